"""Tests of the CPU CUDA emulator itself (cucrf.testing.emulator)."""
import shutil

import numpy as np
import pytest

from cucrf.testing.emulator import (EmulatedModule, EmulatorCompileError, EmulatorError,
                                    asan_available)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not available")

ORDERS = ("forward", "reverse")

REDUCE = r"""
extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.f;
  BARRIER_A
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    BARRIER_B
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void static_sum(const float* x, float* out) {
  __shared__ float s[128];
  s[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.f;
    for (int k = 0; k < 128; ++k) acc += s[k];
    out[0] = acc;
  }
}
"""
GOOD = ("-DBARRIER_A=__syncthreads();", "-DBARRIER_B=__syncthreads();")


def _module(src, options=(), names=(), order="forward", **kw):
    return EmulatedModule(src, options, names, thread_order=order, **kw)


def _block_sum(options, order, n=1000, threads=128):
    rng = np.random.default_rng(0)
    x = rng.random(n, dtype=np.float32)
    blocks = (n + threads - 1) // threads
    out = np.zeros(blocks, np.float32)
    fn = _module(REDUCE, options, order=order).get_function("block_sum")
    fn((blocks,), (threads,), (x, out, np.int32(n)), shared_mem=threads * 4)
    expected = np.add.reduceat(np.pad(x, (0, blocks * threads - n)), np.arange(0, n, threads))
    return out, expected


@pytest.mark.parametrize("order", ORDERS)
def test_block_reduction_matches_numpy(order):
    out, expected = _block_sum(GOOD, order)
    np.testing.assert_allclose(out, expected, rtol=2e-5)


@pytest.mark.parametrize("missing", ["A", "B"])
def test_missing_barrier_is_caught_in_some_order(missing):
    options = tuple(o for o in GOOD if not o.startswith(f"-DBARRIER_{missing}"))
    options += (f"-DBARRIER_{missing}=",)
    wrong = []
    for order in ORDERS:
        out, expected = _block_sum(options, order)
        wrong.append(not np.allclose(out, expected, rtol=2e-5))  # NaN counts as wrong
    assert any(wrong), "a reduction without a barrier matched NumPy in both thread orders"


def test_static_shared_memory():
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(1, np.float32)
    _module(REDUCE, GOOD).get_function("static_sum")(1, 128, (x, out))
    assert out[0] == x.sum()


WARP = r"""
extern "C" __global__ void warp_sum(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.f;
  for (int off = warpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) out[i / 32] = v;
}

extern "C" __global__ void warp_types(double* d, int* k) {
  const int lane = threadIdx.x;
  d[lane] = __shfl_sync(0xffffffffu, d[lane], 31 - lane);
  k[lane] = __shfl_up_sync(0xffffffffu, k[lane], 1) + __ballot_sync(0xffffffffu, lane < 4);
  __syncwarp();
}

extern "C" __global__ void exited_lane(float* x) {
  if (threadIdx.x >= 16) return;  // bug: upper half of the warp has exited
  float v = x[threadIdx.x];
  v += __shfl_down_sync(0xffffffffu, v, 8);
  x[threadIdx.x] = v;
}

extern "C" __global__ void barrier_after_return(float* x) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  x[threadIdx.x] = 1.f;
}
"""


@pytest.mark.parametrize("order", ORDERS)
def test_warp_shuffle_reduction(order):
    x = np.random.default_rng(1).random(256, dtype=np.float32)
    out = np.zeros(8, np.float32)
    _module(WARP, order=order).get_function("warp_sum")(2, 128, (x, out, np.int32(256)))
    np.testing.assert_allclose(out, x.reshape(8, 32).sum(1), rtol=2e-5)


def test_shuffle_double_int_and_ballot():
    d = np.arange(32, dtype=np.float64) * 0.5
    k = np.arange(32, dtype=np.int32)
    _module(WARP).get_function("warp_types")(1, 32, (d, k))
    np.testing.assert_array_equal(d, np.arange(32)[::-1] * 0.5)
    np.testing.assert_array_equal(k, np.r_[0, np.arange(31)] + 0b1111)


def test_shuffle_from_exited_lane_is_reported():
    with pytest.raises(EmulatorError, match="lane 8 of warp 0 reads lane 16, which has exited"):
        _module(WARP).get_function("exited_lane")(1, 32, (np.zeros(32, np.float32),))


def test_barrier_after_early_return_is_reported():
    with pytest.raises(EmulatorError, match="early return"):
        _module(WARP).get_function("barrier_after_return")(1, 64, (np.zeros(64, np.float32),))


SCALARS = r"""
extern "C" __global__ void axpy(float a, const float* x, float* y, long long n) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
template <int K, typename T> __global__ void scale(T* x, T a) {
  x[threadIdx.x] = x[threadIdx.x] * a + K + OFFSET;
}
"""


def test_python_float_to_float_parameter_gives_garbage():
    fn = _module(SCALARS, ("-D", "OFFSET=0")).get_function("axpy")
    x = np.ones(40, np.float32)
    y = np.zeros(40, np.float32)
    fn(1, 64, (np.float32(2.5), x, y, 40))          # right: float32 for float, int -> int64
    np.testing.assert_array_equal(y, 2.5)
    y[:] = 0
    fn(1, 64, (2.5, x, y, 40))                      # bug: a double's low 4 bytes read as float
    assert not np.allclose(y, 2.5)


def test_argument_errors_are_clear():
    fn = _module(SCALARS, ("-DOFFSET=0",)).get_function("axpy")
    x = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="takes 4 parameters, received 3"):
        fn(1, 4, (np.float32(1), x, x))
    with pytest.raises(TypeError, match="argument 1 .* pointer, received int"):
        fn(1, 4, (np.float32(1), 3, x, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        fn(1, 4, (np.float32(1), np.ones((4, 4), np.float32).T, x, 4))
    with pytest.raises(ValueError, match="block .* exceeds CUDA limits"):
        fn(1, (32, 64), (np.float32(1), x, x, 4))
    with pytest.raises(ValueError, match="shared_mem=65536 .* max_dynamic_shared_size_bytes"):
        fn(1, 4, (np.float32(1), x, x, 4), shared_mem=65536)


def test_template_kernel_via_name_expressions_and_defines():
    mod = _module(SCALARS, ("-DOFFSET=100",), ("scale<3, float>", "scale<2,double>"))
    xf = np.arange(8, dtype=np.float32)
    mod.get_function("scale<3,float>")(1, 8, (xf, np.float32(2)))
    np.testing.assert_array_equal(xf, np.arange(8) * 2 + 103)
    xd = np.arange(8, dtype=np.float64)
    mod.get_function("scale<2, double>")(1, 8, (xd, 0.5))
    np.testing.assert_array_equal(xd, np.arange(8) * 0.5 + 102)
    with pytest.raises(KeyError, match="name_expressions"):
        mod.get_function("scale<4,float>")


def test_compile_error_names_the_problem():
    with pytest.raises(EmulatorCompileError, match="undeclared|not declared"):
        _module('extern "C" __global__ void k(float* x) { x[0] = undeclared_thing; }')


OOB = r"""
extern "C" __global__ void shift(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + OFFSET];   // OFFSET=1: off-by-one read past the end
}
"""


@pytest.mark.skipif(not asan_available(), reason="libasan.so not found by g++")
def test_out_of_bounds_read_reported_under_asan():
    x = np.arange(64, dtype=np.float32)
    y = np.zeros(64, np.float32)
    ok = _module(OOB, ("-DOFFSET=0",), asan=True).get_function("shift")
    ok(2, 32, (x, y, np.int32(64)))
    np.testing.assert_array_equal(y, x)             # results come back from the subprocess
    bad = _module(OOB, ("-DOFFSET=1",), asan=True).get_function("shift")
    with pytest.raises(EmulatorError, match="heap-buffer-overflow"):
        bad(2, 32, (x, y, np.int32(64)))
