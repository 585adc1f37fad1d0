"""Threaded NumPy work gives exactly the single-threaded result."""

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
