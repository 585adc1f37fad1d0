"""``cucrf refine`` on images larger than memory: TIFF or Zarr in, labels to Zarr or TIFF, tile by tile.

The image and the unary are opened lazily as Dask arrays (tiled TIFFs and Zarr arrays chunk by
chunk, uncompressed TIFFs and .npy files memory-mapped), refined by :func:`cucrf.dask.infer`
chunk by chunk with the exact context, and the labels are written as they come: a Zarr array
chunk by chunk, or a tiled TIFF one band of chunks at a time. Peak memory is a few tiles, not the
image. Outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from ._crf import IGNORE, normalization
from ._errors import CLIError, UsageError, error_text

#: Outputs that make ``refine`` work tile by tile.
TILED_OUTPUTS = (".zarr", ".tif", ".tiff")
#: Inputs that are opened lazily.
LAZY_INPUTS = (".zarr", ".tif", ".tiff", ".npy")
DEFAULT_TILE = 1024


def _suffix(path) -> str:
    return Path(str(path).rstrip("/\\")).suffix.lower()


def is_tiled(args) -> bool:
    """Whether this ``refine`` call writes labels tile by tile (a .zarr or .tif output, or a .zarr input)."""
    outputs = args.output or []
    return (any(_suffix(o) in TILED_OUTPUTS for o in outputs)
            or any(_suffix(i) == ".zarr" for i in list(args.images) + list(args.unary or [])))


def add_options(parser) -> None:
    """The options of large images and of many images on workers (shared with :mod:`._many`)."""
    group = parser.add_argument_group(
        "large images and many images (need the dask extra: pip install 'cucrf[dask]')")
    group.add_argument("--tile", type=_tile_size, default=None, metavar="PIXELS",
                       help=f"large images (a .zarr or .tif output): the side of the tiles computed at once "
                            f"(default: {DEFAULT_TILE}); each is computed with the context it depends on, so the "
                            "result is the same for every tile size")
    group.add_argument("--workers", type=_positive, default=None, metavar="N",
                       help="compute on N local worker processes (dask.distributed): many images one per task, "
                            "or the tiles of a large image")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="compute on a running dask scheduler (e.g. tcp://10.0.0.5:8786) instead of local "
                            "workers; the files must be readable and writable from every worker")
    group.add_argument("--resume", action="store_true",
                       help="skip the images whose outputs all exist already (outputs are written under a "
                            "temporary name and renamed when complete, so an existing output is a finished one)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace existing outputs (with --workers, --scheduler, --resume or a .zarr/.tif "
                            "output an existing output is refused otherwise)")


def _positive(text):
    from ._parser import positive_int

    return positive_int(text)


def _tile_size(text):
    import argparse

    value = _positive(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected a tile side of at least 16 pixels, got {value}")
    return value


def check_not_existing(paths, args) -> None:
    """Refuse outputs that exist unless ``--overwrite`` (``--resume`` is handled by the caller)."""
    existing = [p for p in paths if p is not None and os.path.lexists(p)]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CLIError(f"output {str(existing[0])!r}{more} exists; pass --overwrite to replace it, or --resume to "
                       "skip the images whose outputs exist")


def temporary_path(path: Path, token: str) -> Path:
    """A name next to ``path`` for writing it before the rename (the same suffix, hidden, tagged)."""
    suffix = ".zarr" if _suffix(path) == ".zarr" else "".join(path.suffixes[-1:])
    return path.with_name(f".{path.name}.cucrf-tmp-{token}-{os.getpid()}{suffix}")


def remove_temporaries(folders, token: str) -> None:
    """Delete what an interrupted writer of this run (``token``) left behind in ``folders``."""
    for folder in set(folders):
        if not Path(folder).is_dir():
            continue
        for leftover in Path(folder).glob(f".*.cucrf-tmp-{token}-*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def replace(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``; an existing output is removed first (--overwrite)."""
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.cucrf-old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _dask_modules():
    try:
        import dask
        import dask.array as da
        import zarr  # noqa: F401
    except ImportError as exc:
        raise CLIError(f"large images (.zarr or .tif outputs), --workers and --scheduler need the dask extra: "
                       f"pip install 'cucrf[dask]' ({error_text(exc)})") from None
    return dask, da


class LazyFile:
    """A file's array, read region by region; pickles as its path, so dask workers open it themselves.

    Parameters
    ----------
    path : str
    what : str
        What the file is (``'image'``, ``'unary'``), for messages.
    """

    _opened = {}  # (path, pid) -> the open array, one per process

    def __init__(self, path: str, what: str):
        self.path = str(Path(path).resolve())
        self.what = what
        array = self._array()
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.channel_axis = False  # add a trailing channel axis of length 1 (a grey image)
        self.cast = None  # read as this dtype (float16 scores as float32)

    def with_channel_axis(self):
        """This file's (H, W) array read as (H, W, 1)."""
        self.channel_axis = True
        self.shape = self.shape + (1,)
        self.ndim += 1
        return self

    def as_dtype(self, dtype):
        self.cast = self.dtype = np.dtype(dtype)
        return self

    def __getitem__(self, key):
        if self.channel_axis:
            key = key if isinstance(key, tuple) else (key,)
            if Ellipsis in key or len(key) < self.ndim:
                raise IndexError("a grey image is read with one index per axis")
            values = np.asarray(self._array()[key[:-1]])[..., None][..., key[-1]]
        else:
            values = np.asarray(self._array()[key])
        return values if self.cast is None else values.astype(self.cast)

    def _array(self):
        key = (self.path, os.getpid())
        array = self._opened.get(key)
        if array is None:
            array = self._opened[key] = _open_file(self.path, self.what)
        return array


def _open_file(path: str, what: str):
    """The array in ``path``: Zarr, TIFF (memory-mapped when uncompressed), .npy (memory-mapped) or an image."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {path!r} does not exist")
    suffix = _suffix(path)
    try:
        if suffix == ".zarr":
            array = zarr.open(str(p), mode="r")
            if not hasattr(array, "shape"):
                names = sorted(getattr(array, "array_keys", lambda: [])())
                raise CLIError(f"{what} {path!r} is a Zarr group ({', '.join(names) or 'no arrays'}); expected a "
                               "Zarr array: give the array's folder, e.g. " + (f"{path}/{names[0]}" if names else path))
            return array
        if suffix in (".tif", ".tiff"):
            import tifffile

            try:
                return tifffile.memmap(str(p), mode="r")  # uncompressed and contiguous: pages read as needed
            except (ValueError, OSError):
                return zarr.open(tifffile.imread(str(p), aszarr=True), mode="r")
        if suffix == ".npy":
            return np.load(str(p), mmap_mode="r")
        from ._files import read_image

        return read_image(path)
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader's failure, named
        raise CLIError(f"cannot read {what} {path!r}: {error_text(exc)}") from exc


def open_lazy(path: str, what: str, tile: int):
    """``path`` as a :class:`LazyFile` (shape, dtype), opened on whichever process reads it."""
    _dask_modules()
    if not Path(path).exists():
        raise CLIError(f"{what} {path!r} does not exist")
    return LazyFile(path, what)


def _progress(total, disable):
    """A dask callback that shows a tqdm bar of the tiles computed (the threaded scheduler)."""
    from dask.callbacks import Callback
    from tqdm import tqdm

    class Bar(Callback):
        def __init__(self):
            super().__init__()
            self.bar = tqdm(total=total, unit="tile", disable=disable, file=sys.stderr, dynamic_ncols=True)

        def _posttask(self, key, result, dsk, state, worker_id):
            name = key[0] if isinstance(key, tuple) else key
            if isinstance(name, str) and name.startswith("cucrf-infer"):
                self.bar.update(1)

        def _finish(self, dsk, state, errored):
            self.bar.close()

    return Bar()


def run_tiles(args, client_factory) -> int:
    """Refine one large image (per IMAGE) tile by tile; ``client_factory(args)`` gives a distributed client or None."""
    from .._validation import ProblemTooLargeError  # noqa: F401 - documented failure mode of each tile
    from ._files import check_output_paths, load_feature_transform, load_params

    _dask_modules()
    n = len(args.images)
    if args.output is None:
        raise UsageError("large images need -o OUT.zarr or -o OUT.tif (one per image), not --out-dir")
    if len(args.output) != n or len(args.unary) != n:
        raise UsageError(f"got {n} image(s), {len(args.unary)} --unary file(s) and {len(args.output)} -o path(s); "
                         "give one unary and one output per image")
    unsupported = [option for option, value in (("--save-probabilities", args.save_probabilities),
                                                ("--overlay", args.overlay), ("--comparison", args.comparison))
                   if value is not None]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)} are for pictures in memory; a large image writes its labels only "
                         "(leave them out)")
    outputs = [Path(o) for o in args.output]
    for o in outputs:
        if _suffix(o) not in TILED_OUTPUTS:
            raise CLIError(f"output {str(o)!r}: a large image's labels are written to a .zarr folder or a .tif file; "
                           "expected -o OUT.zarr or -o OUT.tif")
    check_output_paths([("-o/--output", o) for o in outputs],
                       [("image", i) for i in args.images] + [("unary", u) for u in args.unary])
    todo = []
    for image, unary, out in zip(args.images, args.unary, outputs):
        if os.path.lexists(out) and args.resume:
            print(f"{out}  (exists, skipped: --resume)")
            continue
        todo.append((image, unary, out))
    check_not_existing([o for _, _, o in todo], args)
    params = load_params(args.params)
    transform = load_feature_transform(args.feature_transform) if args.feature_transform is not None else None
    tile = args.tile or DEFAULT_TILE
    client = client_factory(args) if (args.workers or args.scheduler) else None
    token = uuid.uuid4().hex[:12]
    try:
        for image, unary, out in todo:
            try:
                _refine_large(image, unary, out, args, params, transform, tile, client, token)
            finally:
                remove_temporaries([out.parent], token)
    finally:
        if client is not None:
            from ._many import close_client

            close_client(client)
    return 0


def _refine_large(ipath, upath, out, args, params, transform, tile, client, token):
    import dask
    import dask.array as da

    from .. import dask as cucrf_dask
    from ..dask import label_dtype

    start = time.perf_counter()
    image = open_lazy(ipath, "image", tile)
    if image.ndim == 2:
        image.with_channel_axis()
    elif image.ndim != 3:
        raise CLIError(f"image {ipath!r} has shape {image.shape}; expected (H, W) or (H, W, F)")
    H, W = image.shape[:2]
    chunks = (min(H, tile), min(W, tile))
    unary = open_lazy(upath, "unary", tile)
    kind = args.unary_kind
    if kind is None:
        kind = "labels" if (unary.ndim == 2 and np.issubdtype(unary.dtype, np.integer)) else "logits"
    if kind == "labels":
        if unary.shape != (H, W):
            raise CLIError(f"label map {upath!r} has shape {unary.shape} but image {ipath!r} is {H}x{W}; "
                           f"expected ({H}, {W})")
    else:
        if unary.ndim != 3 or unary.shape[1:] != (H, W):
            raise CLIError(f"unary {upath!r} has shape {unary.shape} but image {ipath!r} is {H}x{W}; expected "
                           f"(C, {H}, {W})")
        if unary.dtype == np.float16:
            unary.as_dtype(np.float32)  # networks often store float16 scores; computed in float32
    extra = {}
    if kind == "labels":
        unknown = None if args.unknown_label is None or args.unknown_label < 0 else args.unknown_label
        num_classes = args.num_classes
        if num_classes is None:  # one pass over the label map, chunk by chunk
            as_int = da.from_array(unary, chunks=chunks, name=f"labels-{uuid.uuid4().hex}").astype(np.int64)
            known = as_int if unknown is None else da.where(as_int == unknown, -1, as_int)
            num_classes = max(int(known.max().compute()) + 1, 2)
        extra.update(num_classes=num_classes, confidence=args.confidence, unknown_label=unknown)
    else:
        num_classes = unary.shape[0]
    if transform is not None:
        extra["feature_transform"] = transform
    try:
        # Each tile reads its own window from the files: memory is bounded by the tiles in flight.
        labels = cucrf_dask.infer_stored(
            unary, image, params, chunks=tile, filter_size=args.filter_size, blur=args.blur, iterations=args.iterations,
            normalization=normalization(args.normalization), include_self=bool(getattr(args, "include_self", False)),
            unary_kind=kind, output="labels", device=args.device, **extra)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{ipath}: {error_text(exc)}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(out, token)
    tiles = int(np.prod([len(c) for c in labels.chunks]))
    disable = args.no_progress
    try:
        if _suffix(out) == ".zarr":
            _write_zarr(labels, tmp, client, tiles, disable)
        else:
            _write_tiff(labels, tmp, client, tiles, disable, ipath)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{ipath}: {error_text(exc)}") from exc
    replace(tmp, out)
    seconds = time.perf_counter() - start
    print(f"{out}  ({H}x{W}, {num_classes} classes, {tiles} tiles, {seconds:.1f} s, "
          f"{H * W / seconds / 1e6:.2f} Mpx/s, labels {label_dtype(num_classes)})")


def _compute(task, client, tiles, disable):
    """Run a dask collection on the client, or on local threads with a progress bar."""
    import dask

    if client is not None:
        future = client.compute(task)
        if not disable:
            from distributed import progress

            progress(future)
        future.result()
        return
    # Two cucrf threads per tile and half as many tiles at once as cores: as fast as one thread per
    # tile, with half the tiles (and memory) in flight.
    threads = os.environ.get("CUCRF_NUM_THREADS")
    os.environ.setdefault("CUCRF_NUM_THREADS", "2")
    try:
        with _progress(tiles, disable):
            dask.compute(task, scheduler="threads", num_workers=max(1, (os.cpu_count() or 1) // 2))
    finally:
        if threads is None:
            os.environ.pop("CUCRF_NUM_THREADS", None)


def _write_zarr(labels, tmp, client, tiles, disable):
    import zarr

    store = zarr.open_array(str(tmp), mode="w", shape=labels.shape, chunks=tuple(c[0] for c in labels.chunks),
                            dtype=labels.dtype)
    # Every output chunk is one Zarr chunk: writers never share a chunk, so no lock is needed.
    task = labels.store(store, lock=False, compute=False)
    _compute(task, client, tiles, disable)


def _write_tiff(labels, tmp, client, tiles, disable, ipath):
    """A tiled, compressed TIFF written one band of chunks at a time (each band computed in parallel)."""
    import tifffile

    side = 256  # TIFF tile side
    H, W = labels.shape
    bar = _progress_bar(tiles, disable)

    def bands():
        y = 0
        for rows in labels.chunks[0]:
            band = labels[y:y + rows]
            if client is not None:
                values = client.compute(band).result()
            else:
                import dask

                (values,) = dask.compute(band, scheduler="threads", num_workers=max(1, (os.cpu_count() or 1) // 2))
            bar.update(len(labels.chunks[1]))
            yield np.asarray(values)
            y += rows

    def tiles_in_order():
        # Rows wait in a buffer until a whole row of TIFF tiles is there: at most a band plus
        # side - 1 rows are held.
        buffer = np.zeros((0, W), dtype=labels.dtype)
        for band in bands():
            buffer = np.concatenate([buffer, band]) if buffer.size else band
            while buffer.shape[0] >= side:
                yield from _tile_row(buffer[:side], side)
                buffer = buffer[side:]
        if buffer.shape[0]:
            yield from _tile_row(buffer, side)

    try:
        tifffile.imwrite(str(tmp), tiles_in_order(), shape=(H, W), dtype=labels.dtype, tile=(side, side),
                         compression="zlib", bigtiff=H * W * labels.dtype.itemsize > 2**31)
    finally:
        bar.close()


def _tile_row(rows, side):
    """The TIFF tiles of up to ``side`` rows, left to right, the edge tiles padded with zeros."""
    for x in range(0, rows.shape[1], side):
        block = rows[:, x:x + side]
        if block.shape != (side, side):
            padded = np.zeros((side, side), dtype=block.dtype)
            padded[:block.shape[0], :block.shape[1]] = block
            block = padded
        yield block


def _progress_bar(total, disable):
    from tqdm import tqdm

    return tqdm(total=total, unit="tile", disable=disable, file=sys.stderr, dynamic_ncols=True)


__all__ = ["TILED_OUTPUTS", "is_tiled", "add_options", "run_tiles", "open_lazy", "temporary_path",
           "remove_temporaries", "replace", "check_not_existing", "IGNORE"]
