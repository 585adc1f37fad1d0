"""The memory estimate checked before allocating is never below what the computation really uses."""

import itertools
import tracemalloc

import numpy as np
import pytest

import cucrf
from cucrf import _api, _meanfield

rng = np.random.default_rng(0)
B, H, W, F = 1, 24, 30, 3


def peak_bytes(fn, *args, **kwargs):
    """Peak of the memory ``fn`` allocates beyond what is allocated when it starts (tracemalloc)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = fn(*args, **kwargs)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del result
    return peak


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    # One-time allocations (thread pool, caches) are not part of a computation's working memory.
    u = rng.normal(size=(2, 8, 8))
    cucrf.infer_vjp(u, rng.uniform(0, 255, (8, 8, 3)), grad_output=u, filter_size=3, blur=1)
    cucrf.infer(u, rng.uniform(0, 255, (8, 8, 3)), filter_size=3, blur=1)


CASES = list(itertools.product([2, 5], [3, 11], [1, 2, 4], [None, "symmetric"]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["infer_vjp", "infer"])
def test_estimate_bounds_the_measured_peak(training, dtype):
    worst = []
    for C, k, blur, normalization in CASES:
        config = _meanfield.CRFConfig(k, blur, 5, normalization)
        unary = rng.normal(size=(B, C, H, W)).astype(dtype)
        image = rng.uniform(0, 255, (B, H, W, F)).astype(dtype)
        kw = dict(filter_size=k, blur=blur, iterations=5, normalization=normalization)
        if training:
            peak = peak_bytes(cucrf.infer_vjp, unary, image, grad_output=np.ones_like(unary), **kw)
        else:
            peak = peak_bytes(cucrf.infer, unary, image, **kw)
        need = _api.required_bytes(B, C, (H, W), F, config, np.dtype(dtype).itemsize, training=training)
        worst.append((peak / need, (C, k, blur, normalization)))
    ratio, case = max(worst)
    assert ratio <= 1.0, f"peak {ratio:.2f} x the estimate at (C, filter_size, blur, normalization) = {case}"


def test_infer_vjp_estimate_is_what_the_check_uses(monkeypatch):
    # C=2, filter_size=11, blur=1: the case where the estimate used to be 1.15x too low.
    config = _meanfield.CRFConfig(11, 1, 5, None)
    need = _api.required_bytes(B, 2, (H, W), F, config, 4, training=True)
    unary = rng.normal(size=(B, 2, H, W)).astype(np.float32)
    image = rng.uniform(0, 255, (B, H, W, F)).astype(np.float32)
    kw = dict(grad_output=np.ones_like(unary), filter_size=11, blur=1, iterations=5)
    peak = peak_bytes(cucrf.infer_vjp, unary, image, **kw)
    assert peak <= need
    monkeypatch.setattr("cucrf._api.available_memory_bytes", lambda: need - 1)
    with pytest.raises(cucrf.ProblemTooLargeError, match="this gradient needs about"):
        cucrf.infer_vjp(unary, image, **kw)
    monkeypatch.setattr("cucrf._api.available_memory_bytes", lambda: need)
    cucrf.infer_vjp(unary, image, **kw)
