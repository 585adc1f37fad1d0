"""Finite inputs too large for the compute dtype are refused with a message, never returned as NaN."""

import itertools
import warnings

import numpy as np
import pytest

import cucrf
from cucrf import _api

rng = np.random.default_rng(0)
UNARY = rng.normal(size=(3, 16, 20)).astype(np.float32)
IMAGE = rng.integers(0, 256, size=(16, 20, 3)).astype(np.float32)
GRAD = rng.normal(size=UNARY.shape).astype(np.float32)

#: What every refusal says: the compute dtype's limit and how to get past it.
FIX = r"pass dtype=np.float64"


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with NumPy's overflow warnings silenced (what matters is what it returns or raises)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("blur", [1, 4])
def test_float32_image_near_its_maximum_is_refused(blur):
    image = np.full(IMAGE.shape, 3e38, np.float32)
    image[::2] = 1.0
    with pytest.raises(ValueError, match=rf"^image holds values up to 3e\+38 .*float32 can carry .*{FIX}"):
        quiet(cucrf.infer, UNARY, image, blur=blur)


def test_float64_image_beyond_float32_computed_in_float32_is_refused():
    image = IMAGE.astype(np.float64)
    image[3, 3, 0] = 1e39
    with pytest.raises(ValueError, match=rf"^image holds values up to 1e\+39 .*float32 can carry \(3.4e\+38\).*{FIX}"):
        quiet(cucrf.infer, UNARY, image, dtype=np.float32)
    # the fix the message gives works
    assert np.isfinite(cucrf.infer(UNARY, image, dtype=np.float64)).all()


def test_float64_unary_beyond_float32_computed_in_float32_is_refused():
    unary = UNARY.astype(np.float64) * 1e300
    with pytest.raises(ValueError, match=rf"^unary holds values up to 3.9e\+300 .*float32 can carry.*{FIX}"):
        quiet(cucrf.infer, unary, IMAGE, dtype=np.float32)
    assert np.isfinite(cucrf.infer(unary, IMAGE, dtype=np.float64)).all()


def test_unary_weight_times_unary_beyond_float32_is_refused():
    with pytest.raises(ValueError, match=rf"^unary_weight \* unary reaches 3.9e\+39 .*unary_weight=1e\+06.*{FIX}"):
        quiet(cucrf.infer, UNARY * np.float32(1e33), IMAGE, cucrf.CRFParams(unary_weight=1e6))
    with pytest.raises(ValueError, match=r"^unary_weight \* unary"):
        quiet(cucrf.infer_vjp, UNARY * np.float32(1e33), IMAGE, cucrf.CRFParams(unary_weight=1e6), grad_output=GRAD)


@pytest.mark.parametrize("field,value", [
    ("appearance_weight", 1e38), ("smoothness_weight", -1e38), ("unary_weight", 1e10),
    ("compatibility", np.full((3, 3), 1e38)),
])
def test_extreme_weights_are_refused_by_the_parameters(field, value):
    with pytest.raises(ValueError, match=rf"{field}.* must be in \[-1e\+06, 1e\+06\]"):
        cucrf.CRFParams(**{field: value})


def test_squared_colour_differences_beyond_float32_are_refused():
    with pytest.raises(ValueError, match=rf"^image spans 2.55e\+22 in channel \d .*theta_beta=20.*float32.*{FIX}"):
        quiet(cucrf.infer, UNARY, IMAGE * np.float32(1e20))
    # the message's fixes work: float64, or the image rescaled with theta_beta
    assert np.isfinite(cucrf.infer(UNARY, IMAGE * 1e20, dtype=np.float64)).all()
    params = cucrf.CRFParams(theta_beta=20.0 * 1e4)
    assert np.isfinite(cucrf.infer(UNARY, IMAGE * np.float32(1e4), params)).all()


def test_integer_images_are_scanned_only_when_their_dtype_range_is_too_wide(monkeypatch):
    """A uint8 image cannot hold values the kernels cannot carry: its range is not scanned. An
    int64 one can: it is scanned and refused, with the same message as a float image."""
    from cucrf import _validation

    scanned = []
    real = _validation._extremes
    def spy(arr, xp, axis=None):
        if axis is not None:  # per channel: the features (the unary is scanned whole)
            scanned.append(arr.shape)
        return real(arr, xp, axis)

    monkeypatch.setattr(_validation, "_extremes", spy)
    for dtype in (np.uint8, np.int16, np.uint16):
        assert np.isfinite(cucrf.infer(UNARY, IMAGE.astype(dtype))).all()
    assert scanned == []
    image = (IMAGE.astype(np.int64) * 10**16)
    with pytest.raises(ValueError, match=rf"^image spans 2.55e\+18 in channel \d .*theta_beta=1e-05.*float32.*{FIX}"):
        quiet(cucrf.infer, UNARY, image, cucrf.CRFParams(theta_beta=1e-5))
    assert scanned
    # within range: scanned, accepted
    assert np.isfinite(cucrf.infer(UNARY, IMAGE.astype(np.int64))).all()


def test_transformed_features_beyond_float32_are_refused():
    with pytest.raises(ValueError, match=r"^image \(after feature_transform\) spans"):
        quiet(cucrf.infer, UNARY, IMAGE, feature_transform=np.eye(3) * 1e30)
    with pytest.raises(ValueError, match=r"^feature_transform maps the image to values beyond what float32 can carry"):
        quiet(cucrf.infer, UNARY, IMAGE, feature_transform=np.eye(3) * 1e300)


def test_gradient_of_raw_differences_beyond_float32_is_refused():
    image = (rng.uniform(-1, 1, IMAGE.shape) * 1e19).astype(np.float32)
    assert np.isfinite(cucrf.infer(UNARY, image, cucrf.CRFParams(theta_beta=1e6))).all()  # inference is fine
    with pytest.raises(ValueError, match=rf"^image spans 1.99e\+19 in channel \d; the gradient squares .*{FIX}"):
        quiet(cucrf.infer_vjp, UNARY, image, cucrf.CRFParams(theta_beta=1e6), grad_output=GRAD)


def test_non_finite_gradient_is_an_error_not_a_result():
    # Every input passes its checks, but unary_weight * grad_output overflows float32.
    kw = dict(params=cucrf.CRFParams(unary_weight=1e3), grad_output=GRAD * np.float32(3e36), output="logits")
    with pytest.raises(ValueError, match=r"^the gradient with respect to the unary \(cucrf.infer_vjp\) holds \d+ NaN "
                                         r"or infinite value\(s\) although every input is finite.*largest "
                                         rf"\|grad_output\| is .*rescale grad_output.*{FIX}"):
        quiet(cucrf.infer_vjp, UNARY, IMAGE, **kw)
    r = cucrf.infer_vjp(UNARY, IMAGE, dtype=np.float64, **kw)
    assert np.isfinite(r.unary).all() and np.isfinite(r.image).all()


def test_non_finite_output_is_an_error_not_a_result(monkeypatch):
    # No known finite input passes the checks and still overflows the forward pass; the final
    # check is what stands between such a case and a NaN result.
    real = _api._meanfield.mean_field

    def overflowing(*args, **kwargs):
        out = real(*args, **kwargs).copy()  # a copy: not the array the fused update vouched for
        out[0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(_api._meanfield, "mean_field", overflowing)
    with pytest.raises(ValueError, match=r"^the output of cucrf.infer holds 1 NaN or infinite value\(s\) although "
                                         rf"every input is finite.*float32.*{FIX}"):
        cucrf.infer(UNARY, IMAGE)
    with pytest.raises(ValueError, match=r"^the output \(cucrf.infer_vjp\) holds 1 NaN"):
        cucrf.infer_vjp(UNARY, IMAGE, grad_output=GRAD)
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite value\(s\)") as info:
        cucrf.infer(UNARY.astype(np.float64), IMAGE)
    assert "dtype=np.float64" not in str(info.value)  # already float64: the advice would be useless


@pytest.mark.parametrize("dtype,exponents", [(np.float32, range(14, 40, 2)), (np.float64, range(150, 310, 15))])
def test_never_nan_across_magnitudes(dtype, exponents):
    """Image and unary magnitudes up to the dtype's maximum: a ValueError or a finite result, never NaN."""
    small = UNARY[:, :8, :10]
    base = rng.uniform(-1, 1, (8, 10, 3))
    grad = GRAD[:, :8, :10].astype(dtype)
    for e, (blur, include_self, normalization) in itertools.product(
            exponents, itertools.product([1, 2], [False, True], [None, "symmetric"])):
        kw = dict(filter_size=3, blur=blur, include_self=include_self, normalization=normalization, dtype=dtype)
        for unary, image in (((small.astype(np.float64) * 10.0 ** e).astype(dtype), base.astype(dtype)),
                             (small.astype(dtype), (base * 10.0 ** e).astype(dtype))):
            try:
                r = quiet(cucrf.infer_vjp, unary, image, grad_output=grad, **kw)
            except ValueError as exc:
                assert FIX in str(exc) or "rescale" in str(exc)
                continue
            assert np.isfinite(r.output).all() and np.isfinite(r.unary).all() and np.isfinite(r.image).all()
            assert all(np.isfinite(v).all() for v in r.params.values())


def test_torch_adapter_gets_the_same_protection():
    torch = pytest.importorskip("torch")
    import cucrf.torch as ct

    unary = torch.tensor(UNARY, requires_grad=True)
    with pytest.raises(ValueError, match=r"^image holds values up to 3e\+38"):
        quiet(ct.infer, unary, torch.full(IMAGE.shape, 3e38))
    w = torch.tensor(1e3, requires_grad=True)
    out = ct.infer(unary, torch.tensor(IMAGE), {"unary_weight": w}, output="logits")
    loss = (out * torch.tensor(GRAD * np.float32(3e36))).sum()
    with pytest.raises(ValueError, match=r"gradient with respect to the unary \(cucrf.infer_vjp\) holds"):
        quiet(loss.backward)


def test_jax_adapter_gets_the_same_protection():
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    import cucrf.jax as cj

    unary = jnp.asarray(UNARY)
    # cucrf runs as a JAX callback: its ValueError reaches the caller inside JAX's runtime error
    with pytest.raises(Exception, match=r"ValueError: image holds values up to 3e\+38"):
        quiet(cj.infer, unary, jnp.full(IMAGE.shape, 3e38, jnp.float32))
    g = jnp.asarray(GRAD * np.float32(3e36))
    loss = (lambda u: (cj.infer(u, jnp.asarray(IMAGE), {"unary_weight": 1e3}, output="logits") * g).sum())
    with pytest.raises(Exception, match=r"ValueError: the gradient with respect to the unary \(cucrf.infer_vjp\)"):
        quiet(jax.grad(loss), unary)
