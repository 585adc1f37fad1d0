"""Spreading NumPy work over CPU cores.

NumPy's element-wise loops and reductions release the GIL, so threads working on disjoint slices
of an array run in parallel. Only the full-resolution steps of inference (pooling, upsampling,
the update and its softmax) are split; each chunk is written by exactly one thread, so results
do not depend on the number of threads.

The compiled kernels of the fused CPU path (:mod:`cucrf._numba_backend`) run on the same
threads: each kernel call is split into pieces that release the GIL (:func:`for_pieces`).

``CUCRF_NUM_THREADS`` sets the number of threads (default: the CPU count, at most 8; 1 turns
threading off). Calls from several threads at once are safe: each thread count has its own
executor, which lives as long as the process; a forked child process starts its own (the
parent's worker threads do not exist in it).
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["num_threads", "for_chunks", "for_pieces"]

#: Below this many elements a split costs more than it saves.
MIN_ELEMENTS = 1 << 18

#: The default thread count (``os.cpu_count()`` costs microseconds, and kernels ask per call).
_DEFAULT_THREADS = max(1, min(os.cpu_count() or 1, 8))

_lock = threading.Lock()
_executors = {}  # worker count -> ThreadPoolExecutor; never shut down, as other calls may use it
_inside = threading.local()


def _forget_executors_in_child():
    """After ``fork`` the executors' threads exist only in the parent: work submitted to them
    would wait forever, so the child makes new ones when it needs them."""
    global _lock
    _lock = threading.Lock()
    _executors.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executors_in_child)


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
    return _DEFAULT_THREADS


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


def for_pieces(n_pieces, fn):
    """Call ``fn(piece)`` for every piece in ``range(n_pieces)``, on up to ``num_threads()`` threads.

    The calling thread takes part; the threads take the next piece as they come free, so a
    thread that starts late (waking a sleeping thread takes tens of microseconds on some
    machines) does fewer. ``fn`` must release the GIL to run in parallel (compiled kernels do)
    and must write only what belongs to its piece.
    """
    threads = min(num_threads(), n_pieces)
    if threads <= 1 or getattr(_inside, "active", False):
        for piece in range(n_pieces):
            fn(piece)
        return
    claim = itertools.count()  # next() on it is atomic under the GIL

    def work():
        _inside.active = True
        try:
            for piece in iter(lambda: next(claim), None):
                if piece >= n_pieces:
                    return
                fn(piece)
        finally:
            _inside.active = False

    executor = _get_executor(num_threads())
    futures = [executor.submit(work) for _ in range(threads - 1)]
    error = None
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 (re-raised once every piece has ended)
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001
            error = error or exc
    if error is not None:
        raise error
