"""trace_rl/algo/advantages.py against per-group Python loops."""
from __future__ import annotations

import math
import random

import pytest
import torch

from trace_rl.algo import advantages as A
from trace_rl.algo.advantages import (ADVANTAGE_ESTIMATORS, dr_grpo_advantages, get_advantage_estimator,
                                      group_stats, grpo_advantages, register_advantage_estimator,
                                      zero_variance_mask)


def naive_groups(rewards, group_ids):
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards.tolist(), group_ids.tolist()):
        groups.setdefault(g, []).append(r)
    return groups


def naive_grpo(rewards, group_ids, scale_by_std=True, eps=1e-6, singleton="unit"):
    groups = naive_groups(rewards, group_ids)
    out = []
    for r, g in zip(rewards.tolist(), group_ids.tolist()):
        vals = groups[g]
        n = len(vals)
        if n == 1:
            if singleton == "zero":
                out.append(0.0)
            else:
                out.append(r / (1 + eps) if scale_by_std else r)
            continue
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        out.append((r - mean) / (std + eps) if scale_by_std else r - mean)
    return torch.tensor(out, dtype=torch.float64)


def random_batch(seed, n_groups=12, max_size=5, binary=False):
    rng = random.Random(seed)
    rewards, gids = [], []
    for _ in range(n_groups):
        gid = rng.randrange(-1000, 10**6)  # arbitrary, non-contiguous ids
        size = rng.randint(1, max_size)
        kind = rng.random()
        for _ in range(size):
            if kind < 0.25:
                rewards.append(0.5)  # an all-equal group
            elif binary:
                rewards.append(float(rng.random() < 0.5))
            else:
                rewards.append(rng.uniform(-3, 3))
            gids.append(gid)
    order = list(range(len(rewards)))
    rng.shuffle(order)  # groups interleaved, not contiguous
    return (torch.tensor([rewards[i] for i in order]), torch.tensor([gids[i] for i in order]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("singleton", ["unit", "zero"])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_grpo_matches_loop(seed, scale_by_std, singleton, eps):
    rewards, gids = random_batch(seed, binary=seed % 2 == 0)
    adv = grpo_advantages(rewards, gids, scale_by_std=scale_by_std, eps=eps, singleton=singleton)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    ref = naive_grpo(rewards.double(), gids, scale_by_std, eps, singleton)
    torch.testing.assert_close(adv.double(), ref, atol=2e-5, rtol=1e-5)


def test_all_equal_groups_are_exactly_zero_and_singletons():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 7.0, 2.5])
    gids = torch.tensor([3, 3, 3, 9, 9, 4, 11])
    unit = grpo_advantages(rewards, gids)
    assert unit[:3].tolist() == [0.0, 0.0, 0.0]  # exactly, despite 0.1 not being representable
    assert unit[3] > 0 > unit[4] and abs(float(unit[3]) + float(unit[4])) < 1e-6
    assert math.isclose(float(unit[5]), 7.0 / (1 + 1e-6), rel_tol=1e-6)
    assert math.isclose(float(unit[6]), 2.5 / (1 + 1e-6), rel_tol=1e-6)
    zero = grpo_advantages(rewards, gids, singleton="zero")
    assert zero[5].item() == 0.0 and zero[6].item() == 0.0
    torch.testing.assert_close(zero[:5], unit[:5])
    # unbiased std: group {1, 0} has std sqrt(0.5)
    assert math.isclose(float(unit[3]), 0.5 / (math.sqrt(0.5) + 1e-6), rel_tol=1e-6)
    # eps = 0 must not produce 0/0 on flat groups
    assert torch.isfinite(grpo_advantages(rewards, gids, eps=0.0, singleton="zero")).all()


@pytest.mark.parametrize("seed", range(4))
def test_dr_grpo_and_group_stats_match_loop(seed):
    rewards, gids = random_batch(seed)
    groups = naive_groups(rewards.double(), gids)
    dr = dr_grpo_advantages(rewards, gids)
    mean, std, size = group_stats(rewards, gids)
    for i, (r, g) in enumerate(zip(rewards.double().tolist(), gids.tolist())):
        vals = groups[g]
        m = sum(vals) / len(vals)
        assert abs(float(dr[i]) - (r - m)) < 1e-5
        assert abs(float(mean[i]) - m) < 1e-5
        assert int(size[i]) == len(vals)
        s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        assert abs(float(std[i]) - s) < 1e-5
    assert dr.dtype == torch.float32


@pytest.mark.parametrize("seed", range(4))
def test_zero_variance_mask_matches_loop(seed):
    rewards, gids = random_batch(seed, binary=True)
    groups = naive_groups(rewards, gids)
    mask = zero_variance_mask(rewards, gids)
    assert mask.dtype == torch.bool
    expect = [len(set(groups[g])) == 1 for g in gids.tolist()]
    assert mask.tolist() == expect
    # their GRPO advantage is 0 (the reason DAPO can drop them)
    assert (grpo_advantages(rewards, gids, singleton="zero")[mask] == 0).all()


def test_zero_variance_mask_integer_rewards_and_singletons():
    mask = zero_variance_mask(torch.tensor([1, 1, 0, 1, 5]), torch.tensor([0, 0, 1, 1, 2]))
    assert mask.tolist() == [True, True, False, False, True]


def test_empty_batch():
    e = torch.zeros(0)
    g = torch.zeros(0, dtype=torch.long)
    assert grpo_advantages(e, g).shape == (0,)
    assert dr_grpo_advantages(e, g).shape == (0,)
    assert zero_variance_mask(e, g).shape == (0,)


def test_input_errors():
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="rewards must be a 1-D"):
        grpo_advantages(r[None], g[None])
    with pytest.raises(ValueError, match="group_ids must be a tensor shaped like rewards"):
        grpo_advantages(r, torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="group_ids must be integers"):
        grpo_advantages(r, g.float())
    with pytest.raises(ValueError, match="NaN"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), g)
    with pytest.raises(ValueError, match="singleton must be one of"):
        grpo_advantages(r, g, singleton="drop")


def test_registry():
    assert get_advantage_estimator("grpo") is grpo_advantages
    assert get_advantage_estimator("dr_grpo") is dr_grpo_advantages
    for exc in (KeyError, ValueError):
        with pytest.raises(exc) as info:
            get_advantage_estimator("reinforce++")
        assert "dr_grpo, grpo" in str(info.value) and "reinforce++" in str(info.value)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda r, g: r)

    try:
        @register_advantage_estimator("test_negated")
        def negated(rewards, group_ids, **kwargs):
            return -rewards

        assert get_advantage_estimator("test_negated") is negated
        assert "test_negated" in ADVANTAGE_ESTIMATORS
    finally:
        A.ADVANTAGE_ESTIMATORS.pop("test_negated", None)
