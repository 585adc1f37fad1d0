"""Every CUDA kernel specialisation the library launches compiles through NVRTC, as CuPy would
compile it, for sm_80 and sm_90, without register spills or stack use. Needs no GPU; skipped when
CuPy or NVRTC is not installed (`pip install -e .[kernel-check]`)."""

import pytest

from cucrf.testing import nvrtc_check


def test_all_package_kernels_compile_clean():
    try:
        nvrtc_check._nvrtc()
    except nvrtc_check.SetupError as exc:
        pytest.skip(f"NVRTC check unavailable: {exc}")
    files = nvrtc_check._package_kernels()
    assert files, "no .cu files found in cucrf.kernels"
    results = nvrtc_check.check(files)
    failed = [r for r in results if not r.ok]
    assert not failed, nvrtc_check.format_table(failed)
    # every file and both architectures were compiled
    assert {r.file for r in results} == {f.name for f in files} or {r.file for r in results} == {str(f) for f in files}
    assert {r.arch for r in results} == set(nvrtc_check.DEFAULT_ARCHS)
