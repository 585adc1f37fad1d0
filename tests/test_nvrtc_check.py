"""Tests of the device-less NVRTC compile check (cucrf.testing.nvrtc_check)."""
import pytest

from cucrf.testing import nvrtc_check

try:
    nvrtc_check._nvrtc()
except nvrtc_check.SetupError as e:
    pytest.skip(f"CuPy NVRTC not usable: {e}", allow_module_level=True)

GOOD = r"""
template <int K>
__global__ void scale(float* __restrict__ x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= K * SCALE;
}
"""
SYNTAX = 'extern "C" __global__ void broken(float* x) { x[0] = 1.0f }\n'
STACK = r"""
extern "C" __global__ void local_array(const int* idx, float* out) {
  float buf[256];
  for (int k = 0; k < 256; ++k) buf[k] = out[k] * k;
  buf[idx[threadIdx.x] & 255] += 1.0f;       // dynamic index: buf lives on the stack
  out[threadIdx.x] = buf[idx[threadIdx.x + 1] & 255];
}
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_kernel_passes(tmp_path):
    f = _write(tmp_path, "good.cu", GOOD)
    specs = {"good.cu": [(("-DSCALE=2.0f",), ["scale<3>"])]}
    results = nvrtc_check.check([f], ("sm_80", "sm_90"), specs)
    assert [r.arch for r in results] == ["sm_80", "sm_90"]
    assert all(r.ok for r in results), nvrtc_check.format_table(results)
    k = results[0].kernels[0]
    assert k.name == "scale<3>" and k.registers > 0


def test_syntax_error_fails(tmp_path, capsys):
    f = _write(tmp_path, "bad.cu", SYNTAX)
    assert nvrtc_check.main([str(f), "--arch", "sm_90"]) == 1
    out = capsys.readouterr().out
    assert "COMPILE ERROR" in out and "expected" in out


def test_dynamically_indexed_local_array_fails(tmp_path, capsys):
    f = _write(tmp_path, "stack.cu", STACK)
    assert nvrtc_check.main([str(f), "--arch", "sm_90"]) == 1
    [r] = nvrtc_check.check([f], ("sm_90",), {})
    assert r.error is None and r.kernels[0].stack > 0


def test_option_list_matches_cupy_rawmodule():
    opts = nvrtc_check.cupy_options(("-DX=1",), "sm_90")
    assert "-DX=1" in opts and "--std=c++17" in opts
    assert opts[-3:] == ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")


def test_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers"""
    [k] = nvrtc_check.parse_ptxas(log)
    assert (k.name, k.registers, k.stack, k.spill_stores, k.spill_loads) == ("k", 255, 16, 8, 4)
    assert not k.ok
