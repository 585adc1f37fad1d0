"""Exact tiled inference on Dask arrays: images of any size, on many cores, GPUs and machines.

:func:`infer` runs :func:`cucrf.infer` on every chunk of a Dask array together with the context
the chunk's pixels depend on (:func:`cucrf.receptive_radius`), cut on the whole image's pooling
grid, so that the result equals :func:`cucrf.infer` on the whole array (docs/scale.md derives
why). It is built on :func:`dask.array.map_overlap`: any Dask scheduler runs it (threads,
processes, a ``dask.distributed`` cluster), and the chunks may be NumPy or CuPy arrays.
:func:`infer_stored` does the same on arrays that stay on disk (Zarr, memory maps), each tile
reading its own window, so that memory is bounded by the tiles being computed.

Needs the ``dask`` extra (``pip install "cucrf[dask]"``); ``import cucrf`` does not load this module.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

try:
    import dask.array as da
    from dask.array.overlap import ensure_minimum_chunksize
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cucrf.dask needs Dask: pip install 'cucrf[dask]' (dask[array], distributed, zarr, "
                      "tifffile)") from exc

from ._api import (
    DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS, _check_params, _choice, check_config,
    check_feature_transform,
)
from ._diagnostics import check_unary_layout
from ._radius import axis_radius, tile_span
from ._spatial import check_spatial_dims, resolve_spatial_dims
from ._validation import check_compute_dtype, check_float_array, check_image, check_int

__all__ = ["infer", "infer_stored", "tile_context", "label_dtype", "argmax_classes"]

_OUTPUTS = ("probabilities", "logits", "labels")


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds the ids ``0 .. num_classes - 1`` (uint8 up to 256)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def tile_context(config, nd: int) -> tuple:
    """Pixels of context a tile needs on each side, per spatial axis.

    The receptive radius (the farther of the unary's and the image's reach), and at least the
    window's half-width plus one cell, so that a tile is never smaller than the window allows
    (:func:`cucrf.infer` refuses windows wider than the image).
    """
    sizes = config.filter_sizes(nd)
    blurs = config.blurs(nd)
    widest = max(sizes) // 2 + 1
    return tuple(max(axis_radius(k, b, config.iterations, config.normalization == "symmetric"), widest * b)
                 for k, b in zip(sizes, blurs))


def _describe(value) -> str:
    kind = type(value)
    return f"{kind.__module__.split('.')[0]}.{kind.__name__}"


def infer(unary, image, params=None, *, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
          iterations=DEFAULT_ITERATIONS, unary_kind="logits", num_classes=None, confidence=None,
          unknown_label=None, clip=1e-5, normalization=None, include_self=False, output="probabilities",
          dtype=None, device=None, feature_transform=None, spatial_dims=None, spacing=None):
    """:func:`cucrf.infer` on Dask arrays, tile by tile, with the same result.

    Each chunk is computed with the context its pixels depend on (the receptive radius, rounded
    out to the whole image's pooling cells), so the output equals :func:`cucrf.infer` on the whole
    array (to rounding: float64 within 1e-12, float32 within 1e-5), whatever the chunking.

    Parameters
    ----------
    unary : dask.array.Array, shape (C, H, W) or (B, C, H, W); volumes (C, D, H, W) or (B, C, D, H, W)
        Class scores (or probabilities, or an integer label map (H, W) / (B, H, W) with
        ``unary_kind='labels'``), chunked along the spatial (and batch) axes; the classes in one chunk.
        Chunks may be NumPy or CuPy arrays (Dask's ``array.backend``).
    image : dask.array.Array, shape (H, W, F) or (B, H, W, F); volumes (D, H, W, F) or (B, D, H, W, F)
        Chunked exactly as ``unary`` along the spatial and batch axes; the channels in one chunk.
    params, filter_size, blur, iterations, unary_kind, num_classes, confidence, unknown_label, clip, \
normalization, include_self, dtype, device, feature_transform, spatial_dims, spacing
        As for :func:`cucrf.infer`.
    output : {'probabilities', 'logits', 'labels'}
        ``'labels'``: the argmax over classes of the probabilities as uint8 (uint16 beyond 256
        classes, ...), shape (H, W) or (B, H, W): a small result to store.

    Returns
    -------
    dask.array.Array
        Probabilities or logits shaped like a (C, ...) unary, or labels without the class axis;
        chunked like the inputs (chunks smaller than the context are merged with a neighbour
        first), each chunk of the input chunks' kind (NumPy or CuPy). Nothing is computed until
        you compute or store it.

    Raises
    ------
    TypeError
        For inputs that are not Dask arrays (use :func:`cucrf.infer` for arrays in memory).
    ValueError
        For a class or channel axis split across chunks, a unary and image chunked differently,
        and everything :func:`cucrf.infer` refuses from shapes and settings alone; errors that
        need the values (NaN, magnitudes) are raised when a tile is computed.

    Notes
    -----
    The overlap each chunk reads on each side is :func:`tile_context` plus ``blur - 1`` pixels
    per axis: with the defaults (filter 5, blur 4, 5 iterations) 64 pixels, so 2048 x 2048 chunks
    compute 13 % more pixels than they return (docs/scale.md).

    Examples
    --------
    >>> import numpy as np, dask.array as da, cucrf, cucrf.dask
    >>> rng = np.random.default_rng(0)
    >>> unary = rng.normal(size=(3, 300, 200)); image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    >>> tiled = cucrf.dask.infer(da.from_array(unary, chunks=(3, 128, 128)),
    ...                          da.from_array(image, chunks=(128, 128, 3)))
    >>> bool(np.abs(tiled.compute() - cucrf.infer(unary, image)).max() < 1e-12)
    True
    """
    checked = _check(unary, image, params, filter_size=filter_size, blur=blur, iterations=iterations,
                     unary_kind=unary_kind, num_classes=num_classes, confidence=confidence,
                     unknown_label=unknown_label, clip=clip, normalization=normalization, include_self=include_self,
                     output=output, dtype=dtype, device=device, feature_transform=feature_transform,
                     spatial_dims=spatial_dims, spacing=spacing)
    return _overlapped(unary, image, checked)


def _check(unary, image, params, *, filter_size, blur, iterations, unary_kind, num_classes, confidence,
           unknown_label, clip, normalization, include_self, output, dtype, device, feature_transform,
           spatial_dims, spacing):
    """Every check of :func:`infer` that needs no values; returns a :class:`_Checked`."""
    for name, value in (("unary", unary), ("image", image)):
        if not isinstance(value, da.Array):
            raise TypeError(f"cucrf.dask.infer takes Dask arrays, but {name} is a {_describe(value)}; use "
                            f"cucrf.infer for arrays in memory, or wrap it: dask.array.from_array({name}, chunks=...)")
    _choice("unary_kind", unary_kind, ("logits", "probabilities", "labels"))
    _choice("output", output, _OUTPUTS)
    _choice("device", device, (None, "cpu", "gpu"))
    dtype = check_compute_dtype(dtype)
    nd = resolve_spatial_dims(check_spatial_dims(spatial_dims), unary.shape, image.shape, unary_kind)
    labels_in = unary_kind == "labels"
    if labels_in:
        if num_classes is None:
            raise ValueError("unary_kind='labels' needs num_classes")
        num_classes = check_int("num_classes", num_classes, minimum=2)
        check_float_array("unary", unary, np, ndims=(nd, nd + 1), allow_int=True, finite=False)
        batched = unary.ndim == nd + 1
        classes = num_classes
    else:
        check_unary_layout(unary, image, nd)
        check_float_array("unary", unary, np, ndims=(nd + 1, nd + 2), finite=False)
        batched = unary.ndim == nd + 2
        classes = unary.shape[-nd - 1]
        if classes < 2:
            raise ValueError(f"unary must have at least 2 classes on axis {unary.ndim - nd - 1}, got shape "
                             f"{tuple(unary.shape)}")
    size = tuple(int(n) for n in unary.shape[-nd:])
    batch = unary.shape[0] if batched else 1
    check_image(image, np, batch, size, batched, finite=False)
    channels = image.shape[-1]
    transform = check_feature_transform(feature_transform, channels)
    config = check_config(filter_size, blur, iterations, normalization, size, keep_centre=include_self,
                          spacing=spacing)
    params = _check_params(params, classes, channels if transform is None else transform[0].shape[0])

    # The axes that must each be one chunk, and the chunking the two inputs must share.
    if not labels_in and len(unary.chunks[-nd - 1]) > 1:
        axis = unary.ndim - nd - 1
        raise ValueError(f"unary's class axis (axis {axis}, {classes} classes) is split into chunks "
                         f"{unary.chunks[axis]}; keep the classes of a pixel in one chunk: "
                         f"unary = unary.rechunk({{{axis}: -1}})")
    if len(image.chunks[-1]) > 1:
        raise ValueError(f"image's channel axis (axis {image.ndim - 1}, {channels} channels) is split into chunks "
                         f"{image.chunks[-1]}; keep the channels of a pixel in one chunk: "
                         f"image = image.rechunk({{{image.ndim - 1}: -1}})")
    u_spatial = unary.chunks[-nd:]
    i_spatial = image.chunks[-nd - 1:-1]
    u_batch = unary.chunks[0] if batched else ()
    i_batch = image.chunks[0] if batched else ()
    if u_spatial != i_spatial or u_batch != i_batch:
        wanted = ((u_batch,) if batched else ()) + tuple(u_spatial) + (image.shape[-1],)
        raise ValueError(
            f"unary and image are chunked differently along the {'batch and ' if batched else ''}spatial axes "
            f"(unary {tuple(len(c) for c in u_spatial)} chunks of sizes {_chunk_text(u_spatial)}, image "
            f"{tuple(len(c) for c in i_spatial)} of sizes {_chunk_text(i_spatial)}); chunk them alike, e.g. "
            f"image = image.rechunk({_chunks_literal(wanted)})")

    checked = _Checked(nd, size, config, labels_in, batched, classes, output, dtype, dict(
        params=params, filter_size=config.filter_size, blur=config.blur, iterations=config.iterations,
        unary_kind=unary_kind, num_classes=num_classes, confidence=confidence, unknown_label=unknown_label,
        clip=clip, normalization=normalization, include_self=config.keep_centre, device=device,
        feature_transform=feature_transform, spatial_dims=nd, spacing=spacing))
    return checked


@dataclasses.dataclass
class _Checked:
    """What :func:`_check` found: the geometry, the settings and the options of each tile's infer."""

    nd: int
    size: tuple
    config: object
    labels_in: bool
    batched: bool
    classes: int
    output: str
    dtype: object
    options: dict

    def compute_dtype(self, unary_dtype):
        return self.dtype if self.dtype is not None else (
            np.dtype(np.float64) if unary_dtype == np.float64 else np.dtype(np.float32))

    def out_dtype(self, unary_dtype):
        return label_dtype(self.classes) if self.output == "labels" else self.compute_dtype(unary_dtype)

    def tile_options(self, unary_dtype):
        return dict(self.options, dtype=self.compute_dtype(unary_dtype))


def _overlapped(unary, image, checked):
    """The Dask graph of :func:`infer`: map_overlap with the exact depth, one tile per chunk."""
    nd, size, config = checked.nd, checked.size, checked.config
    blurs = config.blurs(nd)
    context = tile_context(config, nd)
    # Each block reads its neighbours' pixels up to the context plus blur - 1, the room to move a
    # tile's ends onto the whole image's cell grid; an axis no longer than that is one chunk.
    depths = []
    spatial_chunks = []
    for a in range(nd):
        depth = context[a] + blurs[a] - 1
        chunks = unary.chunks[unary.ndim - nd + a]
        if depth >= size[a]:
            chunks, depth = (size[a],), 0
        else:
            chunks = ensure_minimum_chunksize(depth, chunks)
        depths.append(depth)
        spatial_chunks.append(tuple(chunks))
    if checked.labels_in:
        unary = unary[..., None, :, :] if nd == 2 else unary[..., None, :, :, :]  # a class axis of length 1
    u_axes = tuple(range(unary.ndim - nd, unary.ndim))
    unary = unary.rechunk(dict(zip(u_axes, spatial_chunks)))
    # Blocks are matched axis by axis from the right: the image's channels go in front of its
    # spatial axes, where the unary has its classes ((B, F, H, W) against (B, C, H, W)); the
    # tile puts them back.
    image = da.moveaxis(image, -1, -nd - 1).rechunk(dict(zip(u_axes, spatial_chunks)))
    out_dtype = checked.out_dtype(unary.dtype)
    lead = ((unary.chunks[0],) if checked.batched else ())
    classes = () if checked.output == "labels" else ((checked.classes,),)
    out_chunks = lead + classes + tuple(spatial_chunks)
    kwargs = {"drop_axis": [unary.ndim - nd - 1]} if checked.output == "labels" else {}
    bounds = tuple(tuple(int(v) for v in np.cumsum((0,) + c)) for c in spatial_chunks)
    tile = functools.partial(_tile, nd=nd, size=size, blurs=blurs, context=context, depths=tuple(depths),
                             bounds=bounds, output=checked.output, options=checked.tile_options(unary.dtype))
    return da.map_overlap(
        tile, unary, image, depth=dict(zip(u_axes, depths)), boundary="none", trim=False, align_arrays=False,
        allow_rechunk=False, dtype=out_dtype, chunks=out_chunks, meta=_meta(unary, len(out_chunks), out_dtype),
        name="cucrf-infer", **kwargs)


def _chunk_text(chunks) -> str:
    return " x ".join(str(tuple(c)) if len(c) <= 4 else f"({c[0]}, {c[1]}, ..., {c[-1]})" for c in chunks)


def _chunks_literal(chunks) -> str:
    parts = []
    for c in chunks:
        if isinstance(c, int):
            parts.append(str(c))
        elif len(set(c[:-1])) <= 1 and c[-1] <= c[0]:
            parts.append(str(c[0]))  # regular: dask accepts the block size
        else:
            parts.append(str(tuple(c)))
    return "(" + ", ".join(parts) + ")"


def _meta(unary, ndim, dtype):
    """An empty array of the kind of ``unary``'s chunks (NumPy or CuPy) with ``ndim`` dimensions."""
    from dask.array.utils import meta_from_array

    return meta_from_array(unary._meta, ndim=ndim, dtype=dtype)


def _tile(u, im, *, nd, size, blurs, context, depths, bounds, output, options, block_info=None):
    """Compute one chunk: cut the tile out of the overlapped block, run :func:`cucrf.infer`, crop.

    ``u`` and ``im`` are the chunk's blocks with up to ``depths`` pixels of each neighbour on
    each side (classes and channels in front of the spatial axes); ``bounds`` the chunk
    boundaries along each spatial axis of the whole array.
    """
    location = block_info[0]["chunk-location"][-nd:]
    tile, crop = [], []
    for a in range(nd):
        i = location[a]
        start, stop = bounds[a][i], bounds[a][i + 1]
        origin = start - (depths[a] if i > 0 else 0)
        extent = u.shape[u.ndim - nd + a]
        expected = stop - start + (depths[a] if i > 0 else 0) + (depths[a] if i + 1 < len(bounds[a]) - 1 else 0)
        if extent != expected:  # pragma: no cover - would be a change in dask's overlap
            raise RuntimeError(f"block {tuple(location)} of axis {a} has {extent} pixels, expected {expected}")
        lo, hi = tile_span(start, stop, size[a], blurs[a], context[a])
        tile.append(slice(lo - origin, hi - origin))
        crop.append(slice(start - lo, stop - lo))
    xp = _namespace(u)
    u_t = u[(Ellipsis,) + tuple(tile)]
    if options["unary_kind"] == "labels":
        u_t = u_t[(Ellipsis, 0) + (slice(None),) * nd]
    im_t = xp.moveaxis(im[(Ellipsis,) + tuple(tile)], -nd - 1, -1)
    return _run_tile(u_t, im_t, crop, nd, output, options)


def _run_tile(u_t, im_t, crop, nd, output, options):
    """:func:`cucrf.infer` on one tile, cropped to its core; labels as their smallest dtype."""
    from ._api import infer as infer_whole

    xp = _namespace(u_t)
    if xp is not np:  # the CUDA kernels want contiguous arrays (NumPy takes the views as they are)
        u_t, im_t = xp.ascontiguousarray(u_t), xp.ascontiguousarray(im_t)
    opts = dict(options)
    opts["output"] = "logits" if output == "logits" else "probabilities"
    if opts["device"] is not None:
        opts["like"] = u_t  # computed where device= says, handed back as the chunk's kind
    q = infer_whole(u_t, im_t, **opts)
    q = q[(Ellipsis,) + tuple(crop)]
    if output == "labels":
        return argmax_classes(q, q.ndim - nd - 1)
    return q


def infer_stored(unary, image, params=None, *, chunks=1024, filter_size=DEFAULT_FILTER_SIZE,
                 blur=DEFAULT_BLUR, iterations=DEFAULT_ITERATIONS, unary_kind="logits", num_classes=None,
                 confidence=None, unknown_label=None, clip=1e-5, normalization=None, include_self=False,
                 output="probabilities", dtype=None, device=None, feature_transform=None, spatial_dims=None,
                 spacing=None):
    """:func:`infer` on arrays that stay where they are stored, each tile reading its own window.

    :func:`infer` shares the overlap between Dask chunks, so Dask keeps a chunk until every
    neighbour has used it: memory grows with a band of chunks across the image. Here every
    output chunk is one task that reads the tile it needs (its core and the context) straight
    from ``unary`` and ``image``, so memory is bounded by the tiles being computed, whatever the
    image's size, at the price of reading the overlaps twice.

    Parameters
    ----------
    unary, image : array-like
        Shapes as for :func:`infer`, in any object with ``shape``, ``dtype``, ``ndim`` and NumPy
        slicing that reads only what is asked: a Zarr array, a memory-mapped ``.npy`` or TIFF, an
        HDF5 dataset, a generator of regions. On a ``dask.distributed`` cluster they are sent to
        the workers: give objects that pickle by reference (a Zarr array pickles as its store),
        not memory maps.
    chunks : int or tuple of int
        The output chunks' size along each spatial axis (one tile per chunk).
    params, filter_size, blur, iterations, unary_kind, num_classes, confidence, unknown_label, clip, normalization, include_self, output, dtype, device, feature_transform, spatial_dims, spacing
        As for :func:`infer`.

    Returns
    -------
    dask.array.Array
        As :func:`infer` returns it (NumPy chunks), chunked ``chunks`` along the spatial axes.

    Examples
    --------
    >>> import numpy as np, cucrf, cucrf.dask
    >>> rng = np.random.default_rng(0)
    >>> unary = rng.normal(size=(2, 300, 200)); image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    >>> labels = cucrf.dask.infer_stored(unary, image, chunks=128, output="labels")
    >>> bool((labels.compute() == cucrf.infer(unary, image).argmax(axis=0)).all())
    True
    """
    import uuid

    for name, value in (("unary", unary), ("image", image)):
        if isinstance(value, da.Array):
            raise TypeError(f"cucrf.dask.infer_stored reads stored arrays itself, but {name} is a Dask array; use "
                            "cucrf.dask.infer for Dask arrays")
        if not all(hasattr(value, a) for a in ("shape", "dtype", "__getitem__")):
            raise TypeError(f"{name} must be an array-like with shape, dtype and slicing (a Zarr array, a memory "
                            f"map, ...), got {_describe(value)}")
    nd = resolve_spatial_dims(check_spatial_dims(spatial_dims), unary.shape, image.shape, unary_kind)
    sides = chunks if isinstance(chunks, (tuple, list)) else (chunks,) * nd
    if len(sides) != nd:
        raise ValueError(f"chunks must be an int or {nd} ints (one per spatial axis), got {chunks!r}")
    sides = tuple(check_int(f"chunks[{a}]", c, minimum=1) for a, c in enumerate(sides))
    # Stand-ins for the checks: Dask arrays over the sources that are never computed.
    token = uuid.uuid4().hex
    spatial = tuple(min(c, n) for c, n in zip(sides, unary.shape[-nd:]))
    lead = unary.shape[:-nd]
    u_view = da.from_array(unary, chunks=tuple(lead) + spatial, name=f"stored-unary-{token}")
    im_view = da.from_array(image, chunks=tuple(image.shape[:-nd - 1]) + spatial + (image.shape[-1],),
                            name=f"stored-image-{token}")
    checked = _check(u_view, im_view, params, filter_size=filter_size, blur=blur, iterations=iterations,
                     unary_kind=unary_kind, num_classes=num_classes, confidence=confidence,
                     unknown_label=unknown_label, clip=clip, normalization=normalization, include_self=include_self,
                     output=output, dtype=dtype, device=device, feature_transform=feature_transform,
                     spatial_dims=nd, spacing=spacing)
    config = checked.config
    blurs = config.blurs(nd)
    batch = ((1,) * unary.shape[0],) if checked.batched else ()
    classes = () if output == "labels" else ((checked.classes,),)
    out_chunks = batch + classes + tuple(da.core.normalize_chunks(c, (n,))[0] for c, n in zip(sides, checked.size))
    out_dtype = checked.out_dtype(np.dtype(unary.dtype))
    task = functools.partial(_stored_tile, unary, image, nd=nd, size=checked.size, blurs=blurs,
                             context=tile_context(config, nd), batched=checked.batched, output=output,
                             options=checked.tile_options(np.dtype(unary.dtype)))
    return da.map_blocks(task, chunks=out_chunks, dtype=out_dtype, meta=np.empty((0,) * len(out_chunks), out_dtype),
                         name=f"cucrf-infer-stored-{token}")


def _stored_tile(unary, image, *, nd, size, blurs, context, batched, output, options, block_info=None):
    """One output chunk of :func:`infer_stored`: read its tile from the sources, run it, crop."""
    where = block_info[None]["array-location"]
    tile, crop = [], []
    for a, (start, stop) in enumerate(where[-nd:]):
        lo, hi = tile_span(start, stop, size[a], blurs[a], context[a])
        tile.append(slice(lo, hi))
        crop.append(slice(start - lo, stop - lo))
    lead = (slice(*where[0]),) if batched else ()
    labels_in = options["unary_kind"] == "labels"
    u_t = np.asarray(unary[lead + (() if labels_in else (slice(None),)) + tuple(tile)])
    im_t = np.asarray(image[lead + tuple(tile) + (slice(None),)])
    return _run_tile(u_t, im_t, crop, nd, output, options)


def argmax_classes(scores, axis):
    """``scores.argmax(axis)`` as :func:`label_dtype` labels, in one pass per class (the first maximum wins).

    Faster than ``argmax`` over a leading axis, which NumPy walks with strides.
    """
    xp = _namespace(scores)
    classes = scores.shape[axis]
    take = (lambda c: scores[(slice(None),) * axis + (c,)])
    best = take(0).copy()
    labels = xp.zeros(best.shape, dtype=label_dtype(classes))
    for c in range(1, classes):
        value = take(c)
        better = value > best
        labels[better] = c
        xp.maximum(best, value, out=best)
    return labels


def _namespace(array):
    """NumPy or CuPy, after the array."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np
