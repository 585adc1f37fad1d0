"""cucrf.optim.Adam against updates computed by hand."""

import math

import numpy as np
import pytest

from cucrf.optim import Adam


def test_two_steps_by_hand():
    # p0 = 1, g1 = 0.5, g2 = -0.25, lr = 0.1, betas (0.9, 0.999), eps 1e-8.
    # step 1: m = 0.05, v = 0.00025; corrected m = 0.5, v = 0.25; p1 = 1 - 0.1 * 0.5 / (0.5 + 1e-8)
    # step 2: m = 0.045 - 0.025 = 0.02, v = 0.00024975 + 0.0000625 = 0.00031225;
    #         corrections 1 - 0.81 = 0.19 and 1 - 0.998001 = 0.001999
    p1 = 1 - 0.1 * 0.5 / (0.5 + 1e-8)
    p2 = p1 - 0.1 * (0.02 / 0.19) / (math.sqrt(0.00031225 / 0.001999) + 1e-8)
    opt = Adam(lr=0.1)
    p = {"w": np.array([1.0])}
    p = opt.step(p, {"w": np.array([0.5])})
    np.testing.assert_allclose(p["w"], [p1], rtol=1e-14)
    p = opt.step(p, {"w": np.array([-0.25])})
    np.testing.assert_allclose(p["w"], [p2], rtol=1e-14)
    assert abs(p2 - 0.8733662) < 1e-6  # the number worked out on paper


def test_weight_decay_decoupled_and_l2():
    g = {"w": np.array([0.5])}
    # AdamW: p1 = p0 - lr * (1 - 2e-8) - lr * wd * p0
    p = Adam(lr=0.1, weight_decay=0.5).step({"w": np.array([2.0])}, g)
    np.testing.assert_allclose(p["w"], [2.0 - 0.1 * 0.5 / (0.5 + 1e-8) - 0.1 * 0.5 * 2.0], rtol=1e-14)
    # L2: the gradient becomes 0.5 + 0.5 * 2 = 1.5; the first step is still lr * sign
    p = Adam(lr=0.1, weight_decay=0.5, decoupled=False).step({"w": np.array([2.0])}, g)
    np.testing.assert_allclose(p["w"], [2.0 - 0.1 * 1.5 / (1.5 + 1e-8)], rtol=1e-14)


def test_schedule_state_and_inputs_untouched():
    opt = Adam(lr=1.0, schedule=lambda step: 0.5 ** step)
    p0 = {"a": np.array([1.0, 2.0]), "b": np.array(3.0)}
    p1 = opt.step(p0, {"a": np.array([1.0, -1.0]), "b": np.array(2.0)})
    np.testing.assert_array_equal(p0["a"], [1.0, 2.0])  # not modified in place
    assert opt.current_lr() == 0.5
    p2 = opt.step(p1, {"a": np.array([1.0, -1.0]), "b": np.array(2.0)})
    # A constant gradient: corrected m / sqrt(v) = sign(g) exactly up to eps, so steps are lr_t.
    np.testing.assert_allclose(p2["a"], [1.0 - 1.0 - 0.5, 2.0 + 1.0 + 0.5], rtol=1e-7)
    state = opt.state_dict()
    other = Adam(lr=1.0, schedule=lambda step: 0.5 ** step)
    other.load_state_dict(state)
    g = {"a": np.array([0.3, 0.1]), "b": np.array(-1.0)}
    np.testing.assert_array_equal(opt.step(p2, g)["a"], other.step(p2, g)["a"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0), "lr must be > 0"), (dict(betas=(0.9, 1.0)), "betas\\[1\\] must be < 1"),
    (dict(eps=0), "eps must be > 0"), (dict(weight_decay=-1), "weight_decay must be >= 0"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adam(**kwargs)


def test_mismatched_grads():
    with pytest.raises(ValueError, match="same keys"):
        Adam().step({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        Adam().step({"a": np.zeros(2)}, {"a": np.zeros(3)})
    with pytest.raises(TypeError, match="schedule"):
        Adam(schedule=3)
