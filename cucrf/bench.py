"""Benchmark of cucrf inference, with DenseCRF (pydensecrf2) timed side by side when installed.

Run ``python -m cucrf.bench`` (``--help`` for options). Every figure is the median of several
runs after a warm-up; "extra peak memory" is the peak of NumPy allocations during one call
(tracemalloc), beyond its inputs. Timings depend on the machine: compare only rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

import cucrf

#: (height, width, classes, filter_size, blur)
CPU_CASES = [
    (500, 500, 21, 5, 4),
    (500, 500, 21, 7, 4),
    (500, 500, 21, 11, 4),
    (500, 500, 21, 7, 1),
]


def make_problem(height, width, classes, seed=0):
    """A smooth random image with a few regions and a noisy unary: (C, H, W) float32, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    regions = ((yy // 97 + xx // 131) % classes).astype(np.int64)
    colours = rng.integers(0, 256, size=(classes, 3))
    image = colours[regions] + rng.normal(scale=8, size=(height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    unary = rng.normal(scale=1.0, size=(classes, height, width)).astype(np.float32)
    unary[regions, yy, xx] += 1.5
    return unary, image


#: Set by ``--cpu-time``: :func:`time_call` reports the least CPU time instead of the median wall
#: time (for a shared machine, with one thread everywhere).
CPU_TIME = False
#: Set by ``--least``: :func:`time_call` reports the least wall time instead of the median (on a
#: shared machine whose speed drifts, the run least disturbed; the floor is a least wall time too).
LEAST = False


def time_call(fn, repeat, warmup=2):
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs (the least
    CPU time of this process, all threads, with :data:`CPU_TIME`; the least wall time with
    :data:`LEAST`)."""
    return time_calls([fn], repeat, warmup)[0]


def time_calls(fns, repeat, warmup=2, every=False):
    """:func:`time_call` of several callables, run in turn (each once, then each again), so that a
    machine whose speed drifts during the runs slows them alike: their ratios stay fair. Returns
    one time per callable (``every``: the list of all its times)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    clock = time.process_time if CPU_TIME else time.perf_counter
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            t = clock()
            fn()
            spent.append(clock() - t)
    if every:
        return times
    return [_statistic(spent) for spent in times]


def _statistic(times):
    return min(times) if CPU_TIME or LEAST else statistics.median(times)


def peak_extra_bytes(fn):
    """Peak bytes NumPy allocated during ``fn()`` (inputs excluded)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import _fast, _parallel

    fast = _fast.status()
    path = (f"fused CPU path: numba {_numba_version()}, kernels loaded in {fast['seconds']:.2f} s "
            f"({'cached on disk' if fast['cached'] else 'not cached'})" if fast["backend"] else
            f"fused CPU path: off ({fast['reason'] or 'numba not installed' if fast['enabled'] else 'CUCRF_FAST=0'})")
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, cucrf threads {_parallel.num_threads()}, "
            f"Python {platform.python_version()}, NumPy {np.__version__}; {path}; {load}")


def _numba_version():
    import numba

    return numba.__version__


class _numpy_only:
    """Within the block, CPU work runs on the NumPy backend (``CUCRF_FAST=0``)."""

    def __enter__(self):
        self.old = os.environ.get("CUCRF_FAST")
        os.environ["CUCRF_FAST"] = "0"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("CUCRF_FAST", None)
        else:
            os.environ["CUCRF_FAST"] = self.old


def fast_path_active():
    """True when CPU work runs on the fused (numba) backend."""
    from . import _fast

    return _fast.backend() is not None


def real_problem(data_dir, image_id="2007_000129", network="espnet2_384"):
    """A real VOC image and a network's logits from a data folder laid out as ``voc/<id>_image.png``
    and ``unaries/<id>_<network>.npz`` (array ``logits`` (21, H, W)): (C, H, W) float32, (H, W, 3) uint8."""
    import imageio.v3 as iio

    image = np.asarray(iio.imread(os.path.join(data_dir, "voc", f"{image_id}_image.png")))[..., :3]
    with np.load(os.path.join(data_dir, "unaries", f"{image_id}_{network}.npz")) as z:
        unary = np.asarray(z["logits"], dtype=np.float32)
    return unary, np.ascontiguousarray(image, dtype=np.uint8)


def run_cpu(repeat=5, iterations=5, cases=CPU_CASES, print_fn=print, problem=None, convcrf=None, threads=None,
            floor=False):
    """Time cucrf and its peers side by side on each case; return rows of dicts.

    cucrf on the fused CPU path (when active) and on the NumPy backend; pydensecrf2 when
    importable; upstream ConvCRF (PyTorch CPU, ``threads`` threads) when ``convcrf`` names a
    checkout of its repository. ``problem`` is a (unary (C, H, W), image (H, W, 3) uint8) pair
    used for every case (its size replaces the case's), e.g. :func:`real_problem`.

    The cases are timed in turn (:func:`time_calls`: one run of each, then again), and with
    ``floor`` the two measurements of :func:`measure_floor` take their turns among them (wall
    times; with :data:`CPU_TIME` the floor is measured on its own), so that each case's ratio to
    the floor compares times taken under the same conditions; each row then also holds ``floor``
    (the measured machine) and ``floor_s`` (:func:`floor_seconds`). Every
    cucrf case is timed before any peer runs: PyTorch's worker threads keep spinning for a while
    after each of its calls, which would slow whatever runs next on the same cores.
    """
    from . import _parallel, _peers

    fast = fast_path_active()
    threads = _parallel.num_threads() if threads is None else threads
    rows = []
    problems = [make_problem(H, W, C) if problem is None else problem for H, W, C, _, _ in cases]
    runs = [functools.partial(cucrf.infer, unary, image, filter_size=k, blur=blur, iterations=iterations)
            for (unary, image), (_, _, _, k, blur) in zip(problems, cases)]
    # The floor is a least wall time: with CPU_TIME (CPU times in turn) it is measured on its own.
    in_turn = floor and not CPU_TIME
    probes = floor_probes() if in_turn else None
    # (after the floor's copy, which leaves nothing of the problem in the caches, a run of the
    # first case whose time is dropped: every case is then timed as it runs again and again,
    # as the peers are)
    extra = [probes["copy"], probes["exps"], runs[0]] if in_turn else []
    times = time_calls(runs + extra, repeat, every=True)[:len(runs) + (2 if in_turn else 0)]
    measured = measure_floor() if floor and not in_turn else None
    if in_turn:  # (a least time whatever the statistic: the machine at its best)
        measured = dict(bandwidth=probes["bytes"] / min(times[-2]), exp_rate=probes["exps_done"] / min(times[-1]),
                        threads=probes["threads"])
    numpy_times = [None] * len(runs)
    if fast:
        with _numpy_only():
            numpy_times = time_calls(runs, repeat)
    for (unary, image), run, spent, numpy_s in zip(problems, runs, times, numpy_times):
        C, H, W = unary.shape
        k, blur = run.keywords["filter_size"], run.keywords["blur"]
        row = dict(case=f"{H}x{W}x{C} filter {k} blur {blur}", cucrf_s=_statistic(spent), fast=fast,
                   extra_memory_x_unary=peak_extra_bytes(run) / unary.nbytes, densecrf_s=None, numpy_s=numpy_s,
                   convcrf_s=None)
        if floor:
            row["floor"], row["floor_s"] = measured, floor_seconds(C, H * W, iterations, measured)
        rows.append(row)
    densecrf_cache = {}
    have_densecrf = _peers.densecrf_available()
    for row, (unary, image) in zip(rows, problems):
        if have_densecrf:
            key = (unary.shape, id(problem))
            if key not in densecrf_cache:
                logp = unary - np.log(np.exp(unary).sum(axis=0, keepdims=True))
                densecrf_cache[key] = time_call(
                    lambda: _peers.densecrf_infer(logp, image, iterations=iterations), repeat)
            row["densecrf_s"] = densecrf_cache[key]
    for row, (unary, image), (_, _, _, k, blur) in zip(rows, problems, cases):
        if convcrf is not None:
            row["convcrf_s"] = time_call(
                _peers.convcrf_runner(convcrf, unary, image, k, blur, iterations, threads=threads), repeat)
        print_fn(format_row(row))
    return rows


def _s(v):
    return "n/a" if v is None else f"{v:.3f}"


def _ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def format_row(row):
    return (f"| {row['case']} | {row['cucrf_s']:.3f} | {_s(row.get('numpy_s'))} | {_s(row.get('convcrf_s'))} "
            f"| {_s(row['densecrf_s'])} | {_ratio(row.get('numpy_s'), row['cucrf_s'])} "
            f"| {_ratio(row.get('convcrf_s'), row['cucrf_s'])} | {_ratio(row['cucrf_s'], row['densecrf_s'])} "
            f"| {row['extra_memory_x_unary']:.2f}x |")


TABLE_HEADER = ("| case (5 iterations) | cucrf [s] | cucrf NumPy [s] | upstream ConvCRF [s] | pydensecrf2 [s] "
                "| NumPy / cucrf | ConvCRF / cucrf | cucrf / pydensecrf2 | extra peak memory / unary bytes |\n"
                "|---|---|---|---|---|---|---|---|---|")


def run_backward(repeat=5, iterations=5, problem=None, filter_size=5, blur=4, print_fn=print):
    """Forward and backward times at the defaults, fused and NumPy; return rows of dicts.

    ``infer``: :func:`cucrf.infer`. ``taped forward``: the forward pass of
    :func:`cucrf.infer_vjp` alone (the same input checks, then mean-field inference recording
    every iteration's marginals and messages for the backward pass, which inference alone does
    not keep). ``backward``: :func:`cucrf.infer_vjp` minus the taped forward; the last column is
    infer_vjp minus infer, over infer. The three are run in turn (:func:`time_calls`).
    """
    from . import _api, _meanfield

    unary, image = make_problem(500, 500, 21) if problem is None else problem
    g = np.random.default_rng(0).normal(size=unary.shape).astype(np.float32)
    settings = dict(filter_size=filter_size, blur=blur, iterations=iterations)
    rows = []
    fwd = lambda: cucrf.infer(unary, image, **settings)  # noqa: E731
    vjp = lambda: cucrf.infer_vjp(unary, image, grad_output=g, **settings)  # noqa: E731

    def taped():
        p = _api._prepare_inputs(unary, image, None, unary_kind="logits", num_classes=None, confidence=None,
                                 unknown_label=None, clip=1e-5, normalization=None, output="probabilities",
                                 dtype=None, device=None, feature_transform=None, training=True, **settings)
        _meanfield.mean_field(p.backend, p.unary, p.features, p.params, p.config, tape=_meanfield.Tape())

    paths = [("fused", None)] if fast_path_active() else []
    paths.append(("NumPy", _numpy_only))
    for name, ctx in paths:
        with ctx() if ctx is not None else contextlib.nullcontext():
            vjp()  # every call warm before any is timed (the allocator settles on the largest)
            f, t, v = time_calls([fwd, taped, vjp], repeat)  # in turn: the ratios survive drift
        row = dict(path=name, forward_s=f, taped_forward_s=t, vjp_s=v, backward_s=v - t)
        rows.append(row)
        print_fn(f"| {name} | {f:.3f} | {t:.3f} | {v:.3f} | {v - t:.3f} | {(v - t) / t:.2f} | {(v - f) / f:.2f} |")
    return rows


BACKWARD_HEADER = ("| path (filter 5, blur 4) | infer [s] | taped forward [s] | infer_vjp [s] | backward [s] "
                   "| backward / taped forward | (infer_vjp - infer) / infer |\n|---|---|---|---|---|---|---|")


def measure_floor(megabytes=64):
    """This machine's streaming bandwidth and float32 exp throughput with ``CUCRF_NUM_THREADS`` threads.

    Bandwidth: bytes read + written per second by a copy of ``megabytes`` split over the threads
    (NumPy copies release the GIL). Exp throughput: exps per second of the fused path's
    vectorised exp (NumPy's ``exp`` without it) on rows that stay in each core's cache, so that
    memory traffic is not counted twice. Least wall time of 7 runs each (:func:`floor_probes`).
    """
    probes = floor_probes(megabytes)
    return dict(bandwidth=probes["bytes"] / _least_wall_time(probes["copy"], 7),
                exp_rate=probes["exps_done"] / _least_wall_time(probes["exps"], 7), threads=probes["threads"])


def floor_probes(megabytes=64):
    """The two runs :func:`measure_floor` times: ``copy`` (moves ``bytes``, read + written) and
    ``exps`` (takes ``exps_done`` exps), with ``threads``, the thread count they use."""
    from . import _parallel

    n = megabytes * (1 << 20) // 4
    src = np.random.default_rng(0).uniform(-20.0, 0.0, n).astype(np.float32)
    dst = np.empty_like(src)
    pieces = _parallel.num_threads()

    def copy(start, stop):
        for i in range(start, stop):
            a, b = i * n // pieces, (i + 1) * n // pieces
            np.copyto(dst[a:b], src[a:b])

    # 64 rows of 4096 per thread (1 MB: they stay in the core's cache), exp'd 64 times in place
    # by one call (with NumPy, 64 calls of np.exp over the rows, split over the threads)
    rows = np.ascontiguousarray(src[: 64 * 4096 * pieces].reshape(-1, 4096))
    work = rows.copy()
    repeats = 64
    if fast_path_active():
        from . import _numba_backend, _numba_kernels

        def exps():
            _numba_backend._run(_numba_kernels.exp_rows, work, repeats)
    else:
        def exps():
            for _ in range(repeats):
                _parallel.for_chunks(work.shape[0], lambda a, b: np.exp(rows[a:b], out=work[a:b]), work.size)
    return dict(copy=lambda: _parallel.for_chunks(pieces, copy, n), bytes=2 * src.nbytes, exps=exps,
                exps_done=repeats * work.size, threads=pieces)


def _least_wall_time(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def floor_seconds(classes, pixels, iterations, floor):
    """The least time mean-field inference can take on a machine of ``floor`` (:func:`measure_floor`,
    with the thread count of the run): every update reads the unary and writes ``Q`` once
    (float32) and takes ``classes`` exps per pixel (``iterations`` updates and the first softmax);
    coarse-grid work, set-up and the input checks are left out."""
    elements = classes * pixels * (iterations + 1)
    return elements * 8 / floor["bandwidth"] + elements / floor["exp_rate"]


#: (depth, height, width, classes) of the volume benchmark, at the defaults.
VOLUME_CASES = [(100, 150, 120, 2), (256, 256, 256, 4)]


def make_volume(depth, height, width, classes, seed=0):
    """A one-modality volume of blocky regions and a noisy unary: (C, D, H, W) float32, (D, H, W, 1) float32."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[0:depth, 0:height, 0:width]
    regions = ((zz // 23 + yy // 29 + xx // 31) % classes).astype(np.int64)
    levels = np.linspace(40, 215, classes)
    image = (levels[regions] + rng.normal(scale=12, size=regions.shape)).astype(np.float32)[..., None]
    unary = rng.normal(scale=1.0, size=(classes,) + regions.shape).astype(np.float32)
    np.put_along_axis(unary, regions[None], np.take_along_axis(unary, regions[None], axis=0) + 1.5, axis=0)
    return unary, image


def run_volumes(repeat=3, iterations=5, cases=VOLUME_CASES, print_fn=print):
    """Time cucrf on volumes at the defaults (spatial_dims=3), fused and NumPy; return rows of dicts."""
    rows = []
    fast = fast_path_active()
    for D, H, W, C in cases:
        unary, image = make_volume(D, H, W, C)
        run = lambda: cucrf.infer(unary, image, spatial_dims=3, iterations=iterations)  # noqa: E731
        seconds = time_call(run, repeat)
        extra = peak_extra_bytes(run)
        numpy_s = None
        if fast:
            with _numpy_only():
                numpy_s = time_call(run, repeat)
        row = dict(case=f"{D}x{H}x{W}x{C}", cucrf_s=seconds, numpy_s=numpy_s, extra_memory_x_unary=extra / unary.nbytes)
        rows.append(row)
        print_fn(f"| {row['case']} | {seconds:.3f} | {_s(numpy_s)} | {row['extra_memory_x_unary']:.2f}x |")
    return rows


#: (height, width, classes, batch_size) of the training-throughput benchmark.
FIT_CASES = [(188, 250, 21, 1), (375, 500, 21, 1), (375, 500, 21, 4)]


@functools.lru_cache(maxsize=2)
def _recent_problem(height, width, classes, seed):
    """:func:`make_problem`, kept for the next read: unary, image and label of a sample are read in turn."""
    return make_problem(height, width, classes, seed=seed)


class _GeneratedImages:
    """A lazy data set: image i is made when it is read (as a folder reader would load it)."""

    def __init__(self, part, count, height, width, classes):
        self.part, self.count, self.shape = part, count, (height, width, classes)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if not 0 <= i < self.count:
            raise IndexError(i)
        unary, image = _recent_problem(*self.shape, i)
        if self.part == 0:
            return unary
        if self.part == 1:
            return image
        return unary.argmax(axis=0).astype(np.uint8)


def run_fit(images=8, epochs=2, cases=FIT_CASES, print_fn=print, numpy=True):
    """Training throughput of :func:`cucrf.fit` (defaults, no validation), images read lazily.

    Returns rows with ``images_per_s`` over the training epochs (epoch 0, the scoring of the
    start, is left out), and ``numpy_images_per_s`` on the NumPy backend when the fused path is
    active and ``numpy``.
    """

    def throughput(H, W, C, batch):
        data = [_GeneratedImages(part, images, H, W, C) for part in range(3)]
        result = cucrf.fit(*data, epochs=epochs, batch_size=batch, val_fraction=0, progress=False)
        trained = result.history[1:]
        return sum(h["images"] for h in trained) / sum(h["seconds"] for h in trained)

    rows = []
    fast = fast_path_active()
    for H, W, C, batch in cases:
        row = dict(case=f"{H}x{W}x{C} batch {batch}", images_per_s=throughput(H, W, C, batch), numpy_images_per_s=None)
        if fast and numpy:
            with _numpy_only():
                row["numpy_images_per_s"] = throughput(H, W, C, batch)
        rows.append(row)
        ref = row["numpy_images_per_s"]
        print_fn(f"| {row['case']} | {row['images_per_s']:.2f} | {'n/a' if ref is None else f'{ref:.2f}'} "
                 f"| {_ratio(row['images_per_s'], ref)} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cucrf.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only the first case, 3 runs")
    parser.add_argument("--gpu", action="store_true",
                        help="also run the GPU benchmark (needs CuPy and a GPU; checked before the CPU benchmark)")
    parser.add_argument("--fit", action="store_true", help="only the training throughput of cucrf.fit")
    parser.add_argument("--volumes", action="store_true",
                        help="only volumes (spatial_dims=3, defaults): 100x150x120 with 2 classes, 256^3 with 4")
    parser.add_argument("--data", metavar="DIR",
                        help="time on a real image and real logits: DIR/voc/<id>_image.png and "
                             "DIR/unaries/<id>_espnet2_384.npz (instead of the generated 500x500 problem)")
    parser.add_argument("--image", default="2007_000129", help="the image id with --data (default: 2007_000129)")
    parser.add_argument("--convcrf", metavar="CHECKOUT",
                        help="also time upstream ConvCRF (PyTorch CPU) from a checkout of its repository")
    parser.add_argument("--backward", action="store_true",
                        help="also time infer_vjp (forward and backward) at the defaults")
    parser.add_argument("--cpu-time", action="store_true",
                        help="report the least CPU time instead of the median wall time (a shared machine; "
                             "use with CUCRF_NUM_THREADS=1, as the peers then run on one thread too)")
    parser.add_argument("--least", action="store_true",
                        help="report the least wall time of the timed runs instead of the median (a shared "
                             "machine whose speed drifts; the floor is a least wall time too)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure this machine's streaming bandwidth and exp throughput (in turn "
                             "with the cucrf cases), and the floor time of each case")
    args = parser.parse_args(argv)
    global CPU_TIME, LEAST
    CPU_TIME = args.cpu_time
    LEAST = args.least
    if args.gpu:  # before the CPU benchmark's minutes, not after
        from . import _bench_gpu

        problem = _bench_gpu.gpu_problem()
        if problem is not None:
            print(f"{parser.prog}: error: --gpu: {problem}", file=sys.stderr)
            return 1
    if args.fit:
        print(f"machine: {machine_description()}")
        print("| cucrf.fit, defaults (filter 5, blur 4, 5 iterations), float32 | training images/s "
              "| NumPy backend images/s | ratio |\n|---|---|---|---|")
        run_fit()
        return 0
    if args.volumes:
        print(f"machine: {machine_description()}")
        print("| volume D x H x W x classes (1 channel, filter 5, blur 4, 5 iterations), float32 | cucrf [s] "
              "| cucrf NumPy [s] | extra peak memory / unary bytes |\n|---|---|---|---|")
        run_volumes(repeat=3 if args.quick else args.repeat, iterations=args.iterations,
                    cases=VOLUME_CASES[:1] if args.quick else VOLUME_CASES)
        return 0
    cases = CPU_CASES[:1] if args.quick else CPU_CASES
    repeat = 3 if args.quick else args.repeat
    problem = None
    if args.data:
        problem = real_problem(args.data, args.image)
        print(f"problem: {args.image} from {args.data} ({'x'.join(map(str, problem[0].shape[1:]))}, "
              f"{problem[0].shape[0]} classes, real logits)")
    print(f"machine: {machine_description()}")
    statistic = "least CPU time" if CPU_TIME else ("least wall time" if LEAST else "median wall time")
    print(f"times: {statistic} of {repeat} timed runs after 2 warm-up runs")
    print(TABLE_HEADER)
    sys.stdout.flush()
    # cucrf's backward pass first (and the floor within run_cpu): the peers leave threads spinning
    backward_lines = []
    if args.backward:
        run_backward(repeat=repeat, iterations=args.iterations, problem=problem, print_fn=backward_lines.append)
    rows = run_cpu(repeat=repeat, iterations=args.iterations, cases=cases, problem=problem, convcrf=args.convcrf,
                   floor=args.floor)
    if args.floor:
        floor = rows[0]["floor"]
        how = "least wall time of 7 runs each" if CPU_TIME else f"least wall time of {repeat} runs each, in turn " \
                                                                 "with the cucrf cases"
        print(f"\nfloor: streaming {floor['bandwidth'] / 1e9:.1f} GB/s (read + write) and exp "
              f"{floor['exp_rate'] / 1e9:.2f} G/s with {floor['threads']} thread(s) ({how})")
        print("| case | cucrf [s] | floor [s] | cucrf / floor |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['case']} | {row['cucrf_s']:.3f} | {row['floor_s']:.3f} | {row['cucrf_s'] / row['floor_s']:.2f} |")
    if args.backward:
        print("\n" + BACKWARD_HEADER)
        print("\n".join(backward_lines))
    if args.gpu:
        from . import _bench_gpu

        _bench_gpu.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
