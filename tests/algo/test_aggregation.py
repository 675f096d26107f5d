"""trace_rl/algo/aggregation.py: naive loops, and micro-batch / data-parallel additivity."""
from __future__ import annotations

import pytest
import torch

from trace_rl.algo.aggregation import AGG_MODES, aggregate, loss_counts

# "balanced" also needs advantages and its own counts: tests/algo/test_balanced.py
PLAIN_MODES = tuple(m for m in AGG_MODES if m != "balanced")


def naive_aggregate(x, m, mode, max_len):
    """Token and sequence loops over nested lists (m: bool or float weights)."""
    tok_sum, n_tok, n_seq, seq_means = 0.0, 0, 0, 0.0
    for row_x, row_m in zip(x, m):
        s, n = 0.0, 0
        for v, w in zip(row_x, row_m):
            if w:
                s += v * float(w)
                n += 1
        tok_sum += s
        n_tok += n
        if n:
            n_seq += 1
            seq_means += s / n
    if mode == "token-mean":
        return tok_sum / max(n_tok, 1)
    if mode == "seq-mean-token-mean":
        return seq_means / max(n_seq, 1)
    if mode == "seq-mean-token-sum":
        return tok_sum / max(n_seq, 1)
    return tok_sum / (max(n_seq, 1) * max_len)


def make_batch(seed, B=11, R=8, D=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    lengths[3] = 0  # an all-padding row
    lengths[5] = R
    mask = torch.arange(R)[None, :] < lengths[:, None]
    feats = torch.randn(B, R, D, generator=g)
    target = torch.randn(B, R, generator=g)
    return feats, target, mask


@pytest.mark.parametrize("mode", PLAIN_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_loop(mode, seed):
    _, x, mask = make_batch(seed)
    x = x.double()
    got = aggregate(x, mask, mode)
    ref = naive_aggregate(x.tolist(), mask.tolist(), mode, mask.shape[1])
    assert got.dim() == 0
    assert abs(float(got) - ref) < 1e-12


@pytest.mark.parametrize("mode", PLAIN_MODES)
def test_float_weights_mask(mode):
    _, x, mask = make_batch(9)
    g = torch.Generator().manual_seed(1)
    w = mask.double() * torch.rand(mask.shape, generator=g, dtype=torch.float64)
    x = x.double()
    ref = naive_aggregate(x.tolist(), w.tolist(), mode, mask.shape[1])
    assert abs(float(aggregate(x, w, mode)) - ref) < 1e-12


def model_loss(model, feats, target, mask, mode, counts, max_len):
    """A per-token loss from a small model: softplus(linear(features)) - target * value."""
    v = model(feats).squeeze(-1)
    per_token = torch.nn.functional.softplus(v) - target * v
    return aggregate(per_token, mask, mode, num_tokens=counts["num_tokens"], num_seqs=counts["num_seqs"],
                     max_len=max_len)


def trim(feats, target, mask):
    """Cut a micro-batch to its own longest row (uneven padding across micro-batches)."""
    L = max(int(mask.sum(1).max()), 1)
    return feats[:, :L], target[:, :L], mask[:, :L]


@pytest.mark.parametrize("mode", PLAIN_MODES)
@pytest.mark.parametrize("n_micro", [1, 2, 3, 4])
def test_micro_batches_sum_to_whole_batch(mode, n_micro):
    feats, target, mask = make_batch(0)
    R = mask.shape[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(feats.shape[-1], 1)

    whole = model_loss(model, feats, target, mask, mode, loss_counts(mask), R)
    whole.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # Uneven micro-batches (11 rows into n parts), each trimmed to its own length; the global
    # counts are the sums of the per-micro-batch counts (what an all-reduce would give).
    parts = [trim(*t) for t in zip(feats.tensor_split(n_micro), target.tensor_split(n_micro),
                                   mask.tensor_split(n_micro))]
    counts = [loss_counts(m) for _, _, m in parts]
    total = {k: sum(c[k] for c in counts) for k in ("num_tokens", "num_seqs")}
    assert int(total["num_tokens"]) == int(mask.sum()) and int(total["num_seqs"]) == int(mask.any(1).sum())
    acc = 0.0
    for f, t, m in parts:
        loss = model_loss(model, f, t, m, mode, total, R)
        loss.backward()  # gradient accumulation
        acc += float(loss.detach())
    assert abs(acc - float(whole.detach())) < 1e-6
    for p, ref in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", PLAIN_MODES)
def test_two_ranks_times_two_micro_batches(mode):
    """Data parallel (2 ranks, gradients summed as all-reduce-sum would) x 2 micro-batches each."""
    feats, target, mask = make_batch(4, B=12)
    R = mask.shape[1]
    torch.manual_seed(1)
    model = torch.nn.Linear(feats.shape[-1], 1)
    whole = model_loss(model, feats, target, mask, mode, loss_counts(mask), R)
    whole.backward()
    ref = [p.grad.clone() for p in model.parameters()]

    ranks = [torch.nn.Linear(feats.shape[-1], 1) for _ in range(2)]
    for r in ranks:
        r.load_state_dict(model.state_dict())
    rank_rows = [slice(0, 6), slice(6, 12)]
    micro = [[trim(feats[s][i::2], target[s][i::2], mask[s][i::2]) for i in range(2)] for s in rank_rows]
    total = {"num_tokens": sum(loss_counts(m)["num_tokens"] for mb in micro for _, _, m in mb),
             "num_seqs": sum(loss_counts(m)["num_seqs"] for mb in micro for _, _, m in mb)}
    acc = 0.0
    for r, mbs in zip(ranks, micro):
        for f, t, m in mbs:
            loss = model_loss(r, f, t, m, mode, total, R)
            loss.backward()
            acc += float(loss.detach())
    assert abs(acc - float(whole.detach())) < 1e-6
    for i, p_ref in enumerate(ref):
        summed = sum(list(r.parameters())[i].grad for r in ranks)
        torch.testing.assert_close(summed, p_ref, atol=1e-6, rtol=0)


def test_local_counts_would_be_wrong():
    """Guard for the test above: without global counts, micro-batches do NOT add up."""
    _, x, mask = make_batch(0)
    whole = float(aggregate(x, mask, "token-mean"))
    parts = sum(float(aggregate(a, b, "token-mean")) for a, b in zip(x.tensor_split(2), mask.tensor_split(2)))
    assert abs(parts - whole) > 1e-3


def test_empty_and_padding_garbage():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    m = torch.tensor([[True, False], [False, True]])
    for mode in PLAIN_MODES:
        assert torch.isfinite(aggregate(x, m, mode))
        assert float(aggregate(x, torch.zeros_like(m), mode)) == 0.0
    assert float(aggregate(x, m, "token-mean")) == 1.5
    assert float(aggregate(x, m, "seq-mean-token-sum-norm", max_len=4)) == 3.0 / (2 * 4)


def test_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum, "
                                         "seq-mean-token-sum-norm"):
        aggregate(x, m, "sum")
    with pytest.raises(ValueError, match="mask has shape"):
        aggregate(x, m[:, :2])
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, m, "seq-mean-token-sum-norm", max_len=0)
    with pytest.raises(ValueError, match="num_tokens must be a scalar"):
        aggregate(x, m, num_tokens=torch.ones(2))
