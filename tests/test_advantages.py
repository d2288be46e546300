"""Advantage estimators against hand-computed values (the arithmetic is written out, not delegated)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mllmjax.advantages import (
    ESTIMATORS,
    compute_advantages,
    grpo_clip2,
    register_advantage,
    zero_variance,
)
from mllmjax.errors import BadInputError


def test_grpo_hand_computed():
    # group 1: mean 0.5, population std 0.5; group 2: mean 2, std sqrt(2/3)
    a = compute_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 2.0]]), "grpo")
    s1 = 0.5 + 1e-4
    s2 = math.sqrt(0.5) + 1e-4  # values 1,2,3,2: mean 2, var (1+0+1+0)/4
    np.testing.assert_allclose(a[0], [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], rtol=1e-12)
    np.testing.assert_allclose(a[1], [-1 / s2, 0.0, 1 / s2, 0.0], rtol=1e-12, atol=1e-15)
    assert a[0, 0] == pytest.approx(0.99980003999, rel=1e-10)


def test_dr_grpo_and_rloo_hand_computed():
    r = np.array([[1.0, 2.0, 3.0, 6.0]])  # mean 3
    np.testing.assert_allclose(compute_advantages(r, "dr_grpo"), [[-2.0, -1.0, 0.0, 3.0]])
    # r_i minus the mean of the other three: 1-11/3, 2-10/3, 3-9/3, 6-6/3
    np.testing.assert_allclose(
        compute_advantages(r, "rloo"), [[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]], atol=1e-12
    )


def test_reinforce_is_a_global_z_score():
    r = np.array([[0.0, 1.0], [1.0, 1.0]])  # mean 0.75, population std sqrt(0.1875)
    s = math.sqrt(0.1875) + 1e-4
    np.testing.assert_allclose(
        compute_advantages(r, "reinforce"), [[-0.75 / s, 0.25 / s], [0.25 / s, 0.25 / s]]
    )


def test_all_equal_groups_are_exactly_zero_for_group_estimators():
    r = np.array([[0.1, 0.1, 0.1], [1.0, 0.0, 0.5]])  # np.std([0.1]*3) is ~1.4e-17, not 0
    for name in ("grpo", "dr_grpo", "rloo"):
        a = compute_advantages(r, name)
        assert (a[0] == 0.0).all(), name
    assert zero_variance(r).tolist() == [True, False]


def test_grpo_clip2_hand_computed_with_sign_flip():
    r = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # global: 5 ones in 12 -> mean 5/12, var 5/12 - 25/144 = 35/144
    gmean, gstd = 5 / 12, math.sqrt(35) / 12 + 1e-4
    z1, z0 = (1 - gmean) / gstd, (0 - gmean) / gstd
    # group 1 grpo: mean 0.25, std sqrt(0.1875)
    s = math.sqrt(0.1875) + 1e-4
    top, low = 0.75 / s + 0.02 * z1, -0.25 / s + 0.02 * z0
    a = compute_advantages(r, "grpo_clip2")
    # positives rescaled so the max is 1.5; the negatives (> floor -6) stay
    np.testing.assert_allclose(a[0], [1.5, low, low, low], rtol=1e-12)
    assert top > 1.5 and low < 0
    # all-wrong group below the global mean: every member is 0.02*z0 < 0, the floor -4*max = -0.08*z0 > 0
    # lifts them all: the documented sign flip (a group with no correct answer gets a positive advantage)
    np.testing.assert_allclose(a[1], [-4 * 0.02 * z0] * 4, rtol=1e-12)
    assert (a[1] > 0).all()
    # all-right group above the global mean: 0.02*z1 > 0 rescaled to 1.5 for every member
    np.testing.assert_allclose(a[2], [1.5] * 4, rtol=1e-12)
    # plain grpo gives both all-equal groups exactly 0
    np.testing.assert_array_equal(compute_advantages(r, "grpo")[1:], 0.0)


def test_grpo_clip2_floor_binds():
    # one right in 16: the max is rescaled to 1.5, so the floor is -6, far below the lows (~ -0.26)
    r = np.array([[0.0] * 15 + [1.0]])
    a = grpo_clip2(r)
    assert a.max() == pytest.approx(1.5)
    assert a.min() >= -6.0
    # one wrong in 64: its grpo advantage is far below -6, so the floor binds
    r2 = np.array([[1.0] * 63 + [0.0]])
    a2 = grpo_clip2(r2)
    # grpo: outlier at -(63/64)/std with std = sqrt(63)/64 -> about -7.94; floor -4 * 1.5 = -6 binds
    assert a2.max() == pytest.approx(1.5)
    assert a2[0, -1] == pytest.approx(-6.0)


def test_single_sample_groups_are_an_error():
    with pytest.raises(BadInputError, match="G must be >= 2"):
        compute_advantages(np.array([[1.0], [0.0]]), "grpo")


def test_unknown_estimator_lists_known():
    with pytest.raises(BadInputError) as e:
        compute_advantages(np.zeros((1, 2)), "ppo")
    for name in ("grpo", "dr_grpo", "rloo", "reinforce", "grpo_clip2"):
        assert name in str(e.value)


def test_all_gather_hook_supplies_global_statistics():
    local = np.array([[0.0, 1.0]])
    other_host = np.array([1.0, 1.0, 1.0, 1.0])
    a = compute_advantages(local, "reinforce", all_gather=lambda x: np.concatenate([x, other_host]))
    # global: [0,1,1,1,1,1] mean 5/6, var 5/6 - 25/36 = 5/36
    s = math.sqrt(5 / 36) + 1e-4
    np.testing.assert_allclose(a, [[-(5 / 6) / s, (1 / 6) / s]])


def test_registered_estimator_is_usable_by_name():
    def sign_only(rewards, *, all_gather):
        return np.sign(rewards - rewards.mean(axis=1, keepdims=True))

    register_advantage("test_sign_only", sign_only)
    try:
        np.testing.assert_array_equal(compute_advantages(np.array([[0.0, 2.0]]), "test_sign_only"), [[-1, 1]])
    finally:
        ESTIMATORS.pop("test_sign_only")
