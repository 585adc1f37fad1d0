"""cucrf.fit on a small procedurally generated problem, checkpoints, errors and the CLI."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

import cucrf
from cucrf import _fit
from cucrf.cli import main
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


def train_loss(result_params, transform, U, I, L):
    total = weight = 0.0
    for u, im, lab in zip(U, I, L):
        logits = cucrf.infer(u, im, result_params, output="logits", feature_transform=transform,
                             filter_size=OPTS["filter_size"], blur=OPTS["blur"], iterations=OPTS["iterations"])
        loss, _, w = _fit.cross_entropy(logits[None], lab[None].astype(np.int64))
        total += loss * w
        weight += w
    return total / weight


def test_fit_lowers_loss_and_raises_validation_miou(data):
    U, I, L = data
    result = cucrf.fit(U[:10], I[:10], L[:10], validation=(U[10:], I[10:], L[10:]), epochs=3, lr=0.05, **OPTS)
    assert isinstance(result.params, cucrf.CRFParams)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert result.best_epoch > 0
    start, best = result.history[0], result.history[result.best_epoch]
    assert best["val_miou"] > start["val_miou"] + 0.02
    assert train_loss(result.params, None, U[:10], I[:10], L[:10]) < 0.9 * start["train_loss"]
    assert not result.params.is_potts  # the compatibility became a full matrix
    for h in result.history[1:]:
        assert h["lr"] == 0.05 and h["seconds"] > 0 and h["images"] == 10
    json.dumps(result.to_dict())  # serialisable


def test_feature_transform_and_selected_parameters(data):
    U, I, L = data
    start = cucrf.CRFParams(theta_beta=(13.0, 13.0, 13.0))
    result = cucrf.fit(U[:6], I[:6], L[:6], start, learn=("feature_transform", "unary_weight"), epochs=1,
                       lr=0.05, **OPTS)
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
    result = cucrf.fit(U[:4] + [u2], I[:4] + [i2], L[:4] + [l2], epochs=1, batch_size=3,
                       class_weights=[1.0, 2.0, 2.0], **OPTS)
    assert result.history[1]["images"] == 5
    batches = _fit._batches([type("S", (), {"label": lab})() for lab in L[:4] + [l2]], 3,
                            np.random.default_rng(0))
    assert sorted(len(b) for b in batches) == [1, 1, 3]


def test_checkpoint_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    U, I, L = data
    args = (U[:5], I[:5], L[:5])
    kw = dict(validation=(U[10:12], I[10:12], L[10:12]), lr=0.05, seed=3, **OPTS)
    full = cucrf.fit(*args, epochs=3, **kw)
    ckpt = tmp_path / "ck.npz"
    cucrf.fit(*args, epochs=2, checkpoint=ckpt, **kw)
    assert ckpt.exists() and not list(tmp_path.glob(".*tmp*"))
    resumed = cucrf.fit(*args, epochs=3, checkpoint=ckpt, resume=True, **kw)
    assert resumed.params == full.params
    assert [h["val_miou"] for h in resumed.history] == [h["val_miou"] for h in full.history]
    with pytest.raises(ValueError, match="other settings"):
        cucrf.fit(*args, epochs=3, checkpoint=ckpt, resume=True, learn=("weights",), **kw)


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
    with pytest.raises(ValueError, match="sample 1: unary has 2 classes"):
        cucrf.fit([U[0], U[1][:2]], I[:2], L[:2], **OPTS)
    with pytest.raises(ValueError, match="val_fraction"):
        cucrf.fit([U[0]], [I[0]], [L[0]], val_fraction=0.5, **OPTS)


def test_cli_fit(data, tmp_path, capsys):
    U, I, L = data
    folder = tmp_path / "pairs"
    folder.mkdir()
    for n in range(6):
        iio.imwrite(folder / f"s{n}_image.png", I[n])
        iio.imwrite(folder / f"s{n}_label.png", L[n])
        np.savez(folder / f"s{n}_u.npz", logits=U[n].astype(np.float16))
    out = tmp_path / "out"
    rc = main(["fit", str(folder), "--unary-dir", str(folder), "--unary-pattern", "{name}_u.npz", "--epochs", "1",
               "--blur", "2", "--filter-size", "5", "--no-progress", "--val-fraction", "0.34", "--out", str(out),
               "--learn", "weights,bandwidths"])
    assert rc == 0, capsys.readouterr().err
    params = cucrf.CRFParams.from_json(out / "params.json")
    assert params.is_potts
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and history[0]["val_miou"] is not None
    rc = main(["fit", str(folder), "--synthetic", "--epochs", "1", "--blur", "2", "--filter-size", "5",
               "--no-progress", "--out", str(out), "--num-classes", "3"])
    assert rc == 0
    assert main(["fit", str(folder), "--epochs", "1"]) == 2
    assert "give either --unary-dir or --synthetic" in capsys.readouterr().err
    assert main(["fit", str(folder), "--synthetic", "--learn", "weights,nope"]) == 2
    assert main(["fit", str(folder), "--synthetic", "--num-classes", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cucrf: error: ") and "--num-classes is 2" in err[-1]
