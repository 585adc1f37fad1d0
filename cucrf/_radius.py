"""The receptive radius of mean-field inference, and the tiles that reproduce it exactly.

A pixel's output after ``T`` iterations depends only on the inputs within a finite distance of
it, per spatial axis (docs/scale.md derives it). :func:`receptive_radius` gives that distance;
:func:`tile_span` the part of an axis that a tile of it must be computed on so that its core
comes out exactly as in the whole axis.

Along one axis, with blur ``b``, window half-width ``r = k // 2`` (in cells) and ``T >= 1``:

* ``b = 1``: ``T r`` for the unary, ``T r + r`` for the image with symmetric normalisation;
* ``b >= 2``: ``T (r + 1) b + floor(b / 2) - 1`` for the unary, plus ``(r + 1) b`` for the
  image with symmetric normalisation; without normalisation the image reaches as far as the
  unary.
"""

from __future__ import annotations

__all__ = ["receptive_radius", "axis_radius", "tile_span"]


def axis_radius(filter_size: int, blur: int, iterations: int, normalized: bool = False) -> int:
    """The receptive radius along one axis, in pixels (see :func:`receptive_radius`)."""
    k, b, t = int(filter_size), int(blur), int(iterations)
    if t == 0:
        return 0  # softmax(a U): each pixel on its own
    r = k // 2
    if b == 1:
        # No pooling: each iteration reads the window, r pixels; the normaliser of the farthest
        # pixel reads its own window of image features.
        return t * r + (r if normalized else 0)
    # The first (last computed) iteration reads the two upsampling taps: from the worst phase of
    # a cell, the far tap is the neighbouring cell, b + floor(b/2) - 1 pixels away at its far
    # end; the window adds r cells. Every earlier iteration starts from a cell's edge pixel, whose
    # far tap is the next cell: r + 1 cells. The normaliser of the farthest pixel adds one more
    # tap and window of image features.
    return t * (r + 1) * b + b // 2 - 1 + ((r + 1) * b if normalized else 0)


def receptive_radius(filter_size=None, blur=None, iterations=None, *, normalization=None, spatial_dims=None):
    """How far a pixel's output reaches into the inputs, per spatial axis.

    After ``iterations`` mean-field updates the output at a pixel depends only on the unary and
    image within ``r_a`` pixels of it along each spatial axis ``a``; a change at ``r_a + 1``
    leaves it bit-identical, and a change at ``r_a`` can change it (the radius is tight: it is
    reached from the pixels at the worst position in their pooling cell). docs/scale.md derives it.

    Parameters
    ----------
    filter_size : int or tuple of int, optional
        Odd window width (or one per axis), as for :func:`cucrf.infer`; default
        :data:`cucrf.DEFAULT_FILTER_SIZE`.
    blur : int or tuple of int, optional
        Blur factor (or one per axis); default :data:`cucrf.DEFAULT_BLUR`.
    iterations : int, optional
        Number of mean-field updates; default :data:`cucrf.DEFAULT_ITERATIONS`.
    normalization : {None, 'symmetric'}
        Symmetric normalisation reaches one window further into the image.
    spatial_dims : {None, 2, 3}
        Number of spatial axes; None: the length of a tuple ``filter_size`` or ``blur``, else 2.

    Returns
    -------
    tuple of int
        One radius in pixels per spatial axis, ``(r_y, r_x)`` or ``(r_z, r_y, r_x)``: the farther
        of the unary's and the image's reach.

    Examples
    --------
    >>> import cucrf
    >>> cucrf.receptive_radius(5, 4, 5)
    (61, 61)
    >>> cucrf.receptive_radius((1, 5, 5), (1, 4, 4), 2, spatial_dims=3)
    (0, 25, 25)
    """
    from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS, _choice
    from ._spatial import check_per_axis, check_spatial_dims
    from ._validation import check_int

    filter_size = DEFAULT_FILTER_SIZE if filter_size is None else filter_size
    blur = DEFAULT_BLUR if blur is None else blur
    iterations = DEFAULT_ITERATIONS if iterations is None else iterations
    nd = check_spatial_dims(spatial_dims)
    if nd is None:
        lengths = {len(v) for v in (filter_size, blur) if isinstance(v, (tuple, list))}
        if len(lengths) > 1:
            raise ValueError(f"filter_size {tuple(filter_size)} and blur {tuple(blur)} give different numbers of "
                             "axes; give both for the same axes (or one as an int)")
        nd = lengths.pop() if lengths else 2
    sizes = check_per_axis("filter_size", filter_size, nd, minimum=1, odd=True)
    blurs = check_per_axis("blur", blur, nd, minimum=1)
    iterations = check_int("iterations", iterations, minimum=0)
    _choice("normalization", normalization, (None, "symmetric"))
    sizes = sizes if isinstance(sizes, tuple) else (sizes,) * nd
    blurs = blurs if isinstance(blurs, tuple) else (blurs,) * nd
    return tuple(axis_radius(k, b, iterations, normalization == "symmetric") for k, b in zip(sizes, blurs))


def tile_span(start: int, stop: int, size: int, blur: int, radius: int):
    """The part of an axis to compute so that pixels ``start:stop`` come out as in the whole axis.

    ConvCRF's pooling geometry depends on the length of the axis (its padding), so a tile computed
    on its own must have the same cells as the whole axis: a tile ``lo:hi`` with ``lo`` a
    multiple of ``blur`` and ``hi`` congruent to ``size`` modulo ``blur`` has the whole axis's
    padding and cells (those at its two ends that are not ends of the axis may be cut short).
    It must also hold every whole cell within ``radius`` of ``start:stop``; a cut cell outside
    that reach changes nothing inside it.

    Parameters
    ----------
    start, stop : int
        The pixels wanted, ``0 <= start < stop <= size``.
    size : int
        Length of the whole axis.
    blur : int
        Blur factor along the axis.
    radius : int
        Receptive radius along the axis (:func:`axis_radius`).

    Returns
    -------
    (lo, hi) : tuple of int
        ``lo <= start - radius`` (or 0), ``hi >= stop + radius`` (or ``size``), each at most
        ``blur - 1`` further.
    """
    b = int(blur)
    lo = max(0, start - radius)
    lo -= lo % b
    hi = min(size, stop + radius)
    hi += (size - hi) % b
    return lo, min(hi, size)
