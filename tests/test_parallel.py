"""Threaded NumPy work gives exactly the single-threaded result."""

import os
import subprocess
import sys

import numpy as np
import pytest

import cucrf
from cucrf import _parallel


@pytest.mark.parametrize("norm", [None, "symmetric"])
@pytest.mark.parametrize("blur", [1, 3])
def test_threads_do_not_change_results(monkeypatch, norm, blur):
    rng = np.random.default_rng(0)
    unary = rng.normal(size=(2, 5, 23, 19)).astype(np.float32)
    image = rng.integers(0, 256, (2, 23, 19, 3), dtype=np.uint8)
    monkeypatch.setenv("CUCRF_NUM_THREADS", "1")
    single = cucrf.infer(unary, image, filter_size=5, blur=blur, normalization=norm)
    monkeypatch.setattr(_parallel, "MIN_ELEMENTS", 1)
    monkeypatch.setenv("CUCRF_NUM_THREADS", "3")
    threaded = cucrf.infer(unary, image, filter_size=5, blur=blur, normalization=norm)
    np.testing.assert_array_equal(threaded, single)


def test_chunks_cover_every_item_once(monkeypatch):
    monkeypatch.setattr(_parallel, "MIN_ELEMENTS", 1)
    monkeypatch.setenv("CUCRF_NUM_THREADS", "4")
    hits = np.zeros(10, dtype=int)

    def work(a, b):
        hits[a:b] += 1

    _parallel.for_chunks(10, work, 10)
    assert (hits == 1).all()


def test_bad_thread_count(monkeypatch):
    monkeypatch.setenv("CUCRF_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="CUCRF_NUM_THREADS must be a positive integer"):
        _parallel.num_threads()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_thread_count(monkeypatch, value):
    monkeypatch.setenv("CUCRF_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"CUCRF_NUM_THREADS must be a positive integer, got '{value}'"):
        _parallel.num_threads()


# Shared by the subprocess scripts: tiny inputs, every step threaded, the one-thread reference.
_SCRIPT_SETUP = """
import os
import threading
import time

import numpy as np

import cucrf
from cucrf import _parallel

_parallel.MIN_ELEMENTS = 1
rng = np.random.default_rng(0)
unary = rng.normal(size=(3, 16, 12)).astype(np.float32)
image = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
os.environ["CUCRF_NUM_THREADS"] = "1"
reference = cucrf.infer(unary, image, filter_size=5, iterations=2)
"""

_CONCURRENT_SCRIPT = _SCRIPT_SETUP + """os.environ["CUCRF_NUM_THREADS"] = "8"
barrier = threading.Barrier(4)
errors = []


def work():
    barrier.wait()
    try:
        for _ in range(3):
            assert np.array_equal(cucrf.infer(unary, image, filter_size=5, iterations=2), reference)
    except BaseException as exc:
        errors.append(repr(exc))


threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
"""


def test_concurrent_calls_share_the_pool():
    # A fresh process each time: the first calls are the ones that create the pool. Small images
    # (3 classes, so chunks of 3 and of 8 items) keep the calls short and the callers overlapping.
    for _ in range(6):
        run = subprocess.run([sys.executable, "-c", _CONCURRENT_SCRIPT], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr


_CHANGING_SCRIPT = _SCRIPT_SETUP + """stop = threading.Event()
errors = []


def work():
    try:
        while not stop.is_set():
            assert np.array_equal(cucrf.infer(unary, image, filter_size=5, iterations=2), reference)
    except BaseException as exc:
        errors.append(repr(exc))


threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for count in range(2, 17):
    os.environ["CUCRF_NUM_THREADS"] = str(count)
    time.sleep(0.01)
stop.set()
for t in threads:
    t.join()
assert not errors, errors
"""


def test_thread_count_changing_during_calls():
    # In a fresh process, so that the pools made for each count do not outlive the test.
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", _CHANGING_SCRIPT], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr


def test_pieces_cover_every_piece_once_on_any_thread_count(monkeypatch):
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("CUCRF_NUM_THREADS", threads)
        hits = np.zeros(13, dtype=int)

        def work(piece):
            hits[piece] += 1

        _parallel.for_pieces(13, work)
        assert (hits == 1).all(), threads


def test_an_error_in_a_piece_is_raised_after_every_piece_ended(monkeypatch):
    monkeypatch.setenv("CUCRF_NUM_THREADS", "3")
    done = []

    def work(piece):
        if piece == 4:
            raise KeyError("piece 4")
        done.append(piece)

    with pytest.raises(KeyError, match="piece 4"):
        _parallel.for_pieces(9, work)
    assert sorted(done) == [0, 1, 2, 3, 5, 6, 7, 8]


_FORK_SCRIPT = _SCRIPT_SETUP + """os.environ["CUCRF_NUM_THREADS"] = "2"
assert np.array_equal(cucrf.infer(unary, image, filter_size=5, iterations=2), reference)  # the pool exists
pid = os.fork()
if pid == 0:  # the child: the parent's worker threads do not exist here
    ok = np.array_equal(cucrf.infer(unary, image, filter_size=5, iterations=2), reference)
    os._exit(0 if ok else 3)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        assert os.waitstatus_to_exitcode(status) == 0, status
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    raise AssertionError("the forked child hung")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_forked_child_computes_after_the_parent_used_threads(fast):
    # multiprocessing's default start method on Linux before Python 3.14, and DataLoader workers
    env = dict(os.environ, CUCRF_FAST=fast)
    run = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
