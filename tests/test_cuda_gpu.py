"""The CUDA backend on a real GPU through cucrf.infer, against the NumPy backend.

Skipped when CuPy is missing or no CUDA device is usable (CI has none; scripts/gpu-check runs
these on a GPU machine).
"""

import numpy as np
import pytest

import cucrf
from cucrf import _meanfield
from cucrf import _numpy_backend as nb

cupy = pytest.importorskip("cupy")
try:
    _gpu = bool(cupy.cuda.is_available())
except Exception:  # a broken driver install raises instead of returning False
    _gpu = False
pytestmark = pytest.mark.skipif(not _gpu, reason="no CUDA device available to CuPy")

TOL = {np.float32: dict(rtol=1e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def random_problem(rng, B, C, H, W, F, dtype, potts=True):
    unary = rng.normal(scale=2.0, size=(B, C, H, W)).astype(dtype)
    image = rng.uniform(0, 255, size=(B, H, W, F)).astype(dtype)
    params = cucrf.CRFParams(
        theta_alpha=float(rng.uniform(3, 20)),
        theta_beta=tuple(float(v) for v in rng.uniform(5, 30, size=F)),
        theta_gamma=float(rng.uniform(0.8, 3)),
        appearance_weight=float(rng.uniform(0.2, 2)),
        smoothness_weight=float(rng.uniform(0.2, 2)),
        compatibility="potts" if potts else rng.uniform(-1, 2, size=(C, C)),
        unary_weight=float(rng.uniform(0.5, 1.5)),
    )
    return unary, image, params


CASES = [
    # (B, C, H, W, F, filter_size, blur, potts, normalization, dtype)
    (1, 3, 37, 45, 3, 5, 1, True, None, np.float64),
    (2, 4, 50, 33, 1, 7, 2, False, None, np.float64),
    (2, 5, 61, 70, 3, 7, 4, True, "symmetric", np.float64),
    (1, 21, 64, 80, 3, 7, 4, True, None, np.float32),
    (2, 21, 45, 53, 3, 11, 1, True, None, np.float32),
    (1, 19, 40, 48, 3, 11, 3, False, "symmetric", np.float32),
    (1, 40, 30, 31, 5, 5, 2, False, None, np.float32),   # several class chunks, unfused update
    (2, 3, 33, 35, 7, 13, 1, True, "symmetric", np.float32),  # generic feature count
]


def _case_id(c):
    B, C, H, W, F, k, blur, potts, norm, dt = c
    return f"B{B}C{C}_{H}x{W}F{F}_k{k}b{blur}_{'potts' if potts else 'matrix'}_{norm}_{np.dtype(dt).name}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_infer_on_gpu_matches_numpy(case, output):
    B, C, H, W, F, k, blur, potts, norm, dtype = case
    rng = np.random.default_rng(abs(hash(_case_id(case))) % 2**32)
    unary, image, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    kw = dict(filter_size=k, blur=blur, iterations=5, normalization=norm, output=output)
    want = cucrf.infer(unary, image, params, **kw)
    got = cucrf.infer(cupy.asarray(unary), cupy.asarray(image), params, **kw)
    assert isinstance(got, cupy.ndarray), "the result must stay on the GPU"
    assert got.dtype == dtype and got.shape == unary.shape
    host = cupy.asnumpy(got)
    assert np.all(np.isfinite(host))
    np.testing.assert_allclose(host, want, **TOL[dtype])
    if output == "probabilities":
        np.testing.assert_allclose(host.sum(axis=1), 1.0, rtol=1e-5)


def test_backend_is_the_cuda_one():
    from cucrf._backends import get_backend

    backend = get_backend("cupy")
    assert backend.xp is cupy and backend.name == "cupy"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_image_default_settings(dtype):
    rng = np.random.default_rng(0)
    unary, image, params = random_problem(rng, 1, 21, 250, 300, 3, dtype)
    want = cucrf.infer(unary, image, params)
    got = cucrf.infer(cupy.asarray(unary), cupy.asarray(image), params)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), want, **TOL[dtype])


def test_mean_field_primitives_on_gpu():
    from cucrf import _cupy_backend as cb

    rng = np.random.default_rng(1)
    B, C, H, W, F = 2, 6, 29, 31, 3
    unary, image, params = random_problem(rng, B, C, H, W, F, np.float64, potts=False)
    features = np.ascontiguousarray(np.moveaxis(image, -1, 1))
    for norm in (None, "symmetric"):
        config = _meanfield.CRFConfig(7, 2, 3, norm)
        want = _meanfield.mean_field(nb, unary, features, params, config, return_logits=True)
        got = _meanfield.mean_field(cb, cupy.asarray(unary), cupy.asarray(features), params, config,
                                    return_logits=True)
        np.testing.assert_allclose(cupy.asnumpy(got), want, **TOL[np.float64])
