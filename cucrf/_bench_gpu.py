"""GPU benchmark of cucrf's CUDA backend (``python -m cucrf._bench_gpu``; run by scripts/gpu-check).

For each problem: the median wall time of ``cucrf.infer`` on CuPy arrays (5 mean-field
iterations, float32, everything included: validation, copies, feature pooling, kernels), the
median time of the iterations alone, the peak memory CuPy's pool held, the roofline floor of
docs/kernels.md (:func:`floor_model`) and the ratio to it, and -- where PyTorch is importable --
the same message passing written the straightforward way (materialised kernel, ``F.unfold`` of
Q, as upstream ConvCRF does), timed in the same run. Times from CUDA events after warm-up runs.

Then the backward pass (:func:`run_backward`): for each problem of :data:`BACKWARD_PROBLEMS`,
the forward (``mean_field``, the inference), the taped forward, the backward alone
(``mean_field_backward`` on a taped run) and the whole ``cucrf.infer_vjp``; the figure of merit
is backward / forward (target <= :data:`BACKWARD_TARGET` at 500x500x21, filter 7, blur 4).

Then volumes (:func:`run_volumes`): ``cucrf.infer(..., spatial_dims=3)`` on each problem of
:data:`VOLUME_PROBLEMS` (one intensity channel), the iterations alone, ``cucrf.infer_vjp``, the
peak memory and the floor of :func:`volume_floor_model` (target: 256^3 x 4 classes at blur 2 in
at most :data:`VOLUME_TARGET_MS`).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

__all__ = ["PROBLEMS", "BACKWARD_PROBLEMS", "VOLUME_PROBLEMS", "floor_model", "backward_floor_model",
           "volume_floor_model", "run", "run_backward", "run_volumes", "gpu_problem", "main"]

#: (name, B, C, H, W, filter_size, blur)
PROBLEMS = [
    ("500x500x21 k7 b4", 1, 21, 500, 500, 7, 4),
    ("500x500x21 k7 b1", 1, 21, 500, 500, 7, 1),
    ("500x500x21 k11 b4", 1, 21, 500, 500, 11, 4),
    ("8x512x512x21 k7 b4", 8, 21, 512, 512, 7, 4),
    ("1024x2048x19 k11 b1", 1, 19, 1024, 2048, 11, 1),
]
ITERATIONS = 5
FEATURES = 3
HBM_BYTES_PER_S = 3.35e12   # H100 SXM HBM3
FP32_FLOP_PER_S = 60e12     # H100 SXM fp32, no tensor cores (approximate)


def floor_model(B, C, H, W, F, filter_size, blur, iterations=ITERATIONS, itemsize=4):
    """Lower bound of the run time of ``iterations`` mean-field updates (docs/kernels.md).

    Returns ``(bytes, flops, seconds)`` for the whole inference: every full-resolution array is
    read or written once per pass that needs it, coarse arrays once (perfect cache reuse of the
    window halo), FLOPs of the merged kernel (an FMA counts 2, exp 4).
    """
    h, w = -(-H // blur), -(-W // blur)
    full = B * C * H * W * itemsize
    coarse = B * C * h * w * itemsize
    feats_coarse = B * F * h * w * itemsize
    pairs = B * h * w * (filter_size ** 2 - 1)
    per_iter_bytes = (
        (full + coarse if blur > 1 else 0)          # pool: read Q, write Pool(Q)
        + coarse + feats_coarse + coarse            # message: read Q_c, features; write m_c
        + full + coarse + full                      # update: read aU, m_c; write Q
    )
    per_iter_flops = (
        (B * C * H * W if blur > 1 else 0)          # pool: one add per pixel
        + pairs * (2 * C + 3 * FEATURES + 12)       # message: classes + kernel value
        + B * C * H * W * 17                        # update: bilinear, add, exp, sum, divide
    )
    setup_bytes = B * F * H * W * itemsize + feats_coarse + 2 * full   # pool features; softmax(aU)
    total_bytes = iterations * per_iter_bytes + setup_bytes
    total_flops = iterations * per_iter_flops
    seconds = max(total_bytes / HBM_BYTES_PER_S, total_flops / FP32_FLOP_PER_S)
    return total_bytes, total_flops, seconds


def volume_floor_model(B, C, size, F, filter_size, blur, iterations=ITERATIONS, itemsize=4):
    """:func:`floor_model` for any number of spatial axes: ``size``, ``filter_size`` and ``blur``
    per axis (an int applies to every axis). Returns ``(bytes, flops, seconds)``.

    The same accounting as for images: every full-resolution array read or written once per pass
    that needs it, coarse arrays once, FLOPs of the merged kernel over every (cell, neighbour) pair.
    """
    nd = len(size)
    window = filter_size if isinstance(filter_size, tuple) else (filter_size,) * nd
    blurs = blur if isinstance(blur, tuple) else (blur,) * nd
    pixels = math.prod(size)
    cells = math.prod(-(-n // b) for n, b in zip(size, blurs))
    pooled = any(b > 1 for b in blurs)
    full = B * C * pixels * itemsize
    coarse = B * C * cells * itemsize
    feats_coarse = B * F * cells * itemsize
    pairs = B * cells * (math.prod(window) - 1)
    per_iter_bytes = ((full + coarse if pooled else 0) + coarse + feats_coarse + coarse + full + coarse + full)
    interpolation = 2 * 2 ** nd + 9                 # the 2^nd taps, then add, exp, sum, divide
    per_iter_flops = ((B * C * pixels if pooled else 0) + pairs * (2 * C + 3 * F + 12)
                      + B * C * pixels * interpolation)
    setup_bytes = B * F * pixels * itemsize + feats_coarse + 2 * full
    total_bytes = iterations * per_iter_bytes + setup_bytes
    total_flops = iterations * per_iter_flops
    return total_bytes, total_flops, max(total_bytes / HBM_BYTES_PER_S, total_flops / FP32_FLOP_PER_S)


#: (name, B, C, (D, H, W), filter_size, blur) of the volume benchmark (one intensity channel).
VOLUME_PROBLEMS = [
    ("256^3x4 k5 b2", 1, 4, (256, 256, 256), 5, 2),
    ("2x128^3x4 k5 b2", 2, 4, (128, 128, 128), 5, 2),
]
#: Inference time (ms) the CUDA backend aims at for 256^3 x 4 classes at blur 2, 5 iterations.
VOLUME_TARGET_MS = 10.0


#: (name, B, C, H, W, filter_size, blur, normalization) of the backward benchmark.
BACKWARD_PROBLEMS = [
    ("500x500x21 k7 b4", 1, 21, 500, 500, 7, 4, None),
    ("500x500x21 k7 b4 sym", 1, 21, 500, 500, 7, 4, "symmetric"),
    ("500x500x21 k7 b1", 1, 21, 500, 500, 7, 1, None),
    ("8x512x512x21 k7 b4", 8, 21, 512, 512, 7, 4, None),
]
#: Backward time / forward time the CUDA backward aims at (500x500x21, filter 7, blur 4).
BACKWARD_TARGET = 3.0


def backward_floor_model(B, C, H, W, F, filter_size, blur, iterations=ITERATIONS, itemsize=4):
    """Lower bound of ``mean_field_backward`` (merged kernel, Potts; docs/kernels.md "Backward").

    Per iteration every full-resolution class map is moved 6 times (softmax vjp: read Q, write
    gL; grad_scaled += gL: read 2, write 1; Up^T: read gL), coarse ones a few times; once: the
    incoming gradient, the last softmax vjp, the unary-weight sum and the unary gradient (12
    full-resolution maps), and the kernel gradient over the T C stacked coarse classes
    (2 (k^2 - 1) T C multiply-adds per cell, plus the kernel values per chunk of 16).
    Returns ``(bytes, flops, seconds)``.
    """
    h, w = -(-H // blur), -(-W // blur)
    full = B * C * H * W * itemsize
    coarse = B * C * h * w * itemsize
    pairs = B * h * w * (filter_size ** 2 - 1)
    per_iter_bytes = 6 * full + 8 * coarse
    per_iter_flops = pairs * (2 * C + 3 * F + 12) + B * C * H * W * 12 + B * C * h * w * 2 * (2 * blur) ** 2
    ct = iterations * C
    # incoming gradient; softmax vjp of Q_0 (2) and its += (3); <grad_scaled, U> (3 + 1); a grad_scaled (2);
    # stacked G, P (concatenate: read + write) and the kernel gradient's reads; Pool^T of the features.
    once_bytes = 12 * full + 6 * iterations * coarse + 2 * B * F * H * W * itemsize
    once_flops = pairs * (4 * ct + -(-ct // 16) * (4 * F + 30))
    total_bytes = iterations * per_iter_bytes + once_bytes
    total_flops = iterations * per_iter_flops + once_flops
    return total_bytes, total_flops, max(total_bytes / HBM_BYTES_PER_S, total_flops / FP32_FLOP_PER_S)


def _time(cupy, fn, warmup=2, repeat=10, budget_s=20.0):
    """Median milliseconds of ``fn()`` between CUDA events."""
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    spent = 0.0
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, stop)
        times.append(ms)
        spent += ms / 1000
        if spent > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def _problem(cupy, B, C, H, W, seed=0):
    rng = cupy.random.default_rng(seed)
    unary = rng.standard_normal((B, C, H, W), dtype=np.float32) * 2
    image = (rng.random((B, H, W, FEATURES), dtype=np.float32) * 255).astype(np.float32)
    return unary, image


# ---------------------------------------------------------------------------------------------
# PyTorch, the straightforward way: materialised kernel + unfold
# ---------------------------------------------------------------------------------------------
def torch_mean_field(torch, unary, image, params, filter_size, blur, iterations):
    """ConvCRF-style inference on PyTorch tensors (merged kernel, Potts, no normalisation)."""
    Fn = torch.nn.functional
    B, C, H, W = unary.shape
    r = filter_size // 2
    pad_y = math.ceil(((blur - H % blur) % blur) / 2)
    pad_x = math.ceil(((blur - W % blur) % blur) / 2)

    def pool(x):
        if blur == 1:
            return x
        return Fn.avg_pool2d(x, blur, blur, padding=(pad_y, pad_x), count_include_pad=False)

    def upsample(x):
        if blur == 1:
            return x
        up = Fn.interpolate(x, scale_factor=blur, mode="bilinear", align_corners=False)
        return up[:, :, pad_y:pad_y + H, pad_x:pad_x + W]

    dev, dt = unary.device, unary.dtype
    ys = torch.arange(H, device=dev, dtype=dt).view(1, 1, H, 1).expand(B, 1, H, W)
    xs = torch.arange(W, device=dev, dtype=dt).view(1, 1, 1, W).expand(B, 1, H, W)
    colour = image.permute(0, 3, 1, 2)
    tb = torch.as_tensor(params.theta_beta_vector(colour.shape[1]), device=dev, dtype=dt).view(1, -1, 1, 1)
    app = pool(torch.cat([ys / params.theta_alpha, xs / params.theta_alpha, colour / tb], 1))
    smo = pool(torch.cat([ys, xs], 1) / params.theta_gamma)
    h, w = app.shape[-2:]
    k2 = filter_size * filter_size

    def gaussian(feat):
        nf = feat.shape[1]
        cols = Fn.unfold(feat, filter_size, padding=r).view(B, nf, k2, h, w)
        d = cols - feat.view(B, nf, 1, h, w)
        return torch.exp(-0.5 * (d * d).sum(1))

    inside = Fn.unfold(torch.ones(1, 1, h, w, device=dev, dtype=dt), filter_size, padding=r).view(1, k2, h, w)
    inside[:, k2 // 2] = 0  # no message from the cell to itself
    kernel = (params.appearance_weight * gaussian(app) + params.smoothness_weight * gaussian(smo)) * inside

    su = unary * params.unary_weight
    q = torch.softmax(su, 1)
    for _ in range(iterations):
        cols = Fn.unfold(pool(q), filter_size, padding=r).view(B, C, k2, h, w)
        m = upsample((cols * kernel.unsqueeze(1)).sum(2))
        q = torch.softmax(su + m, 1)
    return q


# ---------------------------------------------------------------------------------------------
def run(print_fn=print, problems=None, with_torch=True):
    """Benchmark every problem; print a table (last) and return the rows as dicts."""
    import cupy

    import cucrf
    from cucrf import _cupy_backend as cb
    from cucrf import _meanfield

    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except Exception:  # noqa: BLE001 - any import problem means "no PyTorch comparison"
        torch = None
    if not with_torch:
        torch = None

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print_fn(f"device: {device}; CuPy {cupy.__version__}; PyTorch "
             f"{torch.__version__ if torch is not None else 'not used'}")
    params = cucrf.CRFParams(theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0)
    pool = cupy.get_default_memory_pool()
    rows = []
    for name, B, C, H, W, k, blur in problems or PROBLEMS:
        unary, image = _problem(cupy, B, C, H, W)
        kw = dict(filter_size=k, blur=blur, iterations=ITERATIONS)
        row = dict(problem=name)
        try:
            cucrf.infer(unary, image, params, **kw)  # compile kernels outside the timing
            pool.free_all_blocks()
            before = pool.total_bytes()
            q = cucrf.infer(unary, image, params, **kw)
            cupy.cuda.Device().synchronize()
            row["peak_mib"] = (pool.total_bytes() - before) / 2**20
            del q
            row["infer_ms"] = _time(cupy, lambda: cucrf.infer(unary, image, params, **kw))

            features = cupy.ascontiguousarray(cupy.moveaxis(image, -1, 1))
            config = _meanfield.CRFConfig(k, blur, ITERATIONS)
            setup = cb.prepare(features, params, config)
            su = unary * np.float32(params.unary_weight)
            q0 = cb.softmax(su)

            def iterations():
                q = q0
                for _ in range(ITERATIONS):
                    q = cb.update(su, cb.full_message(setup, q, config), None)
                return q

            row["iters_ms"] = _time(cupy, iterations)
            del setup, su, q0, features
        except Exception as exc:  # noqa: BLE001 - report it in the table and go on
            row.update(infer_ms=float("nan"), iters_ms=float("nan"), peak_mib=float("nan"))
            row["error"] = f"cucrf: {type(exc).__name__}: {exc}"
        _, _, floor_s = floor_model(B, C, H, W, FEATURES, k, blur)
        row["floor_ms"] = floor_s * 1e3
        row["ratio"] = row["infer_ms"] / row["floor_ms"]
        if torch is not None:
            row.update(_torch_row(torch, cupy, unary, image, params, k, blur))
        rows.append(row)
        del unary, image
        pool.free_all_blocks()

    header = f"{'problem':22s} {'infer ms':>9s} {'iters ms':>9s} {'peak MiB':>9s} {'floor ms':>9s} {'x floor':>8s}"
    if torch is not None:
        header += f" {'torch ms':>9s} {'torch MiB':>9s} {'speedup':>8s} {'max|dQ|':>9s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r['problem']:22s} {r['infer_ms']:9.3f} {r['iters_ms']:9.3f} {r['peak_mib']:9.1f} "
                f"{r['floor_ms']:9.3f} {r['ratio']:8.1f}")
        if torch is not None:
            line += (f" {r['torch_ms']:9.3f} {r['torch_mib']:9.1f} "
                     f"{r['torch_ms'] / r['infer_ms']:8.1f} {r['max_diff']:9.2e}")
        lines.append(line)
    for r in rows:
        for key in ("error", "torch_error"):
            if key in r:
                print_fn(f"{r['problem']}: {r[key]}")
    print_fn(f"\ncucrf CUDA backend, float32, {ITERATIONS} iterations, F={FEATURES} "
             f"(floor: {HBM_BYTES_PER_S / 1e12:.2f} TB/s, {FP32_FLOP_PER_S / 1e12:.0f} TFLOP/s; docs/kernels.md)")
    for line in lines:
        print_fn(line)
    return rows


def run_backward(print_fn=print, problems=None):
    """Time the backward pass against the forward; print a table (last) and return the rows."""
    import cupy

    import cucrf
    from cucrf import _cupy_backend as cb
    from cucrf import _meanfield

    params = cucrf.CRFParams(theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0)
    pool = cupy.get_default_memory_pool()
    rows = []
    for name, B, C, H, W, k, blur, norm in problems or BACKWARD_PROBLEMS:
        row = dict(problem=name)
        try:
            unary, image = _problem(cupy, B, C, H, W)
            features = cupy.ascontiguousarray(cupy.moveaxis(image, -1, 1))
            go = cupy.random.default_rng(1).standard_normal(unary.shape, dtype=np.float32)
            config = _meanfield.CRFConfig(k, blur, ITERATIONS, norm)
            row["forward_ms"] = _time(cupy, lambda: _meanfield.mean_field(cb, unary, features, params, config))
            row["taped_ms"] = _time(cupy, lambda: _meanfield.mean_field(cb, unary, features, params, config,
                                                                         tape=_meanfield.Tape()))
            tape = _meanfield.Tape()
            _meanfield.mean_field(cb, unary, features, params, config, tape=tape)
            pool.free_all_blocks()
            before = pool.total_bytes()
            _meanfield.mean_field_backward(cb, tape, go)
            cupy.cuda.Device().synchronize()
            row["backward_peak_mib"] = (pool.total_bytes() - before) / 2**20
            row["backward_ms"] = _time(cupy, lambda: _meanfield.mean_field_backward(cb, tape, go))
            del tape
            kw = dict(filter_size=k, blur=blur, iterations=ITERATIONS, normalization=norm)
            row["vjp_ms"] = _time(cupy, lambda: cucrf.infer_vjp(unary, image, params, grad_output=go, **kw))
            del unary, image, features, go
        except Exception as exc:  # noqa: BLE001 - report it in the table and go on
            row.setdefault("forward_ms", float("nan"))
            for key in ("taped_ms", "backward_ms", "vjp_ms", "backward_peak_mib"):
                row.setdefault(key, float("nan"))
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["ratio"] = row["backward_ms"] / row["forward_ms"]
        row["floor_ms"] = backward_floor_model(B, C, H, W, FEATURES, k, blur)[2] * 1e3
        rows.append(row)
        pool.free_all_blocks()
    header = (f"{'problem':22s} {'fwd ms':>8s} {'taped ms':>9s} {'bwd ms':>8s} {'bwd/fwd':>8s} {'vjp ms':>8s} "
              f"{'bwd MiB':>8s} {'bwd floor':>9s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['problem']:22s} {r['forward_ms']:8.3f} {r['taped_ms']:9.3f} {r['backward_ms']:8.3f} "
                     f"{r['ratio']:8.2f} {r['vjp_ms']:8.3f} {r['backward_peak_mib']:8.1f} {r['floor_ms']:9.3f}")
    for r in rows:
        if "error" in r:
            print_fn(f"{r['problem']}: {r['error']}")
    print_fn(f"\ncucrf CUDA backward, float32, {ITERATIONS} iterations, F={FEATURES}: backward (mean_field_backward "
             f"on a taped run) / forward (mean_field); target <= {BACKWARD_TARGET:g} at 500x500x21 k7 b4")
    for line in lines:
        print_fn(line)
    return rows


def run_volumes(print_fn=print, problems=None):
    """Time inference (and ``infer_vjp``) on volumes; print a table (last) and return the rows."""
    import cupy

    import cucrf
    from cucrf import _cupy_backend as cb
    from cucrf import _meanfield

    params = cucrf.CRFParams(theta_alpha=10.0, theta_beta=20.0, theta_gamma=2.0)
    pool = cupy.get_default_memory_pool()
    rows = []
    for name, B, C, size, k, blur in problems or VOLUME_PROBLEMS:
        row = dict(problem=name)
        try:
            rng = cupy.random.default_rng(0)
            unary = rng.standard_normal((B, C) + size, dtype=np.float32) * 2
            image = rng.random((B,) + size + (1,), dtype=np.float32) * 255
            kw = dict(filter_size=k, blur=blur, iterations=ITERATIONS, spatial_dims=3)
            cucrf.infer(unary, image, params, **kw)  # compile the kernels outside the timing
            pool.free_all_blocks()
            before = pool.total_bytes()
            q = cucrf.infer(unary, image, params, **kw)
            cupy.cuda.Device().synchronize()
            row["peak_mib"] = (pool.total_bytes() - before) / 2**20
            del q
            row["infer_ms"] = _time(cupy, lambda: cucrf.infer(unary, image, params, **kw))

            features = cupy.ascontiguousarray(cupy.moveaxis(image, -1, 1))
            config = _meanfield.CRFConfig(k, blur, ITERATIONS)
            setup = cb.prepare(features, params, config)
            su = unary * np.float32(params.unary_weight)
            q0 = cb.softmax(su)

            def iterations():
                q = q0
                for _ in range(ITERATIONS):
                    q = cb.update(su, cb.full_message(setup, q, config), None)
                return q

            row["iters_ms"] = _time(cupy, iterations)
            del setup, su, q0, features
            go = cupy.random.default_rng(1).standard_normal(unary.shape, dtype=np.float32)
            row["vjp_ms"] = _time(cupy, lambda: cucrf.infer_vjp(unary, image, params, grad_output=go, **kw),
                                  warmup=1, repeat=5)
            del unary, image, go
        except Exception as exc:  # noqa: BLE001 - report it in the table and go on
            for key in ("infer_ms", "iters_ms", "vjp_ms", "peak_mib"):
                row.setdefault(key, float("nan"))
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["floor_ms"] = volume_floor_model(B, C, size, 1, k, blur)[2] * 1e3
        row["ratio"] = row["infer_ms"] / row["floor_ms"]
        rows.append(row)
        pool.free_all_blocks()
    header = (f"{'problem':18s} {'infer ms':>9s} {'iters ms':>9s} {'vjp ms':>8s} {'peak MiB':>9s} {'floor ms':>9s} "
              f"{'x floor':>8s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['problem']:18s} {r['infer_ms']:9.3f} {r['iters_ms']:9.3f} {r['vjp_ms']:8.2f} "
                     f"{r['peak_mib']:9.1f} {r['floor_ms']:9.3f} {r['ratio']:8.1f}")
    for r in rows:
        if "error" in r:
            print_fn(f"{r['problem']}: {r['error']}")
    first = rows[0] if rows else None
    verdict = ""
    if first is not None and first["problem"] == VOLUME_PROBLEMS[0][0]:
        outcome = ("not measured" if math.isnan(first["infer_ms"])
                   else "met" if first["infer_ms"] <= VOLUME_TARGET_MS else "MISSED")
        verdict = f"; target <= {VOLUME_TARGET_MS:g} ms at {first['problem']}: {outcome}"
    print_fn(f"\ncucrf CUDA backend on volumes, float32, {ITERATIONS} iterations, one channel{verdict}")
    for line in lines:
        print_fn(line)
    return rows


def _torch_row(torch, cupy, unary, image, params, k, blur):
    import cucrf

    out = {}
    try:
        tu = torch.from_dlpack(unary)
        ti = torch.from_dlpack(image)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            q = torch_mean_field(torch, tu, ti, params, k, blur, ITERATIONS)
            torch.cuda.synchronize()
            out["torch_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            ours = cucrf.infer(unary, image, params, filter_size=k, blur=blur, iterations=ITERATIONS)
            out["max_diff"] = float(cupy.abs(cupy.from_dlpack(q) - ours).max())
            del q, ours

            def fn():
                torch_mean_field(torch, tu, ti, params, k, blur, ITERATIONS)

            out["torch_ms"] = _time(cupy, fn, warmup=1, repeat=5)
    except Exception as exc:  # noqa: BLE001 - out of memory, or anything else: report it
        out.update(torch_ms=float("nan"), torch_mib=float("nan"), max_diff=float("nan"),
                   torch_error=f"torch: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.empty_cache()
    return out


def gpu_problem():
    """Why the GPU benchmark cannot run here (CuPy or a usable GPU missing), in one line; None when it can."""
    from . import _backends

    try:
        _backends._import_cupy(need_device=True)
    except RuntimeError as exc:
        return " ".join(str(exc).split())
    return None


def main(argv=None) -> int:
    """``python -m cucrf._bench_gpu``: the forward, backward and volume benchmarks; 1 without a GPU."""
    import argparse
    import sys

    argparse.ArgumentParser(prog="python -m cucrf._bench_gpu", description=__doc__.splitlines()[0]).parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(f"python -m cucrf._bench_gpu: error: {problem}", file=sys.stderr)
        return 1
    run()
    run_backward()
    run_volumes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
