"""trace_rl/algo/kl.py: naive per-element formulas, and Monte Carlo against the exact KL."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.algo.kl import KL_ESTIMATORS, kl_estimate


def naive(lp: float, lq: float, kind: str) -> float:
    if kind == "k1":
        return lp - lq
    if kind == "k2":
        return 0.5 * (lp - lq) ** 2
    if kind == "k3":
        return math.exp(lq - lp) - (lq - lp) - 1
    return abs(lp - lq)


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_matches_naive_formula(kind):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 4
    lq = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 4
    out = kl_estimate(lp, lq, kind)
    assert out.shape == lp.shape
    ref = torch.tensor([[naive(a, b, kind) for a, b in zip(r1, r2)] for r1, r2 in zip(lp.tolist(), lq.tolist())],
                       dtype=torch.float64)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if kind != "k1":
        assert (out >= 0).all()


def test_k3_small_differences_are_accurate():
    lp = torch.tensor([-1.0], dtype=torch.float32)
    lq = lp + 1e-4
    # exp(x) - x - 1 ~ x^2 / 2 = 5e-9; computing exp(x) - 1 naively in fp32 would lose it all
    assert float(kl_estimate(lp, lq, "k3")) == pytest.approx(0.5e-8, rel=1e-2)


def test_identical_distributions_give_zero():
    lp = torch.tensor([-0.3, -2.0, -7.5])
    for kind in KL_ESTIMATORS:
        assert (kl_estimate(lp, lp.clone(), kind) == 0).all()


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))


@pytest.mark.parametrize("seed", [0, 1])
def test_k1_k3_unbiased_by_monte_carlo(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    kl = exact_kl(p, q)
    for kind in ("k1", "k3"):
        est = kl_estimate(lp, lq, kind)
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - kl) < 5 * se + 1e-12, (kind, float(est.mean()), kl, se)


def test_k3_lower_variance_and_k2_close_for_near_distributions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, 0)
    q = torch.softmax(logits + 0.1 * torch.randn(8, generator=g, dtype=torch.float64), 0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    kl = exact_kl(p, q)
    k1, k2, k3 = (kl_estimate(lp, lq, k) for k in ("k1", "k2", "k3"))
    assert float(k3.var()) < 0.1 * float(k1.var())  # Schulman's point: k3 is far less noisy
    assert abs(float(k2.mean()) - kl) < 0.1 * kl  # k2's bias is small when p ~ q


def test_k3_clamp():
    lp = torch.tensor([0.0, 0.0])
    lq = torch.tensor([100.0, -100.0])
    out = kl_estimate(lp, lq, "k3")
    assert torch.isfinite(out).all()
    assert float(out[0]) == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert float(out[1]) == pytest.approx(math.exp(-20) + 19, rel=1e-6)
    assert math.isinf(float(kl_estimate(lp, lq, "k3", log_ratio_clamp=None)[0]))


def test_gradients_flow():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    lq = torch.tensor([-1.5, -1.0])
    kl_estimate(lp, lq, "k3").sum().backward()
    # d/dlp [exp(lq - lp) - (lq - lp) - 1] = 1 - exp(lq - lp)
    torch.testing.assert_close(lp.grad, 1 - torch.exp(lq - lp.detach()))


def test_errors():
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(torch.zeros(2), torch.zeros(3))
