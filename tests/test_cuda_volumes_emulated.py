"""The CUDA backend on volumes and per-axis settings, on the CPU emulator, against NumPy.

The kernels are instantiated for 2 or 3 spatial axes (template argument ``ND``) and take one
window radius and one blur factor per axis; the pixel spacing enters the host-built per-axis
tables. Here the volume instances (B, C, D, H, W) and the image instances with per-axis window,
blur and spacing run unchanged under cucrf.testing.emulator, launched by the backend code that
runs on the GPU, and are compared with the NumPy backend:

* the whole taped T-iteration mean field and its backward (what ``cucrf.infer_vjp`` and
  ``cucrf.fit`` run) over a case matrix: blur 1, 2, 3 and (1, 2, 2), windows (3, 3, 3) and
  (1, 3, 5), spacings, Potts and matrix compatibility, both normalisations, include_self,
  batches of 1 and 2, float32 and float64, both thread orders;
* the primitives (pooling, Up^T, Pool^T) with per-axis blur;
* a one-slice volume against the image it holds (the ND = 3 instances against the ND = 2 ones);
* the launch shapes (depth tiles, several x tiles, the grid-z loop), bit-identical results in
  both thread orders, every volume kernel under AddressSanitizer;
* ``supports`` and ``cucrf.infer_vjp`` / ``cucrf.fit`` on volumes through the API, on device
  stand-ins (see tests/test_fit_cuda_emulated.py).

Tolerances: outputs float32 rtol 1e-5 (atol 2e-6), float64 rtol 1e-10; gradients within 1e-5
(float32) or 1e-10 (float64) of each array's largest magnitude, except that a float32 parameter
gradient (a sum over every pair of cells) may also differ by 10 times its measured float32
rounding noise, as in tests/test_cuda_backward_emulated.py.
"""

import contextlib
import shutil
import types
import zlib

import numpy as np
import pytest

import cucrf
from cucrf import _api, _cuda, _meanfield
from cucrf import _numpy_backend as nb
from cucrf._params import CRFParams

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not available")

from .test_cuda_backward_emulated import _flat, _max_abs, _rounding_noise, _taped_backward  # noqa: E402
from .test_cuda_emulated import TOL, emulated, emulator  # noqa: E402

#: Gradient tolerance, relative to each array's largest magnitude.
GRAD_RTOL = {np.float32: 1e-5, np.float64: 1e-10}


def volume_problem(rng, B, C, size, F, dtype, potts=True):
    """Unary (B, C, *size), features (B, F, *size) and parameters of a random problem."""
    unary = rng.normal(scale=2.0, size=(B, C) + size).astype(dtype)
    features = rng.uniform(0, 40, size=(B, F) + size).astype(dtype)
    params = CRFParams(
        theta_alpha=float(rng.uniform(1.5, 6)),
        theta_beta=tuple(float(v) for v in rng.uniform(5, 30, size=F)),
        theta_gamma=float(rng.uniform(0.8, 3)),
        appearance_weight=float(rng.uniform(0.2, 2)),
        smoothness_weight=float(rng.uniform(0.2, 2)),
        compatibility="potts" if potts else rng.uniform(-1, 2, size=(C, C)),
        unary_weight=float(rng.uniform(0.5, 1.5)),
    )
    return unary, features, params


def assert_close(got, want, dtype, what, excuse=0.0):
    """``max |got - want| <= GRAD_RTOL * max |want| + excuse``."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = _max_abs(got - want), _max_abs(want)
    allowed = GRAD_RTOL[dtype] * scale + excuse
    assert err <= allowed, f"{what}: max |diff| {err:.3e} > {allowed:.3e} (scale {scale:.3e}, excuse {excuse:.1e})"


def assert_same_gradients(got, want, dtype, excuse=None):
    got, want = _flat(got), _flat(want)
    excuse = excuse or {}
    assert got["unary"].dtype == dtype and got["features"].dtype == dtype
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], dtype, name, excuse.get(name, 0.0))


def float32_excuse(unary, features, params, config, go, logits=False):
    """10 times the float32 rounding noise of each parameter gradient (none for the arrays)."""
    u64, f64, g64 = (a.astype(np.float64) for a in (unary, features, go))
    truth = _taped_backward(nb, u64, f64, params, config, g64, logits)[1]
    noise = _rounding_noise(unary, features, params, config, go, logits, truth)
    return {name: 10 * v for name, v in noise.items() if name not in ("unary", "features", "compatibility")}


# ---------------------------------------------------------------------------------------------
# the whole taped mean field and its backward
# ---------------------------------------------------------------------------------------------
CASES = [
    # (B, C, size, F, filter_size, blur, spacing, potts, normalization, include_self, T, dtype, order)
    (1, 3, (6, 7, 9), 3, 3, 1, None, True, None, False, 2, np.float64, "forward"),
    (2, 3, (7, 6, 8), 1, (3, 3, 3), 2, None, False, "symmetric", False, 2, np.float64, "reverse"),
    (1, 3, (7, 8, 7), 3, (3, 3, 3), 3, (2.0, 1.0, 1.0), True, "symmetric", True, 2, np.float64, "forward"),
    (2, 4, (5, 8, 9), 1, (1, 3, 5), (1, 2, 2), (3.0, 1.0, 1.0), False, None, True, 2, np.float64, "reverse"),
    (1, 3, (4, 9, 10), 1, (1, 3, 5), (1, 2, 2), None, True, "symmetric", False, 3, np.float64, "forward"),
    (1, 3, (9, 3, 37), 1, 3, 1, (1.5, 1.0, 1.0), False, None, False, 2, np.float64, "reverse"),  # 2 x tiles
    (1, 3, (4, 5, 6), 6, 3, 2, None, True, None, False, 2, np.float64, "forward"),   # generic feature count
    (1, 12, (4, 5, 6), 1, 3, (2, 1, 3), None, False, "symmetric", True, 2, np.float64, "reverse"),  # 16 chunk
    (1, 3, (6, 7, 9), 3, 3, 2, (1.5, 1.0, 1.0), True, None, False, 2, np.float32, "forward"),
    (2, 3, (5, 6, 7), 1, (1, 3, 5), (1, 2, 2), (2.5, 0.8, 0.8), False, "symmetric", True, 2, np.float32, "reverse"),
    (1, 4, (6, 6, 8), 3, (3, 3, 3), 3, None, False, "symmetric", False, 2, np.float32, "forward"),
    (2, 3, (5, 7, 8), 1, 3, 1, None, True, None, True, 2, np.float32, "reverse"),
    # images with per-axis window, blur and spacing (the ND = 2 instances)
    (1, 3, (9, 11), 3, (3, 5), (1, 2), (1.5, 0.7), False, "symmetric", True, 2, np.float64, "forward"),
    (2, 3, (10, 8), 1, (5, 3), (2, 3), (1.0, 2.0), True, None, False, 2, np.float64, "reverse"),
    (1, 3, (8, 12), 1, 5, 2, (2.0, 2.0), True, "symmetric", False, 2, np.float32, "forward"),
    (2, 3, (9, 7), 3, (3, 7), (3, 1), (0.5, 1.0), False, None, True, 2, np.float32, "reverse"),
]


def _case_id(c):
    B, C, size, F, k, blur, sp, potts, norm, keep, T, dt, order = c
    text = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    return (f"B{B}C{C}_{text(size)}F{F}_k{text(k)}_b{text(blur)}_s{text(sp) if sp else 1}_"
            f"{'potts' if potts else 'matrix'}_{norm}{'_self' if keep else ''}_T{T}_{np.dtype(dt).name}_{order}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mean_field_and_backward_match_numpy(case):
    B, C, size, F, k, blur, spacing, potts, norm, keep, T, dtype, order = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))  # the same problem every run
    unary, features, params = volume_problem(rng, B, C, size, F, dtype, potts)
    config = _meanfield.CRFConfig(k, blur, T, norm, keep, spacing)
    go = rng.normal(size=unary.shape).astype(dtype)
    backend = emulated(order)
    logits = _meanfield.mean_field(backend, unary, features, params, config, return_logits=True)
    np.testing.assert_allclose(logits, _meanfield.mean_field(nb, unary, features, params, config, return_logits=True),
                               **TOL[dtype])
    want_out, want = _taped_backward(nb, unary, features, params, config, go, False)
    got_out, got = _taped_backward(backend, unary, features, params, config, go, False)
    assert got_out.dtype == dtype and got_out.shape == unary.shape
    np.testing.assert_allclose(got_out, want_out, **TOL[dtype])
    excuse = float32_excuse(unary, features, params, config, go) if dtype == np.float32 else None
    assert_same_gradients(got, want, dtype, excuse)


@pytest.mark.parametrize("wide_chunks", [False, True])
def test_many_classes_on_a_volume(wide_chunks, monkeypatch):
    """40 classes: several class chunks in the message and kernel-gradient kernels, and more classes
    than the fused update holds (the unfused path), forward and backward."""
    if wide_chunks:
        monkeypatch.setattr(_cuda, "SMALL_GRID_CELLS", 0)
    rng = np.random.default_rng(40)
    unary, features, params = volume_problem(rng, 1, 40, (3, 4, 5), 3, np.float64, potts=False)
    config = _meanfield.CRFConfig((3, 3, 3), (1, 2, 2), 2, "symmetric")
    go = rng.normal(size=unary.shape)
    want_out, want = _taped_backward(nb, unary, features, params, config, go, False)
    got_out, got = _taped_backward(emulated(), unary, features, params, config, go, False)
    np.testing.assert_allclose(got_out, want_out, **TOL[np.float64])
    assert_same_gradients(got, want, np.float64)


def test_one_slice_volume_is_its_image():
    """A (B, C, 1, H, W) volume with window (1, k, k) and blur (1, b, b) through the volume
    instances gives what the image instances give for (B, C, H, W)."""
    rng = np.random.default_rng(8)
    unary, features, params = volume_problem(rng, 2, 3, (9, 10), 3, np.float64, potts=False)
    go = rng.normal(size=unary.shape)
    backend = emulated()
    for norm in (None, "symmetric"):
        image = _meanfield.CRFConfig(5, 2, 2, norm, True, (1.0, 1.0))
        volume = _meanfield.CRFConfig((1, 5, 5), (1, 2, 2), 2, norm, True, (3.0, 1.0, 1.0))
        out2, (gu2, gf2, gp2) = _taped_backward(backend, unary, features, params, image, go, False)
        out3, (gu3, gf3, gp3) = _taped_backward(backend, unary[:, :, None], features[:, :, None], params, volume,
                                                go[:, :, None], False)
        np.testing.assert_allclose(out3[:, :, 0], out2, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gu3[:, :, 0], gu2, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gf3[:, :, 0], gf2, rtol=1e-12, atol=1e-15 * _max_abs(gf2))
        for name in gp2:
            np.testing.assert_allclose(gp3[name], gp2[name], rtol=1e-11, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,blur", [((5, 7, 9), (1, 2, 2)), ((7, 6, 5), (3, 1, 2)), ((6, 7, 8), 2),
                                       ((4, 5, 6), 1), ((9, 10), (1, 3)), ((1, 1, 1), 3)])
def test_pool_and_adjoints(dtype, size, blur):
    """Pool (plain and scaled), Up^T (0, 1, 2 factors) and Pool^T against NumPy."""
    rng = np.random.default_rng(sum(size))
    nd = len(size)
    blurs = blur if isinstance(blur, tuple) else (blur,) * nd
    features = rng.uniform(0, 40, size=(2, 1) + size).astype(dtype)
    params = CRFParams(theta_alpha=2.5, theta_beta=10.0, theta_gamma=1.3)
    config = _meanfield.CRFConfig(3, blur, 1, "symmetric")
    be = emulated("reverse")
    setup = be.prepare(features, params, config)
    coarse = setup.coarse
    x = rng.normal(size=(2, 3) + size).astype(dtype)
    s0, s1 = rng.uniform(0.5, 2, size=(2, 2, 1) + size).astype(dtype)
    tol = TOL[dtype]
    np.testing.assert_allclose(be.pool(x, blur), nb.pool(x, blurs), **tol)
    p0, p1 = be.pool(x, blur, s0, s1)
    np.testing.assert_allclose(p0, nb.pool(x * s0, blurs), **tol)
    np.testing.assert_allclose(p1, nb.pool(x * s1, blurs), **tol)
    (u,) = be.upsample_backward(setup, x)
    np.testing.assert_allclose(u, nb.upsample_backward(x, blurs, coarse), **tol)
    (u0,) = be.upsample_backward(setup, x, (s0,))
    np.testing.assert_allclose(u0, nb.upsample_backward(x * s0, blurs, coarse), **tol)
    u0, u1 = be.upsample_backward(setup, x, (s0, s1))
    np.testing.assert_allclose(u0, nb.upsample_backward(x * s0, blurs, coarse), **tol)
    np.testing.assert_allclose(u1, nb.upsample_backward(x * s1, blurs, coarse), **tol)
    r0, r1 = rng.normal(size=(2, 2, 3) + coarse).astype(dtype)
    np.testing.assert_allclose(be.pool_backward(setup, r0), nb.pool_backward(r0, blurs, size), **tol)
    n0, n1 = setup.normalisers
    want = nb.pool_backward(r0, blurs, size) * n0 + nb.pool_backward(r1, blurs, size) * n1
    np.testing.assert_allclose(be.pool_backward(setup, r0, r1), want, **tol)
    # the normalisers themselves: (Up(K 1) + eps)^-1/2 of each kernel
    ref = _meanfield.prepare(nb, features, params, config)
    for got, want in zip(setup.normalisers, ref.normalisers):
        np.testing.assert_allclose(got, want, **tol)


# ---------------------------------------------------------------------------------------------
# launches: tiles, grid, thread order, bounds
# ---------------------------------------------------------------------------------------------
def test_volume_blocks_split_y_and_z_to_load_the_fewest_halo_cells():
    # isotropic window: the 8 threads beside each 32-wide row split 4 x 2 (y, z)
    assert _cuda.message_launch((64, 64, 64), (1, 1, 1), 1, 4)[0] == (32, 4, 2)
    # no depth radius: no depth halo, so the block stays one plane thick
    assert _cuda.message_launch((64, 64, 64), (0, 1, 2), 1, 4)[0] == (32, 8, 1)
    # images never get a depth extent; blocks are powers of two that fit the shared memory
    assert _cuda.message_launch((125, 125), (3, 3), 3, 4)[0] == (32, 8, 1)
    for coarse in ((3, 4, 5), (9, 3, 37), (64, 64, 64), (2, 200, 300)):
        for radii in ((1, 1, 1), (0, 1, 2), (3, 3, 3), (6, 6, 6)):
            for F, itemsize in ((1, 4), (5, 8), (16, 8)):
                for launch in (_cuda.message_launch, _cuda.kernel_grad_launch):
                    if F * int(np.prod([2 * r + 1 for r in radii])) * itemsize > _cuda.SHARED_MEMORY_LIMIT:
                        with pytest.raises(ValueError, match="smaller filter_size"):  # not even one cell
                            launch(coarse, radii, F, itemsize)
                        continue
                    block, smem = launch(coarse, radii, F, itemsize)
                    n = block[0] * block[1] * block[2]
                    assert n & (n - 1) == 0 and n <= 256 and smem <= _cuda.SHARED_MEMORY_LIMIT
                    grid = _cuda.tiled_grid(coarse, block, 5)
                    assert grid[0] * block[0] >= coarse[2] * -(-coarse[0] // block[2]) and grid[1] * block[1] >= coarse[1]


def test_too_large_a_volume_window_is_refused_by_name():
    with pytest.raises(ValueError, match=r"filter_size=\(41, 41, 41\).*smaller filter_size"):
        _cuda.message_launch((64, 64, 64), (20, 20, 20), 16, 8)


def test_volumes_of_2_31_voxels_per_channel_are_refused_before_any_work():
    """The volume kernels index within a channel in 32 bits: the backend says so instead of
    computing garbage (views of one element: nothing is allocated)."""
    backend = emulated()
    big = np.broadcast_to(np.float32(0), (1, 2, 1024, 1024, 2048))
    params = CRFParams(theta_alpha=2.0, theta_beta=10.0, theta_gamma=1.0)
    for call in (lambda: backend.softmax(big), lambda: backend.pool(big, 2),
                 lambda: backend.update(big, big, None), lambda: backend.softmax_backward(big, big),
                 lambda: backend.prepare(big, params, _meanfield.CRFConfig(3, 2, 1))):
        with pytest.raises(ValueError, match=r"fewer than 2\^31 voxels per channel, got 1024x1024x2048"):
            call()
    # one voxel fewer is computed (checked on its shape only: the limit is exclusive)
    backend._check_voxels((1, 2, 1, 1, 2 ** 31 - 1))


def test_kernel_gradient_and_message_loop_over_grid_z(monkeypatch):
    """More z slices (batch x kernels x class chunks) than the grid has, on a volume with several
    depth tiles; the update's grid y (the batch of volumes) loops too."""
    rng = np.random.default_rng(13)
    unary, features, params = volume_problem(rng, 2, 5, (9, 4, 5), 1, np.float64, potts=False)
    go = rng.normal(size=unary.shape)
    config = _meanfield.CRFConfig(3, (1, 2, 1), 2, "symmetric")
    want_out, want = _taped_backward(nb, unary, features, params, config, go, False)
    monkeypatch.setattr(_cuda, "MAX_GRID_Z", 1)
    got_out, got = _taped_backward(emulated("reverse"), unary, features, params, config, go, False)
    np.testing.assert_allclose(got_out, want_out, **TOL[np.float64])
    assert_same_gradients(got, want, np.float64)


def test_thread_order_does_not_change_a_bit():
    """Depth tiles and 3-D blocks keep one writer per output and fixed-order sums."""
    rng = np.random.default_rng(12)
    unary, features, params = volume_problem(rng, 2, 4, (9, 3, 37), 1, np.float32, potts=False)
    go = rng.normal(size=unary.shape).astype(np.float32)
    for norm in (None, "symmetric"):
        config = _meanfield.CRFConfig(3, (1, 1, 2), 2, norm)
        a = _flat(_taped_backward(emulated("forward"), unary, features, params, config, go, False)[1])
        b = _flat(_taped_backward(emulated("reverse"), unary, features, params, config, go, False)[1])
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.skipif(not emulator.asan_available(), reason="AddressSanitizer not available")
def test_volume_kernels_stay_in_bounds_under_asan():
    """The volume kernels of a normalised forward and backward pass (which launches every volume
    kernel's indexing: both pooling and Up^T variants, both messages, the normalisers, Pool^T,
    the pooled softmax vjp, the kernel gradient), generic feature count, anisotropic settings.
    (One launch is one subprocess: the merged-kernel variants share this indexing.)"""
    rng = np.random.default_rng(30)
    unary, features, params = volume_problem(rng, 2, 3, (4, 5, 7), 6, np.float64, potts=False)
    config = _meanfield.CRFConfig((3, 1, 5), (1, 2, 3), 1, "symmetric")
    go = rng.normal(size=unary.shape)
    want = _taped_backward(nb, unary, features, params, config, go, False)[1]
    got = _taped_backward(emulated(asan=True), unary, features, params, config, go, False)[1]
    assert_same_gradients(got, want, np.float64)


@pytest.mark.skipif(not emulator.asan_available(), reason="AddressSanitizer not available")
def test_a_depth_halo_read_past_the_volume_is_caught_by_asan():
    """The depth border test off by one: the last depth slice reads past the features."""
    mutation = ("message.cu", "(ND == 2 || (gz >= 0 && gz < d))", "(ND == 2 || (gz >= 0 && gz <= d))")
    rng = np.random.default_rng(31)
    unary, features, params = volume_problem(rng, 1, 3, (4, 5, 6), 1, np.float64)
    config = _meanfield.CRFConfig(3, 1, 1)
    with pytest.raises(emulator.EmulatorError, match="AddressSanitizer"):
        _meanfield.mean_field(emulated(asan=True, mutation=mutation), unary, features, params, config)


# ---------------------------------------------------------------------------------------------
# specialisations, supports, and the API on device stand-ins
# ---------------------------------------------------------------------------------------------
def test_specialisations_cover_the_volume_launches():
    specs = _cuda.specialisations()
    names = {n for entries in specs.values() for _, ns in entries for n in ns}
    for dt in (np.float32, np.float64):
        for nd in (2, 3):
            for F in range(1, 9):
                for C in (2, 9, 21, 33, 70):
                    for cells in (None, 100):
                        for sep in (False, True):
                            assert _cuda.message_spec(dt, F, C, sep, cells, nd=nd)[0] in names
                        assert _cuda.kernel_grad_spec(dt, F, 5 * C, cells, nd=nd)[0] in names
            for C in range(2, 40):
                for matrix in (False, True):
                    spec = _cuda.update_spec(dt, C, matrix, nd)
                    assert spec is None or spec in names
            for n in (0, 1, 2):
                assert _cuda.upsample_backward_spec(dt, n, nd) in names
                assert _cuda.softmax_backward_spec(dt, n, nd) in names
            for scaled in (False, True):
                assert _cuda.pool_spec(dt, scaled, nd) in names and _cuda.pool_backward_spec(dt, scaled, nd) in names
            assert _cuda.upsample_spec(dt, nd) in names and _cuda.upsampled_dot_spec(dt, nd) in names
    with pytest.raises(ValueError, match="spatial axes"):
        _cuda.message_spec(np.float32, 3, 3, False, nd=4)


def test_supports_images_and_volumes_with_any_per_axis_setting():
    backend = emulated()
    for nd, config in ((2, _meanfield.CRFConfig(5, 2, 5)), (2, _meanfield.CRFConfig((3, 5), (1, 2), 5, spacing=(2.0, 1.0))),
                       (3, _meanfield.CRFConfig((1, 3, 5), (1, 2, 2), 5, "symmetric", True, (3.0, 1.0, 1.0)))):
        assert backend.supports(nd, config)
        _api.check_backend_geometry(backend, nd, config)  # no error
    assert not backend.supports(1, _meanfield.CRFConfig(3, 1, 5))
    assert not backend.supports(4, _meanfield.CRFConfig(3, 1, 5))


def test_infer_vjp_and_fit_on_device_volumes(monkeypatch):
    """cucrf.infer_vjp(spatial_dims=3, ...) and one epoch of cucrf.fit on volumes, with the CUDA
    backend on device stand-ins: the API accepts the backend for volumes and matches NumPy."""
    from . import test_fit_cuda_emulated as fc

    monkeypatch.setitem(__import__("sys").modules, "cupy", fc._cupy)
    # one device for every stand-in array (NumPy's own ``device`` attribute is the string "cpu")
    monkeypatch.setattr(fc.DeviceArray, "device", property(lambda self: types.SimpleNamespace(id=0)), raising=False)
    monkeypatch.setattr(_api, "device_scope", lambda array: contextlib.nullcontext())  # no cupy.cuda.Device here
    device = fc._emulated_backend()
    prepare, runs = device.prepare, []

    def counted(features, *args, **kwargs):  # every mean field starts here: it ran on the device
        assert isinstance(features, fc.DeviceArray) and features.ndim == 5, (type(features), features.shape)
        runs.append(features.shape)
        return prepare(features, *args, **kwargs)

    device.prepare = counted
    real_get_backend = _api.get_backend
    monkeypatch.setattr(_api, "get_backend", lambda library: device if library == "cupy" else real_get_backend(library))
    rng = np.random.default_rng(50)
    C, size = 3, (4, 6, 7)
    unary = rng.normal(size=(C,) + size)
    image = rng.uniform(0, 255, size=size + (1,))
    go = rng.normal(size=unary.shape)
    params = cucrf.CRFParams(theta_alpha=3.0, theta_beta=20.0, theta_gamma=1.5)
    kw = dict(filter_size=(1, 3, 3), blur=(1, 2, 2), iterations=2, spatial_dims=3, spacing=(2.5, 1.0, 1.0),
              normalization="symmetric", dtype=np.float64)
    want = cucrf.infer_vjp(unary, image, params, grad_output=go, **kw)
    got = cucrf.infer_vjp(fc.to_device(unary), fc.to_device(image), params, grad_output=fc.to_device(go), **kw)
    assert isinstance(got.output, fc.DeviceArray) and len(runs) == 1
    np.testing.assert_allclose(got.output.get(), want.output, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.unary.get(), want.unary, rtol=1e-10, atol=1e-10 * _max_abs(want.unary))
    np.testing.assert_allclose(got.image.get(), want.image, rtol=1e-10, atol=1e-10 * _max_abs(want.image))
    for name, value in want.params.items():
        np.testing.assert_allclose(got.params[name], value, rtol=1e-9, atol=1e-12)

    labels = [np.argmax(u, axis=0) for u in (unary, unary[:, ::-1])]
    data = ([unary, unary[:, ::-1].copy()], [image, image[::-1].copy()], labels)
    fit_kw = dict(epochs=1, lr=0.05, filter_size=3, blur=(1, 2, 2), iterations=2, progress=False, dtype=np.float64,
                  batch_size=2, patience=None, seed=1, spatial_dims=3, spacing=(2.0, 1.0, 1.0))
    want_fit = cucrf.fit(*data, **fit_kw)
    got_fit = cucrf.fit(*([fc.to_device(a) for a in part] for part in data), **fit_kw)
    assert len(runs) >= 2  # the minibatch, then the training images scored
    assert got_fit.history[-1]["train_loss"] == pytest.approx(want_fit.history[-1]["train_loss"], rel=1e-9)
    for name in ("theta_alpha", "theta_beta", "theta_gamma", "appearance_weight", "smoothness_weight"):
        np.testing.assert_allclose(getattr(got_fit.params, name), getattr(want_fit.params, name), rtol=1e-9)
