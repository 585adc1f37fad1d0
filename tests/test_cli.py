"""End-to-end tests of the ``cucrf`` command line (cucrf.cli), plus cucrf.palette and the demo scene."""

import inspect
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import cucrf
from cucrf import palette
from cucrf._demo_scene import CLASS_NAMES, make_scene
from cucrf.cli import main
from cucrf.datasets import synthetic_unary

REPO = Path(cucrf.__file__).resolve().parents[1]
DEMO_FILES = ["image.png", "truth.png", "noisy.png", "refined.png", "overlay.png", "comparison.png"]
H, W, C = 48, 64, len(CLASS_NAMES)


def read_ids(path):
    """Class ids of a label PNG, checked to read back as the same ids with imageio and Pillow."""
    ids = iio.imread(path)
    assert ids.ndim == 2 and ids.dtype in (np.uint8, np.uint16), (ids.shape, ids.dtype)
    with Image.open(path) as im:
        assert im.mode in ("L", "I;16")  # plain grey, no palette: every reader sees the ids
        np.testing.assert_array_equal(np.asarray(im), ids)
    return ids


def scores(output):
    """(accuracy, mIoU) of the 'noisy' and 'refined' rows of the demo's table, in percent."""
    rows = {}
    for name in ("noisy", "refined"):
        m = re.search(rf"^\s*{name}\s+([\d.]+)%\s+([\d.]+)%\s*$", output, re.M)
        assert m, output
        rows[name] = (float(m.group(1)), float(m.group(2)))
    return rows["noisy"], rows["refined"]


def accuracy(pred, label):
    return float((pred == label).mean())


@pytest.fixture
def pair(tmp_path):
    """A small generated scene on disk: image PNG, label PNG, logits / probability unaries."""
    image, label, _ = make_scene(H, W)
    logits = synthetic_unary(label, C, downsample=4, seed=1)
    paths = {
        "image": tmp_path / "scene.png",
        "label": tmp_path / "scene_label.png",
        "npy": tmp_path / "logits.npy",
        "npz": tmp_path / "unary.npz",
        "probs_npy": tmp_path / "probs.npy",
        "probs_npz": tmp_path / "probs.npz",
    }
    iio.imwrite(paths["image"], image)
    iio.imwrite(paths["label"], label)  # greyscale PNG of class ids
    np.save(paths["npy"], logits)
    # A decoy array first: the CLI must pick the one named 'logits'.
    np.savez(paths["npz"], meta=np.arange(3), logits=logits.astype(np.float16))
    np.save(paths["probs_npy"], np.exp(logits))
    np.savez(paths["probs_npz"], probabilities=np.exp(logits))
    return image, label, logits, {k: str(v) for k, v in paths.items()}


def run_ok(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


# -- demo -----------------------------------------------------------------------------------------


def test_demo_generated_scene(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    out, _ = run_ok(["demo", "--out", str(out_dir), "--per-class"], capsys)
    for name in DEMO_FILES:
        assert (out_dir / name).is_file(), name
    (acc0, miou0), (acc1, miou1) = scores(out)
    assert miou1 > miou0 + 10 and acc1 > acc0
    assert "CRF inference:" in out and "240x320" in out
    for name in CLASS_NAMES:
        assert re.search(rf"^\s*{name}\s", out, re.M)
    truth = read_ids(out_dir / "truth.png")
    _, label, _ = make_scene()
    np.testing.assert_array_equal(truth, label)
    refined = read_ids(out_dir / "refined.png")
    assert refined.shape == (240, 320) and refined.max() < C
    assert iio.imread(out_dir / "overlay.png").shape == (240, 320, 3)
    assert iio.imread(out_dir / "comparison.png").shape[1] >= 4 * 320


def test_python_m_cucrf_demo(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cucrf", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (_, miou0), (_, miou1) = scores(proc.stdout)
    assert miou1 > miou0
    for name in DEMO_FILES:
        assert (tmp_path / "cucrf-demo" / name).is_file()


def test_demo_own_pair(tmp_path, capsys, pair):
    _, label, _, p = pair
    lab = label.copy()
    lab[:4] = 255  # an ignored band: not counted, shown as the ignore colour
    iio.imwrite(p["label"], lab)
    out_dir = tmp_path / "own"
    out, _ = run_ok(["demo", "--image", p["image"], "--label", p["label"], "--out", str(out_dir),
                     "--filter-size", "5", "--blur", "2", "--downsample", "4"], capsys)
    assert f"{H}x{W} pixels, {C} classes" in out
    (_, miou0), (_, miou1) = scores(out)
    assert miou1 > miou0
    assert all((out_dir / n).is_file() for n in DEMO_FILES)
    np.testing.assert_array_equal(read_ids(out_dir / "truth.png"), lab)

    out, _ = run_ok(["demo", "--image", p["image"], "--label", p["label"], "--out", str(out_dir),
                     "--filter-size", "5", "--num-classes", "9"], capsys)
    assert "9 classes" in out


# -- refine ---------------------------------------------------------------------------------------


def test_refine_npy_logits(tmp_path, capsys, pair):
    image, label, logits, p = pair
    out_png, out_npy = tmp_path / "sub" / "refined.png", tmp_path / "q.npy"
    out, _ = run_ok(["refine", p["image"], "--unary", p["npy"], "-o", str(out_png), "--filter-size", "5",
                     "--save-probabilities", str(out_npy)], capsys)
    assert str(out_png) in out
    refined = read_ids(out_png)
    q = np.load(out_npy)
    expected = cucrf.infer(logits, image, filter_size=5)
    np.testing.assert_allclose(q, expected, atol=1e-6)
    np.testing.assert_array_equal(refined, expected.argmax(0))
    assert accuracy(refined, label) > accuracy(logits.argmax(0), label)


def test_refine_npz_picks_logits(tmp_path, capsys, pair):
    image, _, logits, p = pair
    out_png = tmp_path / "r.png"
    run_ok(["refine", p["image"], "-u", p["npz"], "-o", str(out_png), "--filter-size", "5",
            "--iterations", "3", "--save-probabilities"], capsys)
    q = np.load(tmp_path / "r.npy")  # saved next to the PNG
    expected = cucrf.infer(logits.astype(np.float16).astype(np.float32), image, filter_size=5, iterations=3)
    np.testing.assert_allclose(q, expected, atol=1e-6)


@pytest.mark.parametrize("source", ["probs_npy", "probs_npz"])
def test_refine_probabilities(tmp_path, capsys, pair, source):
    image, _, logits, p = pair
    argv = ["refine", p["image"], "-u", p[source], "-o", str(tmp_path / "r.png"), "--filter-size", "5",
            "--save-probabilities"]
    if source == "probs_npy":
        argv += ["--unary-kind", "probabilities"]  # an .npz array named 'probabilities' needs no flag
    _, err = run_ok(argv, capsys)
    assert "looks like probabilities" not in err
    expected = cucrf.infer(np.exp(logits), image, unary_kind="probabilities", filter_size=5)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected, atol=1e-5)


def test_refine_probabilities_as_logits_gives_a_note(tmp_path, capsys, pair):
    _, _, _, p = pair
    rc = main(["refine", p["image"], "-u", p["probs_npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5"])
    assert rc == 0
    assert "--unary-kind probabilities" in capsys.readouterr().err


def test_refine_two_class_label_png_default_confidence(tmp_path, capsys, pair):
    image, _, _, p = pair
    coarse = (image[..., 0] > 127).astype(np.uint8)
    lab_png = tmp_path / "two.png"
    palette.save_label_png(lab_png, coarse)
    run_ok(["refine", p["image"], "-u", str(lab_png), "-o", str(tmp_path / "r.png"), "--num-classes", "2",
            "--unknown-label", "none", "--filter-size", "5", "--save-probabilities"], capsys)
    expected = cucrf.infer(coarse, image, unary_kind="labels", num_classes=2, confidence=0.7, filter_size=5)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected, atol=1e-6)


def test_refine_label_png_with_confidence(tmp_path, capsys, pair):
    image, label, logits, p = pair
    coarse = logits.argmax(0).astype(np.uint8)
    coarse[10:20, 10:30] = 255  # unknown: the CRF fills it in
    lab_png = tmp_path / "coarse.png"
    palette.save_label_png(lab_png, coarse)
    out_png = tmp_path / "r.png"
    run_ok(["refine", p["image"], "-u", str(lab_png), "-o", str(out_png), "--confidence", "0.7",
            "--num-classes", str(C), "--filter-size", "5", "--save-probabilities"], capsys)
    expected = cucrf.infer(coarse, image, unary_kind="labels", num_classes=C, confidence=0.7,
                           unknown_label=255, filter_size=5)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected, atol=1e-6)
    refined = read_ids(out_png)
    assert refined.max() < C  # the unknown pixels got a class
    assert accuracy(refined, label) > accuracy(np.where(coarse == 255, 0, coarse), label)


def test_refine_several_images(tmp_path, capsys, pair):
    image, _, logits, p = pair
    second = tmp_path / "other.jpg"
    iio.imwrite(second, image[:, ::-1].copy())
    other_unary = tmp_path / "other.npy"
    np.save(other_unary, logits[:, :, ::-1])
    out_dir = tmp_path / "out"
    out, err = run_ok(["refine", p["image"], str(second), "--unary", p["npy"], str(other_unary),
                       "--out-dir", str(out_dir), "--filter-size", "5", "--save-probabilities"], capsys)
    for stem in ("scene", "other"):
        assert read_ids(out_dir / f"{stem}.png").shape == (H, W)
        assert np.load(out_dir / f"{stem}.npy").shape == (C, H, W)
    assert "refined 2 images" in out
    assert "2/2" in err  # the progress bar

    outs = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    run_ok(["refine", p["image"], str(second), "-u", p["npy"], str(other_unary), "-o", *outs,
            "--filter-size", "5"], capsys)
    assert all(Path(o).is_file() for o in outs)


def test_refine_with_params_file(tmp_path, capsys, pair):
    image, _, logits, p = pair
    params_file = tmp_path / "params.json"
    run_ok(["params", "-o", str(params_file)], capsys)
    data = json.loads(params_file.read_text())
    assert data == cucrf.CRFParams().to_dict()
    data["appearance_weight"] = 3.0
    params_file.write_text(json.dumps(data))
    run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5",
            "--params", str(params_file), "--save-probabilities"], capsys)
    expected = cucrf.infer(logits, image, cucrf.CRFParams(appearance_weight=3.0), filter_size=5)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected, atol=1e-6)


def test_params_prints_json(capsys):
    out, _ = run_ok(["params"], capsys)
    assert cucrf.CRFParams.from_json(out) == cucrf.CRFParams()


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert cucrf.__version__ in capsys.readouterr().out
    assert main(["refine", "--help"]) == 0
    assert "--unary" in capsys.readouterr().out


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path, pair):
    _, _, logits, p = pair
    files = {
        "short": tmp_path / "short.npy",
        "hwc": tmp_path / "hwc.npy",
        "txt": tmp_path / "u.txt",
        "corrupt": tmp_path / "corrupt.npy",
        "small_label": tmp_path / "small_label.png",
        "big_label": tmp_path / "big_label.png",
        "ft4": tmp_path / "ft4.json",
        "ft_bad": tmp_path / "ft_bad.json",
        "ft_list": tmp_path / "ft_list.json",
    }
    np.save(files["short"], logits[:, :40])
    np.save(files["hwc"], np.moveaxis(logits, 0, -1))
    files["txt"].write_text("1 2 3")
    files["corrupt"].write_bytes(b"not a numpy file")
    iio.imwrite(files["small_label"], np.zeros((10, 10), np.uint8))
    iio.imwrite(files["big_label"], np.full((H, W), 7, np.uint8))
    files["ft4"].write_text(json.dumps({"matrix": np.eye(4).tolist(), "offset": [0, 0, 0, 0]}))
    files["ft_bad"].write_text('{"matrix": [[1, 0, 0]')
    files["ft_list"].write_text("[[1, 0, 0]]")
    return {**p, **{k: str(v) for k, v in files.items()}, "out": str(tmp_path / "o.png")}


ERROR_CASES = {
    "missing image": (["refine", "nope.png", "-u", "{npy}", "-o", "{out}"], "does not exist"),
    "missing unary": (["refine", "{image}", "-u", "nope.npy", "-o", "{out}"], "does not exist"),
    "unary size": (["refine", "{image}", "-u", "{short}", "-o", "{out}"], "(C, 48, 64)"),
    "channels last": (["refine", "{image}", "-u", "{hwc}", "-o", "{out}"], "channels-last"),
    "unary suffix": (["refine", "{image}", "-u", "{txt}", "-o", "{out}"], "expected .npy"),
    "corrupt npy": (["refine", "{image}", "-u", "{corrupt}", "-o", "{out}"], "cannot read unary"),
    "even filter": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--filter-size", "4"], "odd"),
    "huge filter": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--filter-size", "99"], "filter_size"),
    "count mismatch": (["refine", "{image}", "{image}", "-u", "{npy}", "--out-dir", "x"], "1 --unary"),
    "output count": (["refine", "{image}", "-u", "{npy}", "-o", "a.png", "b.png"], "output"),
    "no output": (["refine", "{image}", "-u", "{npy}"], "required"),
    "output suffix": (["refine", "{image}", "-u", "{npy}", "-o", "x.jpg"], ".png"),
    "bad params": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--params", "{{bad json"], "JSON"),
    "unknown param": (["params", "--params", '{{"theta": 1}}'], "unknown CRF parameter"),
    "missing params": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--params", "nope.json"], "nope.json"),
    "label classes": (["refine", "{image}", "-u", "{big_label}", "-o", "{out}", "--num-classes", "3"], "outside"),
    "confidence": (["refine", "{image}", "-u", "{label}", "-o", "{out}", "--confidence", "1.5"], "confidence"),
    "label kind": (["refine", "{image}", "-u", "{label}", "-o", "{out}", "--unary-kind", "logits"], "label map"),
    "label size": (["refine", "{image}", "-u", "{small_label}", "-o", "{out}"], "label map"),
    "num classes": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--num-classes", "3"], "classes"),
    "transform missing": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--feature-transform", "nope.json"],
                          "--feature-transform 'nope.json': the file does not exist; expected the "
                          "feature_transform.json that 'cucrf fit' writes"),
    "transform JSON": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--feature-transform", "{ft_bad}"],
                       "ft_bad.json': not valid JSON"),
    "transform list": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--feature-transform", "{ft_list}"],
                       "ft_list.json': holds a JSON list; expected the feature_transform.json"),
    "transform channels": (["refine", "{image}", "-u", "{npy}", "-o", "{out}", "--feature-transform", "{ft4}"],
                           "the matrix is 4x4, for images with 4 channels, but image"),
    "demo half pair": (["demo", "--image", "{image}"], "together"),
    "demo size": (["demo", "--image", "{image}", "--label", "{small_label}", "--out", "{out}"], "same size"),
    "demo num classes": (["demo", "--image", "{image}", "--label", "{big_label}", "--num-classes", "3",
                          "--out", "{out}"], "--num-classes"),
    "demo replace prob": (["demo", "--replace-prob", "2"], "[0, 1]"),
    "bad int": (["demo", "--blur", "x"], "expected an integer or comma-separated integers"),
    "unknown command": (["bogus"], "invalid choice"),
    "no command": ([], "COMMAND"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line(case, bad_files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs of failing cases land in tmp_path
    template, fragment = ERROR_CASES[case]
    argv = [a.format(**bad_files) for a in template]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cucrf: error: ")
    assert fragment in lines[0]


def test_debug_reraises(pair):
    _, _, _, p = pair
    with pytest.raises(Exception, match="odd"):
        main(["--debug", "refine", p["image"], "-u", p["npy"], "-o", "x.png", "--filter-size", "4"])


def _refused(argv, capsys, option, path, protected, fragment=""):
    """Run ``argv``: exit 2, one error line naming ``option`` and ``path`` (and holding ``fragment``),
    ``protected`` files unchanged."""
    before = {f: Path(f).read_bytes() for f in protected}
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: "), err
    assert option in lines[0] and str(path) in lines[0] and fragment in lines[0], err
    for f, data in before.items():
        assert Path(f).read_bytes() == data, f


def test_refine_refuses_to_overwrite_an_input(tmp_path, capsys, pair):
    _, label, _, p = pair
    inputs = [p["image"], p["npy"], p["label"]]
    base = ["refine", p["image"], "-u", p["npy"]]
    _refused(base + ["-o", p["image"]], capsys, "-o/--output", p["image"], inputs)
    other_spelling = str(tmp_path / "sub" / ".." / "scene.png")
    _refused(base + ["-o", other_spelling], capsys, "-o/--output", other_spelling, inputs)
    link = tmp_path / "link.png"
    os.link(p["image"], link)  # a second name of the image
    _refused(base + ["-o", str(link)], capsys, "-o/--output", link, inputs)
    _refused(["refine", p["image"], "-u", p["label"], "-o", p["label"]], capsys, "-o/--output", p["label"], inputs)
    # --out-dir names the output after the image: the image's own folder would replace it
    _refused(base + ["--out-dir", str(tmp_path)], capsys, "--out-dir", p["image"], inputs)
    # probabilities over the unary, given or next to the output PNG
    _refused(base + ["-o", str(tmp_path / "r.png"), "--save-probabilities", p["npy"]], capsys,
             "--save-probabilities", p["npy"], inputs)
    _refused(base + ["-o", str(tmp_path / "logits.png"), "--save-probabilities"], capsys,
             "--save-probabilities", p["npy"], inputs)
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "logits.png").exists()


def test_refine_refuses_to_overwrite_params_or_feature_transform(tmp_path, capsys, pair):
    _, _, _, p = pair
    params = tmp_path / "params.png"  # odd names, but still inputs
    params.write_text(json.dumps(cucrf.CRFParams().to_dict()))
    transform = tmp_path / "transform.png"
    transform.write_text(json.dumps({"matrix": np.eye(5).tolist(), "offset": [0.0] * 5}))
    base = ["refine", p["image"], "-u", p["npy"]]
    _refused(base + ["--params", str(params), "-o", str(params)], capsys, "-o/--output", params, [params])
    _refused(base + ["--feature-transform", str(transform), "-o", str(transform)], capsys, "-o/--output",
             transform, [transform])


def test_refine_refuses_an_output_under_a_file(tmp_path, capsys, pair):
    _, _, _, p = pair
    out = Path(p["image"]) / "refined.png"
    _refused(["refine", p["image"], "-u", p["npy"], "-o", str(out)], capsys, "-o/--output", out, [p["image"]])
    probs = Path(p["npy"]) / "deeper" / "q.npy"
    _refused(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--save-probabilities",
              str(probs)], capsys, "--save-probabilities", probs, [p["npy"]])
    assert not (tmp_path / "r.png").exists()


# -- palette and the demo scene --------------------------------------------------------------------


def test_palette():
    assert palette.voc_palette(6).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                                               [0, 0, 128], [128, 0, 128]]
    assert len({tuple(c) for c in palette.PALETTE}) == 256  # every id has its own colour
    colours = palette.color_labels(np.array([[0, 1], [15, 255]]))
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    assert colours[1, 1].tolist() == [224, 224, 192]
    with pytest.raises(ValueError):
        palette.color_labels(np.array([[256]]))
    with pytest.raises(TypeError):
        palette.color_labels(np.zeros((2, 2)))


def test_overlay():
    image = np.full((4, 5, 3), 100, np.uint8)
    labels = np.ones((4, 5), np.uint8)
    labels[0, 0] = 255
    out = palette.overlay(image, labels, alpha=0.5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert out[1, 1].tolist() == [114, 50, 50]
    assert out[0, 0].tolist() == [100, 100, 100]  # ignored: the image shows through
    grey = palette.overlay(image[:, :, :1], labels, alpha=0.0)
    np.testing.assert_array_equal(grey, image)
    with pytest.raises(ValueError):
        palette.overlay(image, labels[:3])


def test_save_label_png_roundtrip(tmp_path):
    labels = np.arange(60, dtype=np.uint8).reshape(6, 10)
    labels[0, 0] = 255
    path = tmp_path / "l.png"
    palette.save_label_png(path, labels)
    with Image.open(path) as im:
        assert im.mode == "P"  # palette.save_label_png writes paletted PNGs (VOC's format)
        np.testing.assert_array_equal(np.asarray(im), labels)
        assert im.convert("RGB").getpixel((1, 0)) == tuple(palette.PALETTE[1])


def test_demo_scene_is_deterministic():
    image, label, names = make_scene()
    image2, label2, _ = make_scene()
    assert image.shape == (240, 320, 3) and image.dtype == np.uint8
    assert label.shape == (240, 320) and label.dtype == np.uint8
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(label, label2)
    assert set(np.unique(label)) == set(range(len(names)))
    # every class is a real image region: its mean colour differs from the others'
    means = np.array([image[label == c].mean(axis=0) for c in range(len(names))])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(len(names), dtype=bool)].min() > 10


# -- refine: feature transform, include_self -------------------------------------------------------


def test_refine_feature_transform_and_include_self(tmp_path, capsys, pair):
    image, _, logits, p = pair
    transform = {"matrix": [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], "offset": [0.0, 4.0]}
    ft = tmp_path / "feature_transform.json"
    ft.write_text(json.dumps(transform))
    params = cucrf.CRFParams(theta_beta=(15.0, 15.0))
    params.to_json(tmp_path / "params.json")
    run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5",
            "--params", str(tmp_path / "params.json"), "--feature-transform", str(ft), "--include-self",
            "--save-probabilities"], capsys)
    expected = cucrf.infer(logits, image, params, filter_size=5, feature_transform=transform, include_self=True)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected, atol=1e-6)
    without = cucrf.infer(logits, image, params, filter_size=5, feature_transform=transform)
    assert not np.allclose(expected, without, atol=1e-4)  # include_self made a difference


# -- fit --------------------------------------------------------------------------------------------

FIT_H, FIT_W, FIT_C = 16, 20, 3
FIT_OPTS = ["--filter-size", "3", "--blur", "2", "--iterations", "2"]


def _fit_scene(seed):
    rng = np.random.default_rng(seed)
    label = np.zeros((FIT_H, FIT_W), np.uint8)
    y, x = rng.integers(2, 6), rng.integers(2, 8)
    label[y:y + 8, x:x + 9] = 1
    label[:, -4:] = 2
    colours = np.array([[20, 30, 40], [200, 60, 50], [40, 180, 90]])
    image = np.clip(colours[label] + rng.normal(0, 6, (FIT_H, FIT_W, 3)), 0, 255).astype(np.uint8)
    return image, label


@pytest.fixture
def fit_data(tmp_path):
    """tmp/pairs with 8 tiny pairs (p0..p7), their logits in tmp/unaries, and a split file."""
    folder, unaries = tmp_path / "pairs", tmp_path / "unaries"
    folder.mkdir()
    unaries.mkdir()
    for n in range(8):
        image, label = _fit_scene(n)
        iio.imwrite(folder / f"p{n}_image.png", image)
        iio.imwrite(folder / f"p{n}_label.png", label)
        np.savez(unaries / f"p{n}_net.npz", logits=synthetic_unary(label, FIT_C, downsample=4, seed=n))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["p0", "p1", "p2", "p3"], "validation": ["p4", "p5"],
                                 "test": ["p6", "p7"]}))
    return {"folder": str(folder), "unaries": str(unaries), "split": str(split), "out": str(tmp_path / "out"),
            "tmp": tmp_path}


def _history(scores, metric="miou"):
    key = {"loss": "val_loss"}.get(metric, f"val_{metric}")
    out = []
    for e, s in enumerate(scores):
        entry = {"epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": 0.9 - 0.05 * e, "val_accuracy": 0.5,
                 "val_miou": 0.4, "val_miou_gt": 0.45, "score": s, "lr": None if e == 0 else 0.02,
                 "seconds": 0.1, "images": 0 if e == 0 else 4}
        entry[key] = s
        out.append(entry)
    return out


class FakeFit:
    """Stands in for cucrf.fit: records what the command passes, reads one item, logs, returns a result."""

    def __init__(self, scores=(0.40, 0.55, 0.50), best_epoch=1, improved=True, transform=True):
        self.scores, self.best_epoch, self.improved, self.transform = scores, best_epoch, improved, transform
        self.calls = []
        self.__signature__ = inspect.signature(cucrf.fit)  # the command takes its defaults from fit's

    def __call__(self, unaries, images, labels, params=None, **kwargs):
        from cucrf import _fit

        self.calls.append(dict(kwargs, unaries=unaries, images=images, labels=labels, params=params))
        self.first = (unaries[0], images[0], labels[0])
        logging.getLogger("cucrf.fit").info("resuming at epoch 2 from ck.npz (epochs 0-1 done)")
        metric = kwargs.get("metric", "miou")
        history = _history(self.scores, metric)
        history[-1]["val_accuracy"] = float("nan")  # written as null
        ft = _fit.FeatureTransform(np.eye(3) * 0.5, np.arange(3.0)) if self.transform else None
        return _fit.FitResult(params or cucrf.CRFParams(appearance_weight=7.0), ft, history, self.best_epoch,
                              improved=self.improved, metric=metric)


def test_fit_streams_the_split_and_passes_options(fit_data, capsys, monkeypatch):
    from cucrf import _fit, datasets

    fake = FakeFit()
    monkeypatch.setattr(_fit, "fit", fake)
    reads = []
    real_read = datasets._read_image
    monkeypatch.setattr(datasets, "_read_image", lambda path: reads.append(path.name) or real_read(path))
    # the test images are never read: corrupt them
    for n in (6, 7):
        (Path(fit_data["folder"]) / f"p{n}_image.png").write_bytes(b"never read")
    out, err = run_ok(["fit", fit_data["folder"], "--synthetic", "--num-classes", "4", "--split", fit_data["split"],
                       "--metric", "miou_gt", "--patience", "2", "--include-self", "--epochs", "2", "--no-progress",
                       "--learn", "weights", "--seed", "5", "-o", fit_data["out"]] + FIT_OPTS, capsys)
    call = fake.calls[0]
    # lazy sequences, not lists; only the first training item was decoded (by the fit stand-in)
    for key in ("unaries", "images", "labels"):
        assert not isinstance(call[key], (list, tuple, np.ndarray)) and len(call[key]) == 4
    assert reads == ["p0_image.png"]
    val_u, val_i, val_l = call["validation"]
    assert len(val_u) == len(val_i) == len(val_l) == 2
    # synthetic unaries: --num-classes classes, seed = position in the folder
    u0, i0, l0 = fake.first
    np.testing.assert_array_equal(u0, synthetic_unary(l0, 4, seed=0))
    np.testing.assert_array_equal(val_u[1], synthetic_unary(val_l[1], 4, seed=5))  # p5
    assert i0.shape == (FIT_H, FIT_W, 3)
    assert {k: call[k] for k in ("metric", "patience", "include_self", "num_classes", "epochs", "learn", "seed",
                                 "filter_size", "blur", "iterations", "progress")} == dict(
        metric="miou_gt", patience=2, include_self=True, num_classes=4, epochs=2, learn=["weights"], seed=5,
        filter_size=3, blur=2, iterations=2, progress=False)
    assert "val_fraction" not in call  # the split's validation images are used
    assert "4 training images" in out and "validating on 2 images" in out
    assert "resuming at epoch 2" in err  # fit's log reaches stderr, also with --no-progress

    # without a split: every pair trains, --val-fraction passes through ('auto' too); unaries from files
    fake.calls.clear()
    run_ok(["fit", fit_data["folder"], "--unary-dir", fit_data["unaries"], "--unary-pattern", "{name}_net.npz",
            "--val-fraction", "0.25", "--no-progress", "--max-images", "5", "--patience", "none",
            "-o", fit_data["out"]], capsys)
    call = fake.calls[-1]
    assert len(call["unaries"]) == 5 and call["val_fraction"] == 0.25 and call["patience"] is None
    assert call["num_classes"] == FIT_C and "validation" not in call and call["include_self"] is False
    np.testing.assert_array_equal(fake.first[0], np.load(Path(fit_data["unaries"]) / "p0_net.npz")["logits"])
    run_ok(["fit", fit_data["folder"], "--unary-dir", fit_data["unaries"], "--unary-pattern", "{name}_net.npz",
            "--val-fraction", "auto", "--no-progress", "--max-images", "6", "-o", fit_data["out"]], capsys)
    # options not given take cucrf.fit's defaults
    defaults = {k: v.default for k, v in inspect.signature(cucrf.fit).parameters.items()}
    call = fake.calls[-1]
    assert call["val_fraction"] == "auto"
    for key in ("metric", "patience", "epochs", "lr", "batch_size", "seed"):
        assert call[key] == defaults[key], key
    assert tuple(call["learn"]) == tuple(defaults["learn"])


def test_fit_outputs_and_summary(fit_data, capsys, monkeypatch):
    from cucrf import _fit

    monkeypatch.setattr(_fit, "fit", FakeFit())
    out_dir = Path(fit_data["out"])
    out, err = run_ok(["fit", fit_data["folder"], "--synthetic", "--num-classes", "3", "--no-progress",
                       "-o", str(out_dir)], capsys)
    assert cucrf.CRFParams.from_json(out_dir / "params.json") == cucrf.CRFParams(appearance_weight=7.0)
    history = json.loads((out_dir / "history.json").read_text())  # strict JSON: NaN became null
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[-1]["val_accuracy"] is None
    ft = json.loads((out_dir / "feature_transform.json").read_text())
    assert ft == {"matrix": (np.eye(3) * 0.5).tolist(), "offset": [0.0, 1.0, 2.0]}
    assert ("fitting beat the start: best epoch 1 of 2, validation mIoU over the classes in the ground truth "
            "40.00% -> 55.00%") in out
    written = "params.json feature_transform.json history.json"
    try:
        import matplotlib  # noqa: F401

        assert (out_dir / "training_curve.png").is_file()
        written += " training_curve.png"
    except ImportError:
        pass
    assert f"wrote {written} to" in out

    # no epoch beat the start: said so; no transform learned, none written
    monkeypatch.setattr(_fit, "fit", FakeFit(scores=(0.9, 0.7), best_epoch=0, improved=False, transform=False))
    other = out_dir.parent / "other"
    out, _ = run_ok(["fit", fit_data["folder"], "--synthetic", "--num-classes", "3", "--no-progress",
                     "--metric", "loss", "-o", str(other)], capsys)
    assert ("fitting did not beat the start: no epoch of 1 improved the validation loss (0.9000); params.json "
            "holds the starting parameters") in out
    assert not (other / "feature_transform.json").exists()


def test_fit_logging_is_restored(fit_data, capsys, monkeypatch):
    from cucrf import _fit

    monkeypatch.setattr(_fit, "fit", FakeFit())
    logger = logging.getLogger("cucrf.fit")
    before = (list(logger.handlers), logger.level, logger.propagate)
    _, err = run_ok(["fit", fit_data["folder"], "--synthetic", "--num-classes", "3", "-o", fit_data["out"]], capsys)
    assert err.count("resuming at epoch 2") == 1  # once, with the progress bars on
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_training_curve_figure():
    pytest.importorskip("matplotlib")
    from cucrf.cli.fit import training_curve_figure as _training_curve_figure

    history = _history([0.4, 0.6, 0.5, 0.45])
    fig = _training_curve_figure(history, "miou", 1)
    loss_ax, metric_ax = fig.axes[:2]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert "training loss" in labels and "validation loss" in labels
    metric_lines = {line.get_label(): line for line in metric_ax.get_lines()}
    np.testing.assert_allclose(metric_lines["validation mIoU (selection metric)"].get_ydata(), [40, 60, 50, 45])
    for ax in (loss_ax, metric_ax):  # the best epoch: a vertical line in each panel
        best = [line for line in ax.get_lines() if line.get_label().startswith("best epoch")]
        assert len(best) == 1 and list(best[0].get_xdata()) == [1, 1]
    star = [line for line in metric_ax.get_lines() if line.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [1] and list(star[0].get_ydata()) == [60]
    fig.canvas.draw()
    ticks = [t for t in metric_ax.get_xticks() if metric_ax.get_xlim()[0] <= t <= metric_ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    import matplotlib.pyplot as plt

    plt.close(fig)
    # the metric 'loss' plots the validation loss; without validation, whatever fit scored
    fig = _training_curve_figure(_history([0.9, 0.8], "loss"), "loss", 1)
    assert "validation loss" in fig.axes[1].get_ylabel()
    plt.close(fig)


def test_training_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    from cucrf.cli.fit import plot_history as _plot_history

    assert _plot_history(_history([0.4, 0.5]), tmp_path / "c.png", "accuracy", 1)
    assert iio.imread(tmp_path / "c.png").ndim == 3


def _fit_error_files(d):
    tmp = d["tmp"]
    files = dict(d)
    for name, content in {
        "no_train": {"validation": ["p0"]},
        "bad_ids": {"train": ["p0", "p99"]},
        "bad_json": "{oops",
    }.items():
        path = tmp / f"{name}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        files[name] = str(path)
    big = tmp / "big"
    big.mkdir()
    for n in range(2):
        image, label = _fit_scene(n)
        label[3, 3] = 5 if n == 1 else label[3, 3]
        iio.imwrite(big / f"q{n}_image.png", image)
        iio.imwrite(big / f"q{n}_label.png", label)
    files["big"] = str(big)
    two = tmp / "two"
    two.mkdir()
    np.savez(two / "p0.npz", logits=np.zeros((2, FIT_H, FIT_W), np.float32))
    files["two"] = str(two)
    return files


FIT_ERRORS = {
    "synthetic without num-classes": (["{folder}", "--synthetic"], 2,
                                      r"--synthetic needs --num-classes C: the labels alone do not fix"),
    "label id >= num-classes": (["{big}", "--synthetic", "--num-classes", "4"], 1,
                                r"label file '.*q1_label.png' holds class id 5 but --num-classes is 4; expected class "
                                r"ids in \[0, 4\) or 255"),
    "label id >= unary classes": (["{folder}", "--unary-dir", "{unaries}", "--unary-pattern", "{{name}}_net.npz",
                                   "--num-classes", "2"], 1,
                                  r"unary file '.*p0_net.npz' has 3 classes but --num-classes is 2"),
    "num-classes 1": (["{folder}", "--synthetic", "--num-classes", "1"], 2, r"--num-classes: expected a number of "
                                                                             r"classes >= 2, got 1"),
    "both unary sources": (["{folder}", "--synthetic", "--num-classes", "3", "--unary-dir", "{unaries}"], 2,
                           r"give either --unary-dir or --synthetic"),
    "missing unary": (["{folder}", "--unary-dir", "{two}"], 1, r"no unary for 'p1': '.*two/p1.npz' does not exist"),
    "missing folder": (["nope", "--synthetic", "--num-classes", "3"], 1, r"training folder 'nope' does not exist"),
    "split missing": (["{folder}", "--synthetic", "--num-classes", "3", "--split", "nope.json"], 1,
                      r"--split: split file 'nope.json' does not exist"),
    "split malformed": (["{folder}", "--synthetic", "--num-classes", "3", "--split", "{bad_json}"], 1,
                        r"--split: split file '.*bad_json.json' is not valid JSON"),
    "split ids": (["{folder}", "--synthetic", "--num-classes", "3", "--split", "{bad_ids}"], 1,
                  r"--split: .*'train' names id\(s\) 'p99' with no <id>_image.png / <id>_label.png pair"),
    "split no train": (["{folder}", "--synthetic", "--num-classes", "3", "--split", "{no_train}"], 1,
                       r"--split '.*no_train.json' names no 'train' ids"),
    "split and val-fraction": (["{folder}", "--synthetic", "--num-classes", "3", "--split", "{split}",
                                "--val-fraction", "0.2"], 2, r"names validation images, so --val-fraction 0.2"),
    "val-fraction": (["{folder}", "--synthetic", "--num-classes", "3", "--val-fraction", "1"], 2,
                     r"--val-fraction: expected 'auto' or a number in \[0, 1\), got 1.0"),
    "val-fraction text": (["{folder}", "--synthetic", "--num-classes", "3", "--val-fraction", "most"], 2,
                          r"--val-fraction: expected 'auto' or a number in \[0, 1\), got 'most'"),
    "patience": (["{folder}", "--synthetic", "--num-classes", "3", "--patience", "0"], 2,
                 r"--patience: expected an integer >= 1 or 'none', got 0"),
    "metric": (["{folder}", "--synthetic", "--num-classes", "3", "--metric", "f1"], 2, r"--metric: invalid choice"),
    "learn": (["{folder}", "--synthetic", "--num-classes", "3", "--learn", "weights,colour"], 2, r"--learn"),
    "resume without checkpoint": (["{folder}", "--synthetic", "--num-classes", "3", "--resume"], 2,
                                  r"--resume needs --checkpoint"),
    "params": (["{folder}", "--synthetic", "--num-classes", "3", "--params", "nope.json"], 1,
               r"--params 'nope.json': cannot read CRF parameters"),
}


@pytest.mark.parametrize("case", sorted(FIT_ERRORS))
def test_fit_bad_input(case, fit_data, capsys, monkeypatch):
    from cucrf import _fit

    fake = FakeFit()
    monkeypatch.setattr(_fit, "fit", fake)
    monkeypatch.chdir(fit_data["tmp"])
    files = _fit_error_files(fit_data)
    template, status, match = FIT_ERRORS[case]
    rc = main(["fit"] + [a.format(**files) for a in template] + ["--no-progress", "-o", fit_data["out"]])
    out, err = capsys.readouterr()
    assert rc == status, err
    assert "Traceback" not in err and not fake.calls  # nothing was fitted
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: "), err
    assert re.search(match, lines[0]), lines[0]


def test_fit_end_to_end_then_refine_and_eval(fit_data, capsys):
    out_dir = Path(fit_data["out"])
    ckpt = fit_data["tmp"] / "ck.npz"
    argv = ["fit", fit_data["folder"], "--synthetic", "--num-classes", "3", "--split", fit_data["split"],
            "--epochs", "1", "--learn", "weights,unary_weight,feature_transform", "--no-progress",
            "--checkpoint", str(ckpt), "-o", str(out_dir)] + FIT_OPTS
    out, err = run_ok(argv, capsys)
    assert re.search(r"^fitting (beat|did not beat) the start", out, re.M), out
    assert "epoch 1" in err  # the per-epoch summary, logged
    history = json.loads((out_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert {"train_loss", "val_loss", "val_accuracy", "val_miou", "val_miou_gt", "score"} <= set(history[0])
    params = cucrf.CRFParams.from_json(out_dir / "params.json")
    # run again from the finished checkpoint: fit says where it resumes
    _, err = run_ok(argv + ["--resume"], capsys)
    assert "resuming at epoch 2" in err

    image, label = _fit_scene(6)  # a test image
    folder = Path(fit_data["folder"])
    u = synthetic_unary(label, 3, downsample=4, seed=0)
    np.save(fit_data["tmp"] / "u.npy", u)
    ft_path = out_dir / "feature_transform.json"
    transform = json.loads(ft_path.read_text()) if ft_path.exists() else None
    argv = ["refine", str(folder / "p6_image.png"), "-u", str(fit_data["tmp"] / "u.npy"), "-o",
            str(fit_data["tmp"] / "r.png"), "--params", str(out_dir / "params.json"), "--save-probabilities"]
    argv += ["--feature-transform", str(ft_path)] if transform is not None else []
    run_ok(argv + FIT_OPTS, capsys)
    expected = cucrf.infer(u, image, params, filter_size=3, blur=2, iterations=2, feature_transform=transform)
    np.testing.assert_allclose(np.load(fit_data["tmp"] / "r.npy"), expected, atol=1e-5)

    argv = ["eval", "--data", fit_data["folder"], "--methods", "unary,cucrf:3x2", "--params",
            f"fitted={out_dir / 'params.json'}", "--split", fit_data["split"], "--no-progress", "--iterations", "2"]
    argv += ["--feature-transform", f"fitted={ft_path}"] if transform is not None else []
    out, _ = run_ok(argv, capsys)
    assert "scoring the 2 'test' images" in out and re.search(r"^\s+fitted\s+\d", out, re.M)


# -- structure --------------------------------------------------------------------------------------


def test_one_module_per_command():
    import importlib

    import cucrf.cli

    parser = cucrf.cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert list(commands) == ["demo", "refine", "fit", "eval", "params"]
    for name, sub in commands.items():
        module = importlib.import_module(f"cucrf.cli.{name}")
        assert callable(module.add_parser)
        assert sub.get_default("func") is module.run  # each command runs its own module's code


# -- refine: where the probabilities go ---------------------------------------------------------------


def test_refine_save_probabilities_writes_exactly_the_reported_path(tmp_path, capsys, pair):
    image, _, logits, p = pair
    expected = cucrf.infer(logits, image, filter_size=5)
    base = ["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5"]
    upper = tmp_path / "Q.NPY"  # np.save would append '.npy' to any other spelling
    out, _ = run_ok(base + ["--save-probabilities", str(upper)], capsys)
    assert f"probabilities {upper}" in out
    np.testing.assert_allclose(np.load(upper), expected, atol=1e-6)
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.lower().startswith("q")) == ["Q.NPY"]


def test_refine_save_probabilities_refuses_another_suffix(tmp_path, capsys, pair):
    _, _, _, p = pair
    target = tmp_path / "p.txt"
    rc = main(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--save-probabilities",
               str(target)])
    _, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: --save-probabilities ")
    assert str(target) in lines[0] and "expected a .npy file" in lines[0]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["logits.npy", "probs.npy", "probs.npz", "scene.png",
                                                          "scene_label.png", "unary.npz"]  # nothing written


def test_refine_save_probabilities_into_a_folder(tmp_path, capsys, pair):
    image, _, logits, p = pair
    folder = tmp_path / "probs"
    folder.mkdir()
    second = tmp_path / "other.png"
    iio.imwrite(second, image[::-1].copy())
    np.save(tmp_path / "other.npy", logits[:, ::-1])
    # one folder for every image: each file is named after its output PNG
    out, _ = run_ok(["refine", p["image"], str(second), "-u", p["npy"], str(tmp_path / "other.npy"),
                     "--out-dir", str(tmp_path / "out"), "--filter-size", "5", "--save-probabilities", str(folder)],
                    capsys)
    assert sorted(f.name for f in folder.iterdir()) == ["other.npy", "scene.npy"]
    assert f"probabilities {folder / 'scene.npy'}" in out
    np.testing.assert_allclose(np.load(folder / "scene.npy"), cucrf.infer(logits, image, filter_size=5), atol=1e-6)
    assert not (tmp_path / "probs.npy.npy").exists()
    # a path ending in a separator is a folder too, created when missing
    run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5",
            "--save-probabilities", str(tmp_path / "new") + os.sep], capsys)
    assert (tmp_path / "new" / "r.npy").is_file()


# -- refine: label maps are class ids, pictures are asked for ------------------------------------------


def test_refine_label_map_reads_back_as_class_ids(tmp_path, capsys, pair):
    image, _, logits, p = pair
    out_png = tmp_path / "r.png"
    run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(out_png), "--filter-size", "5"], capsys)
    expected = cucrf.infer(logits, image, filter_size=5).argmax(0)
    ids = iio.imread(out_png)
    assert ids.shape == (H, W) and ids.dtype == np.uint8
    np.testing.assert_array_equal(ids, expected)
    with Image.open(out_png) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), expected)


def test_refine_label_map_is_16_bit_beyond_256_classes(tmp_path, capsys):
    h, w, c = 6, 8, 300
    image = np.zeros((h, w, 3), np.uint8)
    image[:, w // 2:] = 200
    logits = np.zeros((c, h, w), np.float32)
    logits[3, :, : w // 2] = 8.0
    logits[299, :, w // 2:] = 8.0  # a class id beyond 8 bits
    iio.imwrite(tmp_path / "i.png", image)
    np.save(tmp_path / "u.npy", logits)
    run_ok(["refine", str(tmp_path / "i.png"), "-u", str(tmp_path / "u.npy"), "-o", str(tmp_path / "r.png"),
            "--filter-size", "3", "--blur", "1"], capsys)
    ids = read_ids(tmp_path / "r.png")
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, cucrf.infer(logits, image, filter_size=3, blur=1).argmax(0))
    assert ids.max() == 299


def _crf_must_not_run(monkeypatch):
    import cucrf._api

    def refuse(*args, **kwargs):
        raise AssertionError("the CRF ran")

    monkeypatch.setattr(cucrf._api, "infer", refuse)


@pytest.mark.parametrize("case", ["png limit", "overlay limit", "comparison limit", "label map"])
def test_refine_refuses_too_many_classes_before_the_crf(case, tmp_path, capsys, monkeypatch):
    h, w = 2, 3
    iio.imwrite(tmp_path / "i.png", np.zeros((h, w, 3), np.uint8))
    c = 65537 if case == "png limit" else 257
    np.save(tmp_path / "u.npy", np.zeros((c, h, w), np.float32))
    iio.imwrite(tmp_path / "l.png", np.zeros((h, w), np.uint8))
    unary = tmp_path / ("l.png" if case == "label map" else "u.npy")
    argv = ["refine", str(tmp_path / "i.png"), "-u", str(unary), "-o", str(tmp_path / "r.png")]
    argv += {"png limit": [], "overlay limit": ["--overlay", str(tmp_path / "o.png")],
             "comparison limit": ["--comparison", str(tmp_path / "c.png")],
             "label map": ["--num-classes", "70000"]}[case]
    _crf_must_not_run(monkeypatch)
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: "), err
    assert str(unary) in lines[0]
    limit = {"png limit": "at most 65536", "label map": "at most 65536", "overlay limit": "--overlay",
             "comparison limit": "--comparison"}[case]
    assert limit in lines[0], lines[0]
    assert str({"png limit": 65537, "label map": 70000}.get(case, 257)) + " classes" in lines[0]
    assert not (tmp_path / "r.png").exists()


def test_refine_overlay_and_comparison(tmp_path, capsys, pair):
    image, _, logits, p = pair
    out_png, overlay, comparison = tmp_path / "r.png", tmp_path / "pics" / "o.png", tmp_path / "c.png"
    out, _ = run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(out_png), "--filter-size", "5",
                     "--overlay", str(overlay), "--comparison", str(comparison)], capsys)
    refined = read_ids(out_png)
    np.testing.assert_array_equal(iio.imread(overlay), palette.overlay(image, refined, alpha=0.5))
    strip = iio.imread(comparison)
    assert strip.ndim == 3 and strip.shape[2] == 3 and strip.dtype == np.uint8
    assert strip.shape[1] >= 3 * W and strip.shape[0] > H  # image, before, after; captions and legend
    # the panels are in the strip, in order: image, the unary's argmax, the refined labels
    rows = [r for r in range(strip.shape[0] - H + 1)
            if np.array_equal(strip[r:r + H, :W], image)]
    assert len(rows) == 1
    body = strip[rows[0]:rows[0] + H]
    panels = [body[:, i * (W + 4):i * (W + 4) + W] for i in range(3)]
    np.testing.assert_array_equal(panels[1], palette.color_labels(logits.argmax(0)))
    np.testing.assert_array_equal(panels[2], palette.color_labels(refined))
    assert str(overlay) in out and str(comparison) in out
    # nothing but the label map unless asked
    run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "plain.png"), "--filter-size", "5"], capsys)
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith("plain")) == ["plain.png"]


def test_refine_pictures_next_to_each_output_or_in_a_folder(tmp_path, capsys, pair):
    image, _, logits, p = pair
    run_ok(["refine", p["image"], "-u", p["npy"], "--out-dir", str(tmp_path / "out"), "--filter-size", "5",
            "--overlay", "--comparison"], capsys)
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["scene.png", "scene_comparison.png",
                                                                    "scene_overlay.png"]
    (tmp_path / "ov").mkdir()
    run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5",
            "--overlay", str(tmp_path / "ov")], capsys)
    assert iio.imread(tmp_path / "ov" / "r.png").shape == (H, W, 3)


def test_refine_refuses_a_picture_over_another_output(tmp_path, capsys, pair):
    _, _, _, p = pair
    out = tmp_path / "r.png"
    _refused(["refine", p["image"], "-u", p["npy"], "-o", str(out), "--overlay", str(out)], capsys,
             "--overlay", out, [p["image"]], "is also the -o/--output path")
    _refused(["refine", p["image"], "-u", p["npy"], "-o", str(out), "--comparison", str(tmp_path / "c.jpg")],
             capsys, "--comparison", tmp_path / "c.jpg", [p["image"]], "expected a .png file")
    _refused(["refine", p["image"], "-u", p["npy"], "-o", str(out), "--overlay", p["image"]], capsys,
             "--overlay", p["image"], [p["image"]], "is the image")
    assert not out.exists()


def test_demo_label_maps_read_back_as_class_ids(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    run_ok(["demo", "--out", str(out_dir)], capsys)
    _, label, _ = make_scene()
    for name in ("truth.png", "noisy.png", "refined.png"):
        ids = iio.imread(out_dir / name)
        assert ids.shape == label.shape and ids.dtype == np.uint8, name
    np.testing.assert_array_equal(iio.imread(out_dir / "truth.png"), label)


# -- messages: every error names the file or option, what it got and what it expects ----------------


def _one_error_line(rc, err, status=1):
    assert rc == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: "), err
    return lines[0]


def test_truncated_npz_unary_names_the_file(tmp_path, capsys, pair):
    _, _, logits, p = pair
    data = Path(p["npz"]).read_bytes()
    for name, cut in (("tail.npz", data[: len(data) // 2]), ("head.npz", data[: len(data) - 30])):
        bad = tmp_path / name
        bad.write_bytes(cut)
        line = _one_error_line(main(["refine", p["image"], "-u", str(bad), "-o", str(tmp_path / "r.png")]),
                               capsys.readouterr().err)
        assert str(bad) in line and "truncated or corrupt" in line and ".npz" in line, line
        assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("role", ["image", "label map", "demo label", "demo image"])
def test_a_text_file_named_png_is_not_an_image(role, tmp_path, capsys, pair):
    _, _, _, p = pair
    fake = tmp_path / "fake.png"
    fake.write_text("hello, not a picture\n")
    argv = {"image": ["refine", str(fake), "-u", p["npy"], "-o", str(tmp_path / "r.png")],
            "label map": ["refine", p["image"], "-u", str(fake), "-o", str(tmp_path / "r.png")],
            "demo label": ["demo", "--image", p["image"], "--label", str(fake), "--out", str(tmp_path / "d")],
            "demo image": ["demo", "--image", str(fake), "--label", p["label"], "--out", str(tmp_path / "d")]}[role]
    line = _one_error_line(main(argv), capsys.readouterr().err)
    assert str(fake) in line and "is not an image" in line and "PNG" in line, line
    assert "pip install" not in line and "plugin" not in line
    assert "b'hello, not a pic'" in line  # what the file holds instead


def test_a_truncated_png_is_named(tmp_path, capsys, pair):
    _, _, _, p = pair
    cut = tmp_path / "cut.png"
    data = Path(p["image"]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    line = _one_error_line(main(["refine", str(cut), "-u", p["npy"], "-o", str(tmp_path / "r.png")]),
                           capsys.readouterr().err)
    assert str(cut) in line and "PNG" in line and "truncated or corrupt" in line, line


@pytest.mark.parametrize("command", ["demo", "fit", "fit checkpoint", "eval csv", "params"])
def test_an_output_under_a_file_is_refused_before_any_work(command, tmp_path, capsys, fit_data):
    afile = tmp_path / "img.png"
    afile.write_bytes(b"a file, not a folder")
    under = afile / "sub" / "out"
    fit = ["fit", fit_data["folder"], "--synthetic", "--num-classes", "3", "--no-progress"] + FIT_OPTS
    argv, option = {
        "demo": (["demo", "--out", str(under)], "--out"),
        "fit": (fit + ["-o", str(under)], "-o/--out"),
        "fit checkpoint": (fit + ["-o", str(tmp_path / "o"), "--checkpoint", str(under) + ".npz"], "--checkpoint"),
        "eval csv": (["eval", "--data", fit_data["folder"], "--methods", "unary", "--no-progress",
                      "--csv", str(under) + ".csv"], "--csv"),
        "params": (["params", "-o", str(under) + ".json"], "-o/--output"),
    }[command]
    line = _one_error_line(main(argv), capsys.readouterr().err, status=2)
    assert option in line and str(afile) in line and "is a file, not a folder" in line, line
    assert "File exists" not in line
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "o").exists()


def test_demo_refuses_to_overwrite_its_inputs(tmp_path, capsys, pair):
    image, label, _, _ = pair
    folder = tmp_path / "mine"
    folder.mkdir()
    iio.imwrite(folder / "image.png", image)
    iio.imwrite(folder / "truth.png", label)
    before = (folder / "image.png").read_bytes()
    line = _one_error_line(main(["demo", "--image", str(folder / "image.png"), "--label", str(folder / "truth.png"),
                                 "--out", str(folder)]), capsys.readouterr().err, status=2)
    assert "--out" in line and str(folder / "image.png") in line and "is the image" in line, line
    assert (folder / "image.png").read_bytes() == before


def test_demo_refuses_a_16_bit_image_before_any_work(tmp_path, capsys, pair):
    image, _, _, p = pair
    img16 = tmp_path / "img16.png"
    iio.imwrite(img16, image[:, :, 0].astype(np.uint16) * 257)  # 16-bit grey PNG
    out_dir = tmp_path / "d16"
    rc = main(["demo", "--image", str(img16), "--label", p["label"], "--out", str(out_dir), "--filter-size", "5"])
    out, err = capsys.readouterr()
    line = _one_error_line(rc, err)
    assert str(img16) in line and "16-bit" in line and "8-bit" in line, line
    assert out == "" and not out_dir.exists()  # nothing printed, nothing left behind


def test_demo_refuses_more_classes_than_it_can_colour_before_any_work(tmp_path, capsys, pair):
    image, label, _, p = pair
    lab16 = tmp_path / "lab16.png"
    big = label.astype(np.uint16)
    big[0, 0] = 300
    iio.imwrite(lab16, big)
    out_dir = tmp_path / "d"
    rc = main(["demo", "--image", p["image"], "--label", str(lab16), "--out", str(out_dir)])
    out, err = capsys.readouterr()
    line = _one_error_line(rc, err)
    assert str(lab16) in line and "301 classes" in line and "256" in line, line
    assert out == "" and not out_dir.exists()


def test_single_frame_gifs_are_read(tmp_path, capsys, pair):
    image, label, logits, p = pair
    Image.fromarray(image).save(tmp_path / "scene.gif")
    # a paletted label GIF: the palette indices are the class ids
    lab = Image.fromarray(label).convert("P")
    lab.putpalette(palette.PALETTE.tobytes())
    lab.save(tmp_path / "label.gif")
    with Image.open(tmp_path / "label.gif") as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im), label)
    assert iio.imread(tmp_path / "scene.gif").shape[0] == 1  # imageio reads GIFs as a stack of frames
    gif_image = np.asarray(Image.open(tmp_path / "scene.gif").convert("RGB"))
    run_ok(["refine", str(tmp_path / "scene.gif"), "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size",
            "5", "--save-probabilities"], capsys)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), cucrf.infer(logits, gif_image, filter_size=5), atol=1e-6)
    run_ok(["refine", p["image"], "-u", str(tmp_path / "label.gif"), "-o", str(tmp_path / "l.png"),
            "--filter-size", "5", "--num-classes", str(C), "--save-probabilities"], capsys)
    expected = cucrf.infer(label, image, unary_kind="labels", num_classes=C, unknown_label=255, filter_size=5)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), expected, atol=1e-6)
    out, _ = run_ok(["demo", "--image", str(tmp_path / "scene.gif"), "--label", str(tmp_path / "label.gif"),
                     "--out", str(tmp_path / "d"), "--filter-size", "5"], capsys)
    assert f"{H}x{W} pixels, {C} classes" in out


def test_an_animated_gif_is_refused(tmp_path, capsys, pair):
    image, _, _, p = pair
    frames = [Image.fromarray(image), Image.fromarray(255 - image)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    line = _one_error_line(main(["refine", str(tmp_path / "anim.gif"), "-u", p["npy"], "-o", str(tmp_path / "r.png")]),
                           capsys.readouterr().err)
    assert str(tmp_path / "anim.gif") in line and "2 frames" in line and "a single image" in line, line


@pytest.mark.parametrize("command", [[], ["demo"], ["refine"], ["fit"], ["eval"], ["params"]])
def test_help_shows_single_percent_signs(command, capsys):
    assert main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "%(" not in out
    if command in (["demo"], ["eval"]):
        assert "20% of the" in out.replace("\n", " ")


def test_a_closed_pipe_ends_quietly(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv in (["params"], ["--help"], ["refine", "--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "cucrf", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # as 'cucrf params | head -0' does: nobody reads
        err = proc.stderr.read().decode()
        rc = proc.wait(timeout=60)
        proc.stderr.close()
        assert err == "", err
        assert rc in (0, 141)  # 141: the status of a command ended by SIGPIPE, which shells expect


def test_refine_no_progress(tmp_path, capsys, pair):
    image, _, logits, p = pair
    second = tmp_path / "b.png"
    iio.imwrite(second, image[::-1].copy())
    argv = ["refine", p["image"], str(second), "-u", p["npy"], p["npy"], "--out-dir", str(tmp_path / "out"),
            "--filter-size", "5", "--iterations", "1"]
    _, err = run_ok(argv, capsys)
    assert "2/2" in err
    out, err = run_ok(argv + ["--no-progress"], capsys)
    assert "2/2" not in err and "it/s" not in err and "image/s" not in err and "refined 2 images" in out


@pytest.mark.parametrize("name, expected", [("2007_000033_image.png", "2007_000033.png"),
                                            ("scene.jpg", "scene.png"), ("p4-image.png", "p4.png"),
                                            ("aachen_000000_000019_leftImg8bit.png", "aachen_000000_000019.png"),
                                            ("x_img.png", "x.png"), ("_image.png", "_image.png"),
                                            ("my_imagery.png", "my_imagery.png")])
def test_refine_out_dir_names_the_label_map_after_the_image(name, expected, tmp_path, capsys, pair):
    image, _, _, p = pair
    src = tmp_path / "in" / name
    src.parent.mkdir()
    iio.imwrite(src, image)
    run_ok(["refine", str(src), "-u", p["npy"], "--out-dir", str(tmp_path / "out"), "--filter-size", "5",
            "--iterations", "1"], capsys)
    assert [f.name for f in (tmp_path / "out").iterdir()] == [expected]


def test_eval_per_class_shows_class_names(tmp_path, capsys):
    from cucrf.datasets import CLASS_NAMES

    data = tmp_path / "data"
    folder = data / "msrc"
    folder.mkdir(parents=True)
    for n in range(2):
        image, label = _fit_scene(n)
        iio.imwrite(folder / f"m{n}_image.png", image)
        iio.imwrite(folder / f"m{n}_label.png", label)
    out, _ = run_ok(["eval", "--data", str(data), "--methods", "unary,cucrf:3x2", "--iterations", "1",
                     "--no-progress", "--per-class"], capsys)
    assert len(CLASS_NAMES["msrc"]) == 23 and CLASS_NAMES["msrc"][:3] == ["building", "grass", "tree"]
    for i, name in enumerate(CLASS_NAMES["msrc"]):
        assert re.search(rf"^\s+{i} {name}\s", out, re.M), name
    row = re.search(r"^\s+1 grass\s+([\d.]+)\s+([\d.]+)\s*$", out, re.M)
    assert row, out  # one column per method
    # a folder of unknown classes: --class-names names them
    out, _ = run_ok(["eval", "--data", str(folder), "--methods", "unary", "--num-classes", "3", "--no-progress",
                     "--per-class", "--class-names", "dark,red,green"], capsys)
    assert re.search(r"^\s+2 green\s", out, re.M), out
    line = _one_error_line(main(["eval", "--data", str(folder), "--methods", "unary", "--num-classes", "3",
                                 "--no-progress", "--class-names", "dark,red"]), capsys.readouterr().err)
    assert "--class-names" in line and "2 names" in line and "3 classes" in line, line


# -- input checks shared with the API: cucrf.InputWarning as 'cucrf: warning:' lines -----------------


def _warning_lines(err):
    return [line for line in err.strip().splitlines() if line]


def test_refine_reports_input_warnings_as_one_line_each(tmp_path, capsys, pair):
    image, _, logits, p = pair
    energies = tmp_path / "energies.npy"  # pydensecrf's unary_from_softmax: -log(p), all >= 0
    np.save(energies, -np.log(np.clip(np.exp(logits), 1e-5, None)))
    cases = {p["probs_npy"]: ("looks like probabilities", "--unary-kind probabilities"),
             str(energies): ("looks like energies", "-energies")}
    for path, fragments in cases.items():
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("error", cucrf.InputWarning)  # none may escape as a Python warning
            _, err = run_ok(["refine", p["image"], "-u", path, "-o", str(tmp_path / "r.png"), "--filter-size", "5"],
                            capsys)
        lines = _warning_lines(err)
        assert len(lines) == 1, err  # once, not again from cucrf.infer
        assert lines[0].startswith(f"cucrf: warning: unary {path!r} looks like "), lines[0]
        assert all(f in lines[0] for f in fragments), lines[0]
        assert "unary_kind=" not in lines[0]  # the command line's option, not the Python argument
    # logits: no warning at all
    _, err = run_ok(["refine", p["image"], "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5"], capsys)
    assert err == ""


def test_refine_warns_about_a_16_bit_image(tmp_path, capsys, pair):
    image, _, logits, p = pair
    img16 = tmp_path / "img16.png"
    iio.imwrite(img16, image[:, :, 0].astype(np.uint16) * 257)
    _, err = run_ok(["refine", str(img16), "-u", p["npy"], "-o", str(tmp_path / "r.png"), "--filter-size", "5"],
                    capsys)
    lines = _warning_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"cucrf: warning: image {str(img16)!r} is 16-bit"), err
    assert "16-bit" in lines[0] and "theta_beta" in lines[0] and "0..255" in lines[0]


def test_eval_reports_each_kind_of_input_warning_once(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    unaries = tmp_path / "unaries"
    unaries.mkdir()
    for n in range(3):
        image, label = _fit_scene(n)
        iio.imwrite(folder / f"p{n}_image.png", image)
        iio.imwrite(folder / f"p{n}_label.png", label)
        probs = np.exp(synthetic_unary(label, FIT_C, downsample=4, seed=n))  # probabilities stored as logits
        np.savez(unaries / f"p{n}_net.npz", logits=probs)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", cucrf.InputWarning)
        _, err = run_ok(["eval", "--data", str(folder), "--unaries", "net", "--unary-dir", str(unaries),
                         "--methods", "unary,cucrf:3x2", "--iterations", "1", "--no-progress"], capsys)
    lines = [line for line in _warning_lines(err) if not line.startswith("cucrf: note:")]
    assert len(lines) == 1 and lines[0].startswith("cucrf: warning: ") and "looks like probabilities" in lines[0], err
