"""Common input mistakes are reported (InputWarning) or refused, with the fix in the message."""

import warnings

import numpy as np
import pytest

import cucrf
from cucrf._diagnostics import InputWarning, check_inputs

rng = np.random.default_rng(0)
C, H, W = 4, 10, 12
LOGITS = rng.normal(scale=2.0, size=(C, H, W)).astype(np.float32)
PROBS = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=0)
IMAGE = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
KW = dict(filter_size=3, blur=1)


def input_warnings(fn, *args, **kwargs):
    """Call ``fn`` and return the messages of the InputWarnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


def test_input_warning_is_public_and_a_user_warning():
    assert cucrf.InputWarning is InputWarning
    assert issubclass(cucrf.InputWarning, UserWarning)
    assert "InputWarning" in cucrf.__all__


def test_clean_inputs_give_no_warning():
    assert input_warnings(cucrf.infer, LOGITS, IMAGE, **KW) == []
    assert input_warnings(cucrf.infer, np.log(PROBS), IMAGE, **KW) == []  # log-probabilities are logits
    assert input_warnings(cucrf.infer, PROBS, IMAGE, unary_kind="probabilities", **KW) == []
    assert input_warnings(cucrf.infer, IMAGE[..., 0] % C, IMAGE, unary_kind="labels", num_classes=C, **KW) == []


def test_probabilities_passed_as_logits_warn():
    messages = input_warnings(cucrf.infer, PROBS, IMAGE, **KW)
    assert len(messages) == 1
    assert "looks like probabilities" in messages[0] and "unary_kind='probabilities'" in messages[0]


def test_probabilities_warning_also_for_a_batch_and_infer_vjp():
    batch = np.stack([PROBS, PROBS])
    messages = input_warnings(cucrf.infer_vjp, batch, np.stack([IMAGE, IMAGE]), grad_output=np.ones_like(batch),
                              **KW)
    assert any("looks like probabilities" in m and "axis 1" in m for m in messages)


def test_pydensecrf_energies_passed_as_logits_warn():
    energies = -np.log(np.clip(PROBS, 1e-5, 1.0)).astype(np.float32)
    messages = input_warnings(cucrf.infer, energies, IMAGE, **KW)
    assert len(messages) == 1
    assert "energies" in messages[0] and "-energies" in messages[0]
    assert "unary_kind='probabilities' with np.exp(-energies)" in messages[0]
    # the advice works: no warning, and -energies gives the same result as the log-probabilities
    assert input_warnings(cucrf.infer, -energies, IMAGE, **KW) == []
    np.testing.assert_allclose(cucrf.infer(-energies, IMAGE, **KW), cucrf.infer(np.log(PROBS), IMAGE, **KW),
                               atol=1e-4)


def test_energies_from_pydensecrf_itself_warn():
    utils = pytest.importorskip("pydensecrf.utils")
    energies = utils.unary_from_softmax(PROBS).reshape(C, H, W)  # (C, H*W) -log(p), clipped at 1e-5
    messages = input_warnings(cucrf.infer, energies, IMAGE, **KW)
    assert any("energies" in m for m in messages)


def test_non_negative_scores_that_are_not_energies_do_not_warn():
    scores = np.abs(LOGITS)  # non-negative, but exp(-scores) does not sum to 1
    assert input_warnings(cucrf.infer, scores, IMAGE, **KW) == []


def test_image_in_unit_range_with_bandwidth_for_255_warns():
    unit = IMAGE.astype(np.float32) / 255
    messages = input_warnings(cucrf.infer, LOGITS, unit, **KW)
    assert len(messages) == 1
    assert "theta_beta=20.0" in messages[0] and "times 255" in messages[0]
    assert "theta_beta=0.078" in messages[0]
    # either fix silences it
    assert input_warnings(cucrf.infer, LOGITS, unit * 255, **KW) == []
    assert input_warnings(cucrf.infer, LOGITS, unit, cucrf.CRFParams(theta_beta=0.05), **KW) == []
    # and so does switching the appearance kernel off, or a feature transform (other units)
    assert input_warnings(cucrf.infer, LOGITS, unit, cucrf.CRFParams(appearance_weight=0.0), **KW) == []
    assert input_warnings(cucrf.infer, LOGITS, unit, feature_transform=np.eye(3), **KW) == []


def test_image_warning_names_per_channel_bandwidths():
    unit = IMAGE.astype(np.float64) / 255
    messages = input_warnings(cucrf.infer, LOGITS, unit, cucrf.CRFParams(theta_beta=(13.0, 13.0, 26.0)), **KW)
    assert len(messages) == 1 and "theta_beta=(0.051, 0.051, 0.102)" in messages[0]


def test_input_warnings_can_be_filtered():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=cucrf.InputWarning)
        cucrf.infer(PROBS, IMAGE, **KW)  # would raise if the warning were of another category


def test_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cucrf.infer(PROBS, IMAGE, **KW)
    assert caught and caught[0].filename == __file__


@pytest.mark.parametrize("batched", [False, True])
def test_channels_last_unary_is_named(batched):
    unary = np.moveaxis(LOGITS, 0, -1)  # (H, W, C)
    image = IMAGE
    if batched:
        unary, image = unary[None], image[None]
    fix = "np.moveaxis(unary, -1, 1)" if batched else "np.moveaxis(unary, -1, 0)"
    with pytest.raises(ValueError, match=r"unary has shape .* looks channels-last") as info:
        cucrf.infer(unary, image, **KW)
    assert fix in str(info.value) and str(info.value).startswith("unary has shape")
    with pytest.raises(ValueError, match="looks channels-last"):
        cucrf.infer(unary, image, unary_kind="probabilities", **KW)
    with pytest.raises(ValueError, match="looks channels-last"):
        check_inputs(unary, image, unary_kind="logits", params=None)


def test_channels_first_image_is_still_blamed_on_the_image():
    # (C, H, W) unary with a (F, H, W) image: the unary's first two axes match the image's, but the image is wrong
    with pytest.raises(ValueError, match="image has shape .* looks channels-first"):
        cucrf.infer(LOGITS[:3], IMAGE.transpose(2, 0, 1), **KW)
    with pytest.raises(ValueError, match="image has shape .* looks channels-first"):
        cucrf.infer(LOGITS[:3][None], IMAGE.transpose(2, 0, 1)[None], **KW)


def test_check_inputs_direct_use():
    assert input_warnings(check_inputs, PROBS, IMAGE, unary_kind="logits", params=None)
    assert input_warnings(check_inputs, PROBS, IMAGE, unary_kind="probabilities", params=None) == []
    assert input_warnings(check_inputs, LOGITS, IMAGE / 255.0, unary_kind="logits",
                          params={"theta_beta": 13.0})
    assert input_warnings(check_inputs, LOGITS, IMAGE / 255.0, unary_kind="logits", params=None) != []
    assert input_warnings(check_inputs, LOGITS, None, unary_kind="logits", params=None) == []
    assert check_inputs(LOGITS, IMAGE, unary_kind="logits", params=cucrf.CRFParams()) is None


def test_check_inputs_does_not_modify_inputs():
    p, im = PROBS.copy(), IMAGE / 255.0
    before = (p.copy(), im.copy())
    input_warnings(check_inputs, p, im, unary_kind="logits", params=None)
    np.testing.assert_array_equal(p, before[0])
    np.testing.assert_array_equal(im, before[1])
