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
