"""The CUDA backward pass on the CPU emulator, against the NumPy reference backward.

As in tests/test_cuda_emulated.py, the kernels (cucrf/kernels/backward.cu, kernel_grad.cu and the
forward ones they reuse) run unchanged under cucrf.testing.emulator, launched by the backend code
that runs on the GPU. Compared with the NumPy backend: every backward primitive, each backend
method of the learning interface, and the whole taped T-iteration mean field plus
``mean_field_backward`` (what ``cucrf.infer_vjp`` runs); a float64 finite-difference check of the
emulated backend's own gradients; forward and reverse thread order give bit-identical results
(deterministic reductions); and a reduction without its barrier is caught.
"""

import shutil
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cucrf import _cuda, _meanfield
from cucrf import _numpy_backend as nb
from cucrf._cuda.backend import MessageGradient, PixelGradient
from cucrf._params import CRFParams

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not available")

from .test_cuda_emulated import ORDERS, emulated, emulator, random_problem  # noqa: E402

#: Backward tolerances: relative to the largest magnitude of the reference array.
RTOL = {np.float32: 1e-4, np.float64: 1e-9}


def _max_abs(a):
    return float(np.max(np.abs(a))) if np.size(a) else 0.0


def assert_close(got, want, dtype, what="", excuse=0.0):
    """``max |got - want| <= RTOL * max |want| + excuse`` (``excuse``: see :func:`_rounding_noise`)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = _max_abs(got - want), _max_abs(want)
    allowed = RTOL[dtype] * scale + excuse
    assert err <= allowed, f"{what}: max |diff| {err:.3e} > {allowed:.3e} (scale {scale:.3e}, excuse {excuse:.1e})"


def _setup_pair(rng, B, F, H, W, k, blur, dtype, norm=None, keep_centre=False):
    features = rng.uniform(0, 40, size=(B, F, H, W)).astype(dtype)
    params = CRFParams(theta_alpha=2.5, theta_beta=tuple(rng.uniform(5, 30, size=F)), theta_gamma=1.3,
                       appearance_weight=0.8, smoothness_weight=1.7)
    config = _meanfield.CRFConfig(k, blur, 1, norm, keep_centre)
    return features, params, config


# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H,W,blur", [(11, 9, 1), (11, 9, 2), (10, 13, 3), (9, 10, 4), (7, 7, 5), (1, 1, 3)])
def test_upsample_and_pool_backward(dtype, H, W, blur):
    rng = np.random.default_rng(H * 100 + W * 10 + blur)
    features, params, config = _setup_pair(rng, 2, 1, H, W, 3, blur, dtype, "symmetric")
    be = emulated("reverse")
    setup = be.prepare(features, params, config)
    h, w = setup.coarse
    x = rng.normal(size=(2, 3, H, W)).astype(dtype)
    s0, s1 = rng.uniform(0.5, 2, size=(2, 2, 1, H, W)).astype(dtype)
    (u,) = be.upsample_backward(setup, x)
    assert_close(u, nb.upsample_backward(x, blur, (h, w)), dtype, "Up^T")
    (u0,) = be.upsample_backward(setup, x, (s0,))
    assert_close(u0, nb.upsample_backward(x * s0, blur, (h, w)), dtype, "Up^T(x s0)")
    u0, u1 = be.upsample_backward(setup, x, (s0, s1))
    assert_close(u0, nb.upsample_backward(x * s0, blur, (h, w)), dtype, "Up^T(x s0), two")
    assert_close(u1, nb.upsample_backward(x * s1, blur, (h, w)), dtype, "Up^T(x s1), two")
    r0, r1 = rng.normal(size=(2, 2, 3, h, w)).astype(dtype)
    assert_close(be.pool_backward(setup, r0), nb.pool_backward(r0, blur, (H, W)), dtype, "Pool^T")
    n0, n1 = setup.normalisers
    want = nb.pool_backward(r0, blur, (H, W)) * n0 + nb.pool_backward(r1, blur, (H, W)) * n1
    assert_close(be.pool_backward(setup, r0, r1), want, dtype, "n Pool^T")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [2, 5, 40])
def test_softmax_backward(dtype, C):
    rng = np.random.default_rng(C)
    q = nb.softmax(rng.normal(scale=2, size=(2, C, 5, 7)).astype(dtype))
    g = rng.normal(size=q.shape).astype(dtype)
    assert_close(emulated().softmax_backward(q, g), nb.softmax_backward(q, g), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C,blocks", [(3, 264), (21, 264), (4, 2)])
def test_class_products(dtype, C, blocks, monkeypatch):
    """The compatibility gradient's (C, C) reduction: several tiles per image, a partial last
    tile, and (blocks = 2) several tiles per block."""
    monkeypatch.setattr(_cuda, "CLASS_PRODUCT_BLOCKS", blocks)
    rng = np.random.default_rng(C)
    a0, m0, a1, m1 = rng.normal(size=(4, 2, C, 13, 11)).astype(dtype)
    want = -(0.7 * np.einsum("bcyx,blyx->cl", a0, m0, dtype=np.float64)
             + 1.3 * np.einsum("bcyx,blyx->cl", a1, m1, dtype=np.float64))
    results = [emulated(order)._class_products(a0, m0, a1, m1, (0.7, 1.3)) for order in ORDERS]
    assert results[0].dtype == np.float64
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)))
    one = emulated()._class_products(a0, m0)
    np.testing.assert_allclose(one, -np.einsum("bcyx,blyx->cl", a0, m0, dtype=np.float64), rtol=1e-12,
                               atol=1e-12 * np.max(np.abs(want)))


# ---------------------------------------------------------------------------------------------
# the backend methods of the learning interface, one at a time
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blur,norm,potts", [(1, None, True), (2, "symmetric", False), (3, None, False),
                                             (4, "symmetric", True), (1, "symmetric", False)])
def test_message_backward_methods(dtype, blur, norm, potts):
    """compatibility_backward, full_message_backward and softmax_backward against NumPy."""
    rng = np.random.default_rng(blur * 7 + (norm is None) + 2 * potts)
    B, C, H, W = 2, 3, 11, 10
    features, params, config = _setup_pair(rng, B, 3, H, W, 5, blur, dtype, norm)
    be = emulated("reverse")
    setup = be.prepare(features, params, config)
    ref = _meanfield.prepare(nb, features, params, config)
    compat = None if potts else rng.uniform(-1, 2, size=(C, C)).astype(dtype)
    q = nb.softmax(rng.normal(size=(B, C, H, W)).astype(dtype))
    g_logits = rng.normal(size=q.shape).astype(dtype)

    msg = be.full_message(setup, q, config)
    full = be.materialise(msg)
    want_msg, want_gc = nb.compatibility_backward(g_logits, full, compat)
    grad_msg, gc = be.compatibility_backward(g_logits, msg, compat)
    assert isinstance(grad_msg, MessageGradient)
    assert_close(be.materialise_gradient(grad_msg), want_msg, dtype, "grad_msg")
    assert_close(gc, want_gc, dtype, "grad_compat")

    S = len(ref.weights)
    want_col, got_col, arr_col = (_meanfield.MessageGradients(S) for _ in range(3))
    want_q = nb.full_message_backward(ref, q, want_msg, config, want_col)
    lazy = be.full_message_backward(setup, q, grad_msg, config, got_col)
    assert isinstance(lazy, PixelGradient)
    assert_close(be.materialise_gradient(lazy), want_q, dtype, "grad_q (lazy grad_msg)")
    # an array grad_msg (the message is then recomputed) gives the same
    from_array = be.full_message_backward(setup, q, want_msg, config, arr_col)
    assert_close(be.materialise_gradient(from_array), want_q, dtype, "grad_q (array grad_msg)")
    # the softmax vjp consumes the lazy gradient on the fly (and settles its normaliser term)
    q_prev = nb.softmax(rng.normal(size=q.shape).astype(dtype))
    assert_close(be.softmax_backward(q, lazy), nb.softmax_backward(q, want_q), dtype, "softmax vjp, lazy")
    # ... also for another q (the normaliser term is then settled on its own)
    assert_close(be.softmax_backward(q_prev, from_array), nb.softmax_backward(q_prev, want_q), dtype,
                 "softmax vjp, lazy, other q")
    for col in (got_col, arr_col):
        for s in range(S):
            assert_close(np.concatenate(col.left[s], 1), np.concatenate(want_col.left[s], 1), dtype, "G")
            assert_close(np.concatenate(col.right[s], 1), np.concatenate(want_col.right[s], 1), dtype, "P")
            if norm:
                assert_close(col.normalisers[s], want_col.normalisers[s], dtype, "grad n")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("F,k,blur,norm,keep", [(3, 5, 2, None, False), (1, 3, 1, "symmetric", False),
                                                (6, 5, 3, "symmetric", True), (2, 7, 1, None, True)])
def test_prepare_backward(dtype, F, k, blur, norm, keep, chunk_rule):
    """The kernel-gradient kernel on the same collected G, P and normaliser gradients as NumPy."""
    rng = np.random.default_rng(F * 10 + k)
    B, C, H, W, T = 2, 3, 10, 11, 3
    features, params, config = _setup_pair(rng, B, F, H, W, k, blur, dtype, norm, keep)
    be = emulated("reverse")
    setup = be.prepare(features, params, config)
    ref = _meanfield.prepare(nb, features, params, config)
    h, w = setup.coarse
    S = len(ref.weights)
    collected = _meanfield.MessageGradients(S)
    for s in range(S):
        for _ in range(T):
            collected.left[s].append(rng.normal(size=(B, C, h, w)).astype(dtype))
            collected.right[s].append(rng.uniform(size=(B, C, h, w)).astype(dtype))
        if norm:
            collected.normalisers[s] = rng.normal(size=(B, 1, H, W)).astype(dtype)
    want_f, want = nb.prepare_backward(ref, features, params, config, collected)
    got_f, got = be.prepare_backward(setup, features, params, config, collected)
    assert_close(got_f, want_f, dtype, "features")
    for name in want:
        assert_close(got[name], want[name], dtype, name)


@pytest.fixture(params=["small-grid", "large-grid"])
def chunk_rule(request, monkeypatch):
    """Test grids are small (chunks of 8 stacked classes); "large-grid" forces chunks of 16."""
    if request.param == "large-grid":
        monkeypatch.setattr(_cuda, "SMALL_GRID_CELLS", 0)
    return request.param


# ---------------------------------------------------------------------------------------------
# the whole taped T-iteration inference and its backward (what infer_vjp runs)
# ---------------------------------------------------------------------------------------------
CASES = [
    # (B, C, H, W, F, filter_size, blur, potts, normalization, iterations, dtype, order, logits)
    (1, 3, 9, 11, 3, 5, 1, True, None, 3, np.float64, "forward", False),
    (2, 4, 11, 7, 1, 3, 2, False, None, 2, np.float64, "reverse", True),
    (2, 3, 12, 10, 3, 7, 3, True, "symmetric", 2, np.float64, "forward", False),
    (1, 3, 10, 9, 1, 5, 2, False, "symmetric", 3, np.float64, "reverse", True),
    (1, 3, 11, 11, 3, 5, 1, False, "symmetric", 2, np.float64, "forward", False),
    (1, 3, 9, 12, 3, 3, 3, False, None, 2, np.float64, "reverse", False),
    (2, 3, 9, 11, 3, 5, 1, True, None, 3, np.float32, "forward", True),
    (1, 4, 12, 9, 1, 3, 3, False, "symmetric", 2, np.float32, "reverse", False),
    (2, 2, 10, 12, 3, 7, 2, True, "symmetric", 3, np.float32, "forward", False),
    (1, 3, 9, 10, 1, 5, 2, False, None, 2, np.float32, "reverse", True),
    (1, 3, 8, 9, 6, 3, 1, True, "symmetric", 2, np.float32, "forward", False),    # generic feature count
    (2, 3, 6, 37, 3, 5, 1, True, None, 2, np.float32, "reverse", False),          # 32-wide tiles, 2 blocks
    (1, 21, 6, 7, 3, 5, 2, False, None, 2, np.float32, "forward", False),         # 42 stacked classes
]


def _case_id(c):
    B, C, H, W, F, k, blur, potts, norm, T, dt, order, logits = c
    return (f"B{B}C{C}_{H}x{W}F{F}_k{k}b{blur}_{'potts' if potts else 'matrix'}_{norm}_T{T}_"
            f"{np.dtype(dt).name}_{order}{'_logits' if logits else ''}")


def _taped_backward(backend, unary, features, params, config, grad_output, logits):
    tape = _meanfield.Tape()
    out = _meanfield.mean_field(backend, unary, features, params, config, return_logits=logits, tape=tape)
    return out, _meanfield.mean_field_backward(backend, tape, grad_output)


def _assert_same_gradients(got, want, dtype, excuse=None):
    """:func:`assert_close` on every gradient; ``excuse`` maps a name to its allowance."""
    (gu, gf, gp), (wu, wf, wp) = got, want
    excuse = excuse or {}
    assert gu.dtype == dtype and gf.dtype == dtype
    assert_close(gu, wu, dtype, "unary", excuse.get("unary", 0.0))
    assert_close(gf, wf, dtype, "features", excuse.get("features", 0.0))
    assert set(gp) == set(wp)
    for name in wp:
        assert_close(gp[name], wp[name], dtype, name, excuse.get(name, 0.0))


def _flat(grads):
    gu, gf, gp = grads
    return {"unary": gu, "features": gf, **gp}


def _rounding_noise(unary, features, params, config, grad_output, logits, truth):
    """How far float32 rounding alone moves each gradient: the largest distance from ``truth``
    (the float64 gradients) of NumPy's float32 gradients of the problem and of two copies whose
    inputs are moved by one ulp. A gradient that is a small difference of large terms (the
    parameter gradients are sums over every pair of cells) is only known to that precision, by
    either backend."""
    rng = np.random.default_rng(0)
    eps = np.finfo(np.float32).eps

    def wiggle(a, amount):
        return (a * (1 + amount * eps * rng.choice([-1.0, 1.0], size=a.shape))).astype(np.float32)

    truth = _flat(truth)
    noise = dict.fromkeys(truth, 0.0)
    for amount in (0, 1, 1):
        u, f, g = (wiggle(a, amount) for a in (unary, features, grad_output))
        draw = _flat(_taped_backward(nb, u, f, params, config, g, logits)[1])
        for name in noise:
            noise[name] = max(noise[name], _max_abs(np.asarray(draw[name], np.float64) - truth[name]))
    return noise


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mean_field_backward_matches_numpy(case):
    B, C, H, W, F, k, blur, potts, norm, T, dtype, order, logits = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))  # the same problem every run
    unary, features, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    config = _meanfield.CRFConfig(k, blur, T, norm)
    go = rng.normal(size=unary.shape).astype(dtype)
    want_out, want = _taped_backward(nb, unary, features, params, config, go, logits)
    got_out, got = _taped_backward(emulated(order), unary, features, params, config, go, logits)
    assert_close(got_out, want_out, dtype, "output")
    excuse = None
    if dtype == np.float32:
        # Strict (1e-4) for the unary and feature maps; a parameter gradient, a sum over every
        # pair of cells, can be ill-conditioned in float32 (condition numbers of thousands here:
        # theta_gamma with normalisation, the weights), so 10 times its float32 rounding noise is
        # excused. (Over 60 random draws of each float32 case the largest error was 0.6 of that
        # allowance; unary, features and compatibility stayed below 0.04 of 1e-4.)
        u64, f64, g64 = (a.astype(np.float64) for a in (unary, features, go))
        truth = _taped_backward(nb, u64, f64, params, config, g64, logits)[1]
        noise = _rounding_noise(unary, features, params, config, go, logits, truth)
        excuse = {name: 10 * v for name, v in noise.items() if name not in ("unary", "features")}
    _assert_same_gradients(got, want, dtype, excuse)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2), C=st.integers(2, 5), H=st.integers(1, 12), W=st.integers(1, 12),
    F=st.sampled_from([1, 3, 6]), blur=st.integers(1, 4), k=st.sampled_from([3, 5, 7]),
    potts=st.booleans(), norm=st.sampled_from([None, "symmetric"]), logits=st.booleans(),
    order=st.sampled_from(ORDERS), seed=st.integers(0, 2**31),
)
def test_mean_field_backward_matches_numpy_random_shapes(B, C, H, W, F, blur, k, potts, norm, logits, order, seed):
    """Odd sizes down to one pixel, in float64 (float32 is covered by the fixed cases)."""
    dtype = np.float64
    rng = np.random.default_rng(seed)
    unary, features, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    config = _meanfield.CRFConfig(k, blur, 2, norm)
    go = rng.normal(size=unary.shape).astype(dtype)
    want = _taped_backward(nb, unary, features, params, config, go, logits)[1]
    got = _taped_backward(emulated(order), unary, features, params, config, go, logits)[1]
    # Tiny images make some gradients zero by symmetry, i.e. pure rounding noise in both
    # backends: allowed are 64 times the float32 noise scaled to float64, and, for the features
    # and parameters, 64 eps of the unary gradient's scale.
    noise = _rounding_noise(unary, features, params, config, go, logits, want)
    ratio = np.finfo(np.float64).eps / np.finfo(np.float32).eps
    floor = 64 * np.finfo(np.float64).eps * _max_abs(want[0])
    excuse = {name: 64 * ratio * v + (floor if name != "unary" else 0.0) for name, v in noise.items()}
    _assert_same_gradients(got, want, dtype, excuse)


def test_keep_centre_zero_weight_and_zero_iterations():
    rng = np.random.default_rng(3)
    unary, features, params = random_problem(rng, 1, 3, 8, 9, 3, np.float64, potts=False)
    go = rng.normal(size=unary.shape)
    for p, norm, T in ((params.replace(appearance_weight=0.0), "symmetric", 2),
                       (params.replace(smoothness_weight=0.0), None, 2),
                       (params, None, 0), (params, "symmetric", 1)):
        config = _meanfield.CRFConfig(5, 2, T, norm, keep_centre=True)
        want = _taped_backward(nb, unary, features, p, config, go, False)[1]
        got = _taped_backward(emulated("reverse"), unary, features, p, config, go, False)[1]
        _assert_same_gradients(got, want, np.float64)


def test_kernel_gradient_loops_over_grid_z(monkeypatch):
    """More z slices (batch x kernels x class chunks) than the grid has: the kernel loops."""
    rng = np.random.default_rng(13)
    unary, features, params = random_problem(rng, 2, 5, 9, 10, 3, np.float64, potts=False)
    go = rng.normal(size=unary.shape)
    config = _meanfield.CRFConfig(5, 2, 2, "symmetric")
    want = _taped_backward(nb, unary, features, params, config, go, False)[1]
    monkeypatch.setattr(_cuda, "MAX_GRID_Z", 3)  # 2 images x 2 kernels x 2 chunks = 8 slices
    got = _taped_backward(emulated("reverse"), unary, features, params, config, go, False)[1]
    _assert_same_gradients(got, want, np.float64)


def test_thread_order_does_not_change_a_bit():
    """Every output has one writer and every sum a fixed order: forward == reverse, bit for bit."""
    rng = np.random.default_rng(12)
    unary, features, params = random_problem(rng, 2, 4, 10, 37, 3, np.float32, potts=False)
    go = rng.normal(size=unary.shape).astype(np.float32)
    for norm in (None, "symmetric"):
        config = _meanfield.CRFConfig(5, 2, 2, norm)
        a = _taped_backward(emulated("forward"), unary, features, params, config, go, False)[1]
        b = _taped_backward(emulated("reverse"), unary, features, params, config, go, False)[1]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        for name in a[2]:
            np.testing.assert_array_equal(a[2][name], b[2][name])


def test_emulated_gradients_against_finite_differences():
    """float64 central differences of the emulated forward along one joint random direction."""
    rng = np.random.default_rng(5)
    B, C, H, W, F = 1, 3, 7, 8, 2
    h_step = 1e-6
    for potts, norm, blur in ((False, None, 2), (True, "symmetric", 1)):
        unary, features, params = random_problem(rng, B, C, H, W, F, np.float64, potts)
        config = _meanfield.CRFConfig(3, blur, 2, norm)
        go = rng.normal(size=unary.shape)
        be = emulated()
        _, (gu, gf, gp) = _taped_backward(be, unary, features, params, config, go, False)
        names = ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight")
        du, df = rng.normal(size=unary.shape), rng.normal(size=features.shape)
        dp = {n: rng.normal() * 0.3 for n in names}
        db = rng.normal(size=F)
        dc = rng.normal(size=(C, C))
        mu = params.compatibility_matrix(C)

        def loss(t):
            p = params.replace(**{n: getattr(params, n) + t * dp[n] for n in names},
                               theta_beta=tuple(np.asarray(params.theta_beta) + t * db), compatibility=mu + t * dc)
            return float(np.sum(go * _meanfield.mean_field(be, unary + t * du, features + t * df, p, config)))

        fd = (loss(h_step) - loss(-h_step)) / (2 * h_step)
        an = (np.sum(gu * du) + np.sum(gf * df) + sum(gp[n] * dp[n] for n in names)
              + np.sum(gp["theta_beta"] * db) + np.sum(gp["compatibility"] * dc))
        assert abs(fd - an) <= 1e-6 * abs(an), (fd, an)


# ---------------------------------------------------------------------------------------------
# specialisations and broken variants
# ---------------------------------------------------------------------------------------------
def test_specialisations_cover_the_backward_launches():
    specs = _cuda.specialisations()
    names = {n for entries in specs.values() for _, ns in entries for n in ns}
    for dt in (np.float32, np.float64):
        for F in range(1, 9):
            for ct in (2, 8, 9, 42, 200):
                for cells in (None, 100):
                    assert _cuda.kernel_grad_spec(dt, F, ct, cells)[0] in names
        for n in (0, 1, 2):
            assert _cuda.upsample_backward_spec(dt, n) in names
            assert _cuda.softmax_backward_spec(dt, n) in names
        for scaled in (False, True):
            assert _cuda.pool_backward_spec(dt, scaled) in names
        assert _cuda.upsampled_dot_spec(dt) in names and _cuda.class_products_spec(dt) in names


def test_kernel_grad_launch_fits_shared_memory():
    for F in (1, 3, 5, 6, 16):
        for radius in (1, 3, 6):
            for itemsize in (4, 8):
                block, smem = _cuda.kernel_grad_launch((125, 125), (radius, radius), F, itemsize)
                n = block[0] * block[1] * block[2]
                assert n & (n - 1) == 0 and smem <= _cuda.SHARED_MEMORY_LIMIT


def _prepare_backward_problem():
    rng = np.random.default_rng(21)
    features, params, config = _setup_pair(rng, 1, 3, 9, 37, 5, 1, np.float64)
    h, w = 9, 37
    collected = _meanfield.MessageGradients(1)
    collected.left[0].append(rng.normal(size=(1, 3, h, w)))
    collected.right[0].append(rng.uniform(size=(1, 3, h, w)))
    return features, params, config, collected


def _run_prepare_backward(backend, problem):
    features, params, config, collected = problem
    return backend.prepare_backward(backend.prepare(features, params, config), features, params, config, collected)


def test_missing_reduction_barrier_is_caught():
    problem = _prepare_backward_problem()
    want = _run_prepare_backward(emulated(), problem)[1]
    loop = "    for (int stride = nthreads >> 1; stride > 0; stride >>= 1) {\n"
    mutation = ("kernel_grad.cu", loop + "        __syncthreads();", loop)
    wrong = []
    for order in ORDERS:
        got = _run_prepare_backward(emulated(order, mutation=mutation), problem)[1]
        wrong.append(any(not np.allclose(got[n], want[n], rtol=1e-9) for n in want))
    assert any(wrong), "a block reduction without its barrier matched in both thread orders"


@pytest.mark.skipif(not emulator.asan_available(), reason="AddressSanitizer not available")
def test_backward_kernels_stay_in_bounds_under_asan():
    """Every backward kernel (merged and normalised, generic feature count) under AddressSanitizer."""
    rng = np.random.default_rng(30)
    for norm, potts, F, blur in ((None, False, 6, 3), ("symmetric", True, 3, 2)):
        unary, features, params = random_problem(rng, 2, 3, 7, 9, F, np.float64, potts)
        config = _meanfield.CRFConfig(5, blur, 1, norm)
        go = rng.normal(size=unary.shape)
        want = _taped_backward(nb, unary, features, params, config, go, False)[1]
        got = _taped_backward(emulated(asan=True), unary, features, params, config, go, False)[1]
        _assert_same_gradients(got, want, np.float64)
