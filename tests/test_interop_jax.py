"""cucrf.jax: custom VJP (check_grads in float64), jit, grad, vmap, both host-callback routes."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import cucrf  # noqa: E402
import cucrf.jax as cj  # noqa: E402

rng = np.random.default_rng(2)
SMALL = dict(filter_size=3, iterations=2)
ROUTES = ["pure"] + (["buffer"] if cj._buffer_callback is not None else [])


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    monkeypatch.setattr(cj, "CALLBACK", request.param)
    return request.param


def tiny_problem(batch=1, classes=3, height=5, width=6, channels=2):
    unary = rng.normal(size=(batch, classes, height, width))
    image = rng.uniform(size=(batch, height, width, channels))  # [0, 1] with theta_beta 0.5: well-conditioned
    params = dict(theta_alpha=3.0, theta_beta=0.5, theta_gamma=2.0, appearance_weight=1.5, smoothness_weight=0.7,
                  unary_weight=1.2, compatibility=1 - np.eye(classes) + 0.1 * rng.normal(size=(classes, classes)))
    return unary, image, params


def as_jax(unary, image, params):
    return jnp.asarray(unary), jnp.asarray(image), {k: jnp.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize("settings", [
    dict(blur=1, output="probabilities"),
    dict(blur=2, output="logits", normalization="symmetric"),
])
def test_check_grads_float64(x64, route, settings):
    unary, image, params = as_jax(*tiny_problem())
    assert unary.dtype == jnp.float64

    def f(u, im, p):
        return cj.infer(u, im, p, **SMALL, **settings)

    check_grads(f, (unary, image, params), order=1, modes=["rev"])


def test_matches_cucrf_forward_and_vjp(x64, route):
    unary, image, params = tiny_problem()
    fixed = cucrf.CRFParams(**params)
    ju, ji, jp = as_jax(unary, image, params)
    f = jax.jit(lambda u, im, p: cj.infer(u, im, p, blur=2, **SMALL))
    q, vjp = jax.vjp(f, ju, ji, jp)
    np.testing.assert_array_equal(np.asarray(q), cucrf.infer(unary, image, fixed, blur=2, **SMALL))
    g = rng.normal(size=q.shape)
    gu, gi, gp = vjp(jnp.asarray(g))
    r = cucrf.infer_vjp(unary, image, fixed, grad_output=g, blur=2, **SMALL)
    np.testing.assert_array_equal(np.asarray(gu), r.unary)
    np.testing.assert_array_equal(np.asarray(gi), r.image)
    for name in params:
        np.testing.assert_allclose(np.asarray(gp[name]), r.params[name], rtol=1e-12)


def test_float32_jit_grad_and_constants(route):
    unary = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 10, 12))
    image = jnp.asarray(rng.integers(0, 255, (2, 10, 12, 3)), dtype=jnp.uint8)

    @jax.jit
    def loss(u, log_theta_beta, w):
        q = cj.infer(u, image, {"theta_beta": jnp.exp(log_theta_beta), "appearance_weight": w, "theta_gamma": 2.0},
                     blur=2)
        return (q[:, 0] ** 2).sum()

    g_u, g_tb, g_w = jax.grad(loss, argnums=(0, 1, 2))(unary, jnp.log(jnp.float32(20.0)), jnp.float32(5.0))
    assert g_u.shape == unary.shape and g_u.dtype == jnp.float32
    assert g_tb.shape == () and g_w.shape == () and np.isfinite([g_tb, g_w]).all()


def test_vmap_and_per_channel_theta_beta(x64, route):
    unary, image, params = tiny_problem(classes=2)
    params["theta_beta"] = np.array([0.4, 0.6])
    ju, ji, jp = as_jax(unary, image, params)
    stacked = jnp.stack([ju[0], -ju[0]])
    q = jax.vmap(lambda u: cj.infer(u, ji[0], jp, blur=2, **SMALL))(stacked)
    fixed = cucrf.CRFParams(**{**params, "theta_beta": (0.4, 0.6)})
    np.testing.assert_array_equal(np.asarray(q[1]), cucrf.infer(-unary[0], image[0], fixed, blur=2, **SMALL))
    g = jax.grad(lambda p: cj.infer(ju, ji, p, blur=2, **SMALL)[:, 0].sum())(jp)
    assert g["theta_beta"].shape == (2,)


def test_param_arrays_and_errors():
    p = cj.param_arrays(num_classes=3)
    assert sorted(p) == sorted(cj.PARAM_NAMES) and p["compatibility"].shape == (3, 3)
    np.testing.assert_allclose(p["compatibility"], 1 - np.eye(3))
    unary = jnp.zeros((3, 8, 9))
    image = jnp.zeros((8, 9, 3))
    q = cj.infer(unary, image, p, blur=2)
    np.testing.assert_allclose(np.asarray(q), 1 / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="pass num_classes"):
        cj.param_arrays()
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        cj.infer(unary, image, {"theta": 1.0})
    with pytest.raises(ValueError, match="must have shape \\(H, W, F\\)"):
        cj.infer(unary, jnp.zeros((3, 8, 9)))
    with pytest.raises(TypeError, match="floating-point logits"):
        cj.infer(jnp.zeros((3, 8, 9), dtype=jnp.int32), image)
    with pytest.raises(ValueError, match="filter_size must be odd"):
        cj.infer(unary, image, filter_size=4)
    with pytest.raises(ValueError, match="compatibility'\\] must have 2 dimension"):
        cj.infer(unary, image, {"compatibility": jnp.ones(3)})


def test_gpu_arrays_stay_on_the_gpu(route):
    try:
        device = jax.devices("gpu")[-1]
    except RuntimeError:
        pytest.skip("JAX sees no GPU")
    pytest.importorskip("cupy")
    unary, image, params = tiny_problem(height=16, width=20)
    ju, ji, jp = (jax.device_put(x, device) for x in as_jax(unary.astype(np.float32), image.astype(np.float32),
                                                            params))
    q = jax.jit(lambda u, im, p: cj.infer(u, im, p, blur=2, **SMALL))(ju, ji, jp)
    assert q.devices() == {device}
    fixed = cucrf.CRFParams(**params)
    np.testing.assert_allclose(np.asarray(q), cucrf.infer(unary.astype(np.float32), image.astype(np.float32), fixed,
                                                          blur=2, **SMALL), atol=1e-5)


def test_docstring_examples():
    import doctest

    result = doctest.testmod(cj, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
