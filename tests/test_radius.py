"""The receptive radius is exact: inputs beyond it never change a pixel, inputs at it can.

Every test perturbs one input pixel (the unary's scores or the image's colour) and finds, from
the bit-level difference of the whole output, the farthest pixel that changed; over every
position of the perturbed pixel in its pooling cell that distance must equal the radius: never
more (a change at r + 1 leaves every pixel bit-identical) and reached (a change at r changes a pixel).
"""

import itertools

import numpy as np
import pytest

import cucrf
from cucrf._radius import axis_radius, tile_span


def _reach(shape, axis, what, infer_kwargs, seed=0):
    """The farthest distance along ``axis`` at which perturbing ``what`` at one pixel changes the output.

    The perturbed pixel runs over every position along ``axis`` (the other axes at their middle).
    """
    rng = np.random.default_rng(seed)
    nd = len(shape)
    unary = rng.normal(size=(3,) + shape)
    image = rng.uniform(0, 255, shape + (3,))
    params = cucrf.CRFParams(theta_beta=60.0)
    kwargs = dict(infer_kwargs, spatial_dims=nd)
    base = cucrf.infer(unary, image, params, **kwargs)
    middle = [n // 2 for n in shape]
    farthest = 0
    for x in range(shape[axis]):
        at = list(middle)
        at[axis] = x
        u, im = unary.copy(), image.copy()
        if what == "unary":
            u[(slice(None),) + tuple(at)] += rng.normal(size=3) * 3
        else:
            im[tuple(at)] = rng.uniform(0, 255, 3)
        changed = (cucrf.infer(u, im, params, **kwargs) != base).any(axis=0)
        where = np.nonzero(changed)[axis]
        if where.size:
            farthest = max(farthest, int(np.abs(where - x).max()))
    return farthest


CASES_2D = [  # filter_size, blur, iterations, normalization
    (3, 1, 2, None), (3, 1, 2, "symmetric"), (5, 2, 1, None), (3, 3, 2, "symmetric"), (5, 4, 2, None),
    (3, 4, 1, "symmetric"), (5, 5, 1, None), (7, 3, 1, None),
]


@pytest.mark.parametrize("filter_size, blur, iterations, normalization", CASES_2D)
def test_radius_is_exact_for_unary_and_image(filter_size, blur, iterations, normalization):
    r = cucrf.receptive_radius(filter_size, blur, iterations, normalization=normalization)
    assert r[0] == r[1]
    unary_reach = axis_radius(filter_size, blur, iterations, normalized=False)
    kwargs = dict(filter_size=filter_size, blur=blur, iterations=iterations, normalization=normalization)
    width = 2 * r[1] + 3 * blur + 5
    assert _reach((5, width), 1, "unary", kwargs) == unary_reach
    assert _reach((5, width), 1, "image", kwargs) == r[1]
    if normalization is None:
        assert unary_reach == r[1]  # without normalisation the image reaches as far as the unary
    else:
        assert r[1] > unary_reach  # the normaliser reads one more window of the image


def test_radius_is_exact_along_the_first_axis_with_per_axis_settings():
    kwargs = dict(filter_size=(5, 3), blur=(3, 2), iterations=2)
    r = cucrf.receptive_radius((5, 3), (3, 2), 2)
    assert r == (axis_radius(5, 3, 2), axis_radius(3, 2, 2))
    assert _reach((2 * r[0] + 11, 7), 0, "unary", kwargs) == r[0]
    assert _reach((2 * r[0] + 11, 7), 0, "image", kwargs) == r[0]


def test_radius_is_exact_in_3d():
    kwargs = dict(filter_size=(3, 3, 5), blur=(1, 2, 3), iterations=1, normalization="symmetric")
    r = cucrf.receptive_radius((3, 3, 5), (1, 2, 3), 1, normalization="symmetric", spatial_dims=3)
    shape = (2 * r[0] + 3, 5, 2 * r[2] + 9)
    assert _reach(shape, 0, "image", kwargs) == r[0]
    assert _reach(shape, 2, "image", kwargs) == r[2]
    assert _reach(shape, 2, "unary", kwargs) == axis_radius(5, 3, 1)


def test_docstring_examples():
    import doctest

    import cucrf._radius as module

    assert doctest.testmod(module).failed == 0


def test_radius_formula_and_defaults():
    # docs/scale.md: T (k//2 + 1) b + b//2 - 1 for blur >= 2, T k//2 for blur 1, and one more
    # window (plus tap) of the image with symmetric normalisation.
    assert cucrf.receptive_radius() == (61, 61)
    assert cucrf.receptive_radius(5, 4, 5) == (5 * 3 * 4 + 1,) * 2
    assert cucrf.receptive_radius(7, 1, 3) == (9, 9)
    assert cucrf.receptive_radius(7, 1, 3, normalization="symmetric") == (12, 12)
    assert cucrf.receptive_radius(3, 2, 1, normalization="symmetric") == (8, 8)
    assert cucrf.receptive_radius(5, 4, 0) == (0, 0)
    assert cucrf.receptive_radius((1, 5, 5), (1, 4, 4), 2, spatial_dims=3) == (0, 25, 25)
    assert cucrf.receptive_radius((3, 5, 7), 2) == (20, 30, 40)  # three axes from the tuple


@pytest.mark.parametrize("kwargs, match", [
    (dict(filter_size=4), "filter_size must be odd"),
    (dict(blur=0), "blur must be >= 1"),
    (dict(iterations=-1), "iterations must be >= 0"),
    (dict(normalization="l1"), "normalization must be one of"),
    (dict(filter_size=(3, 5), blur=(1, 2, 2)), "different numbers of axes"),
    (dict(filter_size=(3, 5), spatial_dims=3), "filter_size must be an int or a sequence of 3"),
])
def test_radius_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cucrf.receptive_radius(**kwargs)


def test_tiles_cut_on_the_whole_grid_reproduce_the_whole_image():
    # A tile from tile_span starts at a multiple of blur and ends congruent to the axis length,
    # so its own pooling geometry is the whole image's: its core is bit-identical.
    rng = np.random.default_rng(3)
    for filter_size, blur, iterations, normalization in itertools.product((3, 5), (1, 2, 3, 4), (1, 2),
                                                                         (None, "symmetric")):
        H, W = int(rng.integers(20, 70)), int(rng.integers(20, 90))
        unary = rng.normal(size=(3, H, W))
        image = rng.uniform(0, 255, (H, W, 3))
        kwargs = dict(filter_size=filter_size, blur=blur, iterations=iterations, normalization=normalization)
        whole = cucrf.infer(unary, image, **kwargs)
        ry, rx = cucrf.receptive_radius(filter_size, blur, iterations, normalization=normalization)
        y0, y1 = sorted(rng.choice(np.arange(1, H), 2, replace=False))
        x0, x1 = sorted(rng.choice(np.arange(1, W), 2, replace=False))
        ly, hy = tile_span(y0, y1, H, blur, ry)
        lx, hx = tile_span(x0, x1, W, blur, rx)
        assert ly % blur == 0 and (H - hy) % blur == 0 and lx % blur == 0 and (W - hx) % blur == 0
        tile = cucrf.infer(unary[:, ly:hy, lx:hx], image[ly:hy, lx:hx], **kwargs)
        assert np.array_equal(tile[:, y0 - ly:y1 - ly, x0 - lx:x1 - lx], whole[:, y0:y1, x0:x1])


def test_tile_span_shifted_off_the_grid_is_wrong():
    # The reason for the alignment: the same context cut one pixel off the grid changes the core.
    rng = np.random.default_rng(4)
    H, W, blur = 9, 80, 4
    unary = rng.normal(size=(3, H, W))
    image = rng.uniform(0, 255, (H, W, 3))
    whole = cucrf.infer(unary, image, blur=blur, iterations=1)
    r = cucrf.receptive_radius(5, blur, 1)[1]
    lo, hi = tile_span(40, 48, W, blur, r)
    assert np.array_equal(cucrf.infer(unary[:, :, lo:hi], image[:, lo:hi], blur=blur, iterations=1)[:, :, 40 - lo:48 - lo],
                          whole[:, :, 40:48])
    # Two pixels off: the tile's padding moves its cells off the whole image's (one pixel off
    # would happen to land on the grid again, with a padding of one).
    shifted = cucrf.infer(unary[:, :, lo + 2:hi], image[:, lo + 2:hi], blur=blur, iterations=1)
    assert not np.allclose(shifted[:, :, 40 - lo - 2:48 - lo - 2], whole[:, :, 40:48], atol=1e-6)
