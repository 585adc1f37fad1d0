"""scripts/evaluate_volumes.py: the 3-D synthetic unary, the Dice score and the intensity mappings."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cucrf.datasets import synthetic_unary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("script_evaluate_volumes", REPO / "scripts" / "evaluate_volumes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labels(shape, num_classes, seed):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, shape).astype(np.uint8)
    label[rng.random(shape) < 0.1] = 255
    return label


@pytest.mark.parametrize("downsample, replace_prob, seed", [(1, 0.2, 0), (4, 0.2, 3), (8, 0.5, 7), (5, 0.0, 1)])
def test_a_one_slice_volume_gets_exactly_the_2d_synthetic_unary(script, downsample, replace_prob, seed):
    label = _labels((13, 21), 3, seed)  # sizes that are no multiple of the factor: partial border cells
    expected = synthetic_unary(label, 3, downsample=downsample, replace_prob=replace_prob, seed=seed)
    got = script.degrade_volume(label[None], 3, downsample=downsample, replace_prob=replace_prob, seed=seed)
    assert got.shape == (3, 1, 13, 21) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], expected, rtol=0, atol=1e-6)


def test_degrade_volume_is_log_probabilities_that_keep_the_label_without_noise(script):
    label = _labels((6, 9, 11), 4, 2)
    unary = script.degrade_volume(label, 4, downsample=1, replace_prob=0.0, seed=0)
    assert unary.shape == (4, 6, 9, 11) and unary.dtype == np.float32
    np.testing.assert_allclose(np.log(np.exp(unary.astype(np.float64)).sum(axis=0)), 0.0, atol=1e-5)
    known = label != 255
    assert (unary.argmax(axis=0)[known] == label[known]).all()
    np.testing.assert_allclose(unary[:, ~known], np.log(0.25), atol=1e-6)  # ignored voxels: uniform
    noisy = script.degrade_volume(label, 4, downsample=2, replace_prob=0.5, seed=0)
    assert not np.array_equal(noisy, script.degrade_volume(label, 4, downsample=2, replace_prob=0.5, seed=1))
    assert np.array_equal(noisy, script.degrade_volume(label, 4, downsample=2, replace_prob=0.5, seed=0))


def test_dice_per_class_ignores_label_255(script):
    label = np.array([[0, 0, 1, 1, 2, 255]])
    pred = np.array([[0, 0, 1, 2, 2, 1]])
    # class 0: 2 of 2; class 1: |P&T| 1, |P| 1, |T| 2; class 2: |P&T| 1, |P| 2, |T| 1 (the ignored voxel not counted)
    np.testing.assert_allclose(script.dice_per_class(pred, label, 3), [1.0, 2 / 3, 2 / 3])
    assert np.isnan(script.dice_per_class(np.zeros((2, 2), int), np.zeros((2, 2), np.uint8), 2)[1])


def test_intensity_mappings_do_not_depend_on_gain_and_offset(script):
    rng = np.random.default_rng(0)
    volume = np.zeros((5, 8, 9, 1))
    volume[1:4, 2:7, 2:8] = rng.normal(150, 30, (3, 5, 6, 1)).clip(1, None)  # a body on a zero background
    other = volume * 12.5 + 40.0
    other[volume == 0] = 0.0
    a, b = script.normalise_intensities(volume), script.normalise_intensities(other)
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() == 255.0
    np.testing.assert_allclose(a, b, atol=1e-3)
    za, zb = script.standardise_intensities(volume), script.standardise_intensities(other)
    body = volume[..., 0] > 0
    np.testing.assert_allclose(za[body], zb[body], atol=1e-5)
    assert abs(float(za[body].mean())) < 1e-5 and abs(float(za[body].std()) - 1.0) < 1e-5
