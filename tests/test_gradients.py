"""Analytic gradients of every operation of inference against float64 finite differences.

Each check is a directional derivative along a random direction ``d``: central differences
``D(h) = (L(x + h d) - L(x - h d)) / 2h`` at h = 2e-5 and 1e-5, combined by Richardson
extrapolation ``(4 D(h/2) - D(h)) / 3`` (truncation error O(h^4); the larger steps keep float64
rounding, about eps |L| / h, near 1e-10), compared with ``<grad, d>``; relative error <= 1e-6
(relative to ``max(|<grad, d>|, 1e-2)``, so that a gradient near zero is compared with an
absolute 1e-8).
"""

import numpy as np
import pytest

import cucrf
from cucrf import _meanfield as mf
from cucrf import _numpy_backend as nb
from cucrf._geometry import axis_geometry

H_STEP = 2e-5
RTOL = 1e-6


def directional_difference(loss, x, d, h=H_STEP):
    """Richardson-extrapolated central difference of ``loss`` at ``x`` along ``d``."""
    def central(step):
        return (loss(x + step * d) - loss(x - step * d)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


def assert_directional(loss, x, grad, rng, scale=1.0):
    """Compare ``<grad, d>`` with the directional difference of ``loss`` at ``x`` along random ``d``."""
    x = np.asarray(x, dtype=np.float64)
    d = rng.normal(size=x.shape) * scale
    fd = directional_difference(loss, x, d)
    an = float(np.sum(np.asarray(grad) * d))
    assert abs(fd - an) <= RTOL * max(abs(an), 1e-2), (fd, an, abs(fd - an) / max(abs(an), 1e-2))


def problem(rng, B=2, C=3, H=8, W=9, F=3, potts=True, scalar_beta=False):
    unary = rng.normal(scale=2.0, size=(B, C, H, W))
    image = rng.uniform(0, 40, size=(B, H, W, F))
    params = cucrf.CRFParams(
        theta_alpha=float(rng.uniform(1.5, 4)),
        theta_beta=float(rng.uniform(8, 20)) if scalar_beta else tuple(rng.uniform(8, 25, size=F)),
        theta_gamma=float(rng.uniform(0.8, 2.5)),
        appearance_weight=float(rng.uniform(0.3, 1.5)),
        smoothness_weight=float(rng.uniform(0.3, 1.5)),
        compatibility="potts" if potts else rng.uniform(-0.5, 1.5, size=(C, C)),
        unary_weight=float(rng.uniform(0.6, 1.4)),
    )
    return unary, image, params


# ---------------------------------------------------------------------------------------------
# single operations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,W,blur", [(5, 7, 2), (9, 4, 3), (10, 13, 4), (7, 7, 5), (1, 1, 3)])
def test_pool_and_upsample_backward_are_transposes(H, W, blur):
    rng = np.random.default_rng(H * 100 + W * 10 + blur)
    h, w = axis_geometry(H, blur).coarse, axis_geometry(W, blur).coarse
    x, y = rng.normal(size=(2, 3, H, W)), rng.normal(size=(2, 3, h, w))
    np.testing.assert_allclose(np.sum(nb.pool(x, blur) * y), np.sum(x * nb.pool_backward(y, blur, (H, W))),
                               rtol=1e-12)
    np.testing.assert_allclose(np.sum(nb.upsample(y, blur, (H, W)) * x),
                               np.sum(y * nb.upsample_backward(x, blur, (h, w))), rtol=1e-12)
    uy, ux = axis_geometry(H, blur).upsample_matrix(), axis_geometry(W, blur).upsample_matrix()
    np.testing.assert_allclose(nb.upsample_backward(x, blur, (h, w)), uy.T @ x @ ux, rtol=1e-12, atol=1e-13)


def test_softmax_backward():
    rng = np.random.default_rng(1)
    x = rng.normal(scale=2, size=(2, 4, 3, 5))
    g = rng.normal(size=x.shape)
    assert_directional(lambda v: np.sum(g * nb.softmax(v.copy())), x, nb.softmax_backward(nb.softmax(x.copy()), g), rng)


@pytest.mark.parametrize("potts", [True, False])
def test_compatibility_backward(potts):
    rng = np.random.default_rng(2)
    C = 4
    msg = rng.normal(size=(2, C, 3, 5))
    mu = 1.0 - np.eye(C) if potts else rng.normal(size=(C, C))
    g = rng.normal(size=msg.shape)
    grad_msg, grad_mu = nb.compatibility_backward(g, msg, None if potts else mu)
    assert_directional(lambda v: np.sum(g * nb.compatibility_transform(v, mu)), msg, grad_msg, rng)
    assert_directional(lambda v: np.sum(g * nb.compatibility_transform(msg, v)), mu, grad_mu, rng)


@pytest.mark.parametrize("keep_centre", [False, True])
@pytest.mark.parametrize("merged", [True, False])
def test_pairwise_kernels_backward(merged, keep_centre):
    rng = np.random.default_rng(3)
    B, F, h, w, k, C = 2, 3, 6, 7, 5, 4
    pos_y, pos_x = np.arange(h) * 2.0 + 0.5, np.arange(w) * 2.0
    feats = rng.uniform(0, 30, size=(B, F, h, w))
    ib = 1.0 / rng.uniform(8, 20, size=F)
    ia2, ig2 = 1.0 / 3.0 ** 2, 1.0 / 2.0 ** 2
    weights = ((0.7, 1.3),) if merged else ((1.0, 0.0), (0.0, 1.0))
    S = len(weights)
    left = [rng.normal(size=(B, C, h, w)) for _ in range(S)]
    right = [rng.normal(size=(B, C, h, w)) for _ in range(S)]
    rows = [rng.normal(size=(B, 1, h, w)) for _ in range(S)]
    scales = (1.0,) if merged else (0.6, 1.7)
    offsets = [(dy, dx) for dy in range(-(k // 2), k // 2 + 1) for dx in range(-(k // 2), k // 2 + 1)
               if keep_centre or (dy, dx) != (0, 0)]

    def gk_of(s):  # the kernel gradient the function forms offset by offset, materialised here
        out = np.zeros((B, len(offsets), h, w))
        r = k // 2
        pad = np.zeros((B, C, h + 2 * r, w + 2 * r))
        pad[:, :, r:r + h, r:r + w] = right[s]
        for o, (dy, dx) in enumerate(offsets):
            out[:, o] = scales[s] * np.sum(left[s] * pad[:, :, r + dy:r + dy + h, r + dx:r + dx + w], axis=1)
        return out + rows[s]

    gks = [gk_of(s) for s in range(S)]

    def loss(f=feats, ib_=ib, ia2_=ia2, ig2_=ig2, wts=weights):
        K = nb.pairwise_kernels((pos_y, pos_x), f, ib_, ia2_, ig2_, k, wts, keep_centre)
        return sum(np.sum(K[s] * gks[s]) for s in range(S))

    out = nb.pairwise_kernels_backward((pos_y, pos_x), feats, ib, ia2, ig2, k, weights, keep_centre,
                                       left, right, scales, rows)
    assert_directional(lambda v: loss(f=v), feats, out["features"], rng)
    assert_directional(lambda v: loss(ib_=v), ib, out["inv_theta_beta"], rng, scale=0.01)
    assert_directional(lambda v: loss(ia2_=float(v)), ia2, out["inv_theta_alpha2"], rng, scale=0.1)
    assert_directional(lambda v: loss(ig2_=float(v)), ig2, out["inv_theta_gamma2"], rng, scale=0.1)
    assert_directional(lambda v: loss(wts=tuple(map(tuple, v))), np.array(weights), out["weights"], rng)
    # pair_dot: the part of <K, gK> that comes from left/right, unscaled.
    K = nb.pairwise_kernels((pos_y, pos_x), feats, ib, ia2, ig2, k, weights, keep_centre)
    for s in range(S):
        want = np.sum(K[s] * (gks[s] - rows[s])) / scales[s]
        np.testing.assert_allclose(out["pair_dot"][s], want, rtol=1e-12)


@pytest.mark.parametrize("blur", [1, 2, 3])
@pytest.mark.parametrize("norm", [None, "symmetric"])
def test_message_vjp_is_the_adjoint(blur, norm):
    """<M(a), b> = <a, M^T(b)> for the full-resolution message, blur and normalisation included."""
    rng = np.random.default_rng(10 + blur)
    B, C, H, W, F = 2, 3, 10, 11, 3
    feats = rng.uniform(0, 50, size=(B, F, H, W))
    params = cucrf.CRFParams(theta_alpha=3, theta_beta=(15, 20, 25), theta_gamma=2, appearance_weight=0.8,
                             smoothness_weight=1.3)
    config = mf.CRFConfig(3, blur, 1, norm)
    setup = nb.prepare(feats, params, config)
    a, b = rng.normal(size=(2, B, C, H, W))
    collected = mf.MessageGradients(len(setup.weights))
    lhs = np.sum(nb.full_message(setup, a, config) * b)
    rhs = np.sum(a * nb.full_message_backward(setup, a, b, config, collected))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    # and the vjp with respect to q is the derivative (linear in q without normalisation of q)
    assert_directional(lambda v: np.sum(b * nb.full_message(setup, v, config)), a,
                       nb.full_message_backward(setup, a, b, config, mf.MessageGradients(len(setup.weights))), rng)


@pytest.mark.parametrize("blur", [1, 2, 3])
@pytest.mark.parametrize("norm", [None, "symmetric"])
def test_message_gradient_wrt_features_and_params(blur, norm):
    """One message: gradient with respect to the features (through pooling) and every kernel parameter."""
    rng = np.random.default_rng(20 + blur)
    B, C, H, W, F = 1, 2, 9, 10, 2
    feats = rng.uniform(0, 40, size=(B, F, H, W))
    q = nb.softmax(rng.normal(size=(B, C, H, W)))
    g = rng.normal(size=(B, C, H, W))
    params = cucrf.CRFParams(theta_alpha=2.5, theta_beta=(12.0, 18.0), theta_gamma=1.7, appearance_weight=0.9,
                             smoothness_weight=1.1)
    config = mf.CRFConfig(3, blur, 1, norm)

    def loss(f=feats, p=params):
        return np.sum(g * nb.full_message(nb.prepare(f, p, config), q, config))

    setup = nb.prepare(feats, params, config)
    collected = mf.MessageGradients(len(setup.weights))
    nb.full_message_backward(setup, q, g, config, collected)
    g_feats, grads = nb.prepare_backward(setup, feats, params, config, collected)
    assert_directional(lambda v: loss(f=v), feats, g_feats, rng)
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight"):
        value = getattr(params, name)
        assert_directional(lambda v: loss(p=params.replace(**{name: float(v)})), value, grads[name], rng)
    assert_directional(lambda v: loss(p=params.replace(theta_beta=tuple(v))), np.array(params.theta_beta),
                       grads["theta_beta"], rng)


# ---------------------------------------------------------------------------------------------
# the whole T-iteration inference, through the public entry point
# ---------------------------------------------------------------------------------------------
CASES = [
    # (blur, potts, normalization, output, filter_size)
    (1, True, None, "probabilities", 3),
    (1, False, "symmetric", "logits", 5),
    (2, True, "symmetric", "probabilities", 3),
    (2, False, None, "logits", 5),
    (3, True, None, "logits", 3),
    (3, False, "symmetric", "probabilities", 3),
    (1, True, "symmetric", "logits", 3),
    (2, False, None, "probabilities", 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"blur{c[0]}_{'potts' if c[1] else 'matrix'}_{c[2]}_{c[3]}_k{c[4]}")
def test_inference_gradients(case):
    blur, potts, norm, output, k = case
    rng = np.random.default_rng(1000 + CASES.index(case))
    unary, image, params = problem(rng, potts=potts, H=9, W=10)
    opts = dict(filter_size=k, blur=blur, iterations=3, normalization=norm, output=output)
    go = rng.normal(size=unary.shape)

    def loss(u=unary, im=image, p=params):
        return float(np.sum(go * cucrf.infer(u, im, p, **opts)))

    r = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
    np.testing.assert_array_equal(r.output, cucrf.infer(unary, image, params, **opts))
    assert r.unary.shape == unary.shape and r.image.shape == image.shape
    assert r.unary.dtype == np.float64 and r.image.dtype == np.float64
    assert_directional(lambda v: loss(u=v), unary, r.unary, rng)
    assert_directional(lambda v: loss(im=v), image, r.image, rng)
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight"):
        assert isinstance(r.params[name], float)
        assert_directional(lambda v: loss(p=params.replace(**{name: float(v)})), getattr(params, name),
                           r.params[name], rng)
    assert r.params["theta_beta"].shape == (3,)
    assert_directional(lambda v: loss(p=params.replace(theta_beta=tuple(v))), np.array(params.theta_beta),
                       r.params["theta_beta"], rng)
    assert r.params["compatibility"].shape == (3, 3)
    assert_directional(lambda v: loss(p=params.replace(compatibility=v)), params.compatibility_matrix(3),
                       r.params["compatibility"], rng)


def test_joint_direction_and_scalar_theta_beta():
    """All inputs perturbed at once, with a scalar theta_beta and a grey image, unbatched."""
    rng = np.random.default_rng(5)
    unary, image, params = problem(rng, B=1, F=1, H=11, W=9, potts=True, scalar_beta=True)
    unary, image = unary[0], image[0]
    opts = dict(filter_size=5, blur=2, iterations=4)
    go = rng.normal(size=unary.shape)
    r = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
    assert isinstance(r.params["theta_beta"], float)
    names = ("theta_alpha", "theta_beta", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight")
    du, di = rng.normal(size=unary.shape), rng.normal(size=image.shape)
    dp = {n: rng.normal() * 0.3 for n in names}
    dc = rng.normal(size=(3, 3))

    def loss(h):
        p = params.replace(**{n: getattr(params, n) + h * dp[n] for n in names},
                           compatibility=1 - np.eye(3) + h * dc)
        return float(np.sum(go * cucrf.infer(unary + h * du, image + h * di, p, **opts)))

    fd = directional_difference(lambda h: loss(float(h)), 0.0, 1.0)
    an = (np.sum(r.unary * du) + np.sum(r.image * di) + sum(r.params[n] * dp[n] for n in names)
          + np.sum(r.params["compatibility"] * dc))
    assert abs(fd - an) <= RTOL * abs(an)


def test_feature_transform_gradient():
    rng = np.random.default_rng(6)
    unary, image, params = problem(rng, B=1, F=3, H=8, W=9)
    params = params.replace(theta_beta=(10.0, 14.0))  # two transformed channels
    matrix = rng.normal(size=(2, 3)) * 0.5
    offset = rng.normal(size=2)
    opts = dict(filter_size=3, blur=2, iterations=2)
    go = rng.normal(size=unary.shape)

    def loss(m=matrix, c=offset, im=image):
        return float(np.sum(go * cucrf.infer(unary, im, params, feature_transform=(m, c), **opts)))

    r = cucrf.infer_vjp(unary, image, params, grad_output=go, feature_transform={"matrix": matrix, "offset": offset},
                        **opts)
    assert_directional(lambda v: loss(m=v), matrix, r.feature_transform["matrix"], rng)
    assert_directional(lambda v: loss(c=v), offset, r.feature_transform["offset"], rng)
    assert_directional(lambda v: loss(im=v), image, r.image, rng)


def test_zero_weights_and_zero_iterations_still_have_gradients():
    rng = np.random.default_rng(7)
    unary, image, params = problem(rng, B=1)
    params = params.replace(appearance_weight=0.0, smoothness_weight=0.0)
    go = rng.normal(size=unary.shape)
    for norm in (None, "symmetric"):
        opts = dict(filter_size=3, blur=2, iterations=2, normalization=norm)
        r = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
        for name in ("appearance_weight", "smoothness_weight"):
            assert_directional(
                lambda v: float(np.sum(go * cucrf.infer(unary, image, params.replace(**{name: float(v)}), **opts))),
                0.0, r.params[name], rng)
    r = cucrf.infer_vjp(unary, image, params, grad_output=go, iterations=0, blur=2, filter_size=3)
    assert_directional(lambda v: float(np.sum(go * cucrf.infer(v, image, params, iterations=0, blur=2,
                                                                  filter_size=3))), unary, r.unary, rng)
    assert not np.any(r.image) and r.params["theta_alpha"] == 0.0


def test_gradients_are_deterministic_and_float32_close():
    rng = np.random.default_rng(8)
    unary, image, params = problem(rng, potts=False)
    go = rng.normal(size=unary.shape)
    a = cucrf.infer_vjp(unary, image, params, grad_output=go, blur=2, filter_size=3)
    b = cucrf.infer_vjp(unary, image, params, grad_output=go, blur=2, filter_size=3)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    np.testing.assert_array_equal(a.image, b.image)
    c = cucrf.infer_vjp(unary.astype(np.float32), image.astype(np.float32), params, grad_output=go, blur=2,
                        filter_size=3)
    assert c.unary.dtype == np.float32 and c.image.dtype == np.float32
    np.testing.assert_allclose(c.unary, a.unary, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(c.params["compatibility"], a.params["compatibility"], rtol=1e-3, atol=1e-3)


def test_taped_forward_equals_inference():
    rng = np.random.default_rng(9)
    unary, image, params = problem(rng, potts=False)
    feats = np.ascontiguousarray(np.moveaxis(image, -1, 1))
    config = mf.CRFConfig(5, 2, 3, "symmetric")
    tape = mf.Tape()
    taped = mf.mean_field(nb, unary.copy(), feats, params, config, tape=tape)
    np.testing.assert_array_equal(taped, mf.mean_field(nb, unary.copy(), feats, params, config))
    assert len(tape.qs) == len(tape.msgs) == 3


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(grad_output=np.zeros((3, 8, 8))), ValueError, "grad_output must have the shape of the output"),
    (dict(grad_output=np.full((3, 8, 9), np.nan)), ValueError, "grad_output contains"),
    (dict(grad_output=np.zeros((3, 8, 9)), unary_kind="probabilities"), ValueError, "logits only"),
    (dict(grad_output=np.zeros((3, 8, 9)), blur=0), ValueError, "blur must be >= 1"),
    (dict(grad_output=np.zeros((3, 8, 9)), feature_transform=np.eye(2)), ValueError, "feature_transform matrix"),
])
def test_infer_vjp_errors(kwargs, error, match):
    rng = np.random.default_rng(0)
    kwargs = {"blur": 2, "filter_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        cucrf.infer_vjp(rng.normal(size=(3, 8, 9)), rng.uniform(size=(8, 9, 3)), **kwargs)


def test_infer_vjp_needs_grad_output():
    with pytest.raises(TypeError):
        cucrf.infer_vjp(np.zeros((2, 4, 4)), np.zeros((4, 4, 1)))


@pytest.mark.parametrize("channels", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("spatial", [(7, 11), (3, 5, 4)])
def test_image_gradient_made_channels_last_matches_moveaxis(channels, spatial):
    from cucrf._api import _channels_last

    a = np.random.default_rng(channels).normal(size=(2, channels) + spatial)
    for src in (a, a.astype(np.float32), a[:, :, ::-1]):  # float64, float32, not contiguous
        out = _channels_last(np, src)
        assert out.flags.c_contiguous and out.dtype == src.dtype
        np.testing.assert_array_equal(out, np.moveaxis(src, 1, -1))
