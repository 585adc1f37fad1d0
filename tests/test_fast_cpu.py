"""The fused CPU path (cucrf[fast], numba) against the NumPy backend, its specification.

The same case matrices as the CUDA emulator tests (images), plus volumes with per-axis windows,
blurs and spacings: outputs within float32 1e-5 / float64 1e-10, gradients within 1e-5 / 1e-10 of
the largest reference value (float32 parameter gradients, sums over every pair of cells, also get
ten times their own float32 rounding noise, as in the emulator tests). Then what must never
crash: numba failing to import or to compile, no writable cache folder, ``CUCRF_FAST=0``, thread
counts. Skipped when numba is not installed.
"""

import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cucrf
from cucrf import _backends, _fast, _meanfield, _parallel
from cucrf import _numpy_backend as nb
from cucrf._params import CRFParams

numba = pytest.importorskip("numba")
fb = pytest.importorskip("cucrf._numba_backend")

from .test_cuda_backward_emulated import CASES as BACKWARD_CASES  # noqa: E402
from .test_cuda_backward_emulated import _rounding_noise  # noqa: E402
from .test_cuda_emulated import CASES as FORWARD_CASES  # noqa: E402
from .test_cuda_emulated import random_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = {np.float32: dict(rtol=1e-5, atol=2e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}
RTOL = {np.float32: 1e-5, np.float64: 1e-10}
#: For a gradient that is exactly 0 in the reference (a one-pixel image), rounding of a sum of
#: terms that cancel.
ATOL = {np.float32: 1e-9, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def _fast_path_on(monkeypatch):
    """Whatever the environment says, these tests are about the fused path."""
    monkeypatch.delenv("CUCRF_FAST", raising=False)


def _max_abs(a):
    return float(np.max(np.abs(a))) if np.size(a) else 0.0


def assert_close(got, want, dtype, what="", excuse=0.0):
    """``max |got - want| <= RTOL * max |want| + ATOL + excuse``."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = _max_abs(got - want), _max_abs(want)
    allowed = RTOL[dtype] * scale + ATOL[dtype] + excuse
    assert err <= allowed, f"{what}: max |diff| {err:.3e} > {allowed:.3e} (scale {scale:.3e})"


def _taped(backend, unary, features, params, config, grad_output, logits):
    tape = _meanfield.Tape()
    out = _meanfield.mean_field(backend, unary, features, params, config, return_logits=logits, tape=tape)
    return out, _meanfield.mean_field_backward(backend, tape, grad_output)


def _check_backward(unary, features, params, config, go, logits, noise_excuse=True):
    dtype = unary.dtype.type
    want_out, (wu, wf, wp) = _taped(nb, unary, features, params, config, go, logits)
    got_out, (gu, gf, gp) = _taped(fb, unary, features, params, config, go, logits)
    assert_close(got_out, want_out, dtype, "output")
    assert gu.dtype == dtype and gf.dtype == dtype
    assert_close(gu, wu, dtype, "unary")
    assert_close(gf, wf, dtype, "features")
    excuse = {}
    if dtype == np.float32 and noise_excuse:
        u64, f64, g64 = (a.astype(np.float64) for a in (unary, features, go))
        truth = _taped(nb, u64, f64, params, config, g64, logits)[1]
        noise = _rounding_noise(unary, features, params, config, go, logits, truth)
        excuse = {k: 10 * v for k, v in noise.items() if k not in ("unary", "features")}
    assert set(gp) == set(wp)
    for name in wp:
        assert_close(gp[name], wp[name], dtype, name, excuse.get(name, 0.0))


# ---------------------------------------------------------------------------------------------
# images: the emulator's case matrices
# ---------------------------------------------------------------------------------------------
def _forward_id(c):
    B, C, H, W, F, k, blur, potts, norm, T, dt, _ = c
    return f"B{B}C{C}_{H}x{W}F{F}_k{k}b{blur}_{'potts' if potts else 'matrix'}_{norm}_T{T}_{np.dtype(dt).name}"


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_forward_id)
def test_forward_matches_numpy(case):
    B, C, H, W, F, k, blur, potts, norm, T, dtype, _ = case
    rng = np.random.default_rng(zlib.crc32(_forward_id(case).encode()))
    unary, features, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    config = _meanfield.CRFConfig(k, blur, T, norm)
    for logits in (False, True):
        want = _meanfield.mean_field(nb, unary, features, params, config, return_logits=logits)
        got = _meanfield.mean_field(fb, unary, features, params, config, return_logits=logits)
        assert got.dtype == dtype and got.shape == unary.shape
        np.testing.assert_allclose(got, want, **TOL[dtype])


def _backward_id(c):
    B, C, H, W, F, k, blur, potts, norm, T, dt, _, logits = c
    return (f"B{B}C{C}_{H}x{W}F{F}_k{k}b{blur}_{'potts' if potts else 'matrix'}_{norm}_T{T}_"
            f"{np.dtype(dt).name}{'_logits' if logits else ''}")


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=_backward_id)
def test_backward_matches_numpy(case):
    B, C, H, W, F, k, blur, potts, norm, T, dtype, _, logits = case
    rng = np.random.default_rng(zlib.crc32(_backward_id(case).encode()))
    unary, features, params = random_problem(rng, B, C, H, W, F, dtype, potts)
    go = rng.normal(size=unary.shape).astype(dtype)
    _check_backward(unary, features, params, _meanfield.CRFConfig(k, blur, T, norm), go, logits)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keep_centre_zero_weights_and_many_classes(dtype):
    rng = np.random.default_rng(3)
    unary, features, params = random_problem(rng, 1, 40, 8, 9, 3, dtype, potts=False)
    go = rng.normal(size=unary.shape).astype(dtype)
    for p, norm in ((params.replace(appearance_weight=0.0), "symmetric"), (params.replace(smoothness_weight=0.0), None),
                    (params.replace(appearance_weight=0.0, smoothness_weight=0.0), None)):
        config = _meanfield.CRFConfig(5, 2, 2, norm, keep_centre=True)
        np.testing.assert_allclose(_meanfield.mean_field(fb, unary, features, p, config),
                                   _meanfield.mean_field(nb, unary, features, p, config), **TOL[dtype])
        _check_backward(unary, features, p, config, go, False)


def test_one_pixel_and_zero_iterations():
    rng = np.random.default_rng(4)
    unary, features, params = random_problem(rng, 1, 3, 1, 1, 3, np.float64)
    for T in (0, 2):
        config = _meanfield.CRFConfig(3, 1, T, "symmetric")
        got = _meanfield.mean_field(fb, unary, features, params, config)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, _meanfield.mean_field(nb, unary, features, params, config), **TOL[np.float64])
        _check_backward(unary, features, params, config, np.ones_like(unary), False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,blur,k", [((150, 37), 2, 5), ((70, 90), 3, 3), ((33, 200), 4, 7), ((9, 5), 4, 5)])
def test_one_kernel_call_per_iteration_equals_two_bit_for_bit(monkeypatch, dtype, size, blur, k):
    """Each iteration's message made inside its update, block by block of rows (many blocks,
    several pieces, a batch of two), with and without a tape (which keeps the message), against
    the message made whole first: the outputs and the kept messages must agree to the last bit,
    and with NumPy to rounding."""
    rng = np.random.default_rng(14)
    unary, features, params = random_problem(rng, 2, 4, size[0], size[1], 3, dtype)
    config = _meanfield.CRFConfig(k, blur, 3)
    assert fb.ready(dtype)  # compiled and checked before the calls are counted
    calls = []
    real = fb._iterate
    monkeypatch.setattr(fb, "_iterate", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("CUCRF_NUM_THREADS", "2")
    fused = _meanfield.mean_field(fb, unary, features, params, config)
    assert len(calls) == 3
    tape = _meanfield.Tape()
    taped = _meanfield.mean_field(fb, unary, features, params, config, tape=tape)
    assert len(calls) == 6
    monkeypatch.setattr(fb, "_one_call_per_iteration", lambda setup: False)
    whole_tape = _meanfield.Tape()
    whole = _meanfield.mean_field(fb, unary, features, params, config, tape=whole_tape)
    assert len(calls) == 6
    assert np.array_equal(fused, whole) and np.array_equal(taped, whole)
    for kept, made_whole in zip(tape.msgs, whole_tape.msgs):
        assert np.array_equal(kept.m[0], made_whole.m[0])
    np.testing.assert_allclose(fused, _meanfield.mean_field(nb, unary, features, params, config), **TOL[dtype])
    monkeypatch.setenv("CUCRF_NUM_THREADS", "1")
    assert np.array_equal(_meanfield.mean_field(fb, unary, features, params, config), fused)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upsampling_by_fours_equals_the_gathers_bit_for_bit(dtype):
    """The message kernel upsamples blur-4 rows four pixels per coarse value; every row length,
    blur and tile phase must give exactly what the per-pixel gathers give."""
    from cucrf import _numba_kernels as k

    rng = np.random.default_rng(13)
    runs = 0
    for blur in range(1, 7):
        for W in range(1, 45):
            tab = fb._tables((1, 1, W), (1, 1, blur), np.dtype(dtype).str)
            lo, hi, f = tab.lo[2], tab.hi[2], tab.frac[2]
            i0, n4 = k._fours(lo, hi, f)
            runs += n4 > 0
            t = rng.normal(size=tab.coarse[2]).astype(dtype)
            want = np.empty(W, dtype)
            got = np.full(W, np.nan, dtype)
            k._upsample_row(t, lo, hi, f, want)
            k._upsample_row_fours(t, lo, hi, f, got, i0, n4)
            assert np.array_equal(got, want), (blur, W, i0, n4)
            if blur == 4 and W >= 16:
                assert n4 >= (W - 8) // 4  # all but the edges
    assert runs > 0


def test_transposed_upsampling_by_fours_matches_the_dense_matrix():
    """The vjp kernels reduce each row along x four pixels per coarse value (the transpose of
    the upsampling by fours): every row length and blur against the dense upsampling matrix."""
    from cucrf import _numba_kernels as k
    from cucrf._geometry import axis_geometry

    rng = np.random.default_rng(17)
    for blur in range(1, 7):
        for W in range(1, 45):
            tab = fb._tables((1, 1, W), (1, 1, blur), np.dtype(np.float64).str)
            lo, hi, f = tab.lo[2], tab.hi[2], tab.frac[2]
            i0, n4 = k._fours(lo, hi, f)
            v = rng.normal(size=W)
            got = np.full(tab.coarse[2], np.nan)
            k._reduce_row_fours(v, lo, hi, f, got, i0, n4)
            want = axis_geometry(W, blur).upsample_matrix().T @ v
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"blur {blur}, W {W}")


@pytest.mark.parametrize("nd,blur,potts", [(2, 4, True), (2, 3, False), (2, (1, 4), True), (3, 2, False)])
def test_training_keeps_no_full_resolution_q_and_matches_numpy(monkeypatch, nd, blur, potts):
    """With one merged kernel a taped run keeps each iteration's Q as its pooled form and what
    makes it again (the backward pass recomputes it inside the softmax's vjp, never writing it):
    nothing on the tape is made at full resolution, before or after the backward pass, and the
    gradients still match NumPy's."""
    rng = np.random.default_rng(18)
    size = (9, 23, 30)[3 - nd:]
    unary = rng.normal(scale=2.0, size=(2, 4) + size)
    features = rng.uniform(0, 40, size=(2, 3) + size)
    params = CRFParams(theta_alpha=2.0, theta_beta=12.0, theta_gamma=1.5,
                       compatibility="potts" if potts else rng.uniform(-1, 2, size=(4, 4)))
    config = _meanfield.CRFConfig(5, blur, 3)
    assert fb.ready(np.float64)  # compiled and checked before _materialise is watched
    made = []
    real = fb._materialise
    monkeypatch.setattr(fb, "_materialise", lambda q: made.append(q) if isinstance(q, fb.PooledQ) else real(q))
    tape = _meanfield.Tape()
    _meanfield.mean_field(fb, unary, features, params, config, tape=tape)
    assert len(tape.qs) == 3 and all(isinstance(q, fb.PooledQ) and q.full is None for q in tape.qs)
    assert not made
    _meanfield.mean_field_backward(fb, tape, rng.normal(size=unary.shape))
    assert not made and all(q.full is None for q in tape.qs)
    monkeypatch.setattr(fb, "_materialise", real)
    _check_backward(unary, features, params, config, rng.normal(size=unary.shape), False)


def _recording_kernels(monkeypatch):
    """The list into which the names of the kernels the fused backend runs (``fb._run``) go, from now on."""
    names = []
    real = fb._run
    monkeypatch.setattr(fb, "_run", lambda kernel, *a: names.append(kernel.__name__) or real(kernel, *a))
    return names


def test_the_last_softmax_vjp_vouches_for_the_unary_gradient_and_sums_its_products(monkeypatch):
    """The first softmax's vjp makes the last addition into the unary's gradient: it tells
    whether every value is finite (infer_vjp then skips its scan) and gives the unary weight's
    gradient sum(grad * U) in the same pass; a gradient that overflowed is still refused."""
    rng = np.random.default_rng(19)
    unary = rng.normal(scale=2.0, size=(2, 4, 30, 41)).astype(np.float32)
    features = rng.uniform(0, 255, size=(2, 3, 30, 41)).astype(np.float32)
    config = _meanfield.CRFConfig(5, 4, 3)
    assert fb.ready(np.float32)
    kernels = _recording_kernels(monkeypatch)
    tape = _meanfield.Tape()
    _meanfield.mean_field(fb, unary, features, CRFParams(), config, tape=tape)
    go = rng.normal(size=unary.shape).astype(np.float32)
    gu, _, grads = _meanfield.mean_field_backward(fb, tape, go)
    assert "row_dots" not in kernels
    assert fb.known_finite(gu)
    want = float(np.sum((gu * unary).astype(np.float64)))
    assert abs(grads["unary_weight"] - want) <= 1e-9 * float(np.sum(np.abs(gu * unary)))
    tape = _meanfield.Tape()
    _meanfield.mean_field(fb, unary, features, CRFParams(), config, tape=tape)
    gu = _meanfield.mean_field_backward(fb, tape, go * np.float32(3e38))[0]
    assert not np.isfinite(gu).all() and not fb.known_finite(gu)
    with pytest.raises(ValueError, match=r"^the gradient with respect to the unary \(cucrf.infer_vjp\) holds"):
        cucrf.infer_vjp(unary[0], np.moveaxis(features[0], 0, -1), grad_output=np.sign(go[0]) * np.float32(3e38))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compat", [None, "matrix"])
def test_the_last_iterations_vjp_makes_its_transposed_upsampling_in_the_same_pass(monkeypatch, dtype, compat):
    """On images with one merged kernel, the softmax's vjp at the taped output also makes the
    transposed upsampling that the compatibility's vjp reads (no pass of its own): the gradients
    still match NumPy, over blurs that do and do not divide the image and a blur of 1 along x."""
    rng = np.random.default_rng(23)
    assert fb.ready(dtype)
    kernels = _recording_kernels(monkeypatch)
    for blur, size in ((4, (29, 41)), (3, (12, 12)), ((2, 1), (9, 7))):
        unary = rng.normal(scale=2.0, size=(2, 5) + size).astype(dtype)
        features = rng.uniform(0, 255, size=(2, 3) + size).astype(dtype)
        params = CRFParams() if compat is None else CRFParams(compatibility=rng.uniform(0, 1, (5, 5)))
        config = _meanfield.CRFConfig(5, blur, 3)
        go = rng.normal(size=unary.shape).astype(dtype)
        kernels.clear()
        _check_backward(unary, features, params, config, go, False)  # (NumPy's kernels are not fb's)
        assert "softmax_backward_reduced" in kernels and "upsample_backward" not in kernels, kernels


def test_the_reduced_last_vjp_gives_the_same_bits_for_every_backward_pass_and_open_tape(monkeypatch):
    """Two tapes open at once and a backward pass run twice on one of them: every backward pass
    at a taped output takes the reduced pass, so each gives the bits of a lone tape's."""
    rng = np.random.default_rng(29)
    config = _meanfield.CRFConfig(5, 4, 3)
    problems = [(rng.normal(scale=2.0, size=(1, 5, 29, 41)).astype(np.float32),
                 rng.uniform(0, 255, size=(1, 3, 29, 41)).astype(np.float32)) for _ in range(2)]
    go = rng.normal(size=(1, 5, 29, 41)).astype(np.float32)
    alone = [_taped(fb, u, f, CRFParams(), config, go, False)[1] for u, f in problems]
    kernels = _recording_kernels(monkeypatch)
    tapes = []
    for u, f in problems:
        tapes.append(_meanfield.Tape())
        _meanfield.mean_field(fb, u, f, CRFParams(), config, tape=tapes[-1])
    got = [_meanfield.mean_field_backward(fb, tapes[1], go), _meanfield.mean_field_backward(fb, tapes[0], go),
           _meanfield.mean_field_backward(fb, tapes[0], go)]
    assert kernels.count("softmax_backward_reduced") == 3 and "upsample_backward" not in kernels
    for (gu, gf, gp), want in zip(got, [alone[1], alone[0], alone[0]]):
        np.testing.assert_array_equal(gu, want[0])
        np.testing.assert_array_equal(gf, want[1])
        for name in want[2]:
            np.testing.assert_array_equal(gp[name], want[2][name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_its_dot_in_one_pass_against_numpy_also_where_the_sum_of_exps_overflows(dtype):
    """The vjps' one-pass softmax and sum_c q G against NumPy (float64 oracle), on ordinary values
    and where sum_c exp(...) G overflows though sum_c q G does not (|G| near the largest value
    over C): that row's dot is then taken from q, finite as NumPy's."""
    from cucrf import _numba_kernels as kernels

    rng = np.random.default_rng(31)
    C, W, Wp = 21, 37, 48
    big = np.finfo(dtype).max / 4
    for scale_g in (1.0, big):
        logits = np.zeros((C, Wp), dtype)
        logits[:, :W] = rng.normal(scale=3.0, size=(C, W))
        logits[:, 5] = 0.0  # equal logits: every e is 1, their sum C
        G = np.zeros((C, Wp), dtype)
        G[:, :W] = rng.uniform(0.5, 1.0, size=(C, W)) * dtype(scale_g)
        top = logits.max(axis=0)
        x = logits[:, :W].astype(np.float64)
        q = np.exp(x - x.max(axis=0))
        q /= q.sum(axis=0)
        want = (q * G[:, :W]).sum(axis=0)
        total, dot = np.empty(Wp, dtype), np.empty(Wp, dtype)
        kernels._softmax_dot_rows(logits, top, total, G, dot)
        assert np.isfinite(dot[:W]).all()
        np.testing.assert_allclose(dot[:W], want, rtol=RTOL[dtype] * 10)
        np.testing.assert_allclose(logits[:, :W] * total[:W], q, rtol=RTOL[dtype] * 10, atol=1e-7)


@pytest.mark.parametrize("shape,filter_size", [((2, 5, 1, 13, 11), (1, 5, 5)), ((1, 21, 1, 20, 17), (1, 7, 3)),
                                               ((2, 3, 3, 7, 9), (3, 3, 3)), ((1, 6, 4, 5, 6), (5, 3, 3)),
                                               ((1, 2, 1, 2, 3), (1, 7, 7))])
def test_pair_products_against_loops(shape, filter_size):
    """The kernel gradient's pair products (flat runs over blocks of rows, wrapped entries set to
    0) against a loop over every cell and offset in float64, added over two calls, on 1 to 3
    pieces: the same bits for any number of pieces."""
    from cucrf import _numba_kernels as kernels

    rng = np.random.default_rng(sum(shape))
    nd = 2 if shape[2] == 1 else 3
    offsets = fb._offsets3(filter_size[3 - nd:], nd, False)
    B, _, d, h, w = shape
    pairs = [(rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)) for _ in range(2)]
    want = np.zeros((B, len(offsets), d, h, w))
    for left, right in pairs:
        for b, o, z, y, x in np.ndindex(want.shape):
            zz, yy, xx = np.array((z, y, x)) + offsets[o]
            if 0 <= zz < d and 0 <= yy < h and 0 <= xx < w:
                want[b, o, z, y, x] += left[b, :, z, y, x].astype(np.float64) @ right[b, :, zz, yy, xx]
    results = []
    for parts in (1, 2, 3):
        out = np.full(want.shape, np.nan, np.float32)
        for t, (left, right) in enumerate(pairs):
            for part in range(parts):
                kernels.pair_products(offsets, left, right, t > 0, out, part, parts)
        results.append(out)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,weighted", [((2, 4, 9, 37), True), ((1, 3, 4, 6, 7), False)])
def test_training_loss_in_one_pass_matches_numpy(monkeypatch, dtype, shape, weighted):
    """fit's loss (tempered cross-entropy, its gradient and the temperature's) from the compiled
    pass against the NumPy code, with ignored pixels and class weights, images and volumes; a
    label out of range still gets NumPy's error."""
    from cucrf._learning import objective

    assert fb.ready(dtype)
    rng = np.random.default_rng(20)
    logits = (rng.normal(size=shape) * 3).astype(dtype)
    labels = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    labels.reshape(-1)[::7] = 255
    weights = rng.uniform(0.2, 2.0, shape[1]) if weighted else None
    for log_tau in (0.0, 0.7):
        got = fb.tempered_cross_entropy(logits, labels, log_tau, weights)
        assert got is not None and got[1].dtype == dtype
        monkeypatch.setenv("CUCRF_FAST", "0")
        want = objective.tempered_cross_entropy(logits, labels, log_tau, weights)
        monkeypatch.delenv("CUCRF_FAST")
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.max(np.abs(w)))
    bad = labels.copy()
    bad.reshape(-1)[3] = shape[1]
    assert fb.tempered_cross_entropy(logits, bad, 0.0, weights) is None
    with pytest.raises(IndexError):
        objective.tempered_cross_entropy(logits, bad, 0.0, weights)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_extremes_match_numpy_and_hand_non_finite_arrays_back(dtype):
    assert fb.ready(dtype)
    rng = np.random.default_rng(12)
    for n in (1, 63, 64, 1000, 300_001):
        a = rng.normal(scale=1e3, size=n).astype(dtype)
        assert fb.extremes(a) == (float(a.min()), float(a.max()))
        for bad in (np.nan, np.inf, -np.inf):
            for where in {0, n // 2, n - 1}:
                b = a.copy()
                b[where] = bad
                assert fb.extremes(b) is None  # NumPy rescans it
    a = rng.normal(size=(3, 50, 70)).astype(dtype)
    assert fb.extremes(a) == (float(a.min()), float(a.max()))
    assert fb.extremes(a[:, ::2]) is None  # not contiguous
    assert fb.extremes(a.astype(np.float16)) is None and fb.extremes(np.arange(10)) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead,size,blur", [((2, 3), (37, 45), 4), ((1, 1), (9, 5), 3), ((1, 4), (16, 16), 2),
                                            ((2, 2), (13, 11), (1, 4)), ((1, 3), (7, 10, 9), (2, 2, 2)),
                                            ((1, 2), (5, 12, 13), (1, 3, 4)), ((3,), (6, 7), 1)])
def test_pooling_vjp_equals_numpy_bit_for_bit(dtype, lead, size, blur):
    assert fb.ready(dtype)
    coarse = nb.pool(np.zeros(lead + size, dtype), blur).shape
    grad = np.random.default_rng(len(size) + sum(size)).normal(size=coarse).astype(dtype)
    np.testing.assert_array_equal(fb.pool_backward(grad, blur, size), nb.pool_backward(grad, blur, size))


def test_a_finite_grad_output_needs_no_scan_of_its_own_and_non_finite_values_are_still_refused(monkeypatch):
    """The fused path vouches for the unary's gradient, which a NaN or infinity in grad_output
    always reaches: a finite grad_output is then not scanned; a unary weight other than 1 (the
    gradient is a scaled copy) scans it after the backward pass."""
    rng = np.random.default_rng(13)
    unary = rng.normal(size=(3, 200, 450)).astype(np.float32)  # 270,000 values: the threaded scans
    image = rng.uniform(0, 255, (200, 450, 3)).astype(np.float32)
    grad = rng.normal(size=unary.shape).astype(np.float32)
    scanned = []
    real = fb.extremes
    monkeypatch.setattr(fb, "extremes", lambda a: scanned.append(a) or real(a))
    cucrf.infer_vjp(unary, image, grad_output=grad, iterations=1)
    assert not any(a is grad for a in scanned)
    cucrf.infer_vjp(unary, image, cucrf.CRFParams(unary_weight=0.5), grad_output=grad, iterations=1)
    assert any(a is grad for a in scanned)
    for bad in (np.nan, np.inf, -np.inf):
        g = grad.copy()
        g[2, 199, 449] = bad
        with pytest.raises(ValueError, match=r"^grad_output contains 1 NaN or infinite value\(s\)"):
            cucrf.infer_vjp(unary, image, grad_output=g, iterations=1)
    strided = np.repeat(grad, 2, axis=2)[:, :, ::2]  # not contiguous: NumPy scans it
    strided[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^grad_output contains 1 NaN"):
        cucrf.infer_vjp(unary, image, grad_output=strided, iterations=1)


@pytest.mark.parametrize("kw", [dict(), dict(output="logits"), dict(normalization="symmetric"), dict(blur=1),
                                dict(iterations=3, filter_size=3), dict(iterations=0), dict(dtype=np.float64),
                                dict(params=cucrf.CRFParams(compatibility=np.array([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])))])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_any_non_finite_grad_output_value_is_refused_by_name(kw, bad, monkeypatch):
    """Wherever the NaN or infinity lies (every class, corners, the middle; beside the largest
    and the smallest marginal), the fused path refuses grad_output, as the NumPy backend does
    before any work: its unary gradient is never finite then."""
    rng = np.random.default_rng(7)
    unary = (4 * rng.normal(size=(3, 40, 52))).astype(np.float32)
    unary[1, 20, 26] = 60.0  # class 1 near certain there: the others' marginals underflow
    image = rng.uniform(0, 255, (40, 52, 3)).astype(np.float32)
    grad = rng.normal(size=unary.shape).astype(np.float32)
    for where in [(0, 0, 0), (2, 39, 51), (1, 20, 26), (0, 20, 26), (2, 17, 3)]:
        g = grad.copy()
        g[where] = bad
        with pytest.raises(ValueError, match=r"^grad_output contains 1 NaN or infinite value\(s\)"):
            cucrf.infer_vjp(unary, image, grad_output=g, **kw)
        if where == (0, 0, 0):
            monkeypatch.setenv("CUCRF_FAST", "0")  # the NumPy backend: scanned before any work
            with pytest.raises(ValueError, match=r"^grad_output contains 1 NaN or infinite value\(s\)"):
                cucrf.infer_vjp(unary, image, grad_output=g, **kw)
            monkeypatch.delenv("CUCRF_FAST")


@pytest.mark.parametrize("fast", ["1", "0"])
def test_grad_output_shape_is_checked_before_its_values_on_both_cpu_backends(fast, monkeypatch):
    """The same first error with and without the fused path: the shape, then NaN or infinity."""
    monkeypatch.setenv("CUCRF_FAST", fast)
    rng = np.random.default_rng(3)
    unary = rng.normal(size=(3, 12, 16)).astype(np.float32)
    image = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^grad_output must have the shape of the output \(3, 12, 16\)"):
        cucrf.infer_vjp(unary, image, grad_output=np.full((3, 12, 15), np.nan, np.float32))
    grad = np.zeros((3, 12, 16), np.float32)
    grad[:, :, :4] = np.inf
    with pytest.raises(ValueError, match=r"^grad_output contains 144 NaN or infinite value\(s\)"):
        cucrf.infer_vjp(unary, image, grad_output=grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blur,normalization,logits", [(2, None, False), (1, None, False), (3, "symmetric", False),
                                                       (2, None, True)])
def test_update_reports_whether_every_output_value_is_finite(dtype, blur, normalization, logits):
    """The final update vouches for a finite output (cucrf.infer then skips its own scan); one NaN
    anywhere in the output withdraws it."""
    rng = np.random.default_rng(11)
    unary, features, params = random_problem(rng, 2, 3, 9, 11, 3, dtype)
    config = _meanfield.CRFConfig(3, blur, 2, normalization)
    out = _meanfield.mean_field(fb, unary, features, params, config, return_logits=logits)
    assert np.isfinite(out).all()
    assert fb.known_finite(out)
    assert not fb.known_finite(out)  # answered once
    assert not fb.known_finite(out.copy())
    for where in [(0, 0, 0, 0), (1, 2, 8, 10), (1, 1, 4, 5)]:
        poisoned = unary.copy()
        poisoned[where] = np.nan  # past every input check: only the kernel can notice
        out = _meanfield.mean_field(fb, poisoned, features, params, config, return_logits=logits)
        assert not np.isfinite(out).all()
        assert not fb.known_finite(out)


# ---------------------------------------------------------------------------------------------
# volumes: per-axis windows and blurs, spacing
# ---------------------------------------------------------------------------------------------
VOLUME_CASES = [
    # (B, C, (D, H, W), F, filter_size, blur, spacing, potts, normalization, T, dtype, logits)
    (1, 3, (6, 7, 9), 1, 3, 1, None, True, None, 2, np.float64, False),
    (2, 2, (5, 9, 8), 2, 3, 2, None, False, None, 2, np.float64, True),
    (1, 3, (7, 6, 10), 1, (3, 5, 5), (1, 2, 3), (2.5, 1.0, 0.8), True, "symmetric", 2, np.float64, False),
    (1, 4, (4, 8, 7), 3, (1, 3, 3), (1, 2, 2), (3.0, 1.0, 1.0), False, "symmetric", 2, np.float64, True),
    (1, 3, (6, 7, 9), 1, 3, 1, None, True, None, 2, np.float32, False),
    (2, 2, (5, 9, 8), 2, 5, 3, (1.0, 2.0, 2.0), False, None, 3, np.float32, False),
    (1, 3, (7, 6, 10), 1, (3, 5, 5), (1, 2, 3), (2.5, 1.0, 0.8), True, "symmetric", 2, np.float32, True),
    (1, 5, (9, 8, 7), 2, (3, 3, 5), (2, 4, 1), None, False, "symmetric", 2, np.float32, False),
]


def _volume_id(c):
    B, C, size, F, k, blur, sp, potts, norm, T, dt, logits = c
    return (f"B{B}C{C}_{'x'.join(map(str, size))}F{F}_k{k}b{blur}_s{sp}_{'potts' if potts else 'matrix'}_{norm}_"
            f"T{T}_{np.dtype(dt).name}{'_logits' if logits else ''}").replace(" ", "")


def _volume_problem(case):
    B, C, size, F, k, blur, sp, potts, norm, T, dtype, logits = case
    rng = np.random.default_rng(zlib.crc32(_volume_id(case).encode()))
    unary = rng.normal(scale=2.0, size=(B, C) + size).astype(dtype)
    features = rng.uniform(0, 40, size=(B, F) + size).astype(dtype)
    params = CRFParams(theta_alpha=float(rng.uniform(1.5, 4)), theta_beta=tuple(float(v) for v in rng.uniform(5, 30, F)),
                       theta_gamma=float(rng.uniform(0.8, 2)), appearance_weight=float(rng.uniform(0.2, 2)),
                       smoothness_weight=float(rng.uniform(0.2, 2)),
                       compatibility="potts" if potts else rng.uniform(-1, 2, size=(C, C)),
                       unary_weight=float(rng.uniform(0.5, 1.5)))
    config = _meanfield.CRFConfig(k, blur, T, norm, spacing=sp)
    go = rng.normal(size=unary.shape).astype(dtype)
    return unary, features, params, config, go, logits


@pytest.mark.parametrize("case", VOLUME_CASES, ids=_volume_id)
def test_volumes_forward_and_backward_match_numpy(case):
    unary, features, params, config, go, logits = _volume_problem(case)
    dtype = unary.dtype.type
    want = _meanfield.mean_field(nb, unary, features, params, config, return_logits=logits)
    got = _meanfield.mean_field(fb, unary, features, params, config, return_logits=logits)
    np.testing.assert_allclose(got, want, **TOL[dtype])
    _check_backward(unary, features, params, config, go, logits)


@settings(max_examples=12, deadline=None)
@given(
    nd=st.sampled_from([2, 3]), B=st.integers(1, 2), C=st.integers(2, 5), size=st.lists(st.integers(1, 9), min_size=3,
                                                                                         max_size=3),
    F=st.sampled_from([1, 3]), blur=st.integers(1, 4), k=st.sampled_from([3, 5]), potts=st.booleans(),
    norm=st.sampled_from([None, "symmetric"]), logits=st.booleans(), seed=st.integers(0, 2**31),
)
def test_random_shapes_match_numpy(nd, B, C, size, F, blur, k, potts, norm, logits, seed):
    """Odd sizes down to one pixel, images and volumes, float64."""
    rng = np.random.default_rng(seed)
    size = tuple(size[:nd])
    unary = rng.normal(scale=2.0, size=(B, C) + size)
    features = rng.uniform(0, 40, size=(B, F) + size)
    params = CRFParams(theta_alpha=2.0, theta_beta=12.0, theta_gamma=1.5,
                       compatibility="potts" if potts else rng.uniform(-1, 2, size=(C, C)))
    config = _meanfield.CRFConfig(k, blur, 2, norm)
    go = rng.normal(size=unary.shape)
    want = _meanfield.mean_field(nb, unary, features, params, config, return_logits=logits)
    np.testing.assert_allclose(_meanfield.mean_field(fb, unary, features, params, config, return_logits=logits), want,
                               **TOL[np.float64])
    _check_backward(unary, features, params, config, go, logits)


# ---------------------------------------------------------------------------------------------
# through the public API
# ---------------------------------------------------------------------------------------------
def test_infer_and_infer_vjp_use_the_fused_path_and_agree_with_numpy(monkeypatch):
    assert _backends.get_backend("numpy") is fb
    rng = np.random.default_rng(5)
    # float64: five iterations at the defaults amplify float32 rounding differences beyond 1e-5
    unary = rng.normal(size=(4, 23, 31))
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    given = unary.copy()
    go = rng.normal(size=unary.shape)
    fast = cucrf.infer(unary, image)
    fast_vjp = cucrf.infer_vjp(unary, image, grad_output=go)
    np.testing.assert_array_equal(unary, given)  # inputs are never written to
    monkeypatch.setenv("CUCRF_FAST", "0")
    assert _backends.get_backend("numpy") is nb
    np.testing.assert_allclose(fast, cucrf.infer(unary, image), **TOL[np.float64])
    ref_vjp = cucrf.infer_vjp(unary, image, grad_output=go)
    assert_close(fast_vjp.unary, ref_vjp.unary, np.float64, "unary")
    assert_close(fast_vjp.image, ref_vjp.image, np.float64, "image")
    for name, value in ref_vjp.params.items():
        assert_close(fast_vjp.params[name], value, np.float64, name)


def test_read_only_and_strided_inputs():
    rng = np.random.default_rng(6)
    unary = rng.normal(size=(3, 12, 14, 9)).astype(np.float32)
    image = rng.uniform(0, 255, (12, 14, 9, 1)).astype(np.float32)
    ro = unary.copy()
    ro.setflags(write=False)
    want = cucrf.infer(unary, image, spatial_dims=3, blur=2, filter_size=3)
    np.testing.assert_array_equal(cucrf.infer(ro, image, spatial_dims=3, blur=2, filter_size=3), want)
    strided = np.ascontiguousarray(unary.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # same values, not C-ordered
    np.testing.assert_array_equal(cucrf.infer(strided, image, spatial_dims=3, blur=2, filter_size=3), want)


def test_thread_count_does_not_change_a_bit(monkeypatch):
    rng = np.random.default_rng(8)
    unary = rng.normal(size=(2, 5, 23, 19)).astype(np.float32)
    image = rng.integers(0, 256, (2, 23, 19, 3), dtype=np.uint8)
    go = rng.normal(size=unary.shape).astype(np.float32)
    results = []
    split = []
    real = _parallel.for_pieces
    monkeypatch.setattr(_parallel, "for_pieces", lambda n, fn: (split.append(n), real(n, fn)))
    for threads in ("1", "3"):
        monkeypatch.setenv("CUCRF_NUM_THREADS", threads)
        split.clear()
        q = cucrf.infer(unary, image, blur=2, normalization="symmetric")
        results.append((q, cucrf.infer_vjp(unary, image, grad_output=go, blur=2, normalization="symmetric")))
        # one thread: each kernel is one call on this thread; more: pieces shared by cucrf's threads
        assert (split == []) if threads == "1" else (len(split) > 10), split
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1].unary, results[1][1].unary)
    np.testing.assert_array_equal(results[0][1].image, results[1][1].image)
    monkeypatch.setenv("CUCRF_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="CUCRF_NUM_THREADS must be a positive integer"):
        cucrf.infer(unary, image)


def test_calls_from_several_threads_at_once():
    rng = np.random.default_rng(9)
    problems = [(rng.normal(size=(3, 40, 30)).astype(np.float32), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
                for _ in range(4)]
    want = [cucrf.infer(u, im, blur=2) for u, im in problems]
    got = [None] * len(problems)

    def work(i):
        for _ in range(3):
            got[i] = cucrf.infer(*problems[i], blur=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_denormal_mode_is_restored_for_numpy():
    rng = np.random.default_rng(10)
    cucrf.infer(rng.normal(size=(3, 20, 20)).astype(np.float32), rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    tiny = np.float32(1e-38)
    assert tiny / np.float32(10) != 0  # NumPy (this thread) still computes denormal numbers


# ---------------------------------------------------------------------------------------------
# loading: light import, fallbacks with one warning, the cache
# ---------------------------------------------------------------------------------------------
def _run_python(code, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=600)


def test_import_cucrf_does_not_import_numba():
    r = _run_python("import sys, cucrf; print('numba' in sys.modules, 'cucrf._numba_backend' in sys.modules)",
                    cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_a_float64_unary_computed_in_float32_does_not_compile_the_float64_kernels():
    code = ("import numpy as np, cucrf\n"
            "from cucrf import _numba_backend as fb\n"
            "rng = np.random.default_rng(0)\n"
            "u = rng.normal(size=(3, 300, 400))\n"  # above the size at which the scan is compiled
            "q = cucrf.infer(u, rng.uniform(0, 255, (300, 400, 3)).astype(np.uint8), dtype=np.float32)\n"
            "print(q.dtype, sorted(fb._ready_dtypes))\n")
    r = _run_python(code, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["float32", "['<f4']"]


@pytest.fixture
def fresh_state(monkeypatch):
    """A fresh :mod:`cucrf._fast` state (the fused backend not yet loaded), restored afterwards."""
    monkeypatch.setattr(_fast, "_state", {"loaded": False, "backend": None, "reason": None, "seconds": None,
                                          "cached": None})
    monkeypatch.setattr(fb, "_ready_dtypes", {})
    return _fast


def test_a_kernel_that_fails_to_compile_falls_back_to_numpy_with_one_warning(fresh_state, monkeypatch):
    def broken(dtypes=(np.float32,)):
        raise numba.core.errors.TypingError("no implementation for this signature")

    monkeypatch.setattr(fb, "warm_up", broken)
    with pytest.warns(_fast.FastPathWarning, match="compiling its float32 kernels failed .*TypingError.*no implementation"):
        assert _backends.get_backend("numpy") is nb
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.get_backend("numpy") is nb  # once only
        rng = np.random.default_rng(0)
        cucrf.infer(rng.normal(size=(2, 8, 9)).astype(np.float32), rng.integers(0, 256, (8, 9, 3), dtype=np.uint8))
    assert _fast.status()["reason"].startswith("compiling its float32 kernels failed")


def test_float64_kernels_that_fail_on_first_use_fall_back_to_numpy_with_one_warning(fresh_state, monkeypatch):
    compiled = fb.warm_up

    def float64_broken(dtypes=(np.float32,)):
        if np.float64 in dtypes:
            raise numba.core.errors.LoweringError("cannot lower this")
        compiled(dtypes)

    monkeypatch.setattr(fb, "warm_up", float64_broken)
    assert _backends.get_backend("numpy") is fb
    rng = np.random.default_rng(1)
    unary = rng.normal(size=(3, 10, 12))
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    go = rng.normal(size=unary.shape)
    with pytest.warns(_fast.FastPathWarning, match="compiling its float64 kernels failed .*LoweringError"):
        got = cucrf.infer(unary, image, blur=2, normalization="symmetric")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_vjp = cucrf.infer_vjp(unary, image, grad_output=go, blur=2)
        cucrf.infer(unary.astype(np.float32), image, blur=2)  # float32 still on the fused path
    monkeypatch.setenv("CUCRF_FAST", "0")
    np.testing.assert_array_equal(got, cucrf.infer(unary, image, blur=2, normalization="symmetric"))
    np.testing.assert_array_equal(got_vjp.unary, cucrf.infer_vjp(unary, image, grad_output=go, blur=2).unary)


def test_numba_that_fails_to_import_falls_back_to_numpy_with_one_warning(tmp_path):
    fake = tmp_path / "numba"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('Numba needs NumPy 2.3 or less')\n")
    code = ("import warnings, numpy as np, cucrf\n"
            "from cucrf import _backends, _fast\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    rng = np.random.default_rng(0)\n"
            "    u = rng.normal(size=(2, 8, 9)).astype(np.float32); im = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)\n"
            "    cucrf.infer(u, im); cucrf.infer(u, im)\n"
            "print(_backends.get_backend('numpy').name)\n"
            "print(len([x for x in w if issubclass(x.category, _fast.FastPathWarning)]))\n"
            "print([str(x.message) for x in w][0])\n")
    r = _run_python(code, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    name, count, message = r.stdout.strip().split("\n")
    assert (name, count) == ("numpy", "1")
    assert "importing numba failed (ImportError: Numba needs NumPy 2.3 or less)" in message


def test_fast_path_off(monkeypatch):
    monkeypatch.setenv("CUCRF_FAST", "0")
    assert _backends.get_backend("numpy") is nb
    assert _fast.status()["backend"] is None


def test_no_writable_cache_folder_warns_and_still_computes(tmp_path):
    """A read-only installation: no cache next to the package, in NUMBA_CACHE_DIR or the user's
    folder (each made impossible by a file where a folder should be, which stops root as well)."""
    pkg = tmp_path / "site" / "cucrf"
    # the package this suite tests (a checkout's, or an installed wheel's)
    shutil.copytree(Path(cucrf.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    code = ("import warnings, numpy as np\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from cucrf import _numba_kernels as k\n"
            "print(k.CACHE)\n"
            "print([str(x.message) for x in w if 'cannot be cached' in str(x.message)][0])\n"
            "x = np.zeros((2, 5), np.float32); k.exp_rows(x, 1, 0, 1)\n"
            "print(float(x.sum()))\n")
    env = {"PYTHONPATH": str(tmp_path / "site"), "NUMBA_CACHE_DIR": str(blocker / "numba"),
           "XDG_CACHE_HOME": str(blocker / "cache"), "HOME": str(blocker / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    r = _run_python(code, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    cached, message, total = r.stdout.strip().split("\n")
    assert cached == "False"
    assert "each new process compiles them again" in message
    assert float(total) == 10.0
