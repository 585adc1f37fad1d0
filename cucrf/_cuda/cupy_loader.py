"""Compile kernel modules with CuPy: lazily, once per device and specialisation."""

from __future__ import annotations

import functools

from . import kernel_source

__all__ = ["load_module", "memory_info"]


@functools.lru_cache(maxsize=None)
def _module(device_id, file_name, options, name_expressions):
    import cupy

    # RawModule compiles (NVRTC, with CuPy's on-disk cache) for the current device on first use.
    return cupy.RawModule(code=kernel_source(file_name), options=options,
                          name_expressions=name_expressions)


def load_module(file_name, options, name_expressions):
    """A ``cupy.RawModule`` of ``cucrf/kernels/<file_name>`` for the current device (cached)."""
    import cupy

    return _module(cupy.cuda.Device().id, file_name, tuple(options), tuple(name_expressions))


def memory_info():
    """Free device memory plus the bytes CuPy's default pool holds unused."""
    import cupy

    free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())
