"""``include_self``: the window keeps its centre cell (upstream ConvCRF's window).

Checked against independent references, all in float64:

* the brute-force oracle (tests/oracle.py, ``keep_centre=True``), to rtol = atol = 1e-10, for
  blur 1 and 2-4, Potts and matrix compatibilities, both normalisations, both outputs;
* a closed form written here from the model: with ``filter_size=1`` the window is the centre
  alone, so each update is ``softmax(a U - mu (w_a + w_s) Up(Pool(Q)))``; and for any window,
  after one iteration without normalisation, the logits with and without the centre differ by
  exactly that self-message ``-mu (w_a + w_s) Up(Pool(softmax(a U)))``;
* ``include_self=False`` is the model as before (the oracle without the centre, and the default);
* gradients of :func:`cucrf.infer_vjp` against Richardson-extrapolated central differences (the
  helpers and the tolerance of tests/test_gradients.py: relative error <= 1e-6);
* the CUDA kernels on the CPU emulator, through the public ``cucrf.infer`` / ``cucrf.infer_vjp``
  (the backend swapped in), against the NumPy backend (rtol 1e-10, atol 1e-12); a kernel that
  ignores the flag is caught;
* the PyTorch and JAX adapters (skipped when not installed);
* anything but a bool is a TypeError naming ``include_self``.
"""

import re
import shutil
import zlib

import numpy as np
import pytest

import cucrf
from cucrf import _api, _meanfield
from cucrf import _numpy_backend as nb

from . import oracle
from .test_gradients import assert_directional, problem
from .test_inference import random_params, random_problem, to_crfparams

RTOL = ATOL = 1e-10  # float64 against the oracle


def _seed(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))  # stable across runs


def _softmax(x):
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _self_message(q, p, blur):
    """``(w_a + w_s) Up(Pool(q))`` for one image's (C, H, W) ``q``: the centre cell's own message."""
    C, H, W = q.shape
    return (p["appearance_weight"] + p["smoothness_weight"]) * oracle.upsample_image(
        oracle.pool_image(q, blur), blur, H, W)


def _mu(p, C):
    return 1.0 - np.eye(C) if p["compatibility"] is None else np.asarray(p["compatibility"])


# ---------------------------------------------------------------------------------------------
# against the brute-force oracle
# ---------------------------------------------------------------------------------------------
CASES = [
    # (B, C, H, W, F, filter_size, blur, potts, normalization, iterations)
    (1, 3, 6, 7, 3, 3, 1, True, None, 3),
    (2, 3, 6, 5, 1, 5, 1, False, "symmetric", 2),
    (1, 2, 5, 6, 2, 1, 1, False, None, 3),
    (1, 4, 7, 9, 3, 3, 2, True, "symmetric", 3),
    (1, 3, 9, 8, 3, 5, 2, False, None, 2),
    (2, 3, 10, 7, 3, 3, 3, True, None, 2),
    (1, 3, 11, 10, 5, 5, 4, False, "symmetric", 3),
    (1, 2, 9, 9, 3, 1, 3, True, "symmetric", 2),
]


def _case_id(c):
    return "B{}C{}_{}x{}F{}_k{}b{}_{}_{}_T{}".format(*c[:7], "potts" if c[7] else "matrix", c[8], c[9])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_matches_oracle_with_centre(case, output):
    B, C, H, W, F, k, blur, potts, norm, T = case
    rng = _seed(case, "with centre")
    unary, image = random_problem(rng, B, C, H, W, F)
    p = random_params(rng, C, F, potts)
    got = cucrf.infer(unary, image, to_crfparams(p), filter_size=k, blur=blur, iterations=T, normalization=norm,
                      output=output, include_self=True)
    assert got.dtype == np.float64 and got.shape == unary.shape
    for b in range(B):
        want = oracle.infer(unary[b], image[b], p, k, blur, T, norm, output, keep_centre=True)
        np.testing.assert_allclose(got[b], want, rtol=RTOL, atol=ATOL)
        if k > 1:  # the centre matters: the model without it is far from this result
            without = oracle.infer(unary[b], image[b], p, k, blur, T, norm, output, keep_centre=False)
            assert np.max(np.abs(want - without)) > 1e-3


@pytest.mark.parametrize("case", [c for c in CASES if c[5] > 1], ids=_case_id)
def test_false_is_the_model_without_centre(case):
    B, C, H, W, F, k, blur, potts, norm, T = case
    rng = _seed(case, "without centre")
    unary, image = random_problem(rng, B, C, H, W, F)
    p = random_params(rng, C, F, potts)
    opts = dict(filter_size=k, blur=blur, iterations=T, normalization=norm)
    explicit = cucrf.infer(unary, image, to_crfparams(p), include_self=False, **opts)
    np.testing.assert_array_equal(explicit, cucrf.infer(unary, image, to_crfparams(p), **opts))
    for b in range(B):
        np.testing.assert_allclose(explicit[b], oracle.infer(unary[b], image[b], p, k, blur, T, norm),
                                   rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# against closed forms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blur", [1, 2, 3])
@pytest.mark.parametrize("potts", [True, False])
@pytest.mark.parametrize("norm", [None, "symmetric"])
def test_window_of_the_centre_alone(blur, potts, norm):
    """filter_size=1: Q <- softmax(a U - mu (w_a + w_s) Up(Pool(Q))); symmetric n = 1/sqrt(1 + 1e-20) = 1."""
    rng = _seed(blur, potts, norm, "k1")
    C, H, W, F, T = 3, 9, 11, 3, 4
    unary, image = random_problem(rng, 1, C, H, W, F)
    p = random_params(rng, C, F, potts)
    got = cucrf.infer(unary[0], image[0], to_crfparams(p), filter_size=1, blur=blur, iterations=T,
                      normalization=norm, include_self=True, output="logits")
    a, mu = p["unary_weight"], _mu(p, C)
    logits = a * unary[0]
    for _ in range(T):
        logits = a * unary[0] - np.einsum("lk,khw->lhw", mu, _self_message(_softmax(logits), p, blur))
    np.testing.assert_allclose(got, logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k,blur", [(3, 1), (5, 1), (3, 2), (5, 4)])
@pytest.mark.parametrize("potts", [True, False])
def test_centre_adds_exactly_the_self_message(k, blur, potts):
    """One iteration, no normalisation: logits(True) - logits(False) = -mu (w_a + w_s) Up(Pool(Q0))."""
    rng = _seed(k, blur, potts, "difference")
    C, H, W, F = 4, 10, 9, 3
    unary, image = random_problem(rng, 1, C, H, W, F)
    p = random_params(rng, C, F, potts)
    opts = dict(filter_size=k, blur=blur, iterations=1, output="logits")
    with_centre = cucrf.infer(unary[0], image[0], to_crfparams(p), include_self=True, **opts)
    without = cucrf.infer(unary[0], image[0], to_crfparams(p), include_self=False, **opts)
    q0 = _softmax(p["unary_weight"] * unary[0])
    expected = -np.einsum("lk,khw->lhw", _mu(p, C), _self_message(q0, p, blur))
    np.testing.assert_allclose(with_centre - without, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
GRAD_CASES = [
    # (blur, potts, normalization, output, filter_size)
    (1, True, None, "probabilities", 3),
    (1, False, "symmetric", "logits", 5),
    (2, False, None, "logits", 3),
    (2, True, "symmetric", "probabilities", 5),
    (3, False, "symmetric", "probabilities", 1),
]


def _grad_id(c):
    return f"blur{c[0]}_{'potts' if c[1] else 'matrix'}_{c[2]}_{c[3]}_k{c[4]}"


@pytest.mark.parametrize("case", GRAD_CASES, ids=_grad_id)
def test_infer_vjp_with_centre_against_finite_differences(case):
    blur, potts, norm, output, k = case
    rng = _seed(case, "gradients")
    unary, image, params = problem(rng, potts=potts, H=9, W=10)
    opts = dict(filter_size=k, blur=blur, iterations=3, normalization=norm, output=output, include_self=True)
    go = rng.normal(size=unary.shape)

    def loss(u=unary, im=image, p=params):
        return float(np.sum(go * cucrf.infer(u, im, p, **opts)))

    r = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
    np.testing.assert_array_equal(r.output, cucrf.infer(unary, image, params, **opts))
    if k > 1:  # the flag reaches the backward pass
        without = cucrf.infer_vjp(unary, image, params, grad_output=go, **{**opts, "include_self": False})
        assert np.max(np.abs(r.unary - without.unary)) > 1e-4
    assert_directional(lambda v: loss(u=v), unary, r.unary, rng)
    if k == 1:
        # The centre alone: kernel value 1 whatever the features and bandwidths.
        assert not np.any(r.image)
        assert r.params["theta_alpha"] == r.params["theta_gamma"] == 0.0 and not np.any(r.params["theta_beta"])
    else:
        assert_directional(lambda v: loss(im=v), image, r.image, rng)
        assert_directional(lambda v: loss(p=params.replace(theta_beta=tuple(v))), np.array(params.theta_beta),
                           r.params["theta_beta"], rng)
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight"):
        assert_directional(lambda v: loss(p=params.replace(**{name: float(v)})), getattr(params, name),
                           r.params[name], rng)
    assert_directional(lambda v: loss(p=params.replace(compatibility=v)), params.compatibility_matrix(3),
                       r.params["compatibility"], rng)


# ---------------------------------------------------------------------------------------------
# memory estimate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [None, "symmetric"])
def test_memory_estimate_covers_the_kernel_stack_with_centre(norm):
    rng = np.random.default_rng(11)
    B, C, H, W, F, k, blur = 2, 3, 17, 21, 3, 5, 2
    config = _api.check_config(k, blur, 2, norm, (H, W), keep_centre=True)
    features = rng.uniform(0, 40, size=(B, F, H, W))
    setup = _meanfield.prepare(nb, features, to_crfparams(random_params(rng, C, F)), config)
    assert setup.kernels.shape[2] == k * k  # the centre is stored
    stored = _meanfield.estimate_bytes(B, C, (H, W), F, config, 8)
    on_the_fly = _meanfield.estimate_bytes(B, C, (H, W), F, config, 8, stored_kernels=False)
    assert stored - on_the_fly >= setup.kernels.nbytes


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
BAD = [1, 0, "yes", None, 1.0, np.int64(1), [True]]


def _small():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 8, 9)), rng.uniform(0, 255, size=(8, 9, 3))


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_values_are_type_errors(bad):
    unary, image = _small()
    match = rf"include_self must be True or False \(a bool\), got {re.escape(repr(bad))} of type {type(bad).__name__}"
    with pytest.raises(TypeError, match=match):
        cucrf.infer(unary, image, blur=2, include_self=bad)
    with pytest.raises(TypeError, match=match):
        cucrf.infer_vjp(unary, image, blur=2, grad_output=np.zeros_like(unary), include_self=bad)


def test_numpy_bool_is_accepted():
    unary, image = _small()
    np.testing.assert_array_equal(cucrf.infer(unary, image, blur=2, include_self=np.True_),
                                  cucrf.infer(unary, image, blur=2, include_self=True))


def test_filter_size_one_needs_the_centre():
    unary, image = _small()
    with pytest.raises(ValueError, match="filter_size must be >= 3 with include_self=False.*include_self=True"):
        cucrf.infer(unary, image, blur=2, filter_size=1)
    with pytest.raises(ValueError, match="filter_size must be odd"):
        cucrf.infer(unary, image, blur=2, filter_size=2, include_self=True)
    assert cucrf.infer(unary, image, blur=2, filter_size=1, include_self=True).shape == unary.shape


# ---------------------------------------------------------------------------------------------
# the CUDA kernels on the CPU emulator, through the public path
# ---------------------------------------------------------------------------------------------
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not available")

EMU_CASES = [
    # (B, C, H, W, F, filter_size, blur, potts, normalization, iterations, dtype)
    (2, 3, 9, 10, 3, 3, 1, True, None, 3, np.float64),
    (1, 4, 11, 9, 3, 5, 2, False, "symmetric", 2, np.float64),
    (1, 3, 10, 12, 2, 1, 3, False, None, 2, np.float64),
    (1, 3, 13, 11, 3, 7, 1, True, "symmetric", 2, np.float64),
    (2, 3, 12, 10, 3, 5, 2, False, None, 2, np.float32),
]


def _on_emulator(monkeypatch, backend):
    """Make the public entry points compute on ``backend`` (the emulated CUDA backend)."""
    calls = []

    def get_backend(library):
        calls.append(library)
        return backend

    monkeypatch.setattr(_api, "get_backend", get_backend)
    return calls


@needs_gxx
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: _case_id(c[:10]) + f"_{np.dtype(c[10]).name}")
def test_emulated_cuda_public_path_matches_numpy(case, monkeypatch):
    from . import test_cuda_emulated as emu  # skips without the emulator
    B, C, H, W, F, k, blur, potts, norm, T, dtype = case
    rng = _seed(case[:10], "emulated")
    unary, image = random_problem(rng, B, C, H, W, F)
    unary = unary.astype(dtype)
    params = to_crfparams(random_params(rng, C, F, potts))
    go = rng.normal(size=unary.shape).astype(dtype)
    opts = dict(filter_size=k, blur=blur, iterations=T, normalization=norm, include_self=True)
    want = cucrf.infer(unary, image, params, output="logits", **opts)
    want_vjp = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
    calls = _on_emulator(monkeypatch, emu.emulated("reverse"))
    got = cucrf.infer(unary, image, params, output="logits", **opts)
    got_vjp = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
    assert calls == ["numpy", "numpy"]  # both calls ran on the emulated backend
    tol = emu.TOL[dtype]
    np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(got_vjp.output, want_vjp.output, **tol)
    # Gradients: relative to the largest magnitude (sums in another order).
    grad_rtol = 1e-4 if dtype == np.float32 else 1e-9
    for name in ("unary", "image"):
        g, w = getattr(got_vjp, name), getattr(want_vjp, name)
        assert np.max(np.abs(g - w)) <= grad_rtol * max(np.max(np.abs(w)), 1e-6), name
    for name, w in want_vjp.params.items():
        g = np.asarray(got_vjp.params[name])
        assert np.max(np.abs(g - w)) <= grad_rtol * max(np.max(np.abs(w)), 1e-6), name


@needs_gxx
def test_emulated_kernel_ignoring_the_flag_is_caught(monkeypatch):
    """The comparison above fails for a message kernel that always skips the centre."""
    from . import test_cuda_emulated as emu  # skips without the emulator
    rng = _seed("mutation")
    unary, image = random_problem(rng, 1, 3, 9, 10, 3)
    params = to_crfparams(random_params(rng, 3, 3))
    opts = dict(filter_size=3, blur=1, iterations=2, include_self=True)
    want = cucrf.infer(unary, image, params, **opts)
    mutation = ("message.cu", "dy == 0 && dx == 0 && !keep_centre", "dy == 0 && dx == 0")
    _on_emulator(monkeypatch, emu.emulated(mutation=mutation))
    got = cucrf.infer(unary, image, params, **opts)
    assert not np.allclose(got, want, **emu.TOL[np.float64])
    np.testing.assert_allclose(got, cucrf.infer(unary, image, params, **{**opts, "include_self": False}),
                               **emu.TOL[np.float64])


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------
def _adapter_problem(seed, C=3, H=6, W=7, F=2):
    rng = np.random.default_rng(seed)
    unary = rng.normal(size=(1, C, H, W))
    image = rng.uniform(size=(1, H, W, F))  # [0, 1] with theta_beta 0.5: well-conditioned
    params = dict(theta_alpha=3.0, theta_beta=0.5, theta_gamma=2.0, appearance_weight=1.5, smoothness_weight=0.7,
                  unary_weight=1.2, compatibility=1 - np.eye(C) + 0.1 * rng.normal(size=(C, C)))
    return unary, image, params


ADAPTER_SETTINGS = [dict(blur=1, filter_size=3, iterations=2, output="probabilities"),
                    dict(blur=2, filter_size=3, iterations=2, output="logits", normalization="symmetric")]


@pytest.mark.parametrize("settings", ADAPTER_SETTINGS)
def test_torch_infer_passes_include_self(settings):
    torch = pytest.importorskip("torch")
    import cucrf.torch as ct

    unary, image, params = _adapter_problem(1)
    names = list(params)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)  # noqa: E731
    u, im, values = t(unary), t(image), [t(params[n]) for n in names]
    out = ct.infer(u, im, dict(zip(names, values)), include_self=True, **settings)
    want = cucrf.infer(unary, image, cucrf.CRFParams(**params), include_self=True, **settings)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(want - cucrf.infer(unary, image, cucrf.CRFParams(**params), **settings))) > 1e-3
    go = np.random.default_rng(3).normal(size=unary.shape)
    out.backward(torch.tensor(go))
    r = cucrf.infer_vjp(unary, image, cucrf.CRFParams(**params), grad_output=go, include_self=True, **settings)
    np.testing.assert_allclose(u.grad.numpy(), r.unary, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(im.grad.numpy(), r.image, rtol=1e-12, atol=1e-12)
    for name, value in zip(names, values):
        np.testing.assert_allclose(value.grad.numpy(), r.params[name], rtol=1e-12, atol=1e-12)

    def f(uu, ii, *vs):
        return ct.infer(uu, ii, dict(zip(names, vs)), include_self=True, **settings)

    assert torch.autograd.gradcheck(f, (u.detach().requires_grad_(), im.detach().requires_grad_(),
                                        *[v.detach().requires_grad_() for v in values]))


def test_torch_module_passes_include_self():
    torch = pytest.importorskip("torch")
    import cucrf.torch as ct

    unary, image, params = _adapter_problem(2)
    crf = ct.ConvCRF(num_classes=3, params=params, filter_size=3, blur=2, iterations=2, include_self=True)
    assert crf.include_self is True and "include_self=True" in repr(crf)
    crf = crf.double()
    u = torch.tensor(unary, requires_grad=True)
    logits = crf(u, torch.tensor(image))
    want = cucrf.infer(unary, image, crf.crf_params(), filter_size=3, blur=2, iterations=2, output="logits",
                       include_self=True)
    np.testing.assert_allclose(logits.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    go = np.random.default_rng(4).normal(size=unary.shape)
    logits.backward(torch.tensor(go))
    r = cucrf.infer_vjp(unary, image, crf.crf_params(), grad_output=go, filter_size=3, blur=2, iterations=2,
                        output="logits", include_self=True)
    np.testing.assert_allclose(u.grad.numpy(), r.unary, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(crf.appearance_weight.grad.numpy(), r.params["appearance_weight"], rtol=1e-12)
    assert ct.ConvCRF(num_classes=3, filter_size=1, include_self=True).include_self is True


@pytest.mark.parametrize("bad", [1, "yes", None], ids=repr)
def test_torch_bad_values(bad):
    torch = pytest.importorskip("torch")
    import cucrf.torch as ct

    unary, image, _ = _adapter_problem(5)
    with pytest.raises(TypeError, match="include_self must be True or False"):
        ct.infer(torch.tensor(unary), torch.tensor(image), include_self=bad)
    with pytest.raises(TypeError, match="include_self must be True or False"):
        ct.ConvCRF(num_classes=3, include_self=bad)
    with pytest.raises(ValueError, match="include_self=True"):
        ct.ConvCRF(num_classes=3, filter_size=1)


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("settings", ADAPTER_SETTINGS)
def test_jax_infer_passes_include_self(jax_x64, settings):
    jax = jax_x64
    import jax.numpy as jnp
    from jax.test_util import check_grads

    import cucrf.jax as cj

    unary, image, params = _adapter_problem(6)
    ju, ji = jnp.asarray(unary), jnp.asarray(image)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    out = jax.jit(lambda u, i, p: cj.infer(u, i, p, include_self=True, **settings))(ju, ji, jp)
    want = cucrf.infer(unary, image, cucrf.CRFParams(**params), include_self=True, **settings)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(want - cucrf.infer(unary, image, cucrf.CRFParams(**params), **settings))) > 1e-3
    go = np.random.default_rng(7).normal(size=unary.shape)
    loss = lambda u, i, p: jnp.sum(jnp.asarray(go) * cj.infer(u, i, p, include_self=True, **settings))  # noqa: E731
    g_u, g_i, g_p = jax.grad(loss, argnums=(0, 1, 2))(ju, ji, jp)
    r = cucrf.infer_vjp(unary, image, cucrf.CRFParams(**params), grad_output=go, include_self=True, **settings)
    np.testing.assert_allclose(np.asarray(g_u), r.unary, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g_i), r.image, rtol=1e-12, atol=1e-12)
    for name in params:
        np.testing.assert_allclose(np.asarray(g_p[name]), r.params[name], rtol=1e-12, atol=1e-12)
    check_grads(lambda u, i, p: cj.infer(u, i, p, include_self=True, **settings), (ju, ji, jp), order=1,
                modes=["rev"])


@pytest.mark.parametrize("bad", [1, "yes", None], ids=repr)
def test_jax_bad_values(jax_x64, bad):
    import jax.numpy as jnp

    import cucrf.jax as cj

    unary, image, _ = _adapter_problem(8)
    with pytest.raises(TypeError, match="include_self must be True or False"):
        cj.infer(jnp.asarray(unary), jnp.asarray(image), include_self=bad)
