"""The CUDA backend on a real GPU through cucrf.infer / infer_vjp / fit, against the NumPy backend.

Skipped when CuPy is missing or no CUDA device is usable (CI has none; scripts/gpu-check runs
these on a GPU machine).
"""

import zlib

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
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))  # stable across runs
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


# ---------------------------------------------------------------------------------------------
# the backward pass (cucrf.infer_vjp, cucrf.fit) on the GPU
# ---------------------------------------------------------------------------------------------
#: Gradient tolerances, relative to the largest magnitude of the NumPy reference array.
GRAD_RTOL = {np.float32: 1e-4, np.float64: 1e-9}


def _assert_grad_close(got, want, dtype, what, excuse=0.0):
    got = np.asarray(got.get() if hasattr(got, "get") else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert np.all(np.isfinite(got)), what
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(got - want)))
    allowed = GRAD_RTOL[dtype] * scale + excuse
    assert err <= allowed, f"{what}: max |diff| {err:.3e} > {allowed:.3e} (scale {scale:.3e}, excuse {excuse:.1e})"


def _float32_parameter_noise(unary, image, params, go, kw):
    """Per parameter gradient, how far float32 rounding alone moves it on the CPU: the largest
    distance from the float64 gradient of the float32 gradients of the problem and of two copies
    whose inputs are moved by one ulp (see tests/test_cuda_backward_emulated.py)."""
    truth = cucrf.infer_vjp(unary, image, params, grad_output=go, dtype=np.float64, **kw).params
    rng = np.random.default_rng(0)
    eps = np.finfo(np.float32).eps
    noise = dict.fromkeys(truth, 0.0)
    for amount in (0, 1, 1):
        u, im, g = ((a * (1 + amount * eps * rng.choice([-1.0, 1.0], size=a.shape))).astype(np.float32)
                    for a in (unary, image, go))
        draw = cucrf.infer_vjp(u, im, params, grad_output=g, **kw).params
        for name in noise:
            noise[name] = max(noise[name], float(np.max(np.abs(np.asarray(draw[name]) - truth[name]))))
    return noise


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_infer_vjp_on_gpu_matches_numpy(case, output):
    B, C, H, W, F, k, blur, potts, norm, dtype = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()) + 1)
    unary, image, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    go = rng.normal(size=unary.shape).astype(dtype)
    kw = dict(filter_size=k, blur=blur, iterations=5, normalization=norm, output=output)
    want = cucrf.infer_vjp(unary, image, params, grad_output=go, **kw)
    got = cucrf.infer_vjp(cupy.asarray(unary), cupy.asarray(image), params, grad_output=cupy.asarray(go), **kw)
    assert isinstance(got.unary, cupy.ndarray) and isinstance(got.image, cupy.ndarray)
    assert got.unary.dtype == dtype and got.image.dtype == dtype
    _assert_grad_close(got.output, want.output, dtype, "output")
    _assert_grad_close(got.unary, want.unary, dtype, "unary")
    _assert_grad_close(got.image, want.image, dtype, "image")
    # A float32 parameter gradient (a sum over every pair of cells) can be ill-conditioned:
    # 10 times its float32 rounding noise is excused, as in the emulator tests.
    noise = _float32_parameter_noise(unary, image, params, go, kw) if dtype == np.float32 else {}
    for name, value in want.params.items():
        _assert_grad_close(got.params[name], value, dtype, name, 10 * noise.get(name, 0.0))


def test_backward_on_gpu_is_deterministic():
    rng = np.random.default_rng(3)
    unary, image, params = random_problem(rng, 2, 21, 64, 80, 3, np.float32, potts=False)
    go = cupy.asarray(rng.normal(size=unary.shape).astype(np.float32))
    u, im = cupy.asarray(unary), cupy.asarray(image)
    for norm in (None, "symmetric"):
        runs = [cucrf.infer_vjp(u, im, params, grad_output=go, filter_size=7, blur=4, normalization=norm)
                for _ in range(3)]
        for r in runs[1:]:
            cupy.testing.assert_array_equal(r.unary, runs[0].unary)
            cupy.testing.assert_array_equal(r.image, runs[0].image)
            for name in r.params:
                np.testing.assert_array_equal(r.params[name], runs[0].params[name])


def test_mean_field_backward_primitives_on_gpu():
    from cucrf import _cupy_backend as cb

    rng = np.random.default_rng(2)
    B, C, H, W, F = 2, 6, 29, 31, 3
    unary, image, params = random_problem(rng, B, C, H, W, F, np.float64, potts=False)
    features = np.ascontiguousarray(np.moveaxis(image, -1, 1))
    go = rng.normal(size=unary.shape)
    for norm in (None, "symmetric"):
        config = _meanfield.CRFConfig(7, 2, 3, norm)
        results = []
        for backend, xp in ((nb, np), (cb, cupy)):
            tape = _meanfield.Tape()
            _meanfield.mean_field(backend, xp.asarray(unary), xp.asarray(features), params, config, tape=tape)
            results.append(_meanfield.mean_field_backward(backend, tape, xp.asarray(go)))
        (wu, wf, wp), (gu, gf, gp) = results
        _assert_grad_close(gu, wu, np.float64, "unary")
        _assert_grad_close(gf, wf, np.float64, "features")
        for name in wp:
            _assert_grad_close(gp[name], wp[name], np.float64, name)


def test_fit_on_gpu_matches_cpu():
    rng = np.random.default_rng(4)
    C, H, W = 3, 40, 48
    unaries, images, labels = [], [], []
    for _ in range(3):
        label = rng.integers(0, C, size=(H // 8, W // 8)).repeat(8, 0).repeat(8, 1)
        images.append(np.clip(label[..., None] * 80.0 + rng.normal(0, 10, (H, W, 3)), 0, 255))
        unaries.append(rng.normal(size=(C, H, W)) + 2.0 * (np.arange(C)[:, None, None] == label))
        labels.append(label.astype(np.uint8))
    kw = dict(epochs=2, lr=0.05, filter_size=5, blur=2, iterations=3, progress=False, dtype=np.float64)
    cpu = cucrf.fit(unaries, images, labels, **kw)
    gpu = cucrf.fit([cupy.asarray(u) for u in unaries], [cupy.asarray(i) for i in images], labels, **kw)
    # float64 throughout: only rounding (FMA contraction, summation order) separates the two runs
    assert [h["epoch"] for h in gpu.history] == [h["epoch"] for h in cpu.history]
    for a, b in zip(cpu.history, gpu.history):
        if a["train_loss"] is not None:
            assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6 * abs(a["train_loss"])
    np.testing.assert_allclose(gpu.params.compatibility_matrix(C), cpu.params.compatibility_matrix(C),
                               rtol=1e-5, atol=1e-5)
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight"):
        np.testing.assert_allclose(getattr(gpu.params, name), getattr(cpu.params, name), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# volumes (B, C, D, H, W) and per-axis window, blur and spacing
# ---------------------------------------------------------------------------------------------
def random_volume_problem(rng, B, C, size, F, dtype, potts=True):
    unary = rng.normal(scale=2.0, size=(B, C) + size).astype(dtype)
    image = rng.uniform(0, 255, size=(B,) + size + (F,)).astype(dtype)
    params = cucrf.CRFParams(
        theta_alpha=float(rng.uniform(3, 10)),
        theta_beta=tuple(float(v) for v in rng.uniform(5, 30, size=F)),
        theta_gamma=float(rng.uniform(0.8, 3)),
        appearance_weight=float(rng.uniform(0.2, 2)),
        smoothness_weight=float(rng.uniform(0.2, 2)),
        compatibility="potts" if potts else rng.uniform(-1, 2, size=(C, C)),
        unary_weight=float(rng.uniform(0.5, 1.5)),
    )
    return unary, image, params


VOLUME_CASES = [
    # (B, C, size, F, filter_size, blur, spacing, potts, normalization, include_self, dtype)
    (1, 4, (24, 40, 36), 1, 3, 2, None, True, None, False, np.float64),
    (2, 3, (17, 33, 29), 2, (3, 3, 3), (1, 2, 2), (2.5, 1.0, 1.0), False, "symmetric", True, np.float64),
    (1, 4, (32, 48, 40), 1, (1, 3, 5), 1, (3.0, 0.8, 0.8), True, None, False, np.float32),
    (2, 5, (20, 37, 45), 3, (3, 5, 5), 3, None, False, "symmetric", False, np.float32),
    (1, 21, (16, 24, 40), 1, 3, (2, 2, 4), None, True, None, False, np.float32),  # 32-class chunks
    (1, 3, (37, 45), 3, (3, 7), (1, 3), (2.0, 1.0), False, "symmetric", True, np.float32),  # an image, per axis
]


def _volume_case_id(c):
    B, C, size, F, k, blur, sp, potts, norm, keep, dt = c
    text = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    return (f"B{B}C{C}_{text(size)}F{F}_k{text(k)}_b{text(blur)}_s{text(sp) if sp else 1}_"
            f"{'potts' if potts else 'matrix'}_{norm}{'_self' if keep else ''}_{np.dtype(dt).name}")


def _volume_kw(case, output="probabilities"):
    B, C, size, F, k, blur, spacing, potts, norm, keep, dtype = case
    return dict(filter_size=k, blur=blur, iterations=5, normalization=norm, include_self=keep, spacing=spacing,
                spatial_dims=len(size), output=output)


@pytest.mark.parametrize("case", VOLUME_CASES, ids=_volume_case_id)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_infer_on_volumes_matches_numpy(case, output):
    B, C, size, F, k, blur, spacing, potts, norm, keep, dtype = case
    rng = np.random.default_rng(zlib.crc32(_volume_case_id(case).encode()))
    unary, image, params = random_volume_problem(rng, B, C, size, F, dtype, potts)
    kw = _volume_kw(case, output)
    want = cucrf.infer(unary, image, params, **kw)
    got = cucrf.infer(cupy.asarray(unary), cupy.asarray(image), params, **kw)
    assert isinstance(got, cupy.ndarray) and got.dtype == dtype and got.shape == unary.shape
    host = cupy.asnumpy(got)
    assert np.all(np.isfinite(host))
    np.testing.assert_allclose(host, want, **TOL[dtype])


@pytest.mark.parametrize("case", VOLUME_CASES, ids=_volume_case_id)
def test_infer_vjp_on_volumes_matches_numpy(case):
    B, C, size, F, k, blur, spacing, potts, norm, keep, dtype = case
    rng = np.random.default_rng(zlib.crc32(_volume_case_id(case).encode()) + 1)
    unary, image, params = random_volume_problem(rng, B, C, size, F, dtype, potts)
    go = rng.normal(size=unary.shape).astype(dtype)
    kw = _volume_kw(case)
    want = cucrf.infer_vjp(unary, image, params, grad_output=go, **kw)
    got = cucrf.infer_vjp(cupy.asarray(unary), cupy.asarray(image), params, grad_output=cupy.asarray(go), **kw)
    assert isinstance(got.unary, cupy.ndarray) and isinstance(got.image, cupy.ndarray)
    _assert_grad_close(got.output, want.output, dtype, "output")
    _assert_grad_close(got.unary, want.unary, dtype, "unary")
    _assert_grad_close(got.image, want.image, dtype, "image")
    noise = _float32_parameter_noise(unary, image, params, go, kw) if dtype == np.float32 else {}
    for name, value in want.params.items():
        _assert_grad_close(got.params[name], value, dtype, name, 10 * noise.get(name, 0.0))


def test_large_volume_matches_numpy():
    """96^3 x 4 classes at blur 2 (several depth tiles, a 48^3 coarse grid) in float32."""
    rng = np.random.default_rng(6)
    unary, image, params = random_volume_problem(rng, 1, 4, (96, 96, 96), 1, np.float32)
    kw = dict(filter_size=3, blur=2, iterations=5, spatial_dims=3)
    want = cucrf.infer(unary, image, params, **kw)
    got = cucrf.infer(cupy.asarray(unary), cupy.asarray(image), params, **kw)
    np.testing.assert_allclose(cupy.asnumpy(got), want, **TOL[np.float32])


def test_backward_on_volumes_is_deterministic():
    rng = np.random.default_rng(7)
    unary, image, params = random_volume_problem(rng, 2, 4, (20, 36, 40), 2, np.float32, potts=False)
    u, im = cupy.asarray(unary), cupy.asarray(image)
    go = cupy.asarray(rng.normal(size=unary.shape).astype(np.float32))
    for norm in (None, "symmetric"):
        runs = [cucrf.infer_vjp(u, im, params, grad_output=go, filter_size=3, blur=(1, 2, 2), normalization=norm,
                                spatial_dims=3, spacing=(2.0, 1.0, 1.0)) for _ in range(3)]
        for r in runs[1:]:
            cupy.testing.assert_array_equal(r.unary, runs[0].unary)
            cupy.testing.assert_array_equal(r.image, runs[0].image)
            for name in r.params:
                np.testing.assert_array_equal(r.params[name], runs[0].params[name])


def test_fit_on_volumes_on_gpu_matches_cpu():
    rng = np.random.default_rng(8)
    C, size = 3, (12, 24, 28)
    unaries, images, labels = [], [], []
    for _ in range(3):
        label = rng.integers(0, C, size=(3, 6, 7)).repeat(4, 0).repeat(4, 1).repeat(4, 2)
        images.append(np.clip(label[..., None] * 80.0 + rng.normal(0, 10, size + (1,)), 0, 255))
        unaries.append(rng.normal(size=(C,) + size) + 2.0 * (np.arange(C)[:, None, None, None] == label))
        labels.append(label.astype(np.uint8))
    kw = dict(epochs=2, lr=0.05, filter_size=3, blur=(1, 2, 2), iterations=3, progress=False, dtype=np.float64,
              spatial_dims=3, spacing=(2.0, 1.0, 1.0))
    cpu = cucrf.fit(unaries, images, labels, **kw)
    gpu = cucrf.fit([cupy.asarray(u) for u in unaries], [cupy.asarray(i) for i in images], labels, **kw)
    assert [h["epoch"] for h in gpu.history] == [h["epoch"] for h in cpu.history]
    for a, b in zip(cpu.history, gpu.history):
        if a["train_loss"] is not None:
            assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6 * abs(a["train_loss"])
    np.testing.assert_allclose(gpu.params.compatibility_matrix(C), cpu.params.compatibility_matrix(C),
                               rtol=1e-5, atol=1e-5)
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight"):
        np.testing.assert_allclose(getattr(gpu.params, name), getattr(cpu.params, name), rtol=1e-5)
