"""Spreading NumPy work over CPU cores.

NumPy's element-wise loops and reductions release the GIL, so threads working on disjoint slices
of an array run in parallel. Only the full-resolution steps of inference (pooling, upsampling,
the update and its softmax) are split; each chunk is written by exactly one thread, so results
do not depend on the number of threads.

``CUCRF_NUM_THREADS`` sets the number of threads (default: the CPU count, at most 8; 1 turns
threading off). Calls from several threads at once are safe: each thread count has its own
executor, which lives as long as the process.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["num_threads", "for_chunks"]

#: Below this many elements a split costs more than it saves.
MIN_ELEMENTS = 1 << 18

_lock = threading.Lock()
_executors = {}  # worker count -> ThreadPoolExecutor; never shut down, as other calls may use it
_inside = threading.local()


def num_threads() -> int:
    """Number of threads to use, from ``CUCRF_NUM_THREADS`` or the CPU count.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    ValueError
        If ``CUCRF_NUM_THREADS`` is set but is not a positive integer.
    """
    env = os.environ.get("CUCRF_NUM_THREADS", "").strip()
    if env:
        try:
            threads = int(env)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"CUCRF_NUM_THREADS must be a positive integer, got {env!r}")
        return threads
    return max(1, min(os.cpu_count() or 1, 8))


def _get_executor(threads):
    """The shared executor with ``threads`` workers, created on first use.

    Executors are kept for the life of the process and never shut down, so a call running in
    another thread (or one that read a different ``CUCRF_NUM_THREADS``) can always submit to the
    executor it got.
    """
    with _lock:
        executor = _executors.get(threads)
        if executor is None:
            executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cucrf")
            _executors[threads] = executor
        return executor


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
    workers = num_threads()
    threads = min(workers, n_items)
    if threads <= 1 or elements < MIN_ELEMENTS or getattr(_inside, "active", False):
        fn(0, n_items)
        return
    bounds = [(i * n_items // threads, (i + 1) * n_items // threads) for i in range(threads)]
    executor = _get_executor(workers)  # one executor per configured count, not per chunk count
    futures = [executor.submit(_run, fn, a, b) for a, b in bounds[1:] if b > a]
    fn(*bounds[0])  # the calling thread takes the first chunk
    for f in futures:
        f.result()
