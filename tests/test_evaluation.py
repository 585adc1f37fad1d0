"""cucrf.evaluation and the ``cucrf eval`` command on tiny generated data."""

import csv

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
