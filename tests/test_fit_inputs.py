"""cucrf.fit and cucrf fit with careless and hostile inputs: every bad input is one clear error
naming the argument, raised before any training; nothing is modified in place; a resumed run
with other settings is refused, naming the setting."""

import itertools
import logging
import os

import numpy as np
import pytest

import cucrf
from cucrf import _fit, cli
from cucrf._learning import checkpoint as ckpt_mod
from cucrf.datasets import synthetic_unary

C = 3
OPTS = dict(filter_size=5, blur=2, iterations=2, progress=False)


def scene(seed, H=24, W=32):
    r = np.random.default_rng(seed)
    label = np.zeros((H, W), np.uint8)
    label[4:14, 5:20] = 1
    label[15:22, 18:30] = 2
    image = np.clip(r.uniform(0, 255, (C, 3))[label] + r.normal(0, 8, (H, W, 3)), 0, 255).astype(np.uint8)
    return synthetic_unary(label, C, seed=seed, downsample=4).astype(np.float32), image, label


@pytest.fixture(scope="module")
def data():
    return [list(x) for x in zip(*[scene(s) for s in range(4)])]


def refused(exc_type, match, *args, **kwargs):
    """fit(*args, **kwargs) raises ``exc_type`` matching ``match`` before any epoch is scored."""
    calls = []
    with pytest.raises(exc_type, match=match) as info:
        cucrf.fit(*args, callback=calls.append, **{**OPTS, "epochs": 1, **kwargs})
    assert calls == [], "the error came after training had started"
    return info.value


# -- arrays ------------------------------------------------------------------------------------------
def test_masked_unaries_and_images_are_refused(data):
    U, I, L = data
    refused(TypeError, "training sample 0: unary is a masked array", [np.ma.masked_less(U[0], -1), U[1]], I[:2],
            L[:2])
    refused(TypeError, "training sample 1: image is a masked array", U[:2], [I[0], np.ma.masked_less(I[1], 10)],
            L[:2])


def test_a_mapping_is_not_a_sequence_of_images(data):
    U, I, L = data
    refused(TypeError, "unaries must be a sequence .* got a dict", {0: U[0]}, I[:1], L[:1])


def test_a_generator_that_raises_names_the_argument_and_item(data):
    U, I, L = data

    def failing():
        yield I[0]
        raise RuntimeError("disk gone")

    err = refused(RuntimeError, "images: reading item 1 failed: disk gone", U[:2], failing(), L[:2])
    assert isinstance(err.__cause__, RuntimeError)


def test_an_endless_generator_beside_finite_inputs_is_a_length_error(data):
    U, I, L = data
    refused(ValueError, "labels .* more items than unaries", U[:2], I[:2], itertools.cycle(L[:2]))


class Reader:
    """A lazy sequence whose item ``bad`` raises ``exc``."""

    def __init__(self, items, bad, exc):
        self.items, self.bad, self.exc = items, bad, exc

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.bad:
            raise self.exc
        return self.items[i]


class TwoArgumentError(Exception):
    def __init__(self, path, reason):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


@pytest.mark.parametrize("exc, kind", [
    (OSError("cannot read x.png"), OSError),
    (KeyError("x.png"), LookupError),
    (TwoArgumentError("x.png", "bad header"), RuntimeError),
])
def test_a_failing_lazy_reader_names_the_sample(data, exc, kind):
    U, I, L = data
    err = refused(kind, "training sample 1: .*x.png", U[:2], Reader(I[:2], 1, exc), L[:2])
    assert err.__cause__ is exc
    assert "training sample 1: 'training" not in str(err)  # a KeyError's quotes do not wrap the message


# -- labels and ignore_index -------------------------------------------------------------------------
def test_uint16_labels_with_65535_as_ignore_index(data):
    U, I, L = data
    labels = [lab.astype(np.uint16) for lab in L[:2]]
    labels[0][0] = 65535
    before = labels[0].copy()
    result = cucrf.fit(U[:2], I[:2], labels, ignore_index=65535, epochs=1, val_fraction=0, **OPTS)
    assert result.history[-1]["train_loss"] is not None
    np.testing.assert_array_equal(labels[0], before)


def test_an_ignore_index_that_is_a_class_is_refused(data):
    U, I, L = data
    refused(ValueError, r"ignore_index 1 is one of the 3 classes \[0, 3\)", U[:2], I[:2], L[:2], ignore_index=1)


# -- settings ----------------------------------------------------------------------------------------
def test_class_weights_of_the_wrong_kind(data):
    U, I, L = data
    refused(TypeError, "class_weights must be .* got \\['a', 'b', 'c'\\]", U[:2], I[:2], L[:2],
            class_weights=["a", "b", "c"])
    refused(TypeError, "class_weights must be .* got a dict", U[:2], I[:2], L[:2], class_weights={0: 1.0})
    refused(ValueError, "class_weights must be 3 finite non-negative numbers .* got \\[1.0, nan, 1.0\\]",
            U[:2], I[:2], L[:2], class_weights=[1, np.nan, 1])


def test_class_weights_that_weigh_no_labelled_class(data):
    U, I, L = data
    labels = [np.where(lab == 2, 0, lab).astype(np.uint8) for lab in L[:2]]  # class 2 is absent
    refused(ValueError, "class_weights give weight 0 to every class in the training labels", U[:2], I[:2], labels,
            class_weights=[0, 0, 1])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(metric=["miou"]), ValueError, r"metric must be one of .* got \['miou'\]"),
    (dict(dtype="banana"), TypeError, "dtype must be numpy.float32 or numpy.float64, got 'banana'"),
    (dict(seed=-1), ValueError, "seed must be an integer >= 0, got -1"),
    (dict(seed=1.5), ValueError, "seed must be an integer >= 0, got 1.5"),
    (dict(seed=None), ValueError, "seed must be an integer >= 0, got None"),
    (dict(progress="no"), TypeError, "progress must be True or False, got 'no'"),
    (dict(resume="yes", checkpoint="x.npz"), TypeError, "resume must be True or False, got 'yes'"),
    (dict(validation={"unaries": []}), TypeError, "validation must be a tuple .* got a dict"),
    (dict(validation=([], [])), TypeError, "validation must be a tuple .* got a tuple of 2"),
    (dict(checkpoint=5), TypeError, "checkpoint must be a file path .* got 5"),
    (dict(checkpoint=""), ValueError, "checkpoint must be a file path .* got ''"),
])
def test_bad_settings_name_the_argument(data, kwargs, exc, match):
    U, I, L = data
    refused(exc, match, U[:2], I[:2], L[:2], **kwargs)


def test_a_diverging_step_says_so_in_one_short_line(data):
    U, I, L = data
    with pytest.raises(ValueError, match="training diverged") as info:
        cucrf.fit(U[:2], I[:2], L[:2], lr=1e300, epochs=1, val_fraction=0, **OPTS)
    assert len(str(info.value)) < 200


# -- checkpoints -------------------------------------------------------------------------------------
def test_a_read_only_checkpoint_folder_is_refused_before_training(data, tmp_path, monkeypatch):
    U, I, L = data
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(folder)
                        else real_access(p, mode, **kw))
    refused(ValueError, "cannot write the checkpoint .*ro", U[:2], I[:2], L[:2], checkpoint=folder / "ck.npz")


@pytest.mark.parametrize("change, setting", [
    (dict(params=cucrf.CRFParams(theta_alpha=40.0)), "params.theta_alpha was 80.0 and is now 40.0"),
    (dict(class_weights=[1.0, 2.0, 3.0]), "class_weights was None"),
    (dict(ignore_index=254), "ignore_index was 255 and is now 254"),
    (dict(dtype=np.float64), "dtype was 'float32' and is now 'float64'"),
    (dict(weight_decay=0.1), "weight_decay was 0.0 and is now 0.1"),
    (dict(feature_transform=np.eye(3) * 2), "feature_transform was None"),
    (dict(labels="other"), "class_pixels was"),
])
def test_resuming_with_other_settings_names_the_setting(data, tmp_path, change, setting):
    U, I, L = data
    ckpt = tmp_path / "ck.npz"
    kw = dict(epochs=1, val_fraction=0, checkpoint=ckpt, **OPTS)
    cucrf.fit(U[:2], I[:2], L[:2], **kw)
    labels = L[:2]
    if change.pop("labels", None):
        labels = [L[0], np.where(L[1] == 2, 1, L[1]).astype(np.uint8)]
    with pytest.raises(ValueError, match="other settings \\(" + setting.replace("(", "\\(").replace(".", "\\.")):
        cucrf.fit(U[:2], I[:2], labels, resume=True, **{**kw, **change})
    cucrf.fit(U[:2], I[:2], L[:2], resume=True, **kw)  # the same settings resume


def test_checkpoint_without_settings(data, tmp_path):
    U, I, L = data
    path = tmp_path / "ck.npz"
    meta = {"format": "cucrf.fit checkpoint", "version": ckpt_mod.VERSION, "adam_t": 1}
    np.savez(path, meta=np.frombuffer(__import__("json").dumps(meta).encode(), dtype=np.uint8))
    refused(ValueError, "holds no settings", U[:2], I[:2], L[:2], checkpoint=path, resume=True)


# -- the start, returned unchanged ---------------------------------------------------------------------
def perfect(label):
    u = np.zeros((C,) + label.shape, np.float32)
    for c in range(C):
        u[c][label == c] = 1e4
    return u


def test_the_given_feature_transform_is_returned_when_nothing_wins(data, caplog):
    U, I, L = data
    start = cucrf.CRFParams()
    transform = _fit.FeatureTransform(np.eye(3) * 0.5, np.zeros(3))
    val = ([perfect(lab) for lab in L[2:]], I[2:], L[2:])
    with caplog.at_level(logging.INFO, logger="cucrf.fit"):
        result = cucrf.fit(U[:2], I[:2], L[:2], start, validation=val, feature_transform=transform,
                           learn=("feature_transform",), **OPTS, epochs=1)
    assert not result.improved and result.params is start and result.feature_transform is transform
    assert "returning the starting parameters unchanged" in caplog.text


def test_epochs_0_says_the_start_is_returned(data, caplog):
    U, I, L = data
    start = cucrf.CRFParams()
    with caplog.at_level(logging.INFO, logger="cucrf.fit"):
        result = cucrf.fit(U[:2], I[:2], L[:2], start, epochs=0, **OPTS)
    assert result.params is start
    assert "epochs=0: returning the starting parameters unchanged" in caplog.text


def test_nothing_is_modified_in_place(data, tmp_path):
    U, I, L = data
    unaries = [u.astype(np.float64) for u in U]
    images = [im.astype(np.float32) for im in I]
    labels = [lab.astype(np.int32) for lab in L]
    weights = np.array([1.0, 2.0, 1.0])
    compat = 1 - np.eye(C)
    start = cucrf.CRFParams(compatibility=compat)
    transform = (np.eye(3), np.zeros(3))
    inputs = unaries + images + labels + [weights, compat, transform[0], transform[1]]
    copies = [a.copy() for a in inputs]
    cucrf.fit(unaries[:2], images[:2], labels[:2], start, validation=(unaries[2:], images[2:], labels[2:]),
              class_weights=weights, feature_transform=transform, learn=("weights", "compatibility",
                                                                       "feature_transform"),
              checkpoint=tmp_path / "ck.npz", epochs=1, **OPTS)
    for a, b in zip(inputs, copies):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


# -- the command line --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory, data):
    from PIL import Image

    _, I, L = data
    d = tmp_path_factory.mktemp("pairs")
    for k in range(3):
        Image.fromarray(I[k]).save(d / f"p{k}_image.png")
        Image.fromarray(L[k]).save(d / f"p{k}_label.png")
    return d


def run_cli(folder, *extra):
    return cli.main(["fit", str(folder), "--synthetic", "--num-classes", "3", "--filter-size", "5", "--blur", "2",
                     "--iterations", "2", "--no-progress", "--epochs", "1", *extra])


def test_cli_out_that_is_a_file(folder, tmp_path, capsys):
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    assert run_cli(folder, "-o", str(afile)) == 2
    err = capsys.readouterr().err
    assert "-o/--out" in err and "is a file" in err and "Traceback" not in err


def test_cli_negative_seed(folder, tmp_path, capsys):
    assert run_cli(folder, "-o", str(tmp_path / "out"), "--seed", "-1") == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "-1" in err


def test_an_integer_unary_points_to_unary_from_labels(data):
    U, I, L = data
    err = refused(TypeError, "training sample 0: unary must hold float class scores .* got dtype int64; .*"
                  "cucrf.unary_from_labels", [u.astype(np.int64) for u in U[:2]], I[:2], L[:2])
    assert "unary_kind" not in str(err)  # fit has no unary_kind


def test_val_fraction_as_a_numpy_float(data):
    U, I, L = data
    result = cucrf.fit(U[:4], I[:4], L[:4], val_fraction=np.float32(0.25), epochs=0, **OPTS)
    assert result.validation == "1 of 4 images held out for validation"


def test_resuming_on_more_images_names_the_image_count(data, tmp_path):
    U, I, L = data
    kw = dict(epochs=1, val_fraction=0, checkpoint=tmp_path / "ck.npz", **OPTS)
    cucrf.fit(U[:2], I[:2], L[:2], **kw)
    with pytest.raises(ValueError, match="other settings \\(train_images was 2 and is now 3\\)"):
        cucrf.fit(U[:3], I[:3], L[:3], resume=True, **kw)


def test_validation_with_other_classes_names_the_training_unaries(data):
    U, I, L = data
    val = ([u[:2] for u in U[2:]], I[2:], [np.minimum(lab, 1) for lab in L[2:]])
    err = refused(ValueError, "validation sample 0: unary has 2 classes but the training unaries have 3", U[:2],
                  I[:2], L[:2], validation=val)
    assert "num_classes" not in str(err)  # num_classes was not given


def test_a_weight_decay_that_overshoots_is_refused(data):
    U, I, L = data
    refused(ValueError, "weight_decay \\* lr must be < 1 .* got weight_decay=1e\\+06 with lr=0.01", U[:2], I[:2],
            L[:2], weight_decay=1e6, lr=0.01)
