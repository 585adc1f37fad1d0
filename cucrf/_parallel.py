"""Spreading NumPy work over CPU cores.

NumPy's element-wise loops and reductions release the GIL, so threads working on disjoint slices
of an array run in parallel. Only the full-resolution steps of inference (pooling, upsampling,
the update and its softmax) are split; each chunk is written by exactly one thread, so results
do not depend on the number of threads.

``CUCRF_NUM_THREADS`` sets the number of threads (default: the CPU count, at most 8; 1 turns
threading off).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["num_threads", "for_chunks"]

#: Below this many elements a split costs more than it saves.
MIN_ELEMENTS = 1 << 18

_lock = threading.Lock()
_executor = None
_executor_size = 0
_inside = threading.local()


def num_threads() -> int:
    """Number of threads to use, from ``CUCRF_NUM_THREADS`` or the CPU count."""
    env = os.environ.get("CUCRF_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"CUCRF_NUM_THREADS must be a positive integer, got {env!r}") from None
    return max(1, min(os.cpu_count() or 1, 8))


def _get_executor(threads):
    global _executor, _executor_size
    with _lock:
        if _executor is None or _executor_size < threads:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cucrf")
            _executor_size = threads
        return _executor


def _run(fn, start, stop):
    _inside.active = True
    try:
        fn(start, stop)
    finally:
        _inside.active = False


def for_chunks(n_items, fn, elements):
    """Call ``fn(start, stop)`` on contiguous chunks covering ``range(n_items)``.

    Parameters
    ----------
    n_items : int
        Length of the axis being split.
    fn : callable
        Does the work for items ``start:stop``; must write only to its own items.
    elements : int
        Total size of the work, to decide whether threads pay off.
    """
    threads = min(num_threads(), n_items)
    if threads <= 1 or elements < MIN_ELEMENTS or getattr(_inside, "active", False):
        fn(0, n_items)
        return
    bounds = [(i * n_items // threads, (i + 1) * n_items // threads) for i in range(threads)]
    executor = _get_executor(threads)
    futures = [executor.submit(_run, fn, a, b) for a, b in bounds[1:] if b > a]
    fn(*bounds[0])  # the calling thread takes the first chunk
    for f in futures:
        f.result()
