"""cucrf.evaluation and the ``cucrf eval`` command on tiny generated data."""

import csv
import re

import imageio.v3 as iio
import numpy as np
import pytest

from cucrf import evaluation, metrics
from cucrf._peers import densecrf_available
from cucrf.cli import main
from cucrf.datasets import load_pairs, synthetic_unary

H, W, C = 24, 32, 3


def _scene(seed):
    """An RGB image of C flat-coloured regions and its label (a few pixels 255)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((H, W), dtype=np.uint8)
    y0, x0 = rng.integers(4, 10), rng.integers(4, 12)
    label[y0:y0 + 10, x0:x0 + 12] = 1
    label[:, -6:] = 2
    colours = np.array([[20, 30, 40], [200, 60, 50], [40, 180, 90]])
    image = np.clip(colours[label] + rng.normal(0, 6, (H, W, 3)), 0, 255).astype(np.uint8)
    label[0, 0] = 255
    return image, label


@pytest.fixture
def data(tmp_path):
    """tmp/sets/{tiny,other}/ with 3 and 2 pairs, tmp/sets/unaries/<id>_net.npz logits."""
    root = tmp_path / "sets"
    (root / "unaries").mkdir(parents=True)
    for folder, n in (("tiny", 3), ("other", 2)):
        (root / folder).mkdir()
        for i in range(n):
            image, label = _scene(10 * len(folder) + i)
            iio.imwrite(root / folder / f"{folder}{i}_image.png", image)
            iio.imwrite(root / folder / f"{folder}{i}_label.png", label)
            logits = synthetic_unary(label, C, downsample=4, seed=100 + i) * 2.0
            np.savez(root / "unaries" / f"{folder}{i}_net.npz", logits=logits.astype(np.float16))
    return root


def test_parse_methods():
    ms = evaluation.parse_methods("unary, cucrf, cucrf:7x1,densecrf,convcrf,convcrf:5x2,cucrf:5x4")
    assert [m.name for m in ms] == ["unary", "cucrf:5x4", "cucrf:7x1", "densecrf", "convcrf:11x4", "convcrf:5x2"]
    for bad, match in [("cucrf:4x4", "odd"), ("cucrf:5x0", "blur"), ("densecrf:5x4", "no window"),
                       ("crf", "unknown method"), ("", "no method"), ("cucrf:5", "unknown method")]:
        with pytest.raises(ValueError, match=match):
            evaluation.parse_methods(bad)


def test_evaluate_scores_and_seeds(data):
    methods = "unary,cucrf:3x2,convcrf:3x2"
    res = evaluation.evaluate(data, ["tiny"], methods, seed=5, downsample=4)
    assert len(res) == 1
    r = res[0]
    assert (r.name, r.num_classes, r.images, r.seed) == ("tiny", C, ["tiny0", "tiny1", "tiny2"], 5)
    samples = load_pairs(data / "tiny")
    # seed of image i is seed + i, and the scores are the confusion matrix summed over the images
    cms = {m: np.zeros((C, C), dtype=np.int64) for m in ("unary", "cucrf:3x2", "convcrf:3x2")}
    for i, s in enumerate(samples):
        u = synthetic_unary(s.label, C, downsample=4, seed=5 + i)
        np.testing.assert_array_equal(evaluation.make_unary(s, i, C, seed=5, downsample=4), u)
        for m in evaluation.parse_methods(methods):
            labels, seconds = evaluation.run_method(m, u, s.image)
            assert labels.shape == (H, W) and seconds >= 0
            cms[m.name] += metrics.confusion_matrix(labels, s.label, C)
    for name, cm in cms.items():
        sc = r[name]
        np.testing.assert_array_equal(sc.cm, cm)
        assert sc.images == 3 and sc.cm.sum() == 3 * (H * W - 1)  # the 255 pixel is ignored
        assert sc.accuracy == metrics.pixel_accuracy(cm)
        assert sc.miou == metrics.mean_iou(cm) and sc.miou_gt == metrics.mean_iou(cm, classes="gt")
    assert r["unary"].seconds == 0 and r["cucrf:3x2"].seconds > 0
    # the CRF cleans up the noisy unary on these easy scenes
    assert r["cucrf:3x2"].accuracy > r["unary"].accuracy
    # deterministic: the same call gives the same matrices; another seed another unary
    again = evaluation.evaluate(data, ["tiny"], methods, seed=5, downsample=4)[0]
    for name in cms:
        np.testing.assert_array_equal(again[name].cm, r[name].cm)
    other = evaluation.evaluate(data, ["tiny"], "unary", seed=6, downsample=4)[0]
    assert not np.array_equal(other["unary"].cm, r["unary"].cm)


def test_real_unaries_max_images_and_set_discovery(data):
    res = evaluation.evaluate(data, ["tiny", "other"], "unary,cucrf:3x1", unaries="net", max_images=2)
    assert [(r.name, len(r.images), r.unaries, r.seed) for r in res] == [("tiny", 2, "net", None),
                                                                          ("other", 2, "net", None)]
    s = load_pairs(data / "tiny", unary_dir=data / "unaries", unary_pattern="{name}_net.npz")
    expected = sum(metrics.confusion_matrix(x.unary.astype(np.float32).argmax(0), x.label, C) for x in s[:2])
    np.testing.assert_array_equal(res[0]["unary"].cm, expected)
    # a folder of pairs is a set by itself; unknown names get their class count from the labels
    assert [r.name for r in evaluation.evaluate(data / "other", None, "unary")] == ["other"]
    assert evaluation.evaluate(data / "other", None, "unary")[0].num_classes == C
    with pytest.raises(FileNotFoundError, match="name the sets"):
        evaluation.find_sets(data)
    with pytest.raises(FileNotFoundError, match="no set 'voc'.*other, tiny"):
        evaluation.find_sets(data, ["voc"])


@pytest.mark.skipif(not densecrf_available(), reason="pydensecrf is not installed")
def test_densecrf_method(data):
    r = evaluation.evaluate(data, ["tiny"], "unary,densecrf", downsample=4)[0]
    assert r["densecrf"].images == 3 and r["densecrf"].seconds > 0
    assert r["densecrf"].accuracy >= r["unary"].accuracy - 0.05


def test_densecrf_needs_rgb():
    m = evaluation.Method("densecrf")
    with pytest.raises(ValueError, match="RGB uint8"):
        evaluation.run_method(m, np.zeros((2, 4, 4), np.float32), np.zeros((4, 4, 1), np.uint8))


def test_table_and_csv(data, tmp_path):
    res = evaluation.evaluate(data, ["tiny", "other"], "unary,cucrf:3x2", downsample=4)
    text = evaluation.format_table(res, per_class=True)
    assert "tiny: 3 images, 3 classes, synthetic unaries, seed 0" in text
    assert "cucrf:3x2" in text and "IoU % / class" in text
    out = tmp_path / "sub" / "res.csv"
    evaluation.write_csv(res, out)
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [(r["set"], r["method"]) for r in rows] == [("tiny", "unary"), ("tiny", "cucrf:3x2"),
                                                       ("other", "unary"), ("other", "cucrf:3x2")]
    first = rows[1]
    sc = res[0]["cucrf:3x2"]
    assert float(first["miou"]) == pytest.approx(sc.miou, abs=1e-6)
    assert float(first["pixel_accuracy"]) == pytest.approx(sc.accuracy, abs=1e-6)
    assert float(first["miou_gain"]) == pytest.approx(sc.miou - res[0]["unary"].miou, abs=1e-6)
    assert float(first["seconds_per_image"]) > 0 and rows[0]["seconds_per_image"] == ""
    assert [float(first[f"iou_{c}"]) for c in range(C)] == pytest.approx(sc.per_class_iou, abs=1e-6)


def test_cli_eval(data, tmp_path, capsys):
    out = tmp_path / "r.csv"
    rc = main(["eval", "--data", str(data), "--set", "tiny,other", "--methods", "unary,cucrf:3x2,convcrf:3x2",
               "--downsample", "4", "--seed", "2", "--csv", str(out), "--no-progress", "--per-class"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "tiny: 3 images" in cap.out and "other: 2 images" in cap.out and "convcrf:3x2" in cap.out
    assert len(list(csv.DictReader(open(out, encoding="utf-8")))) == 6
    rc = main(["eval", "--data", str(data), "--set", "tiny", "--unaries", "net", "--methods", "unary",
               "--max-images", "1", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0 and "tiny: 1 images, 3 classes, unaries net" in cap.out


@pytest.mark.parametrize("argv, status, match", [
    (["--methods", "cucrf:4x4"], 2, "--methods: .*odd"),
    (["--set", "nope"], 1, "no set 'nope'"),
    (["--set", "tiny", "--unaries", "missing"], 1, "no unary for"),
    (["--set", "tiny", "--replace-prob", "2"], 2, "replace-prob"),
])
def test_cli_eval_errors(data, capsys, argv, status, match):
    rc = main(["eval", "--data", str(data), "--no-progress"] + argv)
    err = capsys.readouterr().err
    assert rc == status
    # Notes (e.g. that the optional DenseCRF peer is not installed) may precede the error.
    lines = [line for line in err.strip().splitlines() if not line.startswith("cucrf: note:")]
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: ")
    assert __import__("re").search(match, lines[0]), lines[0]


# -- named parameter sets, feature transforms, include_self, splits -------------------------------

import json  # noqa: E402

import cucrf  # noqa: E402


def test_named_methods():
    base = evaluation.parse_methods("unary,cucrf:3x2")
    p1, p2 = cucrf.CRFParams(appearance_weight=2.0), cucrf.CRFParams(smoothness_weight=1.0)
    ms = evaluation.named_methods(base, {"fit1": (p1, None), "fit2": (p2, {"matrix": np.eye(3)})})
    assert [m.name for m in ms] == ["unary", "cucrf:3x2", "fit1", "fit2"]
    assert (ms[2].filter_size, ms[2].blur, ms[2].params) == (3, 2, p1)
    assert ms[3].feature_transform is not None and ms[2].feature_transform is None
    # several cucrf windows: one row per window; none: cucrf's default window
    two = evaluation.named_methods(evaluation.parse_methods("cucrf:3x2,cucrf:5x1"), {"f": (p1, None)})
    assert [m.name for m in two[2:]] == ["f:3x2", "f:5x1"]
    default = evaluation.named_methods(evaluation.parse_methods("unary"), {"f": (p1, None)})
    assert (default[1].filter_size, default[1].blur) == (cucrf.DEFAULT_FILTER_SIZE, cucrf.DEFAULT_BLUR)
    for bad, match in [("unary", "already a method's name"), ("cucrf:3x2", "must start with a letter"),
                       ("a b", "must start with a letter"), ("", "must start with a letter")]:
        with pytest.raises(ValueError, match=match):
            evaluation.named_methods(base, {bad: (p1, None)})


def test_run_method_with_own_params_transform_and_include_self():
    image, label = _scene(3)
    u = synthetic_unary(label, C, downsample=4, seed=0)
    p = cucrf.CRFParams(appearance_weight=4.0, theta_beta=(10.0, 10.0))
    t = {"matrix": np.array([[1.0, 0, 0], [0, 0.5, 0.5]]), "offset": np.array([0.0, 3.0])}
    m = evaluation.named_methods(evaluation.parse_methods("cucrf:3x2"), {"f": (p, t)})[1]
    labels, _ = evaluation.run_method(m, u, image, params=cucrf.CRFParams(), iterations=2)
    expected = cucrf.infer(u, image, p, filter_size=3, blur=2, iterations=2, feature_transform=t).argmax(0)
    np.testing.assert_array_equal(labels, expected)
    # the plain cucrf method takes the run's params and transform; include_self reaches infer
    plain = evaluation.parse_methods("cucrf:3x2")[0]
    labels, _ = evaluation.run_method(plain, u, image, params=p, feature_transform=t, iterations=2,
                                      include_self=True)
    expected = cucrf.infer(u, image, p, filter_size=3, blur=2, iterations=2, feature_transform=t,
                           include_self=True).argmax(0)
    np.testing.assert_array_equal(labels, expected)


def test_evaluate_names_keep_the_folder_seeds(data):
    r = evaluation.evaluate(data, ["tiny"], "unary", names=["tiny2", "tiny0"], seed=3, downsample=4)[0]
    assert r.images == ["tiny2", "tiny0"]
    s = {x.name: x for x in load_pairs(data / "tiny")}
    # tiny2 is the third pair of the folder: seed 3 + 2, as in a run over the whole set
    expected = sum(metrics.confusion_matrix(synthetic_unary(s[n].label, C, downsample=4, seed=3 + k).argmax(0),
                                            s[n].label, C) for n, k in (("tiny2", 2), ("tiny0", 0)))
    np.testing.assert_array_equal(r["unary"].cm, expected)
    with pytest.raises(ValueError, match="one set"):
        evaluation.evaluate(data, ["tiny", "other"], "unary", names=["tiny0"])


def test_format_table_fits_long_names(data):
    ms = evaluation.named_methods(evaluation.parse_methods("unary"),
                                  {"a_rather_long_parameter_name": (cucrf.CRFParams(), None)})
    res = evaluation.evaluate(data, ["other"], ms, downsample=4, iterations=1)
    line = [x for x in evaluation.format_table(res).splitlines() if "a_rather_long" in x][0]
    assert "a_rather_long_parameter_name " in line


@pytest.fixture
def fitted(tmp_path):
    """Two parameter files and a feature transform, as 'cucrf fit' writes them."""
    files = {"p1": tmp_path / "p1.json", "p2": tmp_path / "p2.json", "ft": tmp_path / "ft.json"}
    cucrf.CRFParams(appearance_weight=2.0).to_json(files["p1"])
    cucrf.CRFParams(smoothness_weight=0.5, theta_beta=(9.0, 9.0, 9.0)).to_json(files["p2"])
    files["ft"].write_text(json.dumps({"matrix": (0.5 * np.eye(3)).tolist(), "offset": [1.0, 2.0, 3.0]}))
    return {k: str(v) for k, v in files.items()}


def run_eval(capsys, *argv):
    rc = main(["eval", "--no-progress", "--downsample", "4", "--iterations", "2"] + list(argv))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def test_cli_eval_named_params(data, fitted, tmp_path, capsys):
    out_csv = tmp_path / "r.csv"
    out = run_eval(capsys, "--data", str(data), "--set", "tiny", "--methods", "unary,cucrf:3x2",
                   "--params", fitted["p1"], "--params", f"fit1={fitted['p1']}", "--params", f"fit2={fitted['p2']}",
                   "--feature-transform", f"fit2={fitted['ft']}", "--csv", str(out_csv))
    rows = {r["method"]: r for r in csv.DictReader(open(out_csv, encoding="utf-8"))}
    assert list(rows) == ["unary", "cucrf:3x2", "fit1", "fit2"]
    for name in rows:
        assert re.search(rf"^\s+{re.escape(name)}\s+\d", out, re.M), out
    # each row is the cucrf method with its own file (the bare --params went to the cucrf row)
    p1, p2 = cucrf.CRFParams.from_json(fitted["p1"]), cucrf.CRFParams.from_json(fitted["p2"])
    ft = json.loads(open(fitted["ft"]).read())
    ms = evaluation.named_methods(evaluation.parse_methods("unary,cucrf:3x2"), {"fit1": (p1, None), "fit2": (p2, ft)})
    ref = evaluation.evaluate(data, ["tiny"], ms, params=p1, downsample=4, iterations=2)[0]
    for name in ("cucrf:3x2", "fit1", "fit2"):
        assert float(rows[name]["miou"]) == pytest.approx(ref[name].miou, abs=1e-6)
    assert rows["cucrf:3x2"]["miou"] == rows["fit1"]["miou"]  # same params, same window
    # several cucrf windows: a row per window; a bare transform goes with the bare params
    out = run_eval(capsys, "--data", str(data), "--set", "other", "--methods", "cucrf:3x2,cucrf:5x1",
                   "--params", f"fit1={fitted['p1']}", "--feature-transform", fitted["ft"], "--include-self")
    assert "fit1:3x2" in out and "fit1:5x1" in out


def test_cli_eval_split_subset(data, tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["tiny0"], "validation": ["tiny1"], "test": ["tiny2"]}))
    (data / "tiny" / "tiny0_image.png").write_bytes(b"not read")  # train images are never read
    out = run_eval(capsys, "--data", str(data), "--set", "tiny", "--methods", "unary", "--split", str(split))
    assert "scoring the 1 'test' images" in out and "tiny: 1 images" in out
    out_csv = tmp_path / "v.csv"
    run_eval(capsys, "--data", str(data), "--set", "tiny", "--methods", "unary,cucrf:3x2", "--split", str(split),
             "--subset", "validation", "--csv", str(out_csv))
    s = load_pairs(data / "tiny", names=["tiny1"])[0]
    cm = metrics.confusion_matrix(synthetic_unary(s.label, C, downsample=4, seed=1).argmax(0), s.label, C)
    row = next(csv.DictReader(open(out_csv, encoding="utf-8")))
    assert int(row["images"]) == 1 and float(row["miou"]) == pytest.approx(metrics.mean_iou(cm), abs=1e-6)


def _eval_error_files(tmp_path, data, fitted):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["tiny0"], "test": ["tiny9", "tiny1"]}))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"train": ["tiny0"]}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{oops")
    ft4 = tmp_path / "ft4.json"
    ft4.write_text(json.dumps({"matrix": np.eye(4).tolist()}))
    ft_keys = tmp_path / "ft_keys.json"
    ft_keys.write_text(json.dumps({"matrix": np.eye(3).tolist(), "bias": [0, 0, 0]}))
    ft_offset = tmp_path / "ft_offset.json"
    ft_offset.write_text(json.dumps({"matrix": np.eye(3).tolist(), "offset": [0, 0]}))
    ft_text = tmp_path / "ft_text.json"
    ft_text.write_text(json.dumps({"matrix": [["a", "b", "c"]]}))
    return dict(fitted, data=str(data), split=str(split), empty=str(empty), bad_json=str(bad_json), ft4=str(ft4),
                ft_keys=str(ft_keys), ft_offset=str(ft_offset), ft_text=str(ft_text))


EVAL_ERRORS = {
    "unknown NAME": (["--params", "a={p1}", "--feature-transform", "b={ft}"], 2,
                     r"--feature-transform b=.*ft.json: no --params named 'b' \(NAMEs given: a\)"),
    "missing params": (["--params", "a=nope.json"], 1, r"--params a='nope.json': cannot read CRF parameters"),
    "malformed params": (["--params", "a={bad_json}"], 1, r"--params a='.*bad.json': .*not valid JSON"),
    "bare params twice": (["--params", "{p1}", "--params", "{p2}"], 2, r"--params given twice without a NAME"),
    "NAME twice": (["--params", "a={p1}", "--params", "a={p2}"], 2, r"--params NAME 'a' given twice"),
    "NAME clash": (["--params", "unary={p1}"], 2, r"--params: parameter set name 'unary' is already"),
    "NAME chars": (["--params", "a b={p1}"], 2, r"NAME 'a b' must start with a letter"),
    "NAME without file": (["--params", "a="], 2, r"no FILE after '='"),
    "missing transform": (["--feature-transform", "nope.json"], 1,
                          r"--feature-transform 'nope.json': the file does not exist; expected the "
                          r"feature_transform.json"),
    "malformed transform": (["--params", "a={p1}", "--feature-transform", "a={bad_json}"], 1,
                            r"--feature-transform a='.*bad.json': not valid JSON"),
    "transform keys": (["--feature-transform", "{ft_keys}"], 1, r"has keys \['bias', 'matrix'\]"),
    "transform offset": (["--feature-transform", "{ft_offset}"], 1, r"'offset' has shape \(2,\) but 'matrix' is 3x3"),
    "transform numbers": (["--feature-transform", "{ft_text}"], 1, r"must hold numbers"),
    "transform channels": (["--params", "a={p1}", "--feature-transform", "a={ft4}"], 1,
                           r"--feature-transform a=.*ft4.json: the matrix is 4x4, for images with 4 channels, but "
                           r"the images of set 'tiny' have 3 channels"),
    "subset without split": (["--subset", "test"], 2, r"--subset test needs --split FILE"),
    "split ids": (["--split", "{split}"], 1, r"--split: split file '.*split.json': 'test' names id\(s\) 'tiny9'"),
    "split missing": (["--split", "nope.json"], 1, r"--split: split file 'nope.json' does not exist"),
    "split malformed": (["--split", "{bad_json}"], 1, r"--split: split file .* is not valid JSON"),
    "split empty subset": (["--split", "{empty}"], 1, r"names no 'test' images"),
    "split two sets": (["--split", "{split}", "--set", "tiny,other"], 2, r"--split names the images of one set, "
                                                                           r"but 2 sets"),
}


@pytest.mark.parametrize("case", sorted(EVAL_ERRORS))
def test_cli_eval_bad_input(case, data, fitted, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _eval_error_files(tmp_path, data, fitted)
    argv, status, match = EVAL_ERRORS[case]
    argv = [a.format(**files) for a in argv]
    if "--set" not in argv:
        argv += ["--set", "tiny"]
    rc = main(["eval", "--data", str(data), "--methods", "unary,cucrf:3x2", "--no-progress"] + argv)
    err = capsys.readouterr().err
    assert rc == status, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("cucrf: note:")]
    assert len(lines) == 1 and lines[0].startswith("cucrf: error: ") and "Traceback" not in err
    assert re.search(match, lines[0]), lines[0]
