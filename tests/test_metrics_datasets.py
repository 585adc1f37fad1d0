"""Tests of cucrf.metrics and cucrf.datasets on small synthetic data (no shared data files)."""

import imageio.v3 as iio
import numpy as np
import pytest

from cucrf.datasets import Sample, load_pairs, synthetic_unary
from cucrf.metrics import (
    SegmentationScore,
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
)


def _brute_force_cm(pred, label, c, ignore=255):
    cm = np.zeros((c, c), dtype=np.int64)
    for p, t in zip(pred.ravel(), label.ravel()):
        if t == ignore:
            continue
        cm[t, p] += 1
    return cm


def _blocks_label(h=48, w=64, c=4):
    """A label of c vertical stripes plus a rectangle."""
    lab = (np.arange(w)[None, :] * c // w).repeat(h, 0).astype(np.uint8)
    lab[10:30, 20:40] = (lab[10:30, 20:40] + 1) % c
    return lab


# ----------------------------------------------------------------------------- metrics
def test_confusion_matrix_matches_brute_force():
    rng = np.random.default_rng(1)
    c = 5
    label = rng.integers(0, c, size=(13, 17)).astype(np.uint8)
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, c, size=(13, 17)).astype(np.int32)
    cm = confusion_matrix(pred, label, c)
    assert cm.dtype == np.int64 and cm.shape == (c, c)
    np.testing.assert_array_equal(cm, _brute_force_cm(pred, label, c))
    assert cm.sum() == (label != 255).sum()


def test_rows_are_ground_truth():
    cm = confusion_matrix(np.array([1, 1]), np.array([0, 0]), 2)
    np.testing.assert_array_equal(cm, [[0, 2], [0, 0]])


def test_perfect_prediction():
    label = _blocks_label()
    cm = confusion_matrix(label, label, 4)
    assert pixel_accuracy(cm) == 1.0
    np.testing.assert_array_equal(per_class_iou(cm), np.ones(4))
    assert mean_iou(cm) == 1.0


def test_ignore_label_is_ignored():
    label = np.array([[0, 1], [255, 255]], dtype=np.uint8)
    good = np.array([[0, 1], [0, 0]])
    other = np.array([[0, 1], [1, 1]])
    np.testing.assert_array_equal(confusion_matrix(good, label, 2), confusion_matrix(other, label, 2))
    assert pixel_accuracy(confusion_matrix(other, label, 2)) == 1.0
    # a custom ignore value, and no ignoring at all
    assert confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2, ignore_index=1).sum() == 1
    assert confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2, ignore_index=None).sum() == 2


def test_iou_values_and_absent_classes():
    # true: 0 0 1 1 ; pred: 0 1 1 1 ; class 2 absent everywhere
    cm = confusion_matrix(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 3)
    iou = per_class_iou(cm)
    assert iou[0] == pytest.approx(1 / 2)
    assert iou[1] == pytest.approx(2 / 3)
    assert np.isnan(iou[2])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert pixel_accuracy(cm) == pytest.approx(0.75)
    # a class only in the prediction counts (IoU 0)
    cm = confusion_matrix(np.array([0, 2]), np.array([0, 0]), 3)
    assert mean_iou(cm) == pytest.approx((0.5 + 0.0) / 2)


def test_empty_confusion_matrix_gives_nan():
    cm = confusion_matrix(np.array([0]), np.array([255]), 2)
    assert np.isnan(pixel_accuracy(cm)) and np.isnan(mean_iou(cm))


def test_bad_label_value_names_argument_and_value():
    with pytest.raises(ValueError, match=r"label.*7"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError, match=r"pred.*9"):
        confusion_matrix(np.array([0, 9]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match=r"label.*-1"):
        confusion_matrix(np.array([0, 1]), np.array([0, -1]), 3)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(TypeError, match=r"pred.*float"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 2)
    with pytest.raises(TypeError, match=r"label.*float"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), np.float32), 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(np.zeros(2, int), np.zeros(2, int), 0)
    with pytest.raises(ValueError, match=r"square"):
        pixel_accuracy(np.zeros((2, 3)))


def test_segmentation_score_accumulates():
    rng = np.random.default_rng(0)
    score = SegmentationScore(3)
    total = np.zeros((3, 3), np.int64)
    for _ in range(3):
        lab = rng.integers(0, 3, size=(5, 6))
        pred = rng.integers(0, 3, size=(5, 6))
        score.add(pred, lab)
        total += _brute_force_cm(pred, lab, 3)
    np.testing.assert_array_equal(score.cm, total)
    assert score.accuracy == pytest.approx(pixel_accuracy(total))
    assert score.miou == pytest.approx(mean_iou(total))
    np.testing.assert_allclose(score.per_class_iou, per_class_iou(total))
    assert "SegmentationScore" in repr(score)
    score.reset()
    assert score.cm.sum() == 0


# ----------------------------------------------------------------------------- synthetic_unary
def _logsumexp0(x):
    m = x.max(0)
    return m + np.log(np.exp(x - m).sum(0))


def test_synthetic_unary_shape_dtype_logprob():
    lab = _blocks_label()
    u = synthetic_unary(lab, 4, seed=0)
    assert u.shape == (4,) + lab.shape and u.dtype == np.float32 and u.flags.c_contiguous
    np.testing.assert_allclose(_logsumexp0(u.astype(np.float64)), 0.0, atol=1e-5)
    p = synthetic_unary(lab, 4, seed=0, kind="probabilities")
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    assert p.min() >= 1e-5 * 0.99
    np.testing.assert_allclose(np.log(p), u, atol=1e-4)


def test_synthetic_unary_non_divisible_size():
    lab = _blocks_label(37, 29, 3)
    u = synthetic_unary(lab, 3, seed=0)
    assert u.shape == (3, 37, 29)
    np.testing.assert_allclose(_logsumexp0(u.astype(np.float64)), 0.0, atol=1e-5)


def test_synthetic_unary_deterministic_per_seed():
    lab = _blocks_label()
    a = synthetic_unary(lab, 4, seed=3)
    np.testing.assert_array_equal(a, synthetic_unary(lab, 4, seed=3))
    assert not np.array_equal(a, synthetic_unary(lab, 4, seed=4))


def test_synthetic_unary_no_noise_recovers_interior():
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 32:] = 1
    u = synthetic_unary(lab, 2, replace_prob=0.0)
    np.testing.assert_array_equal(u.argmax(0), lab)


def test_synthetic_unary_more_noise_is_worse():
    rng = np.random.default_rng(0)
    # a blocky label so that downsampling alone loses little
    lab = np.kron(rng.integers(0, 5, size=(8, 8)), np.ones((16, 16), int)).astype(np.uint8)

    def acc(p):
        return np.mean([
            pixel_accuracy(confusion_matrix(synthetic_unary(lab, 5, replace_prob=p, seed=s).argmax(0), lab, 5))
            for s in range(3)
        ])

    a0, a2, a5 = acc(0.0), acc(0.2), acc(0.5)
    assert a0 > 0.97
    assert a0 > a2 > a5


def test_synthetic_unary_ignore_is_uniform():
    lab = np.full((16, 16), 255, np.uint8)
    p = synthetic_unary(lab, 4, replace_prob=0.0, kind="probabilities")
    np.testing.assert_allclose(p, 0.25, atol=1e-6)


def test_synthetic_unary_errors():
    lab = _blocks_label()
    with pytest.raises(ValueError, match="label.*9"):
        synthetic_unary(np.full((8, 8), 9, np.uint8), 4)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        synthetic_unary(lab[None], 4)
    with pytest.raises(TypeError, match="dtype"):
        synthetic_unary(lab.astype(np.float32), 4)
    with pytest.raises(ValueError, match="replace_prob"):
        synthetic_unary(lab, 4, replace_prob=1.5)
    with pytest.raises(ValueError, match="kind"):
        synthetic_unary(lab, 4, kind="logits")
    with pytest.raises(ValueError, match="downsample"):
        synthetic_unary(lab, 4, downsample=0)


# ----------------------------------------------------------------------------- load_pairs
def _write_pair(folder, name, h=6, w=5, image=None, label=None):
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    if label is None:
        label = (np.arange(h * w).reshape(h, w) % 3).astype(np.uint8)
    iio.imwrite(folder / f"{name}_image.png", image)
    iio.imwrite(folder / f"{name}_label.png", label)
    return image, label


def test_load_pairs_reads_sorted_samples(tmp_path):
    img_b, lab_b = _write_pair(tmp_path, "b")
    img_a, lab_a = _write_pair(tmp_path, "a", 4, 7)
    (tmp_path / "notes.txt").write_text("unrelated")
    samples = load_pairs(tmp_path)
    assert [s.name for s in samples] == ["a", "b"]
    assert isinstance(samples[0], Sample)
    np.testing.assert_array_equal(samples[0].image, img_a)
    np.testing.assert_array_equal(samples[0].label, lab_a)
    np.testing.assert_array_equal(samples[1].image, img_b)
    assert samples[0].label.dtype == np.uint8 and samples[0].unary is None
    assert load_pairs(tmp_path, names=["b"])[0].name == "b"


def test_load_pairs_grey_and_alpha_images(tmp_path):
    _write_pair(tmp_path, "grey", image=np.full((6, 5), 7, np.uint8))
    _write_pair(tmp_path, "rgba", image=np.full((6, 5, 4), 9, np.uint8))
    s = {x.name: x for x in load_pairs(tmp_path)}
    assert s["grey"].image.shape == (6, 5, 1)
    assert s["rgba"].image.shape == (6, 5, 3)


def test_load_pairs_palette_label(tmp_path):
    from PIL import Image

    lab = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    iio.imwrite(tmp_path / "p_image.png", np.zeros((2, 3, 3), np.uint8))
    im = Image.fromarray(lab, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    im.save(tmp_path / "p_label.png")
    np.testing.assert_array_equal(load_pairs(tmp_path)[0].label, lab)


def test_load_pairs_with_unaries(tmp_path):
    data, un = tmp_path / "data", tmp_path / "un"
    data.mkdir()
    un.mkdir()
    _write_pair(data, "a")
    _write_pair(data, "b")
    logits = np.random.default_rng(0).standard_normal((3, 6, 5)).astype(np.float16)
    np.savez(un / "a_net.npz", logits=logits)
    np.save(un / "b_net.npy", logits * 2)
    s = load_pairs(data, unary_dir=un, unary_pattern="{name}_net.npz", names=["a"])
    np.testing.assert_array_equal(s[0].unary, logits)
    s = load_pairs(data, unary_dir=un, unary_pattern="{name}_net.npy", names=["b"])
    np.testing.assert_array_equal(s[0].unary, logits * 2)
    with pytest.raises(FileNotFoundError, match="b_net.npz"):
        load_pairs(data, unary_dir=un, unary_pattern="{name}_net.npz")
    np.savez(un / "c_bad.npz", logits=logits[:, :4])
    _write_pair(data, "c")
    with pytest.raises(ValueError, match="size mismatch"):
        load_pairs(data, unary_dir=un, unary_pattern="{name}_bad.npz", names=["c"])


def test_load_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no '<id>_image.png'"):
        load_pairs(tmp_path)
    _write_pair(tmp_path, "x")
    iio.imwrite(tmp_path / "lonely_image.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="lonely_image.png has no lonely_label.png"):
        load_pairs(tmp_path)
    (tmp_path / "lonely_image.png").unlink()
    iio.imwrite(tmp_path / "y_image.png", np.zeros((4, 4, 3), np.uint8))
    iio.imwrite(tmp_path / "y_label.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"size mismatch for 'y'.*4x4.*4x5"):
        load_pairs(tmp_path)
    iio.imwrite(tmp_path / "y_label.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel"):
        load_pairs(tmp_path, names=["y"])


# ----------------------------------------------------------------------------- PairDataset
def _folder_with_unaries(tmp_path, n=3, c=3, h=6, w=5):
    data, un = tmp_path / "data", tmp_path / "un"
    data.mkdir()
    un.mkdir()
    rng = np.random.default_rng(5)
    for k, name in enumerate("abcdefgh"[:n]):
        label = rng.integers(0, c, size=(h, w)).astype(np.uint8)
        _write_pair(data, name, h, w, image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), label=label)
        np.savez_compressed(un / f"{name}_net.npz", logits=rng.standard_normal((c, h, w)).astype(np.float16))
    return data, un


def test_pair_dataset_matches_load_pairs_and_reads_lazily(tmp_path, monkeypatch):
    from cucrf import datasets

    data, un = _folder_with_unaries(tmp_path)
    reads = []
    real = datasets._read_image
    monkeypatch.setattr(datasets, "_read_image", lambda p: reads.append(p.name) or real(p))
    ds = datasets.PairDataset(data, unary_dir=un, unary_pattern="{name}_net.npz")
    assert reads == []  # construction lists the folder, nothing more
    assert len(ds) == 3 and ds.names == ("a", "b", "c") and ds.indices == (0, 1, 2)
    assert "3 pairs" in repr(ds)
    full = load_pairs(data, unary_dir=un, unary_pattern="{name}_net.npz")
    reads.clear()
    image = ds.images[1]
    assert reads == ["b_image.png"]  # one item, one file
    np.testing.assert_array_equal(image, full[1].image)
    for k in range(3):
        s = ds[k]
        assert s.name == full[k].name and s.index == k and s.unary_path == un / f"{s.name}_net.npz"
        np.testing.assert_array_equal(s.label, full[k].label)
        np.testing.assert_array_equal(ds.labels[k], full[k].label)
        assert ds.unaries[k].dtype == np.float32  # float16 files are widened
        np.testing.assert_array_equal(ds.unaries[k], full[k].unary.astype(np.float32))
    assert ds[-1].name == "c"
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.images[-4]
    # iterating ends cleanly; slices and subsets keep each pair's position in the folder
    assert [s.name for s in ds] == ["a", "b", "c"]
    part = ds[1:]
    assert part.names == ("b", "c") and part.indices == (1, 2) and len(ds.labels[1:]) == 2
    sub = ds.subset(["c", "a"])
    assert sub.names == ("c", "a") and sub.indices == (2, 0)
    with pytest.raises(ValueError, match="ids not in .*'z'"):
        ds.subset(["a", "z"])
    named = datasets.PairDataset(data, names=["c"], unary_dir=un, unary_pattern="{name}_net.npz")
    assert named.indices == (2,)


def test_pair_dataset_synthetic_seed_is_the_folder_position(tmp_path):
    from cucrf.datasets import PairDataset

    data, _ = _folder_with_unaries(tmp_path)
    ds = PairDataset(data, synthetic=True, num_classes=4, seed=7, downsample=2)
    b = ds.subset(["b"])
    expected = synthetic_unary(ds.labels[1], 4, seed=7 + 1, downsample=2)
    np.testing.assert_array_equal(b.unaries[0], expected)
    np.testing.assert_array_equal(ds[1].unary, expected)
    assert ds.unary_path(0) is None and "synthetic unaries, 4 classes" in repr(ds)
    with pytest.raises(ValueError, match="needs num_classes"):
        PairDataset(data, synthetic=True)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        PairDataset(data, synthetic=True, num_classes=1)
    with pytest.raises(ValueError, match="not both"):
        PairDataset(data, synthetic=True, num_classes=3, unary_dir=data)
    without = PairDataset(data)
    assert without.unaries[0] is None and without.check() is None


def test_pair_dataset_check(tmp_path):
    from cucrf.datasets import PairDataset

    data, un = _folder_with_unaries(tmp_path, c=3)
    ds = PairDataset(data, unary_dir=un, unary_pattern="{name}_net.npz")
    assert ds.check() == 3  # from the unaries
    assert ds.check(3) == 3
    with pytest.raises(ValueError, match=r"unary file '.*a_net.npz' has 3 classes but --num-classes is 4"):
        ds.check(4, name="--num-classes")
    # a label id >= the class count names the label file
    bad = np.zeros((6, 5), np.uint8)
    bad[2, 2] = 3
    iio.imwrite(data / "b_label.png", bad)
    with pytest.raises(ValueError, match=r"label file '.*b_label.png' holds class id 3 but the unaries have 3 "
                                         r"classes .*expected class ids in \[0, 3\) or 255"):
        ds.check()
    syn = PairDataset(data, synthetic=True, num_classes=3)
    with pytest.raises(ValueError, match=r"b_label.png' holds class id 3 but num_classes is 3"):
        syn.check()
    bad[2, 2] = 255  # ignored pixels are fine
    iio.imwrite(data / "b_label.png", bad)
    assert syn.check() == 3
    # sizes: image vs label, unary vs label; one unary with another class count
    iio.imwrite(data / "c_image.png", np.zeros((6, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image file '.*c_image.png' is 6x4 .* label file '.*c_label.png' is 6x5"):
        syn.check()
    _write_pair(data, "c")
    np.save(un / "a_x.npy", np.zeros((3, 6, 4), np.float32))
    with pytest.raises(ValueError, match=r"unary file '.*a_x.npy' is \(3, 6, 4\)"):
        PairDataset(data, names=["a"], unary_dir=un, unary_pattern="{name}_x.npy").check()
    np.save(un / "a_y.npy", np.zeros((3, 6, 5), np.float32))
    np.save(un / "b_y.npy", np.zeros((2, 6, 5), np.float32))
    with pytest.raises(ValueError, match=r"'.*b_y.npy' has 2 classes but the unaries have 3 classes"):
        PairDataset(data, names=["a", "b"], unary_dir=un, unary_pattern="{name}_y.npy").check()
    (un / "a_z.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"cannot read unary file '.*a_z.npz'"):
        PairDataset(data, names=["a"], unary_dir=un, unary_pattern="{name}_z.npz").check()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio trying its plugins on a corrupt file
def test_pair_dataset_errors(tmp_path):
    from cucrf.datasets import PairDataset

    data, un = _folder_with_unaries(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no unary for 'a': '.*a_other.npz' does not exist"):
        PairDataset(data, unary_dir=un, unary_pattern="{name}_other.npz")
    with pytest.raises(ValueError, match="must contain '{name}'"):
        PairDataset(data, unary_dir=un, unary_pattern="fixed.npz")
    with pytest.raises(FileNotFoundError, match="zz_image.png not found"):
        PairDataset(data, names=["zz"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PairDataset(tmp_path / "missing")
    (data / "a_image.png").write_bytes(b"garbage")
    ds = PairDataset(data)
    with pytest.raises(ValueError, match=r"image file '.*a_image.png' is not an image"):
        ds.images[0]
    ds.images[1]  # the others still read


def test_unary_shape_reads_headers(tmp_path):
    from cucrf.datasets import _read_unary, _unary_shape

    arr = np.zeros((4, 3, 2), np.float16)
    for name, save in (("a.npy", np.save), ("b.npz", np.savez), ("c.npz", np.savez_compressed)):
        save(tmp_path / name, arr) if name.endswith("npy") else save(tmp_path / name, meta=np.arange(2), logits=arr)
        assert _unary_shape(tmp_path / name) == _read_unary(tmp_path / name).shape == (4, 3, 2)
    np.savez(tmp_path / "d.npz", x=arr, y=arr)
    with pytest.raises(ValueError, match="expected one named 'logits'"):
        _unary_shape(tmp_path / "d.npz")
    np.save(tmp_path / "e.npy", np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"holds shape \(3, 2\); expected \(C, H, W\)"):
        _unary_shape(tmp_path / "e.npy")


# ----------------------------------------------------------------------------- load_split
def test_load_split(tmp_path):
    import json

    from cucrf.datasets import load_split

    for name in "abcd":
        _write_pair(tmp_path, name)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "c"], "test": ["d"]}))
    assert load_split(path, folder=tmp_path) == {"train": ["a", "c"], "validation": [], "test": ["d"]}
    path.write_text(json.dumps({"train": [1, 2]}))
    assert load_split(path)["train"] == ["1", "2"]  # numeric ids are names too

    cases = [
        ("{not json", r"is not valid JSON"),
        ("[1, 2]", r"holds a JSON list; expected an object"),
        ('{"train": ["a"], "val": ["b"]}', r"has key\(s\) 'val'; expected only 'train', 'validation', 'test'"),
        ('{"train": "a"}', r"'train' must be a list of ids"),
        ('{"train": ["a", null]}', r"'train' must be a list of ids"),
        ('{"train": ["a", "a"]}', r"names id 'a' twice"),
        ('{"train": ["a"], "test": ["a"]}', r"names id 'a' in both 'train' and 'test'"),
        ('{"train": ["a"], "validation": ["x", "y"]}', r"'validation' names id\(s\) 'x', 'y' with no "
                                                      r"<id>_image.png / <id>_label.png pair in"),
    ]
    for text, match in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_split(path, folder=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"split file '.*nope.json' does not exist"):
        load_split(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- broken files
def test_broken_unary_files_are_named(tmp_path):
    from cucrf.datasets import PairDataset

    data, un = _folder_with_unaries(tmp_path, n=1)
    good = (un / "a_net.npz").read_bytes()
    for cut in (good[: len(good) // 2], good[: len(good) - 30]):
        (un / "a_net.npz").write_bytes(cut)
        with pytest.raises(ValueError, match=r"unary file '.*a_net.npz' .*truncated or corrupt"):
            load_pairs(data, unary_dir=un, unary_pattern="{name}_net.npz")
        with pytest.raises(ValueError, match=r"unary file '.*a_net.npz'.*truncated or corrupt"):
            PairDataset(data, unary_dir=un, unary_pattern="{name}_net.npz").unaries[0]
    np.save(un / "a_net.npy", np.zeros((3, 6, 5), np.float32))
    (un / "a_net.npy").write_bytes((un / "a_net.npy").read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"unary file '.*a_net.npy' .*truncated or corrupt"):
        load_pairs(data, unary_dir=un, unary_pattern="{name}_net.npy")


def test_images_are_checked_to_be_images_and_single_frames(tmp_path):
    from PIL import Image

    from cucrf.datasets import _read_image, _read_label

    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(ValueError, match=r"image file '.*t.png' is not an image.*b'hello'"):
        _read_image(tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"label file '.*t.png' is not an image"):
        _read_label(tmp_path / "t.png")
    label = (np.arange(20).reshape(4, 5) % 3).astype(np.uint8)
    Image.fromarray(label).save(tmp_path / "one.gif")
    np.testing.assert_array_equal(_read_label(tmp_path / "one.gif"), label)
    assert _read_image(tmp_path / "one.gif").shape == (4, 5, 3)
    frames = [Image.fromarray(label * 50), Image.fromarray(label * 80)]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"image file '.*two.gif' holds 2 frames"):
        _read_image(tmp_path / "two.gif")
    png = tmp_path / "cut.png"
    iio.imwrite(png, np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    png.write_bytes(png.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cannot decode image file '.*cut.png' as a PNG image.*truncated or corrupt"):
        _read_image(png)
