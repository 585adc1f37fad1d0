"""A procedurally generated, labelled outdoor scene for ``cucrf demo``.

The scene is drawn at run time (no data files): a sky gradient with soft clouds, textured grass,
a road running to the horizon, a house, a tree and a person. Every region has its own colours,
texture noise and shading, and the image is slightly blurred and noisy like a photo, so that
label boundaries coincide with real (soft) image edges -- what a CRF's appearance kernel uses.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["CLASS_NAMES", "make_scene"]

CLASS_NAMES = ["sky", "grass", "road", "house", "tree", "person"]
SKY, GRASS, ROAD, HOUSE, TREE, PERSON = range(len(CLASS_NAMES))


def _smooth_noise(rng, shape, sigma):
    """Zero-mean, unit-std Gaussian-filtered white noise (a cheap stand-in for texture)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / (n.std() + 1e-12)


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _paint(image, mask, colour, shade=None, texture=None, amount=0.0):
    """Fill ``mask`` with ``colour`` (RGB 0..1), times a shading field, plus texture noise."""
    c = np.asarray(colour, dtype=np.float64)
    pix = np.broadcast_to(c, image.shape).copy()
    if shade is not None:
        pix *= shade[..., None]
    if texture is not None:
        pix += amount * texture[..., None]
    image[mask] = pix[mask]


def make_scene(height: int = 240, width: int = 320, seed: int = 0):
    """Draw the demo scene.

    Parameters
    ----------
    height, width : int
        Image size in pixels; the layout scales with it (at least 32 x 32).
    seed : int
        Seed of the texture and sensor noise; the default scene is always the same.

    Returns
    -------
    image : numpy.ndarray of uint8, shape (height, width, 3)
        RGB image.
    label : numpy.ndarray of uint8, shape (height, width)
        Class ids, indices into ``class_names``.
    class_names : list of str
        ``["sky", "grass", "road", "house", "tree", "person"]``.

    Examples
    --------
    >>> image, label, names = make_scene(60, 80)
    >>> image.shape, label.shape, names[label[0, 0]]
    ((60, 80, 3), (60, 80), 'sky')
    """
    if height < 32 or width < 32:
        raise ValueError(f"the demo scene needs at least 32x32 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    H, W = int(height), int(width)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    v, u = yy / H, xx / W  # normalised coordinates so the layout scales with the size
    image = np.zeros((H, W, 3))
    label = np.zeros((H, W), dtype=np.uint8)
    tex = _smooth_noise(rng, (H, W), 1.0)  # fine texture, reused with different strengths
    blotch = _smooth_noise(rng, (H, W), max(H, W) / 40)  # larger patches

    horizon = 0.45 + 0.02 * np.sin(2 * np.pi * u * 1.3 + 0.4)  # a gently rolling horizon

    # Sky: deep blue at the top to pale near the horizon, with soft clouds.
    t = np.clip(v / 0.45, 0, 1)[..., None]
    sky = (1 - t) * np.array([0.18, 0.36, 0.72]) + t * np.array([0.70, 0.82, 0.93])
    clouds = np.clip(_smooth_noise(rng, (H, W), max(H, W) / 25) - 0.6, 0, None) * 0.35
    sky = sky + clouds[..., None] * np.array([1.0, 1.0, 1.0])
    image[:] = sky
    label[:] = SKY

    # Grass: greener and darker towards the viewer, mottled.
    ground = v >= horizon
    depth = np.clip((v - horizon) / (1 - horizon + 1e-9), 0, 1)
    shade = 1.05 - 0.35 * depth + 0.08 * blotch
    _paint(image, ground, (0.36, 0.58, 0.22), shade, tex, 0.05)
    label[ground] = GRASS

    # Road: a trapezoid running to a vanishing point on the horizon, with a dashed centre line.
    vp_u, vp_v = 0.58, 0.47
    half = 0.006 + 0.32 * np.clip((v - vp_v) / (1 - vp_v), 0, None)
    centre = vp_u + (0.50 - vp_u) * np.clip((v - vp_v) / (1 - vp_v), 0, None)
    road = ground & (np.abs(u - centre) <= half) & (v >= vp_v)
    _paint(image, road, (0.40, 0.40, 0.42), 1.0 - 0.15 * depth + 0.04 * blotch, tex, 0.035)
    dash = road & (np.abs(u - centre) <= 0.08 * half) & (np.sin(40 * np.log(np.maximum(v - vp_v, 0) + 0.02)) > 0.2)
    image[dash] = np.array([0.92, 0.88, 0.55])
    label[road] = ROAD

    # House: a lit front wall, a darker side wall, a red pitched roof, a door and two windows.
    base = 0.66
    fl, fr, top = 0.06, 0.30, 0.40  # front wall left / right / top (normalised)
    front = (u >= fl) & (u <= fr) & (v >= top) & (v <= base)
    side_r = fr + 0.07
    side = (u > fr) & (u <= side_r) & (v <= base - 0.03 * (u - fr) / 0.07) & (v >= top - 0.02 * (u - fr) / 0.07)
    peak_u, peak_v = (fl + fr) / 2, 0.25
    roof_front = (v < top) & (v >= peak_v + (top - peak_v) * np.abs(u - peak_u) / ((fr - fl) / 2 + 0.02)) & (
        np.abs(u - peak_u) <= (fr - fl) / 2 + 0.02
    )
    roof_side = (u > fr - 0.02) & (u <= side_r + 0.01) & (v < top + 0.005) & (
        v >= peak_v + (top - 0.02 - peak_v) * (u - peak_u) / (side_r - peak_u)
    ) & (v >= peak_v)
    light = 1.0 - 0.25 * (v - top) / (base - top)  # light from above: walls darken downwards
    _paint(image, front, (0.86, 0.78, 0.62), light, tex, 0.02)
    _paint(image, side, (0.62, 0.55, 0.44), light, tex, 0.02)
    _paint(image, roof_side | roof_front, (0.62, 0.20, 0.16), 1.0 + 0.1 * blotch, tex, 0.04)
    _paint(image, roof_side & ~roof_front, (0.45, 0.14, 0.12), None, tex, 0.03)
    door = (np.abs(u - 0.17) <= 0.025) & (v >= 0.54) & (v <= base)
    windows = ((np.abs(u - 0.10) <= 0.025) | (np.abs(u - 0.25) <= 0.025)) & (np.abs(v - 0.49) <= 0.035)
    _paint(image, door, (0.35, 0.22, 0.12), None, tex, 0.02)
    _paint(image, windows, (0.30, 0.42, 0.55), 1.0 - 2.0 * (v - 0.455), tex, 0.02)
    house = front | side | roof_front | roof_side
    label[house] = HOUSE

    # Tree: a brown trunk under a lumpy canopy made of overlapping blobs with a leafy edge.
    trunk = (np.abs(u - 0.83) <= 0.018 + 0.01 * (v - 0.45)) & (v >= 0.35) & (v <= 0.70)
    canopy = np.zeros((H, W), dtype=bool)
    blobs = [(0.26, 0.83, 0.13), (0.33, 0.75, 0.10), (0.33, 0.91, 0.10), (0.18, 0.86, 0.09), (0.38, 0.83, 0.09)]
    for cy, cx, r in blobs:
        rr = r * (1 + 0.12 * tex)  # ragged outline
        canopy |= _ellipse(v, u * W / H, cy, cx * W / H, rr, rr)
    _paint(image, trunk, (0.36, 0.24, 0.14), 1.0 - 0.3 * np.abs(u - 0.83) / 0.03, tex, 0.03)
    leaf_light = 1.05 - 0.9 * np.clip(v - 0.12, 0, None) + 0.15 * blotch  # lit from above
    _paint(image, canopy, (0.12, 0.34, 0.12), leaf_light, _smooth_noise(rng, (H, W), 0.7), 0.05)
    label[trunk | canopy] = TREE

    # Person: head, torso (red shirt), arms and legs (blue jeans), standing on the grass.
    pu, ground_v = 0.70, 0.86
    s = 0.30  # body height, normalised
    aspect = W / H  # keeps the figure's proportions for any image shape
    pxu = (u - pu) * aspect
    head = _ellipse(v, pxu, ground_v - 0.90 * s, 0.0, 0.06 * s, 0.05 * s)
    torso = (np.abs(pxu) <= 0.085 * s + 0.02 * s * (v - (ground_v - 0.8 * s)) / s) & (v >= ground_v - 0.80 * s) & (
        v <= ground_v - 0.45 * s
    )
    arms = (np.abs(np.abs(pxu) - 0.11 * s) <= 0.025 * s) & (v >= ground_v - 0.78 * s) & (v <= ground_v - 0.47 * s)
    legs = (np.abs(np.abs(pxu) - 0.045 * s) <= 0.035 * s) & (v > ground_v - 0.46 * s) & (v <= ground_v)
    body_light = 1.0 - 0.8 * np.clip(pxu / (0.2 * s), -0.4, 0.4) * 0.5  # lit from the left
    _paint(image, head, (0.85, 0.66, 0.52), body_light, tex, 0.015)
    _paint(image, torso | arms, (0.78, 0.14, 0.14), body_light, tex, 0.03)
    _paint(image, legs, (0.16, 0.22, 0.45), body_light, tex, 0.03)
    person = head | torso | arms | legs
    label[person] = PERSON
    # A soft shadow on the ground next to the person and under the tree (image only: not a class).
    shadow = (label == GRASS) & (
        _ellipse(v, pxu, ground_v, 0.12 * s, 0.015, 0.12 * s) | _ellipse(v, u, 0.71, 0.85, 0.02, 0.08)
    )
    image[shadow] *= 0.7

    # Photo-like finish: a slight blur (edges span ~2 px), vignetting and sensor noise.
    image = ndimage.gaussian_filter(image, sigma=(0.8, 0.8, 0))
    vignette = 1.0 - 0.18 * (((u - 0.5) / 0.7) ** 2 + ((v - 0.5) / 0.7) ** 2)
    image = image * vignette[..., None] + 0.012 * rng.standard_normal(image.shape)
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return image, label, list(CLASS_NAMES)
