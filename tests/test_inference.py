"""cucrf.infer against the brute-force oracle, and properties of the model."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cucrf
from cucrf import _numpy_backend as nb
from cucrf._geometry import axis_geometry

from . import oracle


def random_problem(rng, B, C, H, W, F, image_scale=40.0):
    unary = rng.normal(scale=2.0, size=(B, C, H, W))
    image = rng.uniform(0, image_scale, size=(B, H, W, F))
    return unary, image


def random_params(rng, C, F, potts=True):
    compat = None if potts else rng.uniform(-1, 2, size=(C, C))
    return dict(
        theta_alpha=float(rng.uniform(1.5, 6)),
        theta_beta=tuple(float(v) for v in rng.uniform(5, 30, size=F)),
        theta_gamma=float(rng.uniform(0.8, 3)),
        appearance_weight=float(rng.uniform(0.2, 2)),
        smoothness_weight=float(rng.uniform(0.2, 2)),
        compatibility=compat,
        unary_weight=float(rng.uniform(0.5, 1.5)),
    )


def to_crfparams(p):
    q = dict(p)
    q["compatibility"] = "potts" if p["compatibility"] is None else p["compatibility"]
    return cucrf.CRFParams(**q)


CASES = [
    # (B, C, H, W, F, filter_size, blur, potts, normalization, iterations)
    (1, 3, 5, 7, 3, 3, 1, True, None, 3),
    (2, 2, 6, 5, 1, 5, 1, False, None, 2),
    (1, 4, 7, 9, 5, 3, 2, True, "symmetric", 3),
    (2, 3, 9, 6, 3, 3, 3, False, "symmetric", 2),
    (1, 3, 11, 10, 3, 5, 4, True, None, 3),
    (1, 2, 6, 7, 1, 7, 1, True, "symmetric", 2),
    (1, 3, 10, 7, 3, 3, 4, False, None, 1),
    (1, 2, 6, 6, 3, 11, 1, True, None, 2),
    (1, 3, 9, 9, 5, 9, 1, False, "symmetric", 2),
    (1, 2, 13, 9, 3, 5, 2, True, None, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}_{}x{}F{}_k{}b{}_{}_{}_T{}".format(
    c[0], c[1], c[2], c[3], c[4], c[5], c[6], "potts" if c[7] else "matrix", c[8], c[9]))
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_matches_bruteforce_oracle(case, output):
    B, C, H, W, F, k, blur, potts, norm, T = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))  # stable across runs
    unary, image = random_problem(rng, B, C, H, W, F)
    p = random_params(rng, C, F, potts)
    got = cucrf.infer(unary, image, to_crfparams(p), filter_size=k, blur=blur, iterations=T,
                      normalization=norm, output=output, spatial_dims=2)
    assert got.dtype == np.float64 and got.shape == unary.shape
    for b in range(B):
        want = oracle.infer(unary[b], image[b], p, k, blur, T, norm, output)
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    H=st.integers(1, 9), W=st.integers(1, 9), C=st.integers(2, 4), F=st.sampled_from([1, 3, 5]),
    blur=st.integers(1, 4), half=st.integers(1, 5), potts=st.booleans(),
    norm=st.sampled_from([None, "symmetric"]), seed=st.integers(0, 2**31),
)
def test_matches_oracle_random_shapes(H, W, C, F, blur, half, potts, norm, seed):
    k = 2 * half + 1
    h, w = -(-H // blur), -(-W // blur)
    if k > max(2 * max(h, w) - 1, 3):
        k = max(2 * max(h, w) - 1, 3)
    rng = np.random.default_rng(seed)
    unary, image = random_problem(rng, 1, C, H, W, F)
    p = random_params(rng, C, F, potts)
    got = cucrf.infer(unary[0], image[0], to_crfparams(p), filter_size=k, blur=blur, iterations=2,
                      normalization=norm)
    want = oracle.infer(unary[0], image[0], p, k, blur, 2, norm)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("H,W,blur", [(1, 1, 1), (5, 7, 2), (9, 4, 3), (10, 13, 4), (7, 7, 5), (3, 8, 6)])
def test_pool_and_upsample_match_oracle(H, W, blur):
    rng = np.random.default_rng(H * 100 + W * 10 + blur)
    x = rng.normal(size=(2, H, W))
    pooled = nb.pool(x, blur)
    np.testing.assert_allclose(pooled, oracle.pool_image(x, blur), rtol=1e-12)
    np.testing.assert_allclose(nb.upsample(pooled, blur, (H, W)), oracle.upsample_image(pooled, blur, H, W),
                               rtol=1e-12)


def test_blur_geometry_matches_convcrf_demo():
    # The demo image of upstream ConvCRF is 342 x 500 at blur 4: pad (1, 0), grid 86 x 125.
    gy, gx = axis_geometry(342, 4), axis_geometry(500, 4)
    assert (gy.pad, gx.pad, gy.coarse, gx.coarse) == (1, 0, 86, 125)


@pytest.mark.parametrize("size, blur", [(97, 3), (1000, 3), (83, 5), (40, 4), (9, 7)])
def test_upsampling_weights_depend_only_on_the_place_in_the_cell(size, blur):
    # Bit for bit, so that a tile of an image computes exactly what the whole image computes.
    g = axis_geometry(size, blur)
    inner = np.flatnonzero((g.hi != g.lo) & ((np.arange(size) + g.pad + 0.5) / blur - 0.5 >= 0))
    phase = (inner + g.pad) % blur
    for p in np.unique(phase):
        weights = g.frac[inner[phase == p]]
        assert np.all(weights == weights[0]), (p, np.unique(weights))
        exact = (p + 0.5) / blur - 0.5
        assert abs(weights[0] - (exact if exact >= 0 else 1 + exact)) < 1e-15
    # the same interpolation the dense definition gives: src - lo, up to rounding
    src = np.maximum((np.arange(size) + g.pad + 0.5) / blur - 0.5, 0.0)
    np.testing.assert_allclose(g.frac, np.where(g.hi == g.lo, 0.0, src - g.lo), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------
def test_probabilities_sum_to_one_and_are_finite():
    rng = np.random.default_rng(1)
    unary = rng.normal(scale=30, size=(2, 5, 23, 17)).astype(np.float32)  # raw network logits
    image = rng.integers(0, 256, size=(2, 23, 17, 3), dtype=np.uint8)
    q = cucrf.infer(unary, image, filter_size=5, blur=2)
    assert q.dtype == np.float32
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)


def test_zero_weights_give_softmax_of_scaled_unary():
    rng = np.random.default_rng(2)
    unary = rng.normal(size=(3, 8, 9))
    image = rng.uniform(0, 255, size=(8, 9, 3))
    params = cucrf.CRFParams(appearance_weight=0.0, smoothness_weight=0.0, unary_weight=1.7)
    q = cucrf.infer(unary, image, params, filter_size=5, blur=1)
    e = np.exp(1.7 * unary - (1.7 * unary).max(axis=0))
    np.testing.assert_allclose(q, e / e.sum(axis=0), rtol=1e-12)


def test_constant_image_makes_appearance_kernel_spatial():
    # With a constant image, k_a(i, j) = exp(-d^2 / 2 theta_alpha^2): the same as a smoothness
    # kernel with theta_gamma = theta_alpha.
    rng = np.random.default_rng(3)
    unary = rng.normal(size=(3, 9, 11))
    image = np.full((9, 11, 3), 77.0)
    appearance = cucrf.CRFParams(theta_alpha=2.5, appearance_weight=1.3, smoothness_weight=0.0)
    smoothness = cucrf.CRFParams(theta_gamma=2.5, appearance_weight=0.0, smoothness_weight=1.3)
    for blur in (1, 2):
        a = cucrf.infer(unary, image, appearance, filter_size=5, blur=blur)
        s = cucrf.infer(unary, image, smoothness, filter_size=5, blur=blur)
        np.testing.assert_allclose(a, s, rtol=1e-12)


@pytest.mark.parametrize("norm", [None, "symmetric"])
def test_message_operator_is_symmetric_without_blur(norm):
    from cucrf import _meanfield

    rng = np.random.default_rng(4)
    B, C, H, W, F = 2, 3, 8, 7, 3
    feats = rng.uniform(0, 50, size=(B, F, H, W))
    params = cucrf.CRFParams(theta_alpha=3, theta_beta=20, theta_gamma=2)
    config = _meanfield.CRFConfig(5, 1, 1, norm)
    setup = _meanfield.prepare(nb, feats, params, config)
    a, b = rng.normal(size=(2, B, C, H, W))
    ka = _meanfield.message(nb, setup, a, config)
    kb = _meanfield.message(nb, setup, b, config)
    assert np.vdot(ka, b) == pytest.approx(np.vdot(a, kb), rel=1e-12)
    # and it is not trivially zero
    assert abs(np.vdot(ka, b)) > 1e-3


def test_batch_equals_per_image():
    rng = np.random.default_rng(5)
    unary, image = random_problem(rng, 3, 4, 12, 10, 3, image_scale=255)
    unary = unary.astype(np.float32)
    batch = cucrf.infer(unary, image.astype(np.float32), filter_size=5, blur=2, normalization="symmetric")
    for b in range(3):
        single = cucrf.infer(unary[b], image[b].astype(np.float32), filter_size=5, blur=2,
                             normalization="symmetric")
        np.testing.assert_allclose(batch[b], single, rtol=1e-6, atol=1e-7)


def test_float32_close_to_float64():
    rng = np.random.default_rng(6)
    unary, image = random_problem(rng, 1, 5, 20, 24, 3, image_scale=255)
    q64 = cucrf.infer(unary, image, filter_size=7, blur=2)
    q32 = cucrf.infer(unary.astype(np.float32), image.astype(np.float32), filter_size=7, blur=2)
    assert q32.dtype == np.float32
    np.testing.assert_allclose(q32, q64, atol=2e-5)


def test_logits_output_softmaxes_to_probabilities():
    rng = np.random.default_rng(7)
    unary, image = random_problem(rng, 1, 4, 9, 8, 3)
    p = cucrf.CRFParams(compatibility=rng.uniform(0, 1, size=(4, 4)))
    logits = cucrf.infer(unary, image, p, filter_size=3, blur=1, output="logits")
    q = cucrf.infer(unary, image, p, filter_size=3, blur=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), q, rtol=1e-12)


def test_edge_preserving_refinement():
    """A noisy unary on a two-region image is cleaned up along the edge."""
    rng = np.random.default_rng(8)
    H, W = 40, 60
    truth = np.zeros((H, W), dtype=int)
    truth[:, 31:] = 1
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8) * np.ones((1, 1, 3), dtype=np.uint8)
    probs = np.where(rng.random((H, W)) < 0.7, truth, 1 - truth)
    unary = cucrf.unary_from_labels(probs, num_classes=2, confidence=0.6)
    before = (unary.argmax(axis=0) == truth).mean()
    assert before < 0.75
    # Without blur, and at blur 2 and 3 here, the edge is recovered exactly.
    for blur in (1, 2, 3):
        assert (cucrf.infer(unary, image, blur=blur).argmax(axis=0) == truth).all()
    # At blur 4 the cell covering columns 28..31 mixes both regions: one column may be lost.
    assert (cucrf.infer(unary, image).argmax(axis=0) == truth).mean() >= 1 - 1 / W


def test_unary_kinds_agree():
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.ones(3), size=(6, 7)).transpose(2, 0, 1)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    via_kind = cucrf.infer(probs, image, unary_kind="probabilities", filter_size=3, blur=1)
    via_helper = cucrf.infer(cucrf.unary_from_probabilities(probs), image, filter_size=3, blur=1)
    np.testing.assert_array_equal(via_kind, via_helper)
    labels = rng.integers(0, 3, (6, 7))
    labels[0, 0] = 255
    a = cucrf.infer(labels, image, unary_kind="labels", num_classes=3, confidence=0.7, unknown_label=255,
                    filter_size=3, blur=1)
    b = cucrf.infer(cucrf.unary_from_labels(labels, 3, 0.7, 255), image, filter_size=3, blur=1)
    np.testing.assert_array_equal(a, b)


def test_unary_from_labels_values():
    labels = np.array([[0, 2], [255, 1]])
    u = cucrf.unary_from_labels(labels, num_classes=3, confidence=0.8, unknown_label=255)
    p = np.exp(u)
    np.testing.assert_allclose(p[:, 0, 0], [0.8, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(p[:, 0, 1], [0.1, 0.1, 0.8], rtol=1e-6)
    np.testing.assert_allclose(p[:, 1, 0], [1 / 3] * 3, rtol=1e-6)


def test_unary_from_labels_default_confidence():
    labels = np.array([[0, 1], [1, 0]])
    p2 = np.exp(cucrf.unary_from_labels(labels, num_classes=2))  # 0.5 would be uniform for C = 2
    np.testing.assert_allclose(p2[:, 0, 0], [0.7, 0.3], rtol=1e-6)
    p3 = np.exp(cucrf.unary_from_labels(labels, num_classes=3))
    np.testing.assert_allclose(p3[:, 0, 0], [0.5, 0.25, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(cucrf.unary_from_labels(labels, 3), cucrf.unary_from_labels(labels, 3, 0.5))
    image = np.random.default_rng(3).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    q = cucrf.infer(labels, image, unary_kind="labels", num_classes=2, filter_size=1, blur=1, include_self=True)
    assert q.shape == (2, 2, 2)
    with pytest.raises(ValueError, match=r"in \(1/num_classes, 1\) = \(0.5, 1\) for num_classes=2.*got 0.5"):
        cucrf.unary_from_labels(labels, 2, 0.5)


def test_inputs_not_modified():
    rng = np.random.default_rng(10)
    unary = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    image = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    u0, i0 = unary.copy(), image.copy()
    for norm in (None, "symmetric"):
        cucrf.infer(unary, image, filter_size=3, blur=2, normalization=norm)
        cucrf.infer(unary, image, filter_size=3, blur=1, normalization=norm, output="logits",
                    dtype=np.float32)
    np.testing.assert_array_equal(unary, u0)
    np.testing.assert_array_equal(image, i0)


def test_zero_iterations():
    rng = np.random.default_rng(11)
    unary = rng.normal(size=(3, 5, 5))
    image = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    q = cucrf.infer(unary, image, iterations=0, filter_size=3, blur=1)
    e = np.exp(unary - unary.max(axis=0))
    np.testing.assert_allclose(q, e / e.sum(axis=0), rtol=1e-12)
