"""End-to-end tests of the ``cucrf`` command line (cucrf.cli), plus cucrf.palette and the demo scene."""

import json
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
    """Class ids of a paletted label PNG (and check it is paletted)."""
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im)


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
    }
    np.save(files["short"], logits[:, :40])
    np.save(files["hwc"], np.moveaxis(logits, 0, -1))
    files["txt"].write_text("1 2 3")
    files["corrupt"].write_bytes(b"not a numpy file")
    iio.imwrite(files["small_label"], np.zeros((10, 10), np.uint8))
    iio.imwrite(files["big_label"], np.full((H, W), 7, np.uint8))
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
    "demo half pair": (["demo", "--image", "{image}"], "together"),
    "demo size": (["demo", "--image", "{image}", "--label", "{small_label}", "--out", "{out}"], "same size"),
    "demo num classes": (["demo", "--image", "{image}", "--label", "{big_label}", "--num-classes", "3",
                          "--out", "{out}"], "--num-classes"),
    "demo replace prob": (["demo", "--replace-prob", "2"], "[0, 1]"),
    "bad int": (["demo", "--blur", "x"], "invalid int"),
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
    np.testing.assert_array_equal(read_ids(path), labels)
    with Image.open(path) as im:
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
