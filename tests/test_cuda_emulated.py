"""The CUDA backend on the CPU emulator, against the NumPy reference backend.

The kernels in cucrf/kernels/*.cu run unchanged under cucrf.testing.emulator, launched by the
same code as on the GPU (cucrf._cuda.backend.make_backend with numpy as the array namespace), so
grid and block shapes, shared-memory sizes and argument types are those CuPy would use. Threads
run in forward and in reverse order. The last tests break the kernels on purpose and check that
the emulator notices.
"""

import functools
import shutil

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cucrf import _cuda, _meanfield
from cucrf import _numpy_backend as nb
from cucrf._cuda.backend import CoarseMessage, make_backend
from cucrf._geometry import axis_geometry
from cucrf._params import CRFParams

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not available")

emulator = pytest.importorskip("cucrf.testing.emulator")

ORDERS = ("forward", "reverse")
TOL = {np.float32: dict(rtol=1e-5, atol=2e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


@functools.lru_cache(maxsize=None)
def _module(file_name, options, names, order, asan, mutation):
    source = _cuda.kernel_source(file_name)
    if mutation is not None and mutation[0] == file_name:
        _, old, new = mutation
        assert old in source, f"mutation target {old!r} not found in {file_name}"
        source = source.replace(old, new)
    return emulator.EmulatedModule(source, options, names, thread_order=order, asan=asan)


def emulated(order="forward", asan=False, mutation=None, wrap=None):
    """The CUDA backend on the emulator; ``mutation`` = (file, old, new) edits a kernel source."""

    def load(file_name, options, names):
        module = _module(file_name, tuple(options), tuple(names), order, asan, mutation)
        if wrap is None:
            return module
        return _Wrapped(module, wrap)

    return make_backend(np, load, name=f"emulated-{order}")


class _Wrapped:
    """A module whose functions see their argument tuple through ``wrap(args)`` first."""

    def __init__(self, module, wrap):
        self.module, self.wrap = module, wrap

    def get_function(self, name):
        fn = self.module.get_function(name)
        return lambda grid, block, args, **kw: fn(grid, block, self.wrap(args), **kw)


def random_problem(rng, B, C, H, W, F, dtype, potts=True):
    unary = rng.normal(scale=2.0, size=(B, C, H, W)).astype(dtype)
    features = rng.uniform(0, 40, size=(B, F, H, W)).astype(dtype)
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


# ---------------------------------------------------------------------------------------------
# whole inference
# ---------------------------------------------------------------------------------------------
CASES = [
    # (B, C, H, W, F, filter_size, blur, potts, normalization, iterations, dtype, order)
    (1, 3, 9, 11, 3, 5, 1, True, None, 3, np.float64, "forward"),
    (2, 4, 11, 7, 1, 3, 2, False, None, 2, np.float64, "reverse"),
    (2, 3, 12, 10, 5, 7, 3, True, "symmetric", 2, np.float64, "forward"),
    (1, 2, 7, 12, 3, 3, 4, False, "symmetric", 3, np.float64, "reverse"),
    (2, 5, 10, 9, 3, 5, 2, True, "symmetric", 2, np.float64, "reverse"),
    (1, 3, 11, 11, 2, 7, 1, False, "symmetric", 2, np.float64, "forward"),
    (2, 3, 9, 11, 3, 5, 1, True, None, 3, np.float32, "forward"),
    (1, 4, 12, 9, 5, 3, 3, False, None, 2, np.float32, "reverse"),
    (2, 2, 10, 12, 1, 7, 2, True, "symmetric", 3, np.float32, "forward"),
    (1, 3, 9, 10, 3, 5, 4, False, "symmetric", 2, np.float32, "reverse"),
    (1, 6, 8, 9, 7, 3, 1, True, None, 2, np.float32, "forward"),     # generic feature count
    (1, 3, 7, 8, 6, 5, 2, False, "symmetric", 2, np.float64, "forward"),
    (2, 3, 6, 37, 3, 5, 1, True, "symmetric", 2, np.float32, "reverse"),  # 32-wide tiles, 2 blocks
    (1, 12, 7, 9, 3, 5, 2, False, "symmetric", 2, np.float64, "forward"),  # 16-class chunk
    (2, 21, 6, 7, 3, 7, 1, True, None, 2, np.float32, "reverse"),           # 32-class chunk
]


def _case_id(c):
    B, C, H, W, F, k, blur, potts, norm, T, dt, order = c
    return (f"B{B}C{C}_{H}x{W}F{F}_k{k}b{blur}_{'potts' if potts else 'matrix'}_{norm}_T{T}_"
            f"{np.dtype(dt).name}_{order}")


@pytest.fixture(params=["small-grid", "large-grid"])
def chunk_rule(request, monkeypatch):
    """Test images are small grids (one class chunk of 8); "large-grid" forces the wide chunks."""
    if request.param == "large-grid":
        monkeypatch.setattr(_cuda, "SMALL_GRID_CELLS", 0)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mean_field_matches_numpy(case, chunk_rule):
    B, C, H, W, F, k, blur, potts, norm, T, dtype, order = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))  # stable across runs
    unary, features, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    config = _meanfield.CRFConfig(k, blur, T, norm)
    backend = emulated(order)
    for logits in (False, True):
        want = _meanfield.mean_field(nb, unary, features, params, config, return_logits=logits)
        got = _meanfield.mean_field(backend, unary, features, params, config, return_logits=logits)
        assert got.dtype == dtype and got.shape == unary.shape
        np.testing.assert_allclose(got, want, **TOL[dtype])
        if not logits:
            np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), C=st.integers(2, 5), H=st.integers(1, 12), W=st.integers(1, 12),
    F=st.sampled_from([1, 3, 5]), blur=st.integers(1, 4), k=st.sampled_from([3, 5, 7]),
    potts=st.booleans(), norm=st.sampled_from([None, "symmetric"]),
    dtype=st.sampled_from([np.float32, np.float64]), order=st.sampled_from(ORDERS),
    seed=st.integers(0, 2**31),
)
def test_mean_field_matches_numpy_random_shapes(B, C, H, W, F, blur, k, potts, norm, dtype, order, seed):
    rng = np.random.default_rng(seed)
    unary, features, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    config = _meanfield.CRFConfig(k, blur, 2, norm)
    want = _meanfield.mean_field(nb, unary, features, params, config)
    got = _meanfield.mean_field(emulated(order), unary, features, params, config)
    np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_classes_use_several_chunks_and_the_unfused_update(dtype, chunk_rule):
    # 40 classes: 5 chunks of 8 or 2 chunks of 32 in the message kernel, and more than the fused
    # update holds.
    rng = np.random.default_rng(7)
    unary, features, params = random_problem(rng, 1, 40, 6, 7, 3, dtype, potts=False)
    for norm in (None, "symmetric"):
        config = _meanfield.CRFConfig(3, 2, 2, norm)
        want = _meanfield.mean_field(nb, unary, features, params, config)
        got = _meanfield.mean_field(emulated(), unary, features, params, config)
        np.testing.assert_allclose(got, want, **TOL[dtype])


def test_keep_centre_and_zero_weights():
    rng = np.random.default_rng(3)
    unary, features, params = random_problem(rng, 1, 3, 8, 9, 3, np.float64)
    for p, norm in ((params.replace(appearance_weight=0.0), "symmetric"),
                    (params.replace(smoothness_weight=0.0), None),
                    (params.replace(appearance_weight=0.0, smoothness_weight=0.0), None)):
        config = _meanfield.CRFConfig(5, 2, 2, norm, keep_centre=True)
        want = _meanfield.mean_field(nb, unary, features, p, config)
        got = _meanfield.mean_field(emulated("reverse"), unary, features, p, config)
        np.testing.assert_allclose(got, want, **TOL[np.float64])


def test_one_pixel_image_is_finite():
    rng = np.random.default_rng(4)
    unary, features, params = random_problem(rng, 1, 3, 1, 1, 3, np.float64)
    config = _meanfield.CRFConfig(3, 1, 2, "symmetric")
    got = _meanfield.mean_field(emulated(), unary, features, params, config)
    want = _meanfield.mean_field(nb, unary, features, params, config)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, **TOL[np.float64])


# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blur", [1, 2, 3, 4])
@pytest.mark.parametrize("order", ORDERS)
def test_pool(dtype, blur, order):
    rng = np.random.default_rng(blur)
    x = rng.normal(size=(2, 3, 11, 9)).astype(dtype)
    s0, s1 = rng.uniform(0.5, 2, size=(2, 2, 1, 11, 9)).astype(dtype)
    be = emulated(order)
    np.testing.assert_allclose(be.pool(x, blur), nb.pool(x, blur), **TOL[dtype])
    a, b = be.pool(x, blur, s0, s1)
    np.testing.assert_allclose(a, nb.pool(x * s0, blur), **TOL[dtype])
    np.testing.assert_allclose(b, nb.pool(x * s1, blur), **TOL[dtype])


def _setup(rng, B, F, H, W, k, blur, dtype, norm=None, keep_centre=False):
    features = rng.uniform(0, 40, size=(B, F, H, W)).astype(dtype)
    params = CRFParams(theta_alpha=2.5, theta_beta=tuple(rng.uniform(5, 30, size=F)), theta_gamma=1.3,
                       appearance_weight=0.8, smoothness_weight=1.7)
    config = _meanfield.CRFConfig(k, blur, 1, norm, keep_centre)
    return features, params, config


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,blur,F", [(3, 1, 1), (5, 2, 3), (7, 1, 5), (5, 3, 6), (9, 1, 2)])
@pytest.mark.parametrize("order", ORDERS)
def test_message_on_the_coarse_grid(dtype, k, blur, F, order):
    rng = np.random.default_rng(k * 10 + blur)
    B, C, H, W = 2, 3, 10, 9
    features, params, config = _setup(rng, B, F, H, W, k, blur, dtype)
    be = emulated(order)
    setup = be.prepare(features, params, config)
    ref = _meanfield.prepare(nb, features, params, config)
    h, w = axis_geometry(H, blur).coarse, axis_geometry(W, blur).coarse
    q = rng.uniform(size=(B, C, h, w)).astype(dtype)
    want = nb.message(ref.kernels[0], q, k)
    np.testing.assert_allclose(be.coarse_message(setup, q), want, **TOL[dtype])
    # separate kernels: unweighted appearance and smoothness
    kern = nb.pairwise_kernels(
        (axis_geometry(H, blur).centres, axis_geometry(W, blur).centres), nb.pool(features, blur),
        1.0 / params.theta_beta_vector(F), 1.0 / params.theta_alpha ** 2, 1.0 / params.theta_gamma ** 2,
        k, ((1.0, 0.0), (0.0, 1.0)))
    q1 = rng.uniform(size=q.shape).astype(dtype)
    ma, ms = be.coarse_message(setup, q, q1)
    np.testing.assert_allclose(ma, nb.message(kern[0], q, k), **TOL[dtype])
    np.testing.assert_allclose(ms, nb.message(kern[1], q1, k), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blur", [1, 2, 3, 4])
@pytest.mark.parametrize("norm", [None, "symmetric"])
def test_normalisers_and_full_message(dtype, blur, norm):
    rng = np.random.default_rng(blur)
    B, C, H, W = 2, 3, 11, 10
    features, params, config = _setup(rng, B, 3, H, W, 5, blur, dtype, norm)
    be = emulated("reverse")
    setup = be.prepare(features, params, config)
    ref = _meanfield.prepare(nb, features, params, config)
    if norm:
        for got, want in zip(setup.normalisers, ref.normalisers):
            np.testing.assert_allclose(got, want, **TOL[dtype])
    q = nb.softmax(rng.normal(size=(B, C, H, W)).astype(dtype))
    msg = be.full_message(setup, q, config)
    assert isinstance(msg, CoarseMessage)
    np.testing.assert_allclose(be.materialise(msg), _meanfield.message(nb, ref, q, config), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [2, 5, 9, 17, 33])
@pytest.mark.parametrize("potts", [True, False])
def test_update_and_softmax(dtype, C, potts):
    rng = np.random.default_rng(C)
    su = rng.normal(scale=3, size=(2, C, 5, 7)).astype(dtype)
    msg = rng.uniform(0, 4, size=su.shape).astype(dtype)
    compat = None if potts else rng.uniform(-1, 2, size=(C, C)).astype(dtype)
    be = emulated()
    for logits in (False, True):
        want = nb.update(su, msg.copy(), compat, return_logits=logits)
        np.testing.assert_allclose(be.update(su, msg, compat, return_logits=logits), want, **TOL[dtype])
    np.testing.assert_allclose(be.softmax(su), nb.softmax(su), **TOL[dtype])


def test_update_writes_into_out_and_leaves_inputs_alone():
    rng = np.random.default_rng(0)
    su = rng.normal(size=(1, 4, 6, 5))
    msg = rng.uniform(size=su.shape)
    su0, msg0 = su.copy(), msg.copy()
    out = np.empty_like(su)
    got = emulated().update(su, msg, None, out=out)
    assert got is out
    np.testing.assert_array_equal(su, su0)
    np.testing.assert_array_equal(msg, msg0)
    np.testing.assert_allclose(got, nb.softmax(su + msg), rtol=1e-12)


def test_class_chunk_choice():
    spec = _cuda.message_spec
    assert spec(np.float32, 3, 21, False)[2] == 32
    assert spec(np.float32, 3, 21, False, num_cells=10**6)[2] == 32
    assert spec(np.float32, 3, 21, False, num_cells=125 * 125)[2] == 8
    assert spec(np.float64, 3, 12, True)[2] == 16
    assert spec(np.float32, 3, 40, False)[2] == 32     # 2 chunks of 32
    assert spec(np.float32, 3, 70, False)[2] == 32     # 3 chunks
    assert spec(np.float32, 7, 3, False)[1] == 0       # generic feature count


def test_specialisations_cover_the_launches():
    specs = _cuda.specialisations()
    names = {n for entries in specs.values() for _, ns in entries for n in ns}
    for dt in (np.float32, np.float64):
        for F in range(1, 9):
            for C in (1, 2, 8, 9, 21, 33, 70):
                for sep in (False, True):
                    for cells in (None, 100):
                        assert _cuda.message_spec(dt, F, C, sep, cells)[0] in names
        for C in range(2, 40):
            for matrix in (False, True):
                spec = _cuda.update_spec(dt, C, matrix)
                assert spec is None or spec in names
        assert _cuda.pool_spec(dt, True) in names and _cuda.upsample_spec(dt) in names
    assert set(specs) == set(_cuda.KERNEL_FILES)


# ---------------------------------------------------------------------------------------------
# the emulator catches broken variants of these kernels
# ---------------------------------------------------------------------------------------------
def _message_problem(dtype=np.float32):
    rng = np.random.default_rng(11)
    B, C, H, W = 2, 3, 10, 9
    features, params, config = _setup(rng, B, 3, H, W, 5, 1, dtype)
    q = rng.uniform(size=(B, C, H, W)).astype(dtype)
    want = nb.message(_meanfield.prepare(nb, features, params, config).kernels[0], q, 5)
    return features, params, config, q, want


def _run_message(backend, problem):
    features, params, config, q, _ = problem
    return backend.coarse_message(backend.prepare(features, params, config), q)


# The barrier between loading the feature tile and reading it.
_TILE_BARRIER = ("message.cu", "        __syncthreads();\n\n        if (inside) {", "\n        if (inside) {")


def test_reference_variant_is_correct():
    problem = _message_problem()
    for order in ORDERS:
        np.testing.assert_allclose(_run_message(emulated(order), problem), problem[-1], **TOL[np.float32])


def test_missing_barrier_is_caught():
    problem = _message_problem()
    wrong = [not np.allclose(_run_message(emulated(order, mutation=_TILE_BARRIER), problem),
                             problem[-1], rtol=1e-5)  # NaN (poisoned shared memory) counts as wrong
             for order in ORDERS]
    assert any(wrong), "a message kernel without its tile barrier matched NumPy in both orders"


def test_barrier_after_early_return_is_caught():
    # Threads outside the grid (W = 9 cells, 16 threads per row) leave before the tile barriers.
    mutation = ("message.cu", "    for (int z = blockIdx.z;", "    if (!inside) return;\n    for (int z = blockIdx.z;")
    with pytest.raises(emulator.EmulatorError, match="barrier|__syncthreads"):
        _run_message(emulated(mutation=mutation), _message_problem())


def test_python_float_for_a_float_parameter_is_caught():
    # CuPy passes a Python float as a double: the kernel's `float wa, ws` read garbage.
    def as_python_scalars(args):
        return tuple(float(a) if isinstance(a, np.float32) else a for a in args)

    problem = _message_problem()
    got = _run_message(emulated(wrap=as_python_scalars), problem)
    assert not np.allclose(got, problem[-1], rtol=1e-3)


def test_python_int_for_a_pointer_or_missing_argument_is_rejected():
    def drop_last(args):
        return tuple(args[:-1])

    with pytest.raises(TypeError):
        _run_message(emulated(wrap=drop_last), _message_problem())


@pytest.mark.skipif(not emulator.asan_available(), reason="AddressSanitizer not available")
def test_read_past_the_end_is_caught_by_asan():
    # Off by one in the right border test: the last cell reads one element past q.
    mutation = ("message.cu", "if (xn < 0 || xn >= w) continue;", "if (xn < 0 || xn > w) continue;")
    problem = _message_problem()
    with pytest.raises(emulator.EmulatorError, match="AddressSanitizer"):
        _run_message(emulated(asan=True, mutation=mutation), problem)
    # Without ASan the same bug shows as wrong messages at the right border.
    got = _run_message(emulated(mutation=mutation), problem)
    assert not np.allclose(got, problem[-1], rtol=1e-5)


@pytest.mark.skipif(not emulator.asan_available(), reason="AddressSanitizer not available")
def test_undersized_shared_memory_is_caught_by_asan(monkeypatch):
    real = _cuda.message_launch

    def no_halo(coarse, radii, num_features, itemsize):
        block, _ = real(coarse, radii, num_features, itemsize)
        return block, num_features * block[0] * block[1] * block[2] * itemsize  # forgets the halo

    monkeypatch.setattr(_cuda, "message_launch", no_halo)
    with pytest.raises(emulator.EmulatorError, match="AddressSanitizer"):
        _run_message(emulated(asan=True), _message_problem())
