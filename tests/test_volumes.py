"""Volumes (three spatial axes): the brute-force oracle, the 2-D limit, spacing, gradients, errors."""

import zlib

import numpy as np
import pytest

import cucrf
from cucrf import _numpy_backend as nb

from . import oracle3d
from .test_gradients import assert_directional


def random_volume(rng, B, C, size, F):
    unary = rng.normal(scale=2.0, size=(B, C) + tuple(size))
    image = rng.uniform(0, 40, size=(B,) + tuple(size) + (F,))
    return unary, image


def random_params(rng, C, F, potts):
    return dict(
        theta_alpha=float(rng.uniform(1.5, 5)),
        theta_beta=tuple(float(v) for v in rng.uniform(6, 25, size=F)),
        theta_gamma=float(rng.uniform(0.8, 3)),
        appearance_weight=float(rng.uniform(0.3, 1.5)),
        smoothness_weight=float(rng.uniform(0.3, 1.5)),
        compatibility=None if potts else rng.uniform(-0.5, 1.5, size=(C, C)),
        unary_weight=float(rng.uniform(0.6, 1.4)),
    )


def to_crfparams(p):
    q = dict(p)
    q["compatibility"] = "potts" if p["compatibility"] is None else p["compatibility"]
    return cucrf.CRFParams(**q)


CASES = [
    # (B, C, size, F, filter_size, blur, spacing, potts, normalization, include_self, iterations)
    (1, 3, (3, 4, 5), 2, (3, 3, 3), (1, 1, 1), (1.0, 1.0, 1.0), True, None, False, 2),
    (2, 2, (4, 5, 3), 1, (3, 5, 3), (2, 2, 2), (2.0, 1.0, 0.5), False, None, False, 2),
    (1, 3, (5, 6, 7), 2, (3, 3, 5), (1, 2, 3), (1.5, 1.0, 1.0), True, "symmetric", False, 2),
    (1, 2, (3, 7, 6), 3, (1, 3, 3), (1, 3, 2), (3.0, 0.8, 0.8), False, "symmetric", False, 3),
    (1, 3, (4, 4, 5), 1, (3, 3, 3), (2, 1, 2), (1.0, 1.0, 1.0), False, None, True, 2),
    (1, 2, (6, 5, 4), 2, (3, 1, 3), (3, 3, 3), (1.0, 2.0, 1.0), True, "symmetric", True, 1),
]


def _id(c):
    return "B{}C{}_{}_F{}_k{}_b{}_s{}_{}_{}_{}_T{}".format(
        c[0], c[1], "x".join(map(str, c[2])), c[3], "".join(map(str, c[4])), "".join(map(str, c[5])),
        "-".join(f"{v:g}" for v in c[6]), "potts" if c[7] else "matrix", c[8], "self" if c[9] else "noself", c[10])


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_matches_bruteforce_oracle(case, output):
    B, C, size, F, k, blur, spacing, potts, norm, keep, T = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    unary, image = random_volume(rng, B, C, size, F)
    p = random_params(rng, C, F, potts)
    got = cucrf.infer(unary, image, to_crfparams(p), spatial_dims=3, filter_size=k, blur=blur, spacing=spacing,
                      iterations=T, normalization=norm, include_self=keep, output=output)
    assert got.dtype == np.float64 and got.shape == unary.shape
    for b in range(B):
        want = oracle3d.infer(unary[b], image[b], p, k, blur, spacing, T, norm, output, keep)
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-10)


def test_unbatched_and_labels_and_probabilities():
    rng = np.random.default_rng(3)
    unary, image = random_volume(rng, 1, 3, (4, 6, 5), 1)
    q = cucrf.infer(unary[0], image[0], spatial_dims=3, blur=2, filter_size=3)
    np.testing.assert_array_equal(q, cucrf.infer(unary, image, spatial_dims=3, blur=2, filter_size=3)[0])
    labels = unary[0].argmax(axis=0)
    from_labels = cucrf.infer(labels, image[0], spatial_dims=3, unary_kind="labels", num_classes=3, blur=2,
                              filter_size=3)
    want = cucrf.infer(cucrf.unary_from_labels(labels, 3, spatial_dims=3), image[0], spatial_dims=3, blur=2,
                       filter_size=3)
    np.testing.assert_array_equal(from_labels, want)
    assert from_labels.shape == (3, 4, 6, 5)
    probs = np.exp(unary[0]) / np.exp(unary[0]).sum(axis=0)
    from_probs = cucrf.infer(probs, image[0], spatial_dims=3, unary_kind="probabilities", blur=2, filter_size=3)
    assert from_probs.shape == probs.shape and np.allclose(from_probs.sum(axis=0), 1)


@pytest.mark.parametrize("k,blur,norm", [(5, 4, None), (3, 1, "symmetric"), (7, 2, None)])
def test_one_slice_volume_equals_the_image(k, blur, norm):
    """A (C, 1, H, W) volume is the (C, H, W) image: no neighbour exists across the slice axis."""
    rng = np.random.default_rng(k * 10 + blur)
    unary = rng.normal(size=(3, 13, 11))
    image = rng.uniform(0, 255, (13, 11, 3))
    params = cucrf.CRFParams(compatibility=rng.uniform(0, 1, (3, 3)))
    want = cucrf.infer(unary, image, params, filter_size=k, blur=blur, normalization=norm)
    for vk in ((1, k, k), k, (3, k, k)):
        got = cucrf.infer(unary[:, None], image[None], params, spatial_dims=3, filter_size=vk, blur=(1, blur, blur),
                          normalization=norm, include_self=False, spacing=(4.0, 1.0, 1.0))
        np.testing.assert_allclose(got[:, 0], want, rtol=1e-12, atol=1e-14)


def test_spacing_scales_positions():
    """Spacing s with bandwidths s*theta is spacing 1 with theta; per axis, it scales that axis only."""
    rng = np.random.default_rng(5)
    unary, image = random_volume(rng, 1, 2, (5, 6, 7), 1)
    params = cucrf.CRFParams(theta_alpha=3.0, theta_gamma=2.0, theta_beta=20.0)
    base = cucrf.infer(unary, image, params, spatial_dims=3, filter_size=3, blur=1)
    scaled = cucrf.infer(unary, image, params.replace(theta_alpha=7.5, theta_gamma=5.0), spatial_dims=3,
                         filter_size=3, blur=1, spacing=2.5)
    np.testing.assert_allclose(scaled, base, rtol=1e-12, atol=1e-14)
    # Along one axis only: the window along z sees neighbours 3x farther, so less smoothing there.
    thick = cucrf.infer(unary, image, params, spatial_dims=3, filter_size=3, blur=1, spacing=(3.0, 1.0, 1.0))
    assert not np.allclose(thick, base)
    # With only z-neighbours (a 3x1x1 window), spacing (3,1,1) with theta equals spacing 1 with theta/3.
    only_z = dict(spatial_dims=3, filter_size=(3, 1, 1), blur=1)
    a = cucrf.infer(unary, image, params, spacing=(3.0, 1.0, 1.0), **only_z)
    b = cucrf.infer(unary, image, params.replace(theta_alpha=1.0, theta_gamma=2.0 / 3.0), **only_z)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("blur,norm,potts", [((1, 2, 2), None, False), (2, "symmetric", True)])
def test_gradients_match_finite_differences(blur, norm, potts):
    rng = np.random.default_rng(11)
    C, F = 3, 2
    unary, image = random_volume(rng, 1, C, (4, 5, 6), F)
    params = to_crfparams(random_params(rng, C, F, potts))
    opts = dict(spatial_dims=3, filter_size=(3, 3, 5), blur=blur, spacing=(2.0, 1.0, 1.0), iterations=2,
                normalization=norm)
    go = rng.normal(size=unary.shape)

    def loss(u=unary, im=image, p=params):
        return float(np.sum(go * cucrf.infer(u, im, p, **opts)))

    r = cucrf.infer_vjp(unary, image, params, grad_output=go, **opts)
    np.testing.assert_array_equal(r.output, cucrf.infer(unary, image, params, **opts))
    assert r.unary.shape == unary.shape and r.image.shape == image.shape
    assert_directional(lambda v: loss(u=v), unary, r.unary, rng)
    assert_directional(lambda v: loss(im=v), image, r.image, rng)
    for name in ("theta_alpha", "theta_gamma", "appearance_weight", "smoothness_weight", "unary_weight"):
        assert_directional(lambda v: loss(p=params.replace(**{name: float(v)})), getattr(params, name),
                           r.params[name], rng)
    assert_directional(lambda v: loss(p=params.replace(theta_beta=tuple(v))), np.array(params.theta_beta),
                       r.params["theta_beta"], rng)
    assert_directional(lambda v: loss(p=params.replace(compatibility=v)), params.compatibility_matrix(C),
                       r.params["compatibility"], rng)


def test_feature_transform_gradient_in_3d():
    rng = np.random.default_rng(12)
    unary, image = random_volume(rng, 1, 2, (3, 5, 4), 2)
    matrix = rng.normal(size=(2, 2))
    opts = dict(spatial_dims=3, filter_size=3, blur=(1, 2, 2), params=cucrf.CRFParams(theta_beta=(8.0, 9.0)))
    go = rng.normal(size=unary.shape)
    r = cucrf.infer_vjp(unary, image, grad_output=go, feature_transform=matrix, **opts)

    def loss(m):
        return float(np.sum(go * cucrf.infer(unary, image, feature_transform=m, **opts)))

    assert_directional(loss, matrix, r.feature_transform["matrix"], rng)


@pytest.mark.parametrize("size,blur", [((5, 7, 6), (1, 2, 3)), ((4, 4, 9), 4)])
def test_pool_and_upsample_are_exact_transposes_in_3d(size, blur):
    rng = np.random.default_rng(1)
    blurs = blur if isinstance(blur, tuple) else (blur,) * 3
    x = rng.normal(size=(2,) + size)
    pooled = nb.pool(x, blurs)
    coarse = pooled.shape[1:]
    pool_matrix, up_matrix, want_coarse, *_ = oracle3d.operators(size, blurs)
    assert coarse == want_coarse
    np.testing.assert_allclose(pooled.reshape(2, -1), x.reshape(2, -1) @ pool_matrix.T, rtol=1e-13, atol=1e-13)
    y = rng.normal(size=(2,) + coarse)
    up = nb.upsample(y, blurs, size)
    np.testing.assert_allclose(up.reshape(2, -1), y.reshape(2, -1) @ up_matrix.T, rtol=1e-13, atol=1e-13)
    g = rng.normal(size=(2,) + size)
    np.testing.assert_allclose(nb.upsample_backward(g, blurs, coarse).reshape(2, -1), g.reshape(2, -1) @ up_matrix,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nb.pool_backward(y, blurs, size).reshape(2, -1), y.reshape(2, -1) @ pool_matrix,
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
U3 = np.zeros((2, 4, 6, 5))
I3 = np.zeros((4, 6, 5, 1))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(spatial_dims=4), ValueError, "spatial_dims must be 2 .* or 3 .*, got 4"),
    (dict(spatial_dims="3"), TypeError, "spatial_dims must be 2 .* or 3"),
    (dict(spatial_dims=True), TypeError, "spatial_dims"),
    (dict(spacing=(1.0, 1.0)), ValueError, r"spacing must have 3 values .*\(D, H, W\)"),
    (dict(spacing=(1.0, 0.0, 1.0)), ValueError, r"spacing\[1\] must be positive and finite, got 0.0"),
    (dict(spacing=(1.0, np.inf, 1.0)), ValueError, r"spacing\[1\] must be positive and finite"),
    (dict(spacing=(1.0, -2.0, 1.0)), ValueError, r"spacing\[1\] must be positive"),
    (dict(spacing="1,1,1"), TypeError, "spacing must be a number or a sequence"),
    (dict(spacing=(1.0, "a", 1.0)), TypeError, r"spacing\[1\] must be a real number"),
    (dict(filter_size=(3, 3)), ValueError, r"filter_size must be an int or a sequence of 3 ints .* got 2"),
    (dict(filter_size=(3, 4, 3)), ValueError, r"filter_size\[1\] must be odd"),
    (dict(filter_size=(3, 3, 3.0)), TypeError, r"filter_size\[2\] must be an integer"),
    (dict(filter_size=(13, 3, 3), blur=1), ValueError, r"filter_size\[0\]=13 is larger than the volume allows"),
    (dict(filter_size=13, blur=1), ValueError, r"filter_size=13 is larger than the volume allows: .* 4x6x5 volume"),
    (dict(filter_size=(1, 1, 1)), ValueError, "empty window"),
    (dict(blur=(1, 2)), ValueError, r"blur must be an int or a sequence of 3 ints"),
    (dict(blur=(1, 0, 2)), ValueError, r"blur\[1\] must be >= 1"),
    (dict(blur=(5, 1, 1), filter_size=3), ValueError, r"blur\[0\]=5 is larger than axis 0 .* \(4 pixels\)"),
])
def test_volume_setting_errors(kwargs, error, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("spatial_dims", 3)
    kwargs.setdefault("filter_size", 3)
    kwargs.setdefault("blur", 1)
    with pytest.raises(error, match=match):
        cucrf.infer(U3, I3, **kwargs)


def test_shapes_that_fit_images_and_volumes_need_spatial_dims():
    # (C, D, H, W) volume with (D, H, W, F) image, spatial_dims not given.
    with pytest.raises(ValueError, match="fits a volume .* pass spatial_dims=3"):
        cucrf.infer(U3, I3, filter_size=3, blur=1)
    # B == C: a batch of two 2-class images or a 2-class volume of two slices.
    u = np.zeros((2, 2, 6, 5))
    im = np.zeros((2, 6, 5, 1))
    with pytest.raises(ValueError, match="either a batch of 2 images .* or a volume of 2 slices .*spatial_dims=2"):
        cucrf.infer(u, im, filter_size=3, blur=1)
    assert cucrf.infer(u, im, filter_size=3, blur=1, spatial_dims=2).shape == u.shape
    assert cucrf.infer(u, im, filter_size=3, blur=1, spatial_dims=3).shape == u.shape
    # A (D, H, W) label map with a (D, H, W, F) image is also a batch of label maps.
    with pytest.raises(ValueError, match="either a batch of 4 label maps or a volume of 4 slices"):
        cucrf.infer(np.zeros((4, 6, 5), int), I3, unary_kind="labels", num_classes=2, filter_size=3, blur=1)
    # A batch of volumes.
    with pytest.raises(ValueError, match="batch of volumes: pass spatial_dims=3"):
        cucrf.infer(U3[None], I3[None], filter_size=3, blur=1)


def test_volume_shape_errors():
    with pytest.raises(ValueError, match=r"unary must have shape \(C, D, H, W\) or \(B, C, D, H, W\)"):
        cucrf.infer(np.zeros((6, 5, 2)), I3, spatial_dims=3)
    with pytest.raises(ValueError, match=r"image depth, height and width \(4, 6, 4\) differ from the unary's \(4, 6, 5\)"):
        cucrf.infer(U3, np.zeros((4, 6, 4, 1)), spatial_dims=3, filter_size=3, blur=1)
    with pytest.raises(ValueError, match=r"looks channels-first.*transpose\(1, 2, 3, 0\)"):
        cucrf.infer(U3, np.zeros((1, 4, 6, 5)), spatial_dims=3, filter_size=3, blur=1)
    with pytest.raises(ValueError, match=r"image\[\.\.\., None\]"):
        cucrf.infer(U3, np.zeros((4, 6, 5)), spatial_dims=3, filter_size=3, blur=1)
    with pytest.raises(ValueError, match=r"labels must have shape \(D, H, W\) or \(B, D, H, W\)"):
        cucrf.unary_from_labels(np.zeros((6, 5), int), 2, spatial_dims=3)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(2)
    unary, image = random_volume(rng, 1, 2, (4, 5, 6), 1)
    u0, i0 = unary.copy(), image.copy()
    cucrf.infer_vjp(unary, image, grad_output=np.ones_like(unary), spatial_dims=3, filter_size=3, blur=2)
    np.testing.assert_array_equal(unary, u0)
    np.testing.assert_array_equal(image, i0)


# ---------------------------------------------------------------------------------------------
# learning on volumes
# ---------------------------------------------------------------------------------------------
def _noisy_scene(seed, shape=(14, 12)):
    r = np.random.default_rng(seed)
    label = np.zeros(shape, int)
    label[:, shape[1] // 2:] = 1
    label[3:9, 2:7] = 2
    image = (label * 70.0 + r.normal(0, 15, shape))[..., None]
    noisy = np.where(r.uniform(size=shape) < 0.3, r.integers(0, 3, shape), label)
    unary = np.log(np.eye(3)[noisy].transpose((2, 0, 1)) * 0.5 + 0.25)
    return unary, image, label


def test_fit_on_one_slice_volumes_equals_fit_on_images():
    """fit on (C, 1, H, W) volumes follows fit on the (C, H, W) images: same losses, same parameters."""
    data = [_noisy_scene(s) for s in range(3)]
    opts = dict(filter_size=3, epochs=2, progress=False, params=cucrf.CRFParams(theta_beta=25.0), dtype=np.float64)
    flat = cucrf.fit([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], blur=2, **opts)
    vol = cucrf.fit([d[0][:, None] for d in data], [d[1][None] for d in data], [d[2][None] for d in data],
                    spatial_dims=3, blur=(1, 2, 2), **opts)
    assert [h["epoch"] for h in vol.history] == [h["epoch"] for h in flat.history]
    compared = 0
    for a, b in zip(vol.history, flat.history):
        for key in ("train_loss", "val_loss", "val_miou"):
            if b.get(key) is not None:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-9)
                compared += 1
    assert compared >= 4
    np.testing.assert_allclose(vol.params.compatibility_matrix(3), flat.params.compatibility_matrix(3), rtol=1e-8)
    assert vol.params.theta_alpha == pytest.approx(flat.params.theta_alpha, rel=1e-8)


def test_fit_on_volumes_learns():
    def volume(seed):
        slices = [_noisy_scene(seed * 10 + z, (12, 10)) for z in range(6)]
        return (np.stack([s[0] for s in slices], axis=1), np.stack([s[1] for s in slices]),
                np.stack([s[2] for s in slices]))

    data = [volume(s) for s in range(3)]
    result = cucrf.fit([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], spatial_dims=3,
                       spacing=(2.0, 1.0, 1.0), filter_size=3, blur=(1, 2, 2), epochs=3, progress=False,
                       params=cucrf.CRFParams(theta_beta=25.0))
    assert result.history[-1]["train_loss"] < result.history[1]["train_loss"] or result.improved
    with pytest.raises(TypeError, match=r"one \(N, D, H, W\) array, got a bare array of shape \(6, 12, 10\)"):
        cucrf.fit(np.stack([d[0] for d in data]), np.stack([d[1] for d in data]), data[0][2], spatial_dims=3,
                  progress=False)
    with pytest.raises(ValueError, match="pass spatial_dims=3"):
        cucrf.fit([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], progress=False)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True], ids=["infer", "infer_vjp"])
@pytest.mark.parametrize("k,blur,norm", [(5, 4, None), (3, (1, 2, 2), "symmetric"), ((3, 5, 5), 1, None)])
def test_memory_estimate_bounds_the_peak_in_3d(training, k, blur, norm):
    from cucrf import _api

    from .test_memory_estimate import peak_bytes

    rng = np.random.default_rng(7)
    size, C, F = (10, 24, 20), 3, 1
    unary = rng.normal(size=(C,) + size).astype(np.float32)
    image = rng.uniform(0, 255, size + (F,)).astype(np.float32)
    opts = dict(spatial_dims=3, filter_size=k, blur=blur, normalization=norm, iterations=3)
    cucrf.infer(unary[:, :4, :6, :5], image[:4, :6, :5], spatial_dims=3, filter_size=3, blur=1)  # warm-up
    if training:
        peak = peak_bytes(cucrf.infer_vjp, unary, image, grad_output=np.ones_like(unary), **opts)
    else:
        peak = peak_bytes(cucrf.infer, unary, image, **opts)
    config = _api.check_config(k, blur, 3, norm, size)
    assert peak <= _api.required_bytes(1, C, size, F, config, 4, training=training)


def test_inference_on_a_volume_needs_at_most_four_unaries_of_memory():
    """At the defaults, what infer allocates (its output included) stays within 4x the unary's bytes."""
    from .test_memory_estimate import peak_bytes

    rng = np.random.default_rng(8)
    unary = rng.normal(size=(4, 48, 56, 52)).astype(np.float32)
    image = rng.uniform(0, 255, (48, 56, 52, 1)).astype(np.float32)
    cucrf.infer(unary[:, :12, :12, :12], image[:12, :12, :12], spatial_dims=3)  # warm-up
    peak = peak_bytes(cucrf.infer, unary, image, spatial_dims=3)
    assert peak <= 4 * unary.nbytes, peak / unary.nbytes


def test_a_volume_too_large_for_memory_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr("cucrf._api.available_memory_bytes", lambda: 10**6)
    with pytest.raises(cucrf.ProblemTooLargeError, match=r"needs about .* GiB \(1x2x20x30x40, filter_size=5"):
        cucrf.infer(np.zeros((2, 20, 30, 40), np.float32), np.zeros((20, 30, 40, 1), np.float32), spatial_dims=3)
    # A label volume is refused from its shape, before the (C, D, H, W) unary is made.
    with pytest.raises(cucrf.ProblemTooLargeError):
        cucrf.infer(np.zeros((20, 30, 40), np.uint8), np.zeros((20, 30, 40, 1), np.float32), spatial_dims=3,
                    unary_kind="labels", num_classes=150)
