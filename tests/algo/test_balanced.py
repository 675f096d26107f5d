"""The ``balanced`` mode of trace_rl/algo/aggregation.py: naive loops and micro-batch additivity."""
from __future__ import annotations

import pytest
import torch

from trace_rl.algo.aggregation import AGG_MODES, BALANCED_COUNTS, aggregate, loss_counts


def naive_balanced(x, m, adv):
    """Classes by the sign of sum_t adv over the masked tokens; each class's token mean, weighted
    by its number of sequences, over all sequences."""
    classes = {}  # sign -> [weighted sum, tokens, seqs]
    for row_x, row_m, row_a in zip(x, m, adv):
        toks = [(v, float(w), a) for v, w, a in zip(row_x, row_m, row_a) if w]
        if not toks:
            continue
        total = sum(a for _, _, a in toks)
        sign = (total > 0) - (total < 0)
        c = classes.setdefault(sign, [0.0, 0, 0])
        c[0] += sum(v * w for v, w, _ in toks)
        c[1] += len(toks)
        c[2] += 1
    n_seqs = sum(c[2] for c in classes.values())
    return sum(c[2] * c[0] / c[1] for c in classes.values()) / max(n_seqs, 1)


def make(seed, B=12, R=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    lengths[2] = 0  # an all-padding row
    mask = torch.arange(R)[None, :] < lengths[:, None]
    x = torch.randn(B, R, generator=g, dtype=torch.float64)
    seq_adv = torch.randn(B, generator=g, dtype=torch.float64)
    seq_adv[4] = 0.0  # a zero-advantage sequence: its own class
    adv = seq_adv[:, None] + 0.3 * torch.randn(B, R, generator=g, dtype=torch.float64)  # per-token variation
    adv[4] = 0.0
    return x, mask, adv


def test_registered():
    assert "balanced" in AGG_MODES
    assert BALANCED_COUNTS == ("num_pos_tokens", "num_pos_seqs", "num_neg_tokens", "num_neg_seqs")


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive(seed):
    x, mask, adv = make(seed)
    got = aggregate(x, mask, "balanced", advantages=adv)
    assert abs(float(got) - naive_balanced(x.tolist(), mask.tolist(), adv.tolist())) < 1e-12
    w = mask.double() * torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got_w = aggregate(x, w, "balanced", advantages=adv)
    assert abs(float(got_w) - naive_balanced(x.tolist(), w.tolist(), adv.tolist())) < 1e-12


def test_one_class_equals_token_mean_and_classes_matter():
    x, mask, adv = make(7)
    pos = adv.abs() + 0.1
    torch.testing.assert_close(aggregate(x, mask, "balanced", advantages=pos), aggregate(x, mask, "token-mean"))
    assert not torch.allclose(aggregate(x, mask, "balanced", advantages=adv), aggregate(x, mask, "token-mean"))


def test_counts():
    x, mask, adv = make(3)
    c = loss_counts(mask, adv)
    signs = torch.sign((adv * mask).sum(1))
    has = mask.any(1)
    assert float(c["num_pos_seqs"]) == float(((signs > 0) & has).sum())
    assert float(c["num_neg_seqs"]) == float(((signs < 0) & has).sum())
    assert float(c["num_pos_tokens"]) == float(mask[signs > 0].sum())
    assert float(c["num_neg_tokens"]) == float(mask[signs < 0].sum())
    assert set(loss_counts(mask)) == {"num_tokens", "num_seqs"}


@pytest.mark.parametrize("n_micro", [2, 3, 5])
def test_micro_batches_sum_to_whole_batch(n_micro):
    """The learner's recipe: global counts from every micro-batch, summed; each micro-batch loss
    normalised by them; the sum equals the whole-batch loss. Gradients too."""
    x, mask, adv = make(11)
    feats = torch.randn(*x.shape, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    whole = aggregate(feats @ theta, mask, "balanced", advantages=adv)
    (g_whole,) = torch.autograd.grad(whole, theta)
    parts = list(torch.arange(x.shape[0]).tensor_split(n_micro))
    keys = ("num_tokens", "num_seqs", *BALANCED_COUNTS)
    counts = {k: sum(loss_counts(mask[p], adv[p])[k] for p in parts) for k in keys}
    total = sum(aggregate(feats[p] @ theta, mask[p], "balanced", advantages=adv[p], **counts) for p in parts)
    (g_total,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_total, g_whole, rtol=1e-12, atol=1e-12)
    # local counts would not add up
    local = sum(aggregate(feats[p] @ theta, mask[p], "balanced", advantages=adv[p]) for p in parts)
    assert abs(float(local.detach()) - float(whole.detach())) > 1e-6


def test_empty_and_errors():
    x, mask, adv = make(0)
    z = torch.zeros_like(mask)
    assert float(aggregate(x, z, "balanced", advantages=adv)) == 0.0
    with pytest.raises(ValueError, match="'balanced' needs advantages"):
        aggregate(x, mask, "balanced")
    with pytest.raises(ValueError, match="advantages must be a \\[B, R\\] tensor"):
        aggregate(x, mask, "balanced", advantages=adv[:, 0])
    with pytest.raises(ValueError, match="num_pos_tokens must be a scalar"):
        aggregate(x, mask, "balanced", advantages=adv, num_pos_tokens=torch.ones(2))
