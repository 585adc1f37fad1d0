"""Benchmark of cucrf inference, with DenseCRF (pydensecrf2) timed side by side when installed.

Run ``python -m cucrf.bench`` (``--help`` for options). Every figure is the median of several
runs after a warm-up; "extra peak memory" is the peak of NumPy allocations during one call
(tracemalloc), beyond its inputs. Timings depend on the machine: compare only rows of one run.
"""

from __future__ import annotations

import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cucrf.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only the first case, 3 runs")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmark (needs CuPy and a GPU)")
    args = parser.parse_args(argv)
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
