"""Scale benchmarks of docs/scale.md: gigapixel images tile by tile, the halo's cost, many images.

    python scripts/bench_scale.py tile               # in-memory cucrf.infer on one 2048x2048 tile
    python scripts/bench_scale.py large --size 16384 # a lazily generated image, labels to Zarr
    python scripts/bench_scale.py halo               # tile sizes 512, 1024, 2048 on one image
    python scripts/bench_scale.py many --workers 2   # cucrf refine over a folder, images/s
    python scripts/bench_scale.py all                # every case, each in its own process

Each case runs in a fresh process (``all`` starts them) so that its peak resident memory
(``ru_maxrss``) is its own. Images are 2 classes at the defaults (filter 5, blur 4, 5 iterations),
float32; the scene is made chunk by chunk from the pixel coordinates (a lazily generated image:
nothing is read from disk). Outputs go to a temporary folder unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


PERIOD = 512  # the scene repeats every PERIOD pixels along each axis
_TABLES = {}


def _tables():
    """One period of the scene: image (P, P, 3) uint8 and unary (2, P, P) float32."""
    if not _TABLES:
        rng = np.random.default_rng(12345)
        yy, xx = np.mgrid[:PERIOD, :PERIOD]
        truth = ((yy - 230) ** 2 + (xx - 280) ** 2 < 170 ** 2) | ((yy - 60) ** 2 + (xx - 70) ** 2 < 45 ** 2)
        image = np.where(truth[..., None], np.array([200, 60, 40]), np.array([40, 80, 170]))
        _TABLES["image"] = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
        unary = rng.normal(0, 1.5, (2, PERIOD, PERIOD)).astype(np.float32)
        unary[1] += np.where(truth, 1.2, -1.2).astype(np.float32)
        _TABLES["unary"] = unary
    return _TABLES


def scene_block(y0, x0, h, w, what="both"):
    """The image (h, w, 3) uint8 and/or unary (2, h, w) float32 of a generated scene at (y0, x0).

    Discs on a background with noisy colours, and class scores right on average but wrong at
    about a fifth of the pixels, repeating every PERIOD pixels: a function of the global
    coordinates only (any chunking gives the same image), cheap to make (two gathers).
    """
    oy, ox = y0 % PERIOD, x0 % PERIOD
    reps = (-(-(oy + h) // PERIOD), -(-(ox + w) // PERIOD))
    tables = _tables()
    image = unary = None
    if what in ("both", "image"):
        image = np.tile(tables["image"], reps + (1,))[oy:oy + h, ox:ox + w]
    if what in ("both", "unary"):
        unary = np.tile(tables["unary"], (1,) + reps)[:, oy:oy + h, ox:ox + w]
    return image, unary


def lazy_scene(size, chunk):
    """A (2, size, size) unary and (size, size, 3) image as Dask arrays, generated chunk by chunk."""
    import dask.array as da

    def image_block(block_info=None):
        (y0, _), (x0, _), _ = block_info[None]["array-location"]
        h, w, _ = block_info[None]["chunk-shape"]
        return scene_block(y0, x0, h, w, "image")[0]

    def unary_block(block_info=None):
        _, (y0, _), (x0, _) = block_info[None]["array-location"]
        _, h, w = block_info[None]["chunk-shape"]
        return scene_block(y0, x0, h, w, "unary")[1]

    blocks = da.core.normalize_chunks(chunk, (size, size))
    image = da.map_blocks(image_block, chunks=blocks + ((3,),), dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))
    unary = da.map_blocks(unary_block, chunks=((2,),) + blocks, dtype=np.float32,
                          meta=np.empty((0, 0, 0), np.float32))
    return unary, image


class SceneArray:
    """The generated scene as an array that makes only the region it is asked for (no data stored).

    ``what`` is ``'unary'`` (2, size, size) float32 or ``'image'`` (size, size, 3) uint8.
    """

    def __init__(self, what, size):
        self.what = what
        self.shape = (2, size, size) if what == "unary" else (size, size, 3)
        self.dtype = np.dtype(np.float32 if what == "unary" else np.uint8)
        self.ndim = 3

    def __getitem__(self, key):
        spatial = key[1:3] if self.what == "unary" else key[0:2]
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(spatial, self.shape[-2:] if self.what == "unary"
                                                                 else self.shape[:2]))
        image, unary = scene_block(y0, x0, y1 - y0, x1 - x0, self.what)
        return unary if self.what == "unary" else image


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def case_tile(args):
    import cucrf

    image, unary = scene_block(0, 0, args.tile, args.tile)
    cucrf.infer(unary, image)  # warm-up
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        cucrf.infer(unary, image)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"case": "tile", "tile": args.tile, "seconds": seconds, "mpx_s": args.tile ** 2 / seconds / 1e6,
            "peak_rss_gb": peak_rss_gb()}


def case_large(args):
    import dask
    import zarr

    import cucrf.dask

    if args.source == "stored":  # each tile makes its own window of the scene
        labels = cucrf.dask.infer_stored(SceneArray("unary", args.size), SceneArray("image", args.size),
                                         chunks=args.tile, output="labels")
    else:  # Dask arrays made chunk by chunk, shared between neighbours by map_overlap
        unary, image = lazy_scene(args.size, args.tile)
        labels = cucrf.dask.infer(unary, image, output="labels")
    out = Path(args.out) / f"labels-{args.size}.zarr"
    store = zarr.open_array(str(out), mode="w", shape=labels.shape, chunks=(args.tile, args.tile), dtype=labels.dtype)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        labels.store(store, lock=False)
    seconds = time.perf_counter() - start
    return {"case": "large", "source": args.source, "size": args.size, "tile": args.tile, "threads": args.threads,
            "cucrf_threads": os.environ.get("CUCRF_NUM_THREADS", "default"), "seconds": seconds,
            "mpx_s": args.size ** 2 / seconds / 1e6, "peak_rss_gb": peak_rss_gb()}


def case_many(args):
    import imageio.v3 as iio

    from cucrf.cli import main

    folder = Path(args.out) / "many"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "u").mkdir(exist_ok=True)
    for i in range(args.images):
        image, unary = scene_block(i * 512, 0, args.image_size, args.image_size)
        iio.imwrite(folder / "img" / f"{i:04d}.png", image)
        np.save(folder / "u" / f"{i:04d}.npy", unary)
    images = sorted(str(p) for p in (folder / "img").glob("*.png"))
    unaries = sorted(str(p) for p in (folder / "u").glob("*.npy"))
    out = folder / f"out-{args.workers}"
    argv = ["refine", *images, "--unary", *unaries, "--out-dir", str(out), "--no-progress", "--overwrite"]
    if args.workers > 0:
        argv += ["--workers", str(args.workers)]
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            status = main(argv)
        finally:
            sys.stdout = stdout
    seconds = time.perf_counter() - start
    assert status == 0
    return {"case": "many", "workers": args.workers, "images": args.images, "image_size": args.image_size,
            "seconds": seconds, "images_s": args.images / seconds, "peak_rss_gb": peak_rss_gb()}


def halo_rows(tiles=(512, 1024, 2048)):
    """Pixels computed per pixel returned, for interior tiles, at the defaults."""
    import cucrf
    from cucrf.dask import tile_context

    from cucrf._api import check_config

    config = check_config(5, 4, 5, None, (65536, 65536))
    context = tile_context(config, 2)[0] + 3  # the overlap map_overlap reads on each side
    return [{"tile": t, "depth": context, "extra": ((t + 2 * context) / t) ** 2 - 1,
             "radius": cucrf.receptive_radius()[0]} for t in tiles]


CASES = {"tile": case_tile, "large": case_large, "many": case_many}


def run_all(args):
    """Every case in its own process; prints one JSON line per case and a summary."""
    runs = [["tile", "--tile", "2048"]]
    runs += [["large", "--size", str(n), "--tile", "1024"] for n in args.sizes]
    runs += [["tile", "--tile", "2048"]]
    runs += [["large", "--size", str(args.halo_size), "--tile", str(t)] for t in (512, 1024, 2048)]
    runs += [["large", "--size", str(args.halo_size), "--tile", "1024", "--source", "overlap"]]
    runs += [["many", "--workers", str(w), "--images", str(args.images)] for w in (0, 1, 2)]
    rows = []
    for run in runs:
        env = dict(os.environ)
        out = subprocess.run([sys.executable, __file__, *run, "--out", args.out, "--json"], env=env,
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    for row in halo_rows():
        print(json.dumps({"case": "halo", **row}))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES) + ["all", "halo"])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--halo-size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="Dask threads (each tile also uses cucrf's threads)")
    parser.add_argument("--source", choices=["stored", "overlap"], default="stored",
                        help="large: cucrf.dask.infer_stored on the scene (each tile makes its window) or "
                             "cucrf.dask.infer on Dask arrays of it (map_overlap)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="many: 0 runs in this process, one image at a time")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.out = args.out or tmp
        if args.case == "all":
            run_all(args)
        elif args.case == "halo":
            for row in halo_rows():
                print(json.dumps(row))
        else:
            print(json.dumps(CASES[args.case](args)))


if __name__ == "__main__":
    main()
