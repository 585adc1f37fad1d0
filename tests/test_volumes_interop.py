"""Volumes through the framework adapters: cucrf.torch (autograd, the ConvCRF module) and cucrf.jax."""

import numpy as np
import pytest

import cucrf

VOLUME = dict(spatial_dims=3, filter_size=3, blur=(1, 2, 2), spacing=(2.0, 1.0, 1.0), iterations=2)


def problem(seed=0, batch=2, classes=3, size=(3, 5, 6), channels=2):
    rng = np.random.default_rng(seed)
    unary = rng.normal(size=(batch, classes) + size)
    image = rng.uniform(size=(batch,) + size + (channels,))
    params = cucrf.CRFParams(theta_alpha=3.0, theta_beta=0.5, theta_gamma=2.0, appearance_weight=1.5,
                             smoothness_weight=0.7, compatibility=1 - np.eye(classes) + 0.1 * rng.normal(size=(classes,) * 2))
    return unary, image, params


def test_torch_gradcheck_and_module_on_volumes():
    torch = pytest.importorskip("torch")
    import cucrf.torch as ct

    unary, image, params = problem()
    u = torch.tensor(unary, requires_grad=True)
    im = torch.tensor(image, requires_grad=True)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    compat = torch.tensor(params.compatibility_matrix(3), requires_grad=True)

    def f(u, im, w, compat):
        return ct.infer(u, im, {"appearance_weight": w, "compatibility": compat, "theta_beta": 0.5}, **VOLUME)

    assert torch.autograd.gradcheck(f, (u, im, w, compat))
    # The module on (B, C, D, H, W) tensors equals cucrf.infer's logits.
    crf = ct.ConvCRF(num_classes=3, params=params, **VOLUME).double()
    got = crf(torch.tensor(unary), torch.tensor(image)).detach().numpy()
    # The module keeps its parameters in the default dtype (float32): equal to that rounding.
    np.testing.assert_allclose(got, cucrf.infer(unary, image, params, output="logits", **VOLUME), rtol=1e-5,
                               atol=1e-5)
    assert "spatial_dims=3" in repr(crf)
    with pytest.raises(ValueError, match="spatial_dims must be 2 .* or 3 .*, got 4"):
        ct.ConvCRF(spatial_dims=4)
    with pytest.raises(ValueError, match=r"spacing must have 3 values"):
        ct.ConvCRF(spatial_dims=3, spacing=(1.0, 2.0))


def test_jax_on_volumes_matches_cucrf():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import cucrf.jax as cj

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        unary, image, params = problem(1)
        go = np.random.default_rng(2).normal(size=unary.shape)

        def loss(u, im):
            return jnp.sum(jnp.asarray(go) * cj.infer(u, im, params, **VOLUME))

        q = cj.infer(jnp.asarray(unary), jnp.asarray(image), params, **VOLUME)
        np.testing.assert_allclose(np.asarray(q), cucrf.infer(unary, image, params, **VOLUME), rtol=1e-12)
        g_u, g_im = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(unary), jnp.asarray(image))
        r = cucrf.infer_vjp(unary, image, params, grad_output=go, **VOLUME)
        np.testing.assert_allclose(np.asarray(g_u), r.unary, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(g_im), r.image, rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="or a volume of 3 slices .* spatial_dims=3 for a volume"):
            cj.infer(jnp.asarray(unary[0]), jnp.asarray(image[0]), params, filter_size=3, blur=1)
    finally:
        jax.config.update("jax_enable_x64", previous)
