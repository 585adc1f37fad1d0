"""Checks of the spatial settings: images (2 axes) or volumes (3 axes), per-axis window and blur,
and the pixel spacing."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._validation import check_int

__all__ = ["SPATIAL_DIMS", "check_spatial_dims", "check_per_axis", "check_spacing", "resolve_spatial_dims",
           "axes_text"]

#: The numbers of spatial axes cucrf computes on: images (H, W) and volumes (D, H, W).
SPATIAL_DIMS = (2, 3)


def axes_text(nd: int) -> str:
    """``'(H, W)'`` or ``'(D, H, W)'``."""
    return "(H, W)" if nd == 2 else "(D, H, W)"


def check_spatial_dims(spatial_dims):
    """Return ``spatial_dims`` as 2 or 3 (None stays None: images, unless the shapes say otherwise)."""
    if spatial_dims is None:
        return None
    if isinstance(spatial_dims, (bool, np.bool_)) or not isinstance(spatial_dims, numbers.Integral):
        raise TypeError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r} of type "
                        f"{type(spatial_dims).__name__}")
    if int(spatial_dims) not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {int(spatial_dims)}")
    return int(spatial_dims)


def check_per_axis(name, value, nd, *, minimum, odd=False):
    """An int, or a sequence of ``nd`` ints (one per spatial axis).

    Returns an int when every axis has the same value (so that isotropic settings stay plain
    ints), else a tuple of ``nd`` ints.
    """
    if isinstance(value, (tuple, list, np.ndarray)):
        values = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
        if isinstance(value, np.ndarray) and value.ndim != 1:
            raise ValueError(f"{name} must be an int or a sequence of {nd} ints (one per axis of "
                             f"{axes_text(nd)}), got an array of shape {value.shape}")
        if len(values) != nd:
            raise ValueError(f"{name} must be an int or a sequence of {nd} ints (one per axis of "
                             f"{axes_text(nd)}), got {len(values)} value(s): {tuple(value)!r}")
        checked = tuple(check_int(f"{name}[{a}]", v, minimum=minimum, odd=odd) for a, v in enumerate(values))
        return checked[0] if len(set(checked)) == 1 else checked
    return check_int(name, value, minimum=minimum, odd=odd)


def check_spacing(spacing, nd):
    """None, or ``nd`` positive finite floats (a single number applies to every axis).

    Returns None when every spacing is 1 (the positions are then the pixel indices).
    """
    if spacing is None:
        return None
    if isinstance(spacing, (str, bytes, set, frozenset, dict)):
        raise TypeError(f"spacing must be a number or a sequence of {nd} numbers (one per axis of "
                        f"{axes_text(nd)}), got {type(spacing).__name__} {spacing!r}")
    values = np.ravel(np.asarray(spacing, dtype=object))
    if values.size == 1 and np.ndim(spacing) == 0:
        values = np.repeat(values, nd)
    if len(values) != nd:
        raise ValueError(f"spacing must have {nd} values (one per axis of {axes_text(nd)}), got "
                         f"{len(values)}: {spacing!r}")
    out = []
    for a, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"spacing[{a}] must be a real number, got {v!r} of type {type(v).__name__}")
        v = float(v)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"spacing[{a}] must be positive and finite, got {v}")
        if not 1e-6 <= v <= 1e6:
            raise ValueError(f"spacing[{a}] must be in [1e-06, 1e+06] (in the units of theta_alpha and "
                             f"theta_gamma), got {v}")
        out.append(v)
    return None if all(v == 1.0 for v in out) else tuple(out)


def resolve_spatial_dims(spatial_dims, unary_shape, image_shape, unary_kind):
    """The number of spatial axes, refusing shapes that fit both images and volumes.

    With ``spatial_dims=None`` the inputs are images (2 axes), but a 4-D unary that is equally a
    batch of images and a volume (or a volume that is not a batch of images) is refused with a
    message saying to pass ``spatial_dims``.
    """
    if spatial_dims is not None:
        return spatial_dims
    u, im = tuple(unary_shape), tuple(image_shape)
    if unary_kind == "labels":
        # A (B, H, W) batch of label maps and a (D, H, W) label volume have the same shape, and so
        # do their images: only the caller can tell.
        if len(u) == 3 and len(im) == 4:
            raise ValueError(
                f"a 3-D label map of shape {u} with a 4-D image of shape {im} is either a batch of {u[0]} "
                f"label maps or a volume of {u[0]} slices: pass spatial_dims=2 for images or spatial_dims=3 "
                "for a volume")
        if len(u) == 4:
            raise ValueError(f"a 4-D label map of shape {u} is a batch of volumes: pass spatial_dims=3")
        return 2
    # As images: unary (B, C, H, W) with image (B, H, W, F); as a volume: unary (C, D, H, W) with
    # image (D, H, W, F).
    volume = len(u) == 4 and len(im) == 4 and im[:3] == u[1:]
    batch = len(u) == 4 and len(im) == 4 and im[0] == u[0] and im[1:3] == u[2:]
    if volume and batch:
        raise ValueError(
            f"a unary of shape {u} with an image of shape {im} is either a batch of {u[0]} images with "
            f"{u[1]} classes or a volume of {u[1]} slices with {u[0]} classes: pass spatial_dims=2 for "
            "images or spatial_dims=3 for a volume")
    if volume:
        as_images = (f"as a batch of images, the image has batch size {im[0]} but the unary has {u[0]}"
                     if im[0] != u[0] else "as a batch of images they do not match")
        raise ValueError(
            f"a unary of shape {u} with an image of shape {im} fits a volume (C, D, H, W) with image "
            f"(D, H, W, F) ({as_images}): pass spatial_dims=3 for a volume (4-D inputs are a batch of images "
            "otherwise)")
    if (len(u) == 5 and len(im) in (4, 5) and im[-4:-1] == u[-3:]) or (len(im) == 5 and len(u) in (4, 5)):
        raise ValueError(
            f"a unary of shape {u} with an image of shape {im} looks like a batch of volumes: pass "
            "spatial_dims=3")
    return 2
