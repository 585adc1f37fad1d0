"""The ConvCRF-compatible mode (cucrf.convcrf) against upstream's outputs and a brute-force model.

Reference outputs of upstream ConvCRF are read from a folder named by the environment variable
``CUCRF_CONVCRF_REFERENCE`` (``.ci/run`` sets it when such a folder is available); those tests are
skipped when it is unset. Every other test here makes its own data.

Tolerance against the reference: every array must satisfy ``max |ours - ref| <= 1e-5 * max |ref|``
(float32, normwise). An element-wise relative error is not meaningful for the log-space outputs,
whose entries cross zero (a few are ~1e-4 in magnitude, where float32 rounding of the 0.8 / 0.2
mixture alone is a large relative change). The argmax must be identical everywhere.
"""

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from cucrf import convcrf

REFERENCE = os.environ.get("CUCRF_CONVCRF_REFERENCE")
RTOL = 1e-5


def _close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rtol, f"normwise relative error {err:.3g} > {rtol}"


# -------------------------------------------------------------------------------------------------
# upstream's reference outputs
# -------------------------------------------------------------------------------------------------
needs_reference = pytest.mark.skipif(REFERENCE is None, reason="CUCRF_CONVCRF_REFERENCE is not set")


def _load(name):
    path = Path(REFERENCE) / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    z = np.load(path)
    data = {k: z[k] for k in z.files}
    data["config"] = json.loads(str(data["config_json"]))
    data["image_nchw"] = data["image"].transpose(2, 0, 1)[None].astype(np.float32)
    return data


@needs_reference
@pytest.mark.parametrize("name", ["small_testconf_10x10", "demo_f7_b4"])
def test_features_match_reference(name):
    ref = _load(name)
    pos, col = convcrf.features(ref["image_nchw"], ref["config"])
    _close(pos, ref["pos_feats"])
    _close(col, ref["col_feats"])


@needs_reference
@pytest.mark.parametrize("name", ["small_testconf_10x10", "demo_f7_b4"])
def test_kernels_match_reference(name):
    ref = _load(name)
    ours = convcrf.kernels(ref["image_nchw"], ref["config"])
    keys = [k for k in ("kernel_merged", "kernel_pos", "kernel_col", "norm_pos", "norm_col") if k in ref]
    assert keys
    for key in keys:
        _close(ours[key], ref[key])


@needs_reference
@pytest.mark.parametrize("name", ["small_testconf_10x10", "demo_f7_b4"])
def test_outputs_match_reference(name):
    ref = _load(name)
    runs = [(int(k[len("output_iter"):]), ref[k]) for k in ref if k.startswith("output_iter")]
    runs.append((int(ref["num_iter"]), ref["output"]))
    for num_iter, expected in runs:
        out = convcrf.infer(ref["unary"], ref["image_nchw"], ref["config"], num_iter=num_iter)
        assert out.dtype == np.float32
        _close(out, expected)
        assert np.array_equal(out.argmax(axis=1), expected.argmax(axis=1)), f"argmax differs after {num_iter}"


@needs_reference
def test_demo_reference_float64_and_generic_path_agree():
    ref = _load("demo_f7_b4")
    out64 = convcrf.infer(ref["unary"], ref["image_nchw"], ref["config"], dtype=np.float64)
    _close(out64, ref["output"])
    generic = convcrf.infer(ref["unary"], ref["image_nchw"], ref["config"], _generic=True)
    _close(generic, ref["output"])


# -------------------------------------------------------------------------------------------------
# a brute-force version of upstream's semantics (written from the description, loops everywhere)
# -------------------------------------------------------------------------------------------------
def _bf_cells(n, b):
    pad = math.ceil(((b - n % b) % b) / 2)
    coarse = math.ceil(n / b)
    members = [[] for _ in range(coarse)]
    for p in range(n):
        members[(p + pad) // b].append(p)
    return pad, coarse, members


def _bf_pool(x, b):
    """Average of the real pixels in each b x b cell; x (..., H, W)."""
    H, W = x.shape[-2:]
    _, ch, rows = _bf_cells(H, b)
    _, cw, cols = _bf_cells(W, b)
    out = np.zeros(x.shape[:-2] + (ch, cw))
    for i in range(ch):
        for j in range(cw):
            vals = [x[..., y, z] for y in rows[i] for z in cols[j]]
            out[..., i, j] = sum(vals) / len(vals)
    return out


def _bf_up_weights(n, b):
    pad, coarse, _ = _bf_cells(n, b)
    weights = []
    for o in range(n):
        src = max((o + pad + 0.5) / b - 0.5, 0.0)
        lo = min(int(math.floor(src)), coarse - 1)
        hi = min(lo + 1, coarse - 1)
        frac = src - lo if hi != lo else 0.0
        weights.append(((lo, 1.0 - frac), (hi, frac)))
    return weights


def _bf_upsample(x, b, H, W):
    wy, wx = _bf_up_weights(H, b), _bf_up_weights(W, b)
    out = np.zeros(x.shape[:-2] + (H, W))
    for y in range(H):
        for z in range(W):
            for (i, a) in wy[y]:
                for (j, c) in wx[z]:
                    out[..., y, z] += a * c * x[..., i, j]
    return out


def _bf_kernel(feats, k):
    """feats (F, h, w) pooled -> dict (i, j) -> list of (ni, nj, value)."""
    F, h, w = feats.shape
    r = k // 2
    kern = {}
    for i in range(h):
        for j in range(w):
            entries = []
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    ni, nj = i + dy, j + dx
                    if 0 <= ni < h and 0 <= nj < w:
                        d = feats[:, ni, nj] - feats[:, i, j]
                        entries.append((ni, nj, math.exp(-0.5 * float(d @ d))))
            kern[(i, j)] = entries
    return kern


def _bf_apply(kern, x, b, k, compat):
    """Full-resolution message of one kernel (times compat) for x (C, H, W)."""
    C, H, W = x.shape
    pooled = _bf_pool(x, b) if b > 1 else x
    out = np.zeros_like(pooled)
    for (i, j), entries in kern.items():
        for ni, nj, v in entries:
            out[:, i, j] += compat * v * pooled[:, ni, nj]
    return _bf_upsample(out, b, H, W) if b > 1 else out


def brute_force(unary, image, cfg, num_iter):
    """Upstream ConvCRF's inference for one image: unary (C, H, W), image (F, H, W), full config."""
    C, H, W = unary.shape
    b, k = cfg["blur"], cfg["filter_size"]
    rows, cols = np.meshgrid(np.arange(H, dtype=float), np.arange(W, dtype=float), indexing="ij")
    pos = np.stack([rows, cols]) / cfg["pos_feats"]["sdims"]
    col = image / cfg["col_feats"]["schan"]
    if cfg["col_feats"]["use_bias"]:
        col = np.concatenate([np.stack([rows, cols]) / cfg["col_feats"]["sdims"], col])
    kernels = []
    for feats, compat in ((pos, cfg["pos_feats"]["compat"]), (col, cfg["col_feats"]["compat"])):
        kern = _bf_kernel(_bf_pool(feats, b) if b > 1 else feats, k)
        norm = None
        if cfg["norm"] == "sym":
            norm = 1.0 / np.sqrt(_bf_apply(kern, np.ones((1, H, W)), b, k, 1.0) + 1e-20)
        kernels.append((kern, compat, norm))

    def message(x):
        total = np.zeros_like(x)
        for kern, compat, norm in kernels:
            if norm is None:
                total += _bf_apply(kern, x, b, k, compat)
            else:
                total += norm * _bf_apply(kern, x * norm, b, k, compat)
        return total

    def softmax(x):
        e = np.exp(x - x.max(axis=0))
        return e / e.sum(axis=0)

    if cfg["logsoftmax"]:
        lg = unary - unary.max(axis=0) - np.log(np.exp(unary - unary.max(axis=0)).sum(axis=0))
        pred = lg
    else:
        with np.errstate(divide="ignore"):
            lg = np.log(unary)
        pred = softmax(lg)
    for it in range(num_iter):
        m = message(pred)
        if cfg["convcomp"]:
            m = m + 0.1 * math.sqrt(2.0 / C) * m.sum(axis=0)
        if cfg["weight"] is None:
            pred = lg + m
        else:
            w = cfg["weight_init"]
            pred = (cfg["unary_weight"] - w) * lg + w * m
        if (it != num_iter - 1 or cfg["final_softmax"]) and cfg["softmax"]:
            pred = softmax(pred)
    return pred



# -------------------------------------------------------------------------------------------------
# the same semantics vectorised as upstream's code is (unfold of the zero-padded grid, the product
# with the materialised kernel summed over the window), in float64: fast enough for full images
# -------------------------------------------------------------------------------------------------
def _pool_matrix(n, b):
    """(coarse, n): the average over the real pixels of each cell."""
    _, coarse, members = _bf_cells(n, b)
    P = np.zeros((coarse, n))
    for i, pixels in enumerate(members):
        P[i, pixels] = 1.0 / len(pixels)
    return P


def _upsample_matrix(n, b):
    """(n, coarse): bilinear, align_corners=False, cropped to the real pixels."""
    U = np.zeros((n, _bf_cells(n, b)[1]))
    for o, pairs in enumerate(_bf_up_weights(n, b)):
        for cell, weight in pairs:
            U[o, cell] += weight
    return U


def _unfold(x, k):
    """(..., h, w) -> (..., k, k, h, w): ``[..., r + dy, r + dx, i, j] = x[..., i + dy, j + dx]``, 0 outside."""
    r = k // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(-2, -1))  # (..., h, w, k, k)
    return np.moveaxis(windows, (-2, -1), (-4, -3))


def unfold_oracle(unary, image, cfg, num_iter):
    """Upstream ConvCRF's inference for one image in float64: unary (C, H, W), image (F, H, W), full config.

    Returns the outputs for ``num_iter`` = 0, 1, ..., ``num_iter`` (each is what a run of that many
    iterations returns: the last iteration skips the softmax unless ``final_softmax``).
    """
    unary, image = np.asarray(unary, dtype=np.float64), np.asarray(image, dtype=np.float64)
    C, H, W = unary.shape
    b, k = cfg["blur"], cfg["filter_size"]
    if b > 1:
        Py, Px, Uy, Ux = _pool_matrix(H, b), _pool_matrix(W, b), _upsample_matrix(H, b), _upsample_matrix(W, b)

    def pool(x):
        return x if b == 1 else Py @ x @ Px.T

    def upsample(x):
        return x if b == 1 else Uy @ x @ Ux.T

    def gaussian(feats):
        """(k, k, h, w) kernel on the pooled grid, 0 outside it."""
        coarse = pool(feats)
        diff = _unfold(coarse, k) - coarse[:, None, None]
        inside = _unfold(np.ones(coarse.shape[1:]), k)
        return np.exp(-0.5 * (diff * diff).sum(axis=0)) * inside

    def apply(kernel, x):
        return upsample((kernel * _unfold(pool(x), k)).sum(axis=(-4, -3)))

    rows, cols = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    pos = np.stack([rows, cols]) / cfg["pos_feats"]["sdims"]
    col = image / cfg["col_feats"]["schan"]
    if cfg["col_feats"]["use_bias"]:
        col = np.concatenate([np.stack([rows, cols]) / cfg["col_feats"]["sdims"], col])
    raw = [gaussian(pos), gaussian(col)]
    compats = [cfg["pos_feats"]["compat"], cfg["col_feats"]["compat"]]
    if cfg["norm"] == "sym":
        norms = [1.0 / np.sqrt(apply(g, np.ones((1, H, W))) + 1e-20) for g in raw]
    else:
        norms = [None, None]

    def message(x):
        if cfg["merge"]:
            return apply(compats[0] * raw[0] + compats[1] * raw[1], x)
        total = np.zeros_like(x)
        for g, c, n in zip(raw, compats, norms):
            total += apply(c * g, x) if n is None else n * apply(c * g, x * n)
        return total

    def softmax(x):
        e = np.exp(x - x.max(axis=0))
        return e / e.sum(axis=0)

    if cfg["logsoftmax"]:
        shifted = unary - unary.max(axis=0)
        lg = shifted - np.log(np.exp(shifted).sum(axis=0))
        pred = lg
    else:
        with np.errstate(divide="ignore"):
            lg = np.log(unary)
        pred = softmax(lg)
    outputs = [pred]
    for _ in range(num_iter):
        m = message(pred)
        if cfg["convcomp"]:
            m = m + 0.1 * math.sqrt(2.0 / C) * m.sum(axis=0)
        if cfg["weight"] is None:
            pred = lg + m
        else:
            pred = (cfg["unary_weight"] - cfg["weight_init"]) * lg + cfg["weight_init"] * m
        outputs.append(softmax(pred) if cfg["final_softmax"] and cfg["softmax"] else pred)
        if cfg["softmax"]:
            pred = softmax(pred)
    return outputs


CASES = [
    dict(filter_size=3, blur=1),
    dict(filter_size=5, blur=2, merge=True),
    dict(filter_size=3, blur=4),
    dict(filter_size=5, blur=3),  # upstream raises; cucrf uses the same geometry
    dict(filter_size=1, blur=1),
    dict(filter_size=3, blur=2, merge=False, norm="sym", weight="scalar", weight_init=0.5,
         pos_feats={"sdims": 1.5}, col_feats={"sdims": 2, "schan": 20, "compat": 3, "use_bias": True}),
    dict(filter_size=5, blur=1, merge=False, norm="sym", final_softmax=True),
    dict(filter_size=3, blur=2, weight=None, unary_weight=2.0, convcomp=True),
    dict(filter_size=3, blur=1, softmax=False, unary_weight=1.5),
    dict(filter_size=7, blur=4, logsoftmax=False),
    dict(filter_size=9, blur=1, col_feats={"use_bias": True}),  # window wider than the image
]


def _problem(H, W, C, F, seed, probabilities=False):
    rng = np.random.default_rng(seed)
    unary = rng.normal(size=(C, H, W))
    if probabilities:
        unary = np.exp(unary) / np.exp(unary).sum(axis=0)
    image = rng.uniform(0, 255, size=(F, H, W))
    image[:, : H // 2] = np.clip(image[:, : H // 2] * 0.1, 0, 255)  # some structure
    return unary, image


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("size", [(7, 9), (8, 5)])
def test_matches_brute_force(case, size):
    cfg = convcrf.resolve_config(CASES[case])
    H, W = size
    unary, image = _problem(H, W, 3, 3, seed=case, probabilities=not cfg["logsoftmax"])
    for num_iter in (0, 1, 3):
        expected = brute_force(unary, image, cfg, num_iter)
        ours = convcrf.infer(unary[None], image[None], CASES[case], num_iter=num_iter, dtype=np.float64)
        assert ours.shape == (1, 3, H, W) and ours.dtype == np.float64
        np.testing.assert_allclose(ours[0], expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
        generic = convcrf.infer(unary[None], image[None], CASES[case], num_iter=num_iter, dtype=np.float64,
                                _generic=True)
        np.testing.assert_allclose(generic, ours, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


#: float64 results: max |ours - oracle| <= F64_RANGE_TOL * (max - min of the oracle's output).
F64_RANGE_TOL = 1e-9
#: float32 results are the float64 result rounded once: within half a unit in the last place.
HALF_ULP32 = 2.0 ** -24


def _range_error(ours, oracle):
    """max |ours - oracle| as a fraction of the oracle output's range (max - min)."""
    ours, oracle = np.asarray(ours, dtype=np.float64), np.asarray(oracle, dtype=np.float64)
    assert ours.shape == oracle.shape
    return np.abs(ours - oracle).max() / (oracle.max() - oracle.min())


def _assert_rounded_float64(ours32, oracle):
    """ours32 is float32 and differs from the float64 oracle by its own rounding only."""
    assert ours32.dtype == np.float32
    bound = HALF_ULP32 * np.abs(oracle) + 2 * F64_RANGE_TOL * (oracle.max() - oracle.min())
    excess = np.abs(ours32.astype(np.float64) - oracle) - bound
    assert excess.max() <= 0, (f"float32 result off by up to {excess.max():.3g} beyond half an ulp "
                               f"(range error {_range_error(ours32, oracle):.3g})")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_unfold_oracle_agrees_with_brute_force(case):
    cfg = convcrf.resolve_config(CASES[case])
    unary, image = _problem(7, 9, 3, 3, seed=case, probabilities=not cfg["logsoftmax"])
    outputs = unfold_oracle(unary, image, cfg, 3)
    for num_iter in range(4):
        expected = brute_force(unary, image, cfg, num_iter)
        np.testing.assert_allclose(outputs[num_iter], expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


# Upstream's test config at 30 x 40 (filter 5, blur 1, norm 'sym', separate kernels), upstream's
# demo config (filter 7, blur 4, merged) and its defaults (filter 11, blur 4).
PRECISION_CASES = [
    dict(filter_size=5, blur=1, merge=False, norm="sym", weight="scalar", weight_init=0.5,
         pos_feats={"sdims": 1.5}, col_feats={"sdims": 2, "schan": 2, "compat": 3, "use_bias": True}),
    dict(filter_size=5, blur=1),
    dict(filter_size=7, blur=4),
    dict(),
    dict(filter_size=5, blur=2, logsoftmax=False, final_softmax=True),
]


@pytest.mark.parametrize("case", range(len(PRECISION_CASES)))
def test_float64_input_is_computed_in_float64(case):
    cfg = convcrf.resolve_config(PRECISION_CASES[case])
    unary, image = _problem(30, 40, 4, 3, seed=10 + case, probabilities=not cfg["logsoftmax"])
    expected = unfold_oracle(unary, image, cfg, 5)[5]
    out = convcrf.infer(unary[None], image[None], PRECISION_CASES[case])  # no dtype: the unary's float64
    assert out.dtype == np.float64
    assert _range_error(out[0], expected) <= F64_RANGE_TOL
    # A float32 unary gives a float32 result by default, as upstream's.
    assert convcrf.infer(unary[None].astype(np.float32), image[None], PRECISION_CASES[case]).dtype == np.float32


@pytest.mark.parametrize("case", range(len(PRECISION_CASES)))
def test_float32_result_is_the_float64_result_rounded(case):
    cfg = convcrf.resolve_config(PRECISION_CASES[case])
    unary, image = _problem(30, 40, 4, 3, seed=20 + case, probabilities=not cfg["logsoftmax"])
    u32, im32 = unary.astype(np.float32), image.astype(np.float32)
    outputs = unfold_oracle(u32, im32, cfg, 5)
    for num_iter in (1, 5):
        out = convcrf.infer(u32[None], im32[None], PRECISION_CASES[case], num_iter=num_iter)
        _assert_rounded_float64(out[0], outputs[num_iter])
        # The same from float64 inputs asked for a float32 result.
        out = convcrf.infer(u32[None].astype(np.float64), im32[None].astype(np.float64), PRECISION_CASES[case],
                            num_iter=num_iter, dtype=np.float32)
        _assert_rounded_float64(out[0], outputs[num_iter])


@pytest.fixture(scope="module")
def reference_oracle():
    """Oracle outputs (num_iter 0..5) on each reference file's float32 inputs, computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            ref = _load(name)
            cfg = convcrf.resolve_config(ref["config"])
            cache[name] = unfold_oracle(ref["unary"][0], ref["image_nchw"][0], cfg, int(ref["num_iter"]))
        return cache[name]

    return get


def _reference_runs(ref):
    runs = [(int(k[len("output_iter"):]), ref[k]) for k in ref if k.startswith("output_iter")]
    return runs + [(int(ref["num_iter"]), ref["output"])]


@needs_reference
@pytest.mark.parametrize("name", ["small_testconf_10x10", "demo_f7_b4"])
def test_reference_inputs_in_float64_match_the_oracle(name, reference_oracle):
    ref = _load(name)
    oracle = reference_oracle(name)
    u64, im64 = ref["unary"].astype(np.float64), ref["image_nchw"].astype(np.float64)
    for num_iter, _ in _reference_runs(ref):
        out = convcrf.infer(u64, im64, ref["config"], num_iter=num_iter)
        assert out.dtype == np.float64
        assert _range_error(out[0], oracle[num_iter]) <= F64_RANGE_TOL


@needs_reference
@pytest.mark.parametrize("name", ["small_testconf_10x10", "demo_f7_b4"])
def test_float32_at_least_as_accurate_as_upstream(name, reference_oracle):
    """Against the float64 evaluation of upstream's algorithm on the same (float32) inputs, the float32
    result is at least as close as upstream's own float32 output (observed: 4 to 19 times closer)."""
    ref = _load(name)
    oracle = reference_oracle(name)
    for num_iter, upstream_out in _reference_runs(ref):
        out = convcrf.infer(ref["unary"], ref["image_nchw"], ref["config"], num_iter=num_iter)
        ours, theirs = _range_error(out[0], oracle[num_iter]), _range_error(upstream_out[0], oracle[num_iter])
        assert ours <= theirs, f"after {num_iter} iterations: {ours:.3g} of the range, upstream {theirs:.3g}"
        _assert_rounded_float64(out[0], oracle[num_iter])


@needs_reference
def test_float64_demo_unary_is_honoured(reference_oracle):
    """The demo's unary before upstream's float32 conversion: a float64 input gives a float64 result."""
    ref = _load("demo_f7_b4")
    if "unary_hwc_float64" not in ref:
        pytest.skip("the reference file has no float64 unary")
    unary = np.ascontiguousarray(ref["unary_hwc_float64"].transpose(2, 0, 1))
    cfg = convcrf.resolve_config(ref["config"])
    expected = unfold_oracle(unary, ref["image_nchw"][0], cfg, 1)[1]
    out = convcrf.infer(unary[None], ref["image_nchw"], ref["config"], num_iter=1)
    assert out.dtype == np.float64
    assert _range_error(out[0], expected) <= F64_RANGE_TOL


def test_batch_and_channels():
    rng = np.random.default_rng(3)
    unary = rng.normal(size=(2, 4, 9, 11)).astype(np.float32)
    image = rng.uniform(0, 255, size=(2, 1, 9, 11)).astype(np.float32)  # grey
    cfg = {"filter_size": 5, "blur": 2}
    both = convcrf.infer(unary, image, cfg)
    for b in range(2):
        one = convcrf.infer(unary[b:b + 1], image[b:b + 1], cfg)
        np.testing.assert_allclose(both[b:b + 1], one, rtol=1e-6, atol=1e-6)


def test_float32_close_to_float64_and_inputs_untouched():
    unary, image = _problem(12, 10, 4, 3, seed=1)
    u32, i32 = unary[None].astype(np.float32), image[None].astype(np.float32)
    keep_u, keep_i = u32.copy(), i32.copy()
    a = convcrf.infer(u32, i32, {"filter_size": 5, "blur": 2})
    b = convcrf.infer(u32, i32, {"filter_size": 5, "blur": 2}, dtype=np.float64)
    assert a.dtype == np.float32 and b.dtype == np.float64
    _close(a, b)
    assert np.array_equal(u32, keep_u) and np.array_equal(i32, keep_i)


def test_defaults_are_upstreams():
    cfg = convcrf.resolve_config()
    assert (cfg["filter_size"], cfg["blur"], cfg["merge"], cfg["norm"]) == (11, 4, True, "none")
    assert cfg["weight"] == "vector" and cfg["weight_init"] == 0.2 and not cfg["final_softmax"]
    assert cfg["pos_feats"] == {"sdims": 3.0, "compat": 3.0}
    assert cfg["col_feats"] == {"sdims": 80.0, "schan": 13.0, "compat": 10.0, "use_bias": False}
    # A partial nested dict keeps the other nested defaults, and the input is not modified.
    given = {"col_feats": {"schan": 20}}
    cfg = convcrf.resolve_config(given)
    assert cfg["col_feats"]["compat"] == 10.0 and cfg["col_feats"]["schan"] == 20.0
    assert given == {"col_feats": {"schan": 20}}
    assert convcrf.DEFAULT_CONFIG["col_feats"]["schan"] == 13


def test_odd_blur_strict():
    unary, image = _problem(9, 9, 2, 3, seed=0)
    convcrf.infer(unary[None], image[None], {"blur": 3, "filter_size": 3})
    with pytest.raises(NotImplementedError, match="blur=3"):
        convcrf.infer(unary[None], image[None], {"blur": 3, "filter_size": 3}, strict=True)


@pytest.mark.parametrize("config, error, match", [
    ({"filter_size": 4}, ValueError, "odd"),
    ({"filter_size": 0}, ValueError, ">= 1"),
    ({"filter_size": 5.0}, TypeError, "int"),
    ({"blur": 0}, ValueError, ">= 1"),
    ({"norm": "sym"}, NotImplementedError, "merge"),
    ({"norm": "l2", "merge": False}, NotImplementedError, "'sym' or 'none'"),
    ({"weight": "matrix"}, ValueError, "'scalar', 'vector' or None"),
    ({"trainable": True}, ValueError, "state_dict"),
    ({"merge": "yes"}, TypeError, "True or False"),
    ({"filtersize": 5}, ValueError, "unknown ConvCRF config key"),
    ({"pos_feats": {"sdim": 3}}, ValueError, "unknown key"),
    ({"pos_feats": 3}, TypeError, "must be a dict"),
    ({"col_feats": {"schan": 0}}, ValueError, "> 0"),
    ({"unary_weight": float("nan")}, ValueError, "finite"),
    ([("filter_size", 5)], TypeError, "dict"),
])
def test_config_errors(config, error, match):
    with pytest.raises(error, match=match):
        convcrf.resolve_config(config)
    unary, image = _problem(6, 6, 2, 3, seed=0)
    with pytest.raises(error, match=match):
        convcrf.infer(unary[None], image[None], config)


def test_input_errors():
    unary, image = _problem(6, 7, 2, 3, seed=0)
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\)"):
        convcrf.infer(unary, image[None])
    with pytest.raises(ValueError, match=r"4-D \(B, F, H, W\)"):
        convcrf.infer(unary[None], image.transpose(1, 2, 0))
    with pytest.raises(ValueError, match="image has shape"):
        convcrf.infer(unary[None], image[None, :, :6, :6])
    with pytest.raises(TypeError, match="floating point"):
        convcrf.infer(unary[None].astype(np.int32), image[None])
    bad = unary[None].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        convcrf.infer(bad, image[None])
    with pytest.raises(ValueError, match=">= 0"):
        convcrf.infer(unary[None], image[None], {"logsoftmax": False})
    with pytest.raises(ValueError, match="num_iter"):
        convcrf.infer(unary[None], image[None], num_iter=-1)
    with pytest.raises(TypeError, match="dtype"):
        convcrf.infer(unary[None], image[None], dtype=np.float16)


def test_uint8_image_and_zero_iterations():
    unary, image = _problem(6, 7, 3, 3, seed=2)
    out = convcrf.infer(unary[None], image[None].astype(np.uint8), {"filter_size": 3, "blur": 1}, num_iter=0)
    lg = unary - np.log(np.exp(unary).sum(axis=0))
    np.testing.assert_allclose(out[0], lg, rtol=1e-5, atol=1e-5)


def test_cucrf_settings_mapping_and_closeness():
    import cucrf

    s = convcrf.cucrf_settings({"filter_size": 7})
    p = s["params"]
    assert (s["filter_size"], s["blur"], s["normalization"], s["unary_kind"]) == (7, 4, None, "logits")
    assert (p.theta_gamma, p.theta_beta, p.theta_alpha) == (3.0, 13.0, convcrf.NO_POSITION_TERM)
    assert (p.smoothness_weight, p.appearance_weight, p.unary_weight) == pytest.approx((0.6, 2.0, 0.8))
    s2 = convcrf.cucrf_settings({"norm": "sym", "merge": False, "weight": None, "logsoftmax": False,
                                 "col_feats": {"use_bias": True, "sdims": 40}})
    assert s2["normalization"] == "symmetric" and s2["unary_kind"] == "probabilities"
    assert (s2["params"].theta_alpha, s2["params"].unary_weight, s2["params"].appearance_weight) == (40.0, 1.0, 10.0)
    with pytest.raises(ValueError, match="convcomp"):
        convcrf.cucrf_settings({"convcomp": True})
    # Different models, close labels: a noisy two-region problem.
    rng = np.random.default_rng(0)
    H, W = 40, 48
    truth = np.zeros((H, W), dtype=int)
    truth[:, 20:] = 1
    image = np.where(truth[..., None] == 1, 200.0, 40.0) + rng.normal(0, 5, (H, W, 3))
    unary = np.log(np.where(np.arange(2)[:, None, None] == truth, 0.7, 0.3) + 0 * rng.random((2, H, W)))
    flip = rng.random((H, W)) < 0.2
    unary[:, flip] = unary[::-1, flip]
    cfg = {"filter_size": 5, "blur": 2}
    up = convcrf.infer(unary[None].astype(np.float32), image.transpose(2, 0, 1)[None], cfg)[0].argmax(0)
    ours = cucrf.infer(unary.astype(np.float32), image, **convcrf.cucrf_settings(cfg)).argmax(0)
    assert (up == ours).mean() > 0.97
    assert (ours == truth).mean() > 0.95


def test_docstring_examples():
    import doctest

    result = doctest.testmod(convcrf, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_torch_tensors_through_dlpack():
    torch = pytest.importorskip("torch")
    unary, image = _problem(9, 11, 3, 3, seed=4)
    u, im = unary[None].astype(np.float32), image[None].astype(np.float32)
    cfg = {"filter_size": 3, "blur": 2}
    out = convcrf.infer(torch.from_numpy(u), torch.from_numpy(im), cfg)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, convcrf.infer(u, im, cfg))


# -------------------------------------------------------------------------------------------------
# errors name the function that was called
# -------------------------------------------------------------------------------------------------
def _names_cucrf_infer(message):
    return re.search(r"\bcucrf\.infer(_vjp)?\b", message) is not None


@pytest.mark.parametrize("call, caller", [
    (lambda u, im: convcrf.infer(u, im), "cucrf.convcrf.infer"),
    (lambda u, im: convcrf.features(im), "cucrf.convcrf.features"),
    (lambda u, im: convcrf.kernels(im), "cucrf.convcrf.kernels"),
])
def test_tensors_that_require_grad_are_refused_naming_the_convcrf_function(call, caller):
    torch = pytest.importorskip("torch")
    unary, image = _problem(6, 7, 2, 3, seed=0)
    names = ("unary", "image") if caller == "cucrf.convcrf.infer" else ("image",)
    for name in names:
        u, im = torch.from_numpy(unary[None]), torch.from_numpy(image[None])
        (u if name == "unary" else im).requires_grad_(True)
        with pytest.raises(TypeError) as info:
            call(u, im)
        message = str(info.value)
        assert caller in message and f"{name}.detach()" in message and not _names_cucrf_infer(message), message


def test_masked_arrays_are_refused_naming_the_convcrf_function():
    unary, image = _problem(6, 7, 2, 3, seed=0)
    masked = np.ma.masked_less(unary[None], 0)
    with pytest.raises(TypeError) as info:
        convcrf.infer(masked, image[None])
    message = str(info.value)
    assert "cucrf.convcrf.infer" in message and "masked" in message and "filled" in message
    assert "unary_kind" not in message and not _names_cucrf_infer(message)  # cucrf.infer's options do not apply
    with pytest.raises(TypeError, match="cucrf.convcrf.features: image must not be a masked array"):
        convcrf.features(np.ma.masked_less(image[None], 10))


def test_dtype_errors_name_the_convcrf_function():
    unary, image = _problem(6, 7, 2, 3, seed=0)
    with pytest.raises(TypeError, match=r"cucrf\.convcrf\.infer: dtype must be numpy.float32, numpy.float64 or None"):
        convcrf.infer(unary[None], image[None], dtype=np.int32)
    with pytest.raises(TypeError, match=r"cucrf\.convcrf\.kernels: dtype"):
        convcrf.kernels(image[None], dtype="float16")


def test_features_and_kernels_follow_the_image_dtype():
    _, image = _problem(6, 7, 2, 3, seed=0)
    assert convcrf.features(image[None])[0].dtype == np.float64
    assert convcrf.features(image[None].astype(np.uint8))[1].dtype == np.float32
    k32 = convcrf.kernels(image[None].astype(np.float32), {"blur": 1, "filter_size": 3})["kernel_merged"]
    k64 = convcrf.kernels(image[None].astype(np.float32).astype(np.float64), {"blur": 1, "filter_size": 3})
    assert k32.dtype == np.float32 and k64["kernel_merged"].dtype == np.float64
    # Computed in float64 and rounded once.
    np.testing.assert_array_equal(k32, k64["kernel_merged"].astype(np.float32))


# -------------------------------------------------------------------------------------------------
# logsoftmax=False: the unary holds probabilities
# -------------------------------------------------------------------------------------------------
def _probabilities(seed=0):
    unary, image = _problem(6, 7, 3, 3, seed=seed, probabilities=True)
    return unary[None].copy(), image[None]


@pytest.mark.parametrize("value, match", [
    (np.inf, r"finite and >= 0, got 1 entries that are NaN, infinite or negative \(the first, at \(b, c, y, x\) = "
             r"\(0, 1, 2, 3\), is inf\)"),
    (np.nan, r"NaN, infinite or negative .* is nan"),
    (-0.25, r">= 0, got 1 entries .* is -0.25"),
])
def test_probabilities_must_be_finite_and_nonnegative(value, match):
    unary, image = _probabilities()
    unary[0, 1, 2, 3] = value
    keep = unary.copy()
    with pytest.raises(ValueError, match=match):
        convcrf.infer(unary, image, {"logsoftmax": False, "filter_size": 3, "blur": 1})
    assert np.array_equal(unary, keep, equal_nan=True)


def test_pixels_without_any_probability_are_refused():
    unary, image = _probabilities()
    unary[0, :, 4, 5] = 0.0
    unary[0, :, 1, 2] = 0.0
    with pytest.raises(ValueError, match=r"2 pixel\(s\) of the unary are 0 for every class \(the first at "
                                         r"\(b, y, x\) = \(0, 1, 2\)\).*unary \+ 1e-5"):
        convcrf.infer(unary, image, {"logsoftmax": False, "filter_size": 3, "blur": 1})


def test_zero_probabilities_of_some_classes_score_minus_infinity_like_upstream():
    unary, image = _probabilities(seed=1)
    unary[0, 0, 2:4, 1:5] = 0.0  # class 0 impossible there; the others still have probability
    cfg = {"logsoftmax": False, "filter_size": 3, "blur": 2}
    for num_iter in (0, 1, 3):
        out = convcrf.infer(unary, image, cfg, num_iter=num_iter)
        expected = brute_force(unary[0], image[0], convcrf.resolve_config(cfg), num_iter)
        assert not np.isnan(out).any()
        if num_iter:
            assert np.isneginf(out[0, 0, 2:4, 1:5]).all()
        np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=1e-6)


def test_zero_probabilities_that_would_give_nan_are_refused():
    unary, image = _probabilities(seed=2)
    unary[0, 0, 0, 0] = 0.0
    # unary_weight == weight_init: upstream multiplies log(0) = -inf by 0.
    cfg = {"logsoftmax": False, "filter_size": 3, "blur": 1, "unary_weight": 0.2}
    with pytest.raises(ValueError, match=r"cucrf.convcrf.infer: the result would contain NaN.*unary \+ 1e-5"):
        convcrf.infer(unary, image, cfg)
    unary += 1e-5
    assert np.isfinite(convcrf.infer(unary, image, cfg)).all()
