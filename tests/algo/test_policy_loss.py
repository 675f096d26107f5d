"""trace_rl/algo/policy_loss.py against a per-token Python loop."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.algo import policy_loss as P
from trace_rl.algo.policy_loss import (POLICY_LOSSES, get_policy_loss, masked_mean, ppo_clip_loss,
                                       register_policy_loss)


def naive_ppo(lp, old, adv, mask, eps_low, eps_high, dual_clip, clamp):
    """Per-token loss, d loss / d logprob, and metrics, one token at a time."""
    B, R = len(lp), len(lp[0])
    loss = [[0.0] * R for _ in range(B)]
    grad = [[0.0] * R for _ in range(B)]
    n = low = high = dual = 0
    kl_sum = ratio_sum = 0.0
    for b in range(B):
        for t in range(R):
            if not mask[b][t]:
                continue
            a = adv[b][t]
            d = lp[b][t] - old[b][t]
            clamped = clamp is not None and abs(d) > clamp
            if clamp is not None:
                d = max(-clamp, min(clamp, d))
            r = math.exp(d)
            unclipped = -a * r
            clipped = -a * min(max(r, 1 - eps_low), 1 + eps_high)
            val, g = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
            if dual_clip is not None and a < 0 and -a * dual_clip < val:
                val, g = -a * dual_clip, 0.0
            if clamped:
                g = 0.0  # clamp has zero gradient outside its range
            loss[b][t], grad[b][t] = val, g
            n += 1
            low += a < 0 and r < 1 - eps_low
            high += a > 0 and r > 1 + eps_high
            dual += dual_clip is not None and a < 0 and r > dual_clip
            kl_sum += r - 1 - math.log(r)
            ratio_sum += r
    n = max(n, 1)
    metrics = {"clipfrac": (low + high) / n, "clipfrac_low": low / n, "clipfrac_high": high / n,
               "approx_kl": kl_sum / n, "ratio_mean": ratio_sum / n, "clipfrac_dual": dual / n}
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64), metrics


def make_inputs(seed, B=5, R=9, spread=0.4, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, R, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(B, R, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(B, R, generator=g, dtype=torch.float64) if per_token_adv \
        else torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, R + 1, (B,), generator=g)
    lengths[0] = R
    lengths[1] = 0  # an empty row
    mask = torch.arange(R)[None, :] < lengths[:, None]
    return lp, old, adv, mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.1, 0.1)])
def test_ppo_clip_matches_loop(seed, dual_clip, per_token_adv, eps):
    lp, old, adv, mask = make_inputs(seed, spread=1.2 if dual_clip else 0.4, per_token_adv=per_token_adv)
    adv_tok = adv if per_token_adv else adv[:, None].expand_as(lp)
    x = lp.clone().requires_grad_()
    loss, metrics = ppo_clip_loss(x, old, adv, mask, eps_low=eps[0], eps_high=eps[1], dual_clip=dual_clip)
    assert loss.shape == lp.shape
    loss.sum().backward()
    ref_loss, ref_grad, ref_m = naive_ppo(lp.tolist(), old.tolist(), adv_tok.tolist(), mask.tolist(),
                                          eps[0], eps[1], dual_clip, 20.0)
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-12, rtol=0)
    keys = {"clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_mean"}
    assert set(metrics) == keys | ({"clipfrac_dual"} if dual_clip else set())
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad
        assert abs(float(v) - ref_m[k]) < 1e-9, k
    assert float(metrics["clipfrac"]) > 0  # the inputs do exercise the clip ...
    if dual_clip:
        assert float(metrics["clipfrac_dual"]) > 0  # ... and the dual clip


def test_broadcast_advantages_equal_per_token():
    lp, old, adv, mask = make_inputs(7)
    a, _ = ppo_clip_loss(lp, old, adv, mask)
    b, _ = ppo_clip_loss(lp, old, adv[:, None].expand_as(lp).clone(), mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_defaults_are_dapo_clip_higher():
    # A > 0: ratio capped at 1.28 (not 1.2); A < 0: ratio floored at 0.8
    lp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    loss, m = ppo_clip_loss(lp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8]]))
    assert float(m["clipfrac_high"]) == 0.5 and float(m["clipfrac_low"]) == 0.5 and float(m["clipfrac"]) == 1.0


def test_padding_garbage_does_not_leak():
    lp, old, adv, mask = make_inputs(3)
    lp = lp.float()
    old = old.float()
    lp[~mask] = float("nan")
    old[~mask] = float("-inf")
    x = lp.clone().requires_grad_()
    loss, metrics = ppo_clip_loss(x, old, adv.float(), mask)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss[~mask] == 0).all()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_extreme_ratios_are_clamped():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[100.0, -100.0]])  # ratios e^100 and e^-100
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = ppo_clip_loss(lp, old, adv, mask)
    assert torch.isfinite(loss).all()
    assert math.isclose(float(loss[0, 0]), math.exp(20.0), rel_tol=1e-5)  # -A * e^20
    assert math.isclose(float(loss[0, 1]), 0.8, rel_tol=1e-6)  # clip floor for A < 0
    assert torch.isfinite(m["approx_kl"]) and torch.isfinite(m["ratio_mean"])
    unclamped, _ = ppo_clip_loss(lp, old, adv, mask, log_ratio_clamp=None)
    assert math.isinf(float(unclamped[0, 0]))  # what the clamp protects against
    dual, m = ppo_clip_loss(lp, old, adv, mask, dual_clip=3.0)
    assert float(dual[0, 0]) == 3.0 and float(m["clipfrac_dual"]) == 0.5


def test_empty_mask_metrics_are_zero():
    lp, old = torch.zeros(2, 3), torch.zeros(2, 3)
    loss, m = ppo_clip_loss(lp, old, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    assert (loss == 0).all()
    assert all(float(v) == 0.0 for v in m.values())


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 0.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    assert float(masked_mean(x, m)) == pytest.approx(7.0 / 3.0)
    assert float(masked_mean(x, torch.zeros_like(m))) == 0.0


def test_errors():
    lp = torch.zeros(2, 3)
    ok = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        ppo_clip_loss(lp, torch.zeros(2, 4), torch.ones(2), ok)
    with pytest.raises(ValueError, match="mask has shape"):
        ppo_clip_loss(lp, lp, torch.ones(2), ok[:, :2])
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_clip_loss(lp, lp, torch.ones(3), ok)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_loss(lp, lp, torch.ones(2), ok, dual_clip=0.5)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip_loss(lp, lp, torch.ones(2), ok, eps_low=1.5)


def test_registry():
    assert get_policy_loss("ppo_clip") is ppo_clip_loss
    for exc in (KeyError, ValueError):
        with pytest.raises(exc, match="known: ppo_clip"):
            get_policy_loss("gspo")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("ppo_clip")(ppo_clip_loss)
    try:
        @register_policy_loss("test_reinforce")
        def reinforce(logprobs, old_logprobs, advantages, mask, **kw):
            return -advantages[:, None] * logprobs * mask, {}

        assert POLICY_LOSSES["test_reinforce"] is reinforce
    finally:
        P.POLICY_LOSSES.pop("test_reinforce", None)
