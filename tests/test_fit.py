"""cucrf.fit: learning, selection (the exact start when nothing wins), the objective's gradient,
validation plans, streaming data, checkpoints and every bad input."""

import json
import logging
import math

import numpy as np
import pytest

import cucrf
from cucrf import _api, _fit
from cucrf._learning import checkpoint as ckpt_mod
from cucrf._learning import objective, parameters, selection, trainer
from cucrf._learning.data import Dataset, batches
from cucrf.datasets import synthetic_unary

C = 3
OPTS = dict(filter_size=5, blur=2, iterations=3, progress=False)


def scene(seed, H=32, W=40):
    """Two coloured rectangles on a background, a noisy image and the paper's synthetic unary."""
    r = np.random.default_rng(seed)
    label = np.zeros((H, W), np.uint8)
    for c in (1, 2):
        y0, x0 = r.integers(0, H - 10), r.integers(0, W - 12)
        label[y0:y0 + r.integers(6, 14), x0:x0 + r.integers(6, 16)] = c
    colours = r.uniform(0, 255, (C, 3))
    image = np.clip(colours[label] + r.normal(0, 8, (H, W, 3)), 0, 255).astype(np.uint8)
    label[r.random((H, W)) < 0.01] = 255  # a few unlabelled pixels
    return synthetic_unary(label, C, seed=seed, downsample=4), image, label


@pytest.fixture(scope="module")
def data():
    return [list(x) for x in zip(*[scene(s) for s in range(14)])]


def perfect(label):
    """Confident one-hot logits of the label (unlabelled pixels uniform): nothing can beat them."""
    u = np.zeros((C,) + label.shape, np.float32)
    for c in range(C):
        u[c][label == c] = 1e4  # far above any message: the CRF cannot change a label
    return u


# -- learning ---------------------------------------------------------------------------------------
def test_fit_raises_validation_scores_and_returns_the_best_epoch(data):
    U, I, L = data
    start = cucrf.CRFParams(appearance_weight=1.0, smoothness_weight=1.0)  # weaker than the data wants
    result = cucrf.fit(U[:10], I[:10], L[:10], start, validation=(U[10:], I[10:], L[10:]), epochs=3, lr=0.05,
                       patience=None, **OPTS)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert result.improved and result.best_epoch > 0 and result.validation == "4 validation images given"
    first, best = result.history[0], result.history[result.best_epoch]
    assert result.metric == "miou_gt" and best["val_miou_gt"] > first["val_miou_gt"] + 0.01
    for k in ("val_accuracy", "val_miou_gt"):  # the guard: neither below the start's
        assert best[k] >= first[k]
    assert best["score"] == best["val_miou_gt"]
    assert max(h["val_miou_gt"] for h in result.history if all(h[k] >= first[k] for k in
               ("val_accuracy", "val_miou_gt"))) == best["val_miou_gt"]
    # what infer computes with the returned parameters is what was scored
    score = cucrf.metrics.SegmentationScore(C)
    for u, im, lab in zip(U[10:], I[10:], L[10:]):
        score.add(cucrf.infer(u, im, result.params, filter_size=5, blur=2, iterations=3).argmax(0), lab)
    assert score.miou == pytest.approx(best["val_miou"], abs=1e-12)
    assert cucrf.metrics.mean_iou(score.cm, "gt") == pytest.approx(best["val_miou_gt"], abs=1e-12)
    assert result.temperature > 0 and math.isfinite(result.temperature)
    json.dumps(result.to_dict())


def test_nothing_wins_returns_the_exact_start(data, caplog):
    U, I, L = data
    start = cucrf.CRFParams(theta_alpha=80.0, appearance_weight=10.0)
    val = ([perfect(lab) for lab in L[10:]], I[10:], L[10:])  # the start already scores 100 %
    with caplog.at_level(logging.INFO, logger="cucrf.fit"):
        result = cucrf.fit(U[:4], I[:4], L[:4], start, validation=val, epochs=2, lr=0.05, **OPTS)
    assert result.history[0]["val_accuracy"] == 1.0
    assert not result.improved and result.best_epoch == 0
    assert result.params is start and result.params.is_potts and result.params.theta_alpha == 80.0
    assert result.feature_transform is None
    assert "returning the starting parameters unchanged" in caplog.text
    assert len(result.history) == 3  # it did train; nothing was better


def test_selection_guard_margin_and_patience():
    sel = selection.Selection("miou_gt", patience=2, min_improvement=0.01)
    sel.update({"epoch": 0, "val_accuracy": 0.9, "val_miou": 0.5, "val_miou_gt": 0.6})
    assert not sel.update({"epoch": 1, "val_accuracy": 0.89, "val_miou": 0.7, "val_miou_gt": 0.7})  # accuracy fell
    assert not sel.update({"epoch": 2, "val_accuracy": 0.95, "val_miou": 0.49, "val_miou_gt": 0.8})  # mIoU fell
    assert not sel.should_stop  # the score kept rising: no patience spent
    assert not sel.update({"epoch": 3, "val_accuracy": 0.95, "val_miou": 0.6, "val_miou_gt": 0.605})  # < margin
    assert sel.update({"epoch": 4, "val_accuracy": 0.95, "val_miou": 0.6, "val_miou_gt": 0.62})
    assert sel.best_epoch == 4 and sel.stale == 2 and sel.should_stop  # not above 0.8, seen at epoch 2
    loose = selection.Selection("loss", patience=None, guard=False, min_improvement=0.1)
    loose.update({"epoch": 0, "val_loss": 1.0})
    assert not loose.update({"epoch": 1, "val_loss": 0.95})  # not by more than 0.1
    assert loose.update({"epoch": 2, "val_loss": 0.85, "val_accuracy": 0.0})
    assert loose.update({"epoch": 3, "val_loss": 0.84})  # the margin is to the start, not between epochs


def test_validation_plans(data):
    U, I, L = data
    few = cucrf.fit(U[:3], I[:3], L[:3], epochs=1, lr=0.05, **OPTS)
    assert few.validation.startswith("leave-one-out cross-validation over 3")
    assert [h["epoch"] for h in few.history] == [0, 1]
    # the pooled held-out scores are those of the three folds' single images together
    assert few.history[0]["val_accuracy"] is not None
    many = cucrf.fit(U[:12], I[:12], L[:12], epochs=1, **OPTS)
    assert many.validation == "3 of 12 images held out for validation"
    one = cucrf.fit(U[:1], I[:1], L[:1], epochs=1, **OPTS)
    assert one.validation.startswith("one image")
    none = cucrf.fit(U[:2], I[:2], L[:2], epochs=1, val_fraction=0, **OPTS)
    assert none.best_epoch == 1 and none.history[1]["val_miou"] is None


def test_cross_validation_matches_its_folds(data):
    """Leave-one-out at epoch 0 pools the start's predictions of each image: the start's score on all."""
    U, I, L = data
    result = cucrf.fit(U[:3], I[:3], L[:3], epochs=0, **OPTS)
    score = cucrf.metrics.SegmentationScore(C)
    for u, im, lab in zip(U[:3], I[:3], L[:3]):
        score.add(cucrf.infer(u, im, filter_size=5, blur=2, iterations=3).argmax(0), lab)
    assert result.history[0]["val_miou"] == pytest.approx(score.miou, abs=1e-12)
    assert result.params == cucrf.CRFParams()


def test_feature_transform_and_fixed_parameters(data):
    U, I, L = data
    start = cucrf.CRFParams(theta_beta=(13.0, 13.0, 13.0))
    result = cucrf.fit(U[:6], I[:6], L[:6], start, learn=("feature_transform", "unary_weight"), epochs=1,
                       lr=0.05, val_fraction=0, **OPTS)
    ft = result.feature_transform
    assert ft.matrix.shape == (3, 3) and not np.allclose(ft.matrix, np.eye(3))
    p = result.params
    assert (p.theta_alpha, p.theta_beta, p.appearance_weight, p.compatibility) == \
        (start.theta_alpha, start.theta_beta, start.appearance_weight, "potts")
    assert p.unary_weight != start.unary_weight
    q = cucrf.infer(U[0], I[0], p, feature_transform=ft, filter_size=5, blur=2)
    assert q.shape == U[0].shape


def test_batches_group_equal_sizes(data):
    U, I, L = data
    u2, i2, l2 = scene(99, H=24, W=30)
    result = cucrf.fit(U[:4] + [u2], I[:4] + [i2], L[:4] + [l2], epochs=1, batch_size=3, val_fraction=0,
                       class_weights=[1.0, 2.0, 2.0], **OPTS)
    assert result.history[1]["images"] == 5
    groups = batches([lab.shape for lab in L[:4] + [l2]], 3, np.random.default_rng(0))
    assert sorted(len(b) for b in groups) == [1, 1, 3]
    assert sorted(i for b in groups for i in b) == list(range(5))


def test_balanced_class_weights():
    w = objective.balanced_class_weights([10, 30, 0, 20])
    assert w[2] == 0 and w[3] == 1.0  # the median frequency
    np.testing.assert_allclose(w[[0, 1]], [2.0, 2.0 / 3.0])


# -- the objective's gradient -------------------------------------------------------------------------
def test_tempered_cross_entropy_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5, 6)) * 3
    labels = rng.integers(0, 4, (2, 5, 6))
    labels[0, 0, :3] = 255
    weights = np.array([1.0, 0.5, 2.0, 0.0])
    for log_tau in (0.0, 1.3, -0.4):
        loss, g, g_tau, w = objective.tempered_cross_entropy(logits, labels, log_tau, weights)
        direction = rng.normal(size=logits.shape)

        def f(x, lt):
            return objective.tempered_cross_entropy(x, labels, lt, weights)[0]

        h = 1e-6
        fd = (f(logits + h * direction, log_tau) - f(logits - h * direction, log_tau)) / (2 * h)
        assert np.sum(g * direction) == pytest.approx(fd, rel=1e-6)
        fd_tau = (f(logits, log_tau + h) - f(logits, log_tau - h)) / (2 * h)
        assert g_tau == pytest.approx(fd_tau, rel=1e-6)
        # brute force: the weighted mean of -log softmax(x / tau)[y]
        x = logits / np.exp(log_tau)
        logp = x - np.log(np.exp(x).sum(1, keepdims=True))
        valid = labels != 255
        yy = np.where(valid, labels, 0)
        picked = np.take_along_axis(logp, yy[:, None], 1)[:, 0]
        ww = weights[yy] * valid
        assert loss == pytest.approx(-(ww * picked).sum() / ww.sum(), rel=1e-12)
        assert w == pytest.approx(ww.sum())


@pytest.mark.parametrize("classes", ["all", "present"])
def test_lovasz_softmax_gradient(classes):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 5, 6)) * 2
    labels = rng.integers(0, 3, (2, 5, 6))  # class 3 absent
    labels[0, 0, :2] = 255
    loss, g = objective.lovasz_softmax(logits, labels, 0.3, classes=classes)
    assert g[0, :, 0, :2].max() == 0  # unlabelled pixels get no gradient
    for _ in range(3):
        d = rng.normal(size=logits.shape)
        h = 1e-7  # small enough that no sort order changes

        def f(x):
            return objective.lovasz_softmax(x, labels, 0.3, classes=classes)[0]

        assert np.sum(g * d) == pytest.approx((f(logits + h * d) - f(logits - h * d)) / (2 * h), rel=1e-5)


def test_lovasz_softmax_of_hard_predictions_is_one_minus_miou():
    """At one-hot probabilities the surrogate equals the Jaccard loss: 1 - mean IoU over all classes."""
    rng = np.random.default_rng(4)
    for _ in range(5):
        label = rng.integers(0, 3, (1, 6, 7))
        pred = rng.integers(0, 4, (6, 7))  # class 3 predicted but never labelled: IoU 0
        logits = np.stack([np.where(pred == c, 1e4, 0.0) for c in range(4)])[None]
        loss, _ = objective.lovasz_softmax(logits, label, 0.0, classes="all")
        ious = []
        for c in range(4):
            union = ((pred == c) | (label[0] == c)).sum()
            ious.append(((pred == c) & (label[0] == c)).sum() / union if union else 1.0)
        assert loss == pytest.approx(1 - np.mean(ious), abs=1e-12)


def test_training_gradient_matches_finite_differences(data):
    """The gradient of one minibatch's loss with respect to every learned entry, float64."""
    U, I, L = data
    samples = Dataset("", [u.astype(np.float64) for u in U[:2]], I[:2], L[:2],
                      dict(filter_size=5, blur=2, iterations=2, normalization=None, dtype=np.float64, device=None),
                      255).scan()
    params = cucrf.CRFParams(theta_beta=(15.0, 20.0, 25.0), appearance_weight=4.0, smoothness_weight=2.0)
    learn = parameters.LEARNABLE
    transform = _fit.FeatureTransform(np.eye(3) + 0.1, np.zeros(3))
    vec = parameters.initial_vector(params, C, transform)
    vec["log_temperature"] = np.array(0.7)
    rng = np.random.default_rng(5)
    vec["compatibility"] = vec["compatibility"] + 0.1 * rng.normal(size=(C, C))  # away from Potts
    keys = parameters.learned_keys(learn, vec)
    backend = _api.get_backend("numpy")
    t = trainer.Trainer(backend, lambda shape: _api.check_config(5, 2, 2, None, tuple(shape)), params, keys,
                        learn_temperature=True, prior_strength=0.0, class_weights=np.array([1.0, 2.0, 0.5]),
                        ignore_index=255, num_classes=C)
    batch = [samples.load(0), samples.load(1)]
    loss, _, grad = t.gradient(vec, batch)
    assert set(grad) == set(keys) | {"log_temperature"}
    direction = {k: rng.normal(size=np.shape(vec[k])) for k in grad}
    analytic = sum(float(np.sum(grad[k] * direction[k])) for k in grad)

    def loss_at(step):
        v = {k: (vec[k] + step * direction[k] if k in direction else vec[k]) for k in vec}
        return t.gradient(v, batch)[0]

    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_prior_gradient():
    rng = np.random.default_rng(2)
    z = {"a": rng.normal(size=3), "b": np.array(0.3)}
    z0 = {"a": rng.normal(size=3), "b": np.array(-0.2)}
    value, grad = objective.prior(z, z0, 0.7)
    assert value == pytest.approx(0.35 * (np.sum((z["a"] - z0["a"]) ** 2) + 0.25))
    h = 1e-6
    for k in z:
        d = rng.normal(size=np.shape(z[k]))
        up = objective.prior({**z, k: z[k] + h * d}, z0, 0.7)[0]
        down = objective.prior({**z, k: z[k] - h * d}, z0, 0.7)[0]
        assert np.sum(grad[k] * d) == pytest.approx((up - down) / (2 * h), rel=1e-6)


# -- data -------------------------------------------------------------------------------------------
class LazyPairs:
    """A Sequence that makes item i on access and keeps nothing: what a folder reader does."""

    def __init__(self, part, n):
        self.part, self.n, self.reads = part, n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        return scene(i)[self.part]


def test_streams_lazy_sequences_and_reads_generators_once(data):
    U, I, L = data
    lazy = [LazyPairs(k, 4) for k in range(3)]
    result = cucrf.fit(*lazy, epochs=2, val_fraction=0, **OPTS)
    eager = cucrf.fit(U[:4], I[:4], L[:4], epochs=2, val_fraction=0, **OPTS)
    assert result.params == eager.params  # the same data, read lazily
    # read again every epoch (check + epoch 0 + 2 epochs), never cached
    assert all(s.reads >= 4 * 3 for s in lazy)
    gen = cucrf.fit((u for u in U[:4]), iter(I[:4]), (lab for lab in L[:4]), epochs=2, val_fraction=0, **OPTS)
    assert gen.params == eager.params


# -- checkpoints ------------------------------------------------------------------------------------
def test_checkpoint_resume_reproduces_an_uninterrupted_run(data, tmp_path, caplog):
    U, I, L = data
    args = (U[:5], I[:5], L[:5])
    kw = dict(validation=(U[10:12], I[10:12], L[10:12]), lr=0.05, seed=3, epochs=3, patience=None, **OPTS)
    full = cucrf.fit(*args, **kw)
    ckpt = tmp_path / "ck.npz"

    class Killed(Exception):
        pass

    def kill_after_epoch_2(entry):
        if entry["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        cucrf.fit(*args, checkpoint=ckpt, callback=kill_after_epoch_2, **kw)
    (tmp_path / ".ck.npz.tmp12345").write_bytes(b"partial write of a killed run")
    with caplog.at_level(logging.INFO, logger="cucrf.fit"):
        resumed = cucrf.fit(*args, checkpoint=ckpt, resume=True, **kw)
    assert "resuming at epoch 3" in caplog.text
    assert not list(tmp_path.glob(".*tmp*"))
    assert resumed.params == full.params and resumed.best_epoch == full.best_epoch
    assert [h["val_miou"] for h in resumed.history] == [h["val_miou"] for h in full.history]
    with pytest.raises(ValueError, match="other settings \\(learn was"):
        cucrf.fit(*args, checkpoint=ckpt, resume=True, **{**kw, "learn": ("weights",)})
    with pytest.raises(ValueError, match="other settings \\(lr was 0.05 and is now 0.01"):
        cucrf.fit(*args, checkpoint=ckpt, resume=True, **{**kw, "lr": 0.01})


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"PK\x03\x04 truncated", "cannot read checkpoint"),
    (None, "not written by cucrf.fit"),
])
def test_bad_checkpoints_name_the_path(data, tmp_path, content, message):
    U, I, L = data
    path = tmp_path / "bad.npz"
    if content is None:
        np.savez(path, meta=np.frombuffer(json.dumps({"x": 1}).encode(), dtype=np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        cucrf.fit(U[:2], I[:2], L[:2], epochs=1, checkpoint=path, resume=True, **OPTS)
    assert str(path) in str(info.value) and "allow_pickle" not in str(info.value)


def test_checkpoint_paths_are_checked_before_training(data, tmp_path):
    U, I, L = data
    calls = []
    with pytest.raises(ValueError, match="is a directory"):
        cucrf.fit(U[:2], I[:2], L[:2], checkpoint=tmp_path, callback=calls.append, **OPTS)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        cucrf.fit(U[:2], I[:2], L[:2], checkpoint=afile / "sub" / "ck.npz", callback=calls.append, **OPTS)
    assert calls == []


# -- bad input --------------------------------------------------------------------------------------
def test_errors(data):
    U, I, L = data
    bad = L[0].copy()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="sample 0: label holds class id 3, outside \\[0, 3\\)"):
        cucrf.fit([U[0]], [I[0]], [bad], epochs=0, **OPTS)
    with pytest.raises(ValueError, match="same length, got 2, 1 and 1"):
        cucrf.fit(U[:2], I[:1], L[:1], **OPTS)
    with pytest.raises(ValueError, match="unaries is empty"):
        cucrf.fit([], [], [], **OPTS)
    with pytest.raises(ValueError, match="sample 1: image height and width"):
        cucrf.fit(U[:2], [I[0], I[1][:-1]], L[:2], **OPTS)
    with pytest.raises(ValueError, match="label has shape"):
        cucrf.fit([U[0]], [I[0]], [L[0][:-1]], **OPTS)
    with pytest.raises(ValueError, match="unknown name"):
        cucrf.fit([U[0]], [I[0]], [L[0]], learn=("weights", "colour"), **OPTS)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        cucrf.fit([U[0]], [I[0]], [L[0]], resume=True, **OPTS)
    with pytest.raises(ValueError, match="sample 1: unary has 2 classes but sample 0 has 3"):
        cucrf.fit([U[0], U[1][:2]], I[:2], L[:2], **OPTS)
    with pytest.raises(ValueError, match="sample 0: unary has 3 classes but num_classes is 4"):
        cucrf.fit(U[:2], I[:2], L[:2], num_classes=4, **OPTS)
    with pytest.raises(ValueError, match="val_fraction"):
        cucrf.fit([U[0]], [I[0]], [L[0]], val_fraction=0.5, **OPTS)
    with pytest.raises(ValueError, match="val_fraction must be 'auto' or a number"):
        cucrf.fit([U[0]], [I[0]], [L[0]], val_fraction="most", **OPTS)
    with pytest.raises(ValueError, match="metric must be one of"):
        cucrf.fit([U[0]], [I[0]], [L[0]], metric="dice", **OPTS)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        cucrf.fit([U[0]], [I[0]], [L[0]], lr=0, **OPTS)
    with pytest.raises(TypeError, match="temperature must be True or False"):
        cucrf.fit([U[0]], [I[0]], [L[0]], temperature="yes", **OPTS)


def test_labels_without_a_labelled_pixel(data):
    U, I, L = data
    empty = np.full_like(L[0], 255)
    with pytest.raises(ValueError, match="no labelled pixel: every pixel is the ignore index 255"):
        cucrf.fit([U[0]], [I[0]], [empty], **OPTS)
    with pytest.raises(ValueError, match="validation labels have no labelled pixel"):
        cucrf.fit(U[:2], I[:2], L[:2], validation=([U[0]], [I[0]], [empty]), **OPTS)


def test_class_weights_errors(data):
    U, I, L = data
    with pytest.raises(ValueError, match="class_weights are all zero"):
        cucrf.fit(U[:2], I[:2], L[:2], class_weights=[0, 0, 0], **OPTS)
    with pytest.raises(ValueError, match="class_weights must be 3 finite non-negative"):
        cucrf.fit(U[:2], I[:2], L[:2], class_weights=[1, 2], **OPTS)
    with pytest.raises(ValueError, match="'balanced'"):
        cucrf.fit(U[:2], I[:2], L[:2], class_weights="inverse", **OPTS)


def test_diverging_learning_rate_is_one_clear_error(data):
    U, I, L = data
    with pytest.raises(ValueError, match="training diverged at step [0-9]+: .*; lower lr") as info:
        cucrf.fit(U[:3], I[:3], L[:3], lr=1e6, epochs=3, val_fraction=0, lr_schedule=None, prior=0.0, **OPTS)
    assert isinstance(info.value, parameters.TrainingDivergedError)
    assert "\n" not in str(info.value)


def test_bare_arrays_where_sequences_are_expected(data):
    U, I, L = data
    with pytest.raises(TypeError, match=r"unaries must be a sequence .* pass \[unary\]"):
        cucrf.fit(U[0], [I[0]], [L[0]], **OPTS)
    with pytest.raises(TypeError, match=r"images must be a sequence .* pass \[image\]"):
        cucrf.fit([U[0]], I[0], [L[0]], **OPTS)
    with pytest.raises(TypeError, match=r"labels must be a sequence .* pass \[label\]"):
        cucrf.fit([U[0]], [I[0]], L[0], **OPTS)
    with pytest.raises(TypeError, match="got None"):
        cucrf.fit(None, [I[0]], [L[0]], **OPTS)
    # a batch array is N images
    result = cucrf.fit(np.stack(U[:2]), np.stack(I[:2]), np.stack(L[:2]), epochs=0, **OPTS)
    assert len(result.history) == 1


def test_inputs_are_not_modified(data):
    U, I, L = data
    copies = [[a.copy() for a in x[:3]] for x in (U, I, L)]
    cucrf.fit(U[:3], I[:3], L[:3], epochs=1, **OPTS)
    for before, after in zip(copies, (U[:3], I[:3], L[:3])):
        for b, a in zip(before, after):
            np.testing.assert_array_equal(a, b)


def test_checkpoint_module_signature_difference():
    assert ckpt_mod.signature_difference({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) is None
    assert ckpt_mod.signature_difference({"a": 1}, {"a": 2}) == "a was 1 and is now 2"


def test_cross_validation_keeping_the_start_reports_its_temperature(data):
    """When leave-one-out keeps the start, the temperature is the one picked for the start on all images."""
    U, I, L = data
    val_like = ([perfect(lab) for lab in L[:3]], I[:3], L[:3])  # nothing can beat these
    result = cucrf.fit(*val_like, epochs=1, **OPTS)
    assert not result.improved and result.validation.startswith("leave-one-out")
    holdout = cucrf.fit(*val_like, epochs=0, val_fraction=0, **OPTS)  # the start's temperature, all images
    assert result.temperature == holdout.temperature != 1.0


def test_public_names():
    assert cucrf.TrainingDivergedError is parameters.TrainingDivergedError
    assert issubclass(cucrf.TrainingDivergedError, ValueError)
    assert cucrf.FeatureTransform is _fit.FeatureTransform


def test_cross_validation_guards_each_held_out_image_miou():
    """Pooling hides a class predicted in an image that lacks it; the per-image mIoU does not."""
    def fold(cm):
        return [{"epoch": 0, "train_loss": 1.0, "_confusion": np.array(cm), "_loss_sum": 1.0, "_weight_sum": 1.0}]

    # image A holds classes 0 and 1, image B classes 0 and 2; B's predictions put class 1 where
    # class 0 is: pooled, class 1 exists (from A); per image, B gains a class with IoU 0
    a = [[5, 0, 0], [0, 5, 0], [0, 0, 0]]
    b = [[3, 2, 0], [0, 0, 0], [0, 0, 5]]
    pooled = selection.pooled_history([fold(a), fold(b)])[0]
    per_image = np.mean([cucrf.metrics.mean_iou(np.array(a)), cucrf.metrics.mean_iou(np.array(b))])
    assert pooled["val_miou_per_image"] == pytest.approx(per_image)
    assert pooled["val_miou_per_image"] < pooled["val_miou"]
    sel = selection.Selection("miou_gt", patience=None)
    sel.update({"epoch": 0, "val_accuracy": 0.9, "val_miou": 0.8, "val_miou_gt": 0.8, "val_miou_per_image": 0.8})
    assert not sel.update({"epoch": 1, "val_accuracy": 0.95, "val_miou": 0.85, "val_miou_gt": 0.9,
                           "val_miou_per_image": 0.7})


def test_selection_margin_grows_below_eight_validation_images(data, monkeypatch):
    U, I, L = data
    margins = []
    real_init = selection.Selection.__init__

    def recording_init(self, metric, patience, min_improvement=0.0, guard=True):
        margins.append(min_improvement)
        real_init(self, metric, patience, min_improvement, guard)

    monkeypatch.setattr(selection.Selection, "__init__", recording_init)
    cucrf.fit(U[:2], I[:2], L[:2], validation=(U[10:12], I[10:12], L[10:12]), epochs=0, **OPTS)
    cucrf.fit(U[:2], I[:2], L[:2], validation=(U[2:10], I[2:10], L[2:10]), epochs=0, min_improvement=0.01,
              **OPTS)
    assert margins == [pytest.approx(0.005 * 2), pytest.approx(0.01)]  # sqrt(8 / 2) = 2; 8 images: as given
