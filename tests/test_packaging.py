"""The release artefacts: what the wheel and the source distribution contain, and the changelog.

The sdist and the wheel are read from the folder named by the environment variable
``CUCRF_DIST`` (``.ci/run`` builds them with ``python -m build`` and sets it); those tests are
skipped when it is unset. The changelog and the installed package's own files are checked always.
"""

import email.parser
import importlib.resources
import os
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

import cucrf

DIST = os.environ.get("CUCRF_DIST")
#: The checkout the tests were run from (None when the tests were copied elsewhere, to test an
#: installed wheel): the project's files and the package's sources.
CHECKOUT = Path(__file__).resolve().parents[1]
SOURCE = CHECKOUT / "cucrf" if (CHECKOUT / "cucrf" / "__init__.py").is_file() else None

needs_dist = pytest.mark.skipif(DIST is None, reason="CUCRF_DIST (folder of the built sdist and wheel) is not set")


def _one(pattern):
    found = sorted(Path(DIST).glob(pattern))
    assert len(found) == 1, f"expected exactly one {pattern} in {DIST}, found {[p.name for p in found]}"
    return found[0]


def _wheel_names():
    with zipfile.ZipFile(_one("cucrf-*.whl")) as whl:
        return set(whl.namelist())


def _source_files():
    """Files of the package in the checkout (relative to the checkout), the tracked ones when git knows."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "cucrf"], cwd=CHECKOUT, capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
        files = {name for name in listed if name and (CHECKOUT / name).is_file()}
    except (OSError, subprocess.SubprocessError):
        files = set()
    if not files:
        files = {p.relative_to(CHECKOUT).as_posix() for p in SOURCE.rglob("*") if p.is_file()}
    return {f for f in files if "__pycache__" not in f and not f.endswith((".pyc", ".pyo"))}


@needs_dist
def test_wheel_holds_every_file_of_the_package():
    if SOURCE is None:
        pytest.skip("the package's sources are not next to the tests (an installed wheel is being tested)")
    names = _wheel_names()
    expected = _source_files()
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    # What the package reads at run time, named so that a packaging change cannot lose them quietly.
    kernels = {n for n in expected if re.fullmatch(r"cucrf/kernels/[^/]+\.cuh?", n)}
    headers = {n for n in expected if re.fullmatch(r"cucrf/testing/[^/]+\.h", n)}
    assert any(n.endswith(".cu") for n in kernels) and "cucrf/testing/cuda_shim.h" in headers
    assert kernels | headers <= names
    assert {n for n in expected if n.startswith("cucrf/data/")} <= names
    # Nothing but the package and its metadata.
    stray = sorted(n for n in names if not n.startswith(("cucrf/", "cucrf-")))
    assert not stray, f"the wheel holds files outside the package: {stray}"


@needs_dist
def test_wheel_metadata():
    whl_path = _one("cucrf-*.whl")
    with zipfile.ZipFile(whl_path) as whl:
        info = next(n.split("/")[0] for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(whl.read(f"{info}/METADATA").decode("utf-8"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode("utf-8")
        init = whl.read("cucrf/__init__.py").decode("utf-8")
        licence = whl.read(f"{info}/licenses/LICENSE").decode("utf-8")
    version = re.search(r'^__version__ = "([^"]+)"', init, re.M).group(1)
    assert meta["Name"] == "cucrf" and meta["Version"] == version
    assert whl_path.name.startswith(f"cucrf-{version}-py3-none-any")
    assert meta["License-Expression"] == "MIT" and "MIT License" in licence
    assert not [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]  # superseded by the expression
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["Description-Content-Type"] == "text/markdown" and "# cucrf" in meta.get_payload()
    requires = meta.get_all("Requires-Dist")
    assert {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires if "extra ==" not in r} == {
        "numpy", "scipy", "imageio", "tqdm"}
    assert re.search(r"^\[console_scripts\]\s*\ncucrf = cucrf\.cli:main$", entry_points, re.M)


@needs_dist
def test_sdist_builds_the_wheel_and_carries_the_tests():
    sdist = _one("cucrf-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = sdist.name[:-len(".tar.gz")]
        names = {m.name[len(top) + 1:] for m in tar.getmembers() if m.isfile()}
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "tests/__init__.py", "tests/oracle.py",
                 "docs/model.md"):
        assert name in names, f"the sdist lacks {name}"
    package = {n for n in _wheel_names() if n.startswith("cucrf/")}
    assert package <= names, f"the sdist lacks {sorted(package - names)}"


def test_installed_package_has_its_kernels_and_headers():
    """The CUDA sources and the emulator's header are found through the package, wherever it is installed."""
    kernels = importlib.resources.files("cucrf.kernels")
    sources = sorted(p.name for p in kernels.iterdir() if p.name.endswith(".cu"))
    assert sources, f"no .cu file in {kernels}"
    for name in sources:
        assert "__global__" in kernels.joinpath(name).read_text(encoding="utf-8"), name
    assert importlib.resources.files("cucrf.testing").joinpath("cuda_shim.h").is_file()


def test_changelog_describes_this_version():
    changelog = CHECKOUT / "CHANGELOG.md"
    if not changelog.is_file():
        pytest.skip(f"{changelog} not found")
    text = changelog.read_text(encoding="utf-8")
    releases = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert releases and releases[0] in ("Unreleased", cucrf.__version__)
    assert cucrf.__version__ in releases, f"CHANGELOG.md has no section for version {cucrf.__version__}"
