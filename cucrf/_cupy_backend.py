"""The GPU backend: cucrf's CUDA kernels on CuPy arrays (imported only when CuPy arrays are used).

A module-level view of ``cucrf._cuda.backend.make_backend(cupy, load_module)``, offering what
:func:`cucrf._meanfield.mean_field` needs (``xp``, ``prepare``, ``full_message``, ``update``,
``softmax``), what :func:`cucrf._meanfield.mean_field_backward` needs (``softmax_backward``,
``compatibility_backward``, ``full_message_backward``, ``prepare_backward``, ``sum_products``) plus
``available_memory_bytes``. Kernels are compiled on first use, per device.
"""

from __future__ import annotations

import cupy

from ._cuda.backend import make_backend
from ._cuda.cupy_loader import load_module, memory_info

backend = make_backend(cupy, load_module, name="cupy", memory_info=memory_info)

xp = cupy
name = "cupy"
prepare = backend.prepare
full_message = backend.full_message
update = backend.update
softmax = backend.softmax
available_memory_bytes = backend.available_memory_bytes
stores_kernels = backend.stores_kernels  # kernel values are computed on the fly (memory estimate)
supports = backend.supports  # images and volumes, per-axis window and blur, spacing (check_backend_geometry)
# the backward pass (cucrf._meanfield.mean_field_backward)
softmax_backward = backend.softmax_backward
compatibility_backward = backend.compatibility_backward
full_message_backward = backend.full_message_backward
prepare_backward = backend.prepare_backward
sum_products = backend.sum_products

__all__ = ["backend", "xp", "name", "prepare", "full_message", "update", "softmax",
           "available_memory_bytes", "stores_kernels", "supports", "softmax_backward", "compatibility_backward",
           "full_message_backward", "prepare_backward", "sum_products"]
