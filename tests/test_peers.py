"""Tests of the pydensecrf wrapper (skipped when the optional pydensecrf2 extra is missing)."""

import numpy as np
import pytest

from cucrf import _peers

# Skip (rather than fail) without the optional extra, or with a broken binary build of it.
if not _peers.densecrf_available():
    pytest.skip("optional extra pydensecrf2 not installed (scripts/install-densecrf.sh)", allow_module_level=True)


def _two_region_problem(h=40, w=60, noise=0.35, seed=0):
    """Left half dark / right half bright, label = half, unary = noisy per-pixel log-probs."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.int64)
    label[:, w // 2:] = 1
    image = np.where(label[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, axis=2)
    # each pixel independently points to the wrong class with probability `noise`
    wrong = rng.random((h, w)) < noise
    noisy = np.where(wrong, 1 - label, label)
    prob = np.where(np.arange(2)[:, None, None] == noisy[None], 0.7, 0.3)
    return np.log(prob).astype(np.float32), image, label


def test_available():
    assert _peers.densecrf_available()


def test_output_shape_dtype_and_normalised():
    u, img, _ = _two_region_problem()
    q = _peers.densecrf_infer(u, img)
    assert q.shape == u.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q >= 0).all()


def test_improves_accuracy_on_two_regions():
    u, img, label = _two_region_problem()
    before = (u.argmax(0) == label).mean()
    after = (_peers.densecrf_infer(u, img, iterations=5).argmax(0) == label).mean()
    assert before < 0.7
    assert after > 0.95 and after > before


def test_zero_iterations_is_softmax_of_unary():
    u, img, _ = _two_region_problem()
    q = _peers.densecrf_infer(u, img, iterations=0)
    e = np.exp(u - u.max(0))
    np.testing.assert_allclose(q, e / e.sum(0), atol=1e-5)


def test_accepts_float64_and_non_contiguous():
    u, img, _ = _two_region_problem()
    q1 = _peers.densecrf_infer(u, img)
    u_f = np.asfortranarray(u.astype(np.float64))
    img_nc = np.ascontiguousarray(img[:, ::-1])[:, ::-1]
    q2 = _peers.densecrf_infer(u_f, img_nc)
    np.testing.assert_allclose(q1, q2, atol=1e-5)


def test_bad_inputs():
    u, img, _ = _two_region_problem()
    with pytest.raises(ValueError, match=r"image.*\(40, 60, 3\)"):
        _peers.densecrf_infer(u, img[:, :10])
    with pytest.raises(TypeError, match="uint8"):
        _peers.densecrf_infer(u, img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        _peers.densecrf_infer(u[0], img)
    bad = u.copy()
    bad[0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match="inf"):
        _peers.densecrf_infer(bad, img)
