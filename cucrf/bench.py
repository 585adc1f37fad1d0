"""Benchmark of cucrf inference, with DenseCRF (pydensecrf2) timed side by side when installed.

Run ``python -m cucrf.bench`` (``--help`` for options). Every figure is the median of several
runs after a warm-up; "extra peak memory" is the peak of NumPy allocations during one call
(tracemalloc), beyond its inputs. Timings depend on the machine: compare only rows of one run.
"""

from __future__ import annotations

import argparse
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
    (500, 500, 21, 7, 4),
    (500, 500, 21, 5, 4),
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


def time_call(fn, repeat, warmup=1):
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
    from . import _parallel

    return (f"{cpu}, {os.cpu_count()} logical CPUs, cucrf threads {_parallel.num_threads()}, "
            f"Python {platform.python_version()}, NumPy {np.__version__}")


def run_cpu(repeat=5, iterations=5, cases=CPU_CASES, print_fn=print):
    """Time cucrf (NumPy) and, when importable, pydensecrf2 on each case; return rows of dicts."""
    from . import _peers

    have_densecrf = _peers.densecrf_available()
    rows = []
    densecrf_cache = {}
    for H, W, C, k, blur in cases:
        unary, image = make_problem(H, W, C)
        run = lambda: cucrf.infer(unary, image, filter_size=k, blur=blur, iterations=iterations)  # noqa: E731
        seconds = time_call(run, repeat)
        extra = peak_extra_bytes(run)
        row = dict(case=f"{H}x{W}x{C} filter {k} blur {blur}", cucrf_s=seconds,
                   extra_memory_x_unary=extra / unary.nbytes, densecrf_s=None)
        if have_densecrf:
            key = (H, W, C)
            if key not in densecrf_cache:
                logp = unary - np.log(np.exp(unary).sum(axis=0, keepdims=True))
                densecrf_cache[key] = time_call(
                    lambda: _peers.densecrf_infer(logp, image, iterations=iterations), repeat)
            row["densecrf_s"] = densecrf_cache[key]
        rows.append(row)
        print_fn(format_row(row))
    return rows


def format_row(row):
    dense = "n/a" if row["densecrf_s"] is None else f"{row['densecrf_s']:.3f}"
    ratio = "n/a" if row["densecrf_s"] is None else f"{row['cucrf_s'] / row['densecrf_s']:.2f}"
    return (f"| {row['case']} | {row['cucrf_s']:.3f} | {row['extra_memory_x_unary']:.2f}x | {dense} | {ratio} |")


TABLE_HEADER = ("| case (5 iterations) | cucrf NumPy [s] | extra peak memory / unary bytes "
                "| pydensecrf2 [s] | cucrf / pydensecrf2 |\n|---|---|---|---|---|")


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
    """Time cucrf on volumes at the defaults (spatial_dims=3); return rows of dicts."""
    rows = []
    for D, H, W, C in cases:
        unary, image = make_volume(D, H, W, C)
        run = lambda: cucrf.infer(unary, image, spatial_dims=3, iterations=iterations)  # noqa: E731
        seconds = time_call(run, repeat)
        extra = peak_extra_bytes(run)
        row = dict(case=f"{D}x{H}x{W}x{C}", cucrf_s=seconds, extra_memory_x_unary=extra / unary.nbytes)
        rows.append(row)
        print_fn(f"| {row['case']} | {seconds:.3f} | {row['extra_memory_x_unary']:.2f}x |")
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


def run_fit(images=8, epochs=2, cases=FIT_CASES, print_fn=print):
    """Training throughput of :func:`cucrf.fit` (defaults, no validation), images read lazily.

    Returns rows with ``images_per_s`` over the training epochs (epoch 0, the scoring of the
    start, is left out).
    """
    rows = []
    for H, W, C, batch in cases:
        data = [_GeneratedImages(part, images, H, W, C) for part in range(3)]
        result = cucrf.fit(*data, epochs=epochs, batch_size=batch, val_fraction=0, progress=False)
        trained = result.history[1:]
        seconds = sum(h["seconds"] for h in trained)
        count = sum(h["images"] for h in trained)
        row = dict(case=f"{H}x{W}x{C} batch {batch}", images_per_s=count / seconds)
        rows.append(row)
        print_fn(f"| {row['case']} | {row['images_per_s']:.2f} |")
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
    args = parser.parse_args(argv)
    if args.gpu:  # before the CPU benchmark's minutes, not after
        from . import _bench_gpu

        problem = _bench_gpu.gpu_problem()
        if problem is not None:
            print(f"{parser.prog}: error: --gpu: {problem}", file=sys.stderr)
            return 1
    if args.fit:
        print(f"machine: {machine_description()}")
        print("| cucrf.fit, defaults (filter 5, blur 4, 5 iterations), float32 | training images/s |\n|---|---|")
        run_fit()
        return 0
    if args.volumes:
        print(f"machine: {machine_description()}")
        print("| volume D x H x W x classes (1 channel, filter 5, blur 4, 5 iterations), float32 | cucrf NumPy [s] "
              "| extra peak memory / unary bytes |\n|---|---|---|")
        run_volumes(repeat=3 if args.quick else args.repeat, iterations=args.iterations,
                    cases=VOLUME_CASES[:1] if args.quick else VOLUME_CASES)
        return 0
    cases = CPU_CASES[:1] if args.quick else CPU_CASES
    repeat = 3 if args.quick else args.repeat
    print(f"machine: {machine_description()}")
    print(TABLE_HEADER)
    sys.stdout.flush()
    run_cpu(repeat=repeat, iterations=args.iterations, cases=cases)
    if args.gpu:
        from . import _bench_gpu

        _bench_gpu.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
