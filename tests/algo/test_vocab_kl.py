"""trace_rl/algo/vocab_kl.py against naive per-token loops over the vocabulary (Python floats)."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.algo.kl import kl_estimate
from trace_rl.algo.logprobs import gather_log_softmax
from trace_rl.algo.vocab_kl import DIVERGENCES, TAIL_MODES, full_vocab_divergence, sampled_kl, topk_divergence

from .test_logprobs import MaxTensorSize


# ------------------------------------------------------------------------------ naive references
def softmax_list(row, T=1.0):
    m = max(v / T for v in row)
    e = [math.exp(v / T - m) for v in row]
    s = sum(e)
    return [x / s for x in e]


def kl_term(p, q):
    """p log(p / q), 0 log 0 = 0."""
    return 0.0 if p == 0 else p * math.log(p / q)


def naive_terms(ps, pt, kind, beta):
    """Per-entry terms from two lists of probabilities."""
    out = []
    for s, t in zip(ps, pt):
        if kind == "forward":
            out.append(kl_term(t, s))
        elif kind == "reverse":
            out.append(kl_term(s, t))
        else:
            m = beta * t + (1 - beta) * s
            out.append(beta * kl_term(t, m) + (1 - beta) * kl_term(s, m))
    return out


def naive_sum(ps, pt, kind, beta, clip):
    terms = naive_terms(ps, pt, kind, beta)
    return sum(min(x, clip) if clip is not None else x for x in terms)


def naive_full(s_logits, t_logits, kind, beta=0.5, clip=None, T=1.0):
    V = s_logits.shape[-1]
    rows = zip(s_logits.double().reshape(-1, V).tolist(), t_logits.double().reshape(-1, V).tolist())
    out = [naive_sum(softmax_list(s, T), softmax_list(t, T), kind, beta, clip) for s, t in rows]
    return torch.tensor(out, dtype=torch.float64).view(s_logits.shape[:-1])


def naive_topk(s_logits, t_logits, ids, kind, beta=0.5, tail="bucket", clip=None):
    V, K = s_logits.shape[-1], ids.shape[-1]
    out = []
    for s_row, t_row, row_ids in zip(s_logits.double().reshape(-1, V).tolist(),
                                     t_logits.double().reshape(-1, V).tolist(), ids.reshape(-1, K).tolist()):
        ps_full, pt_full = softmax_list(s_row), softmax_list(t_row)
        ps, pt = [ps_full[i] for i in row_ids], [pt_full[i] for i in row_ids]
        if tail == "bucket":
            ps, pt = ps + [max(1 - sum(ps), 0.0)], pt + [max(1 - sum(pt), 0.0)]
        elif tail == "renorm":
            ps, pt = [x / sum(ps) for x in ps], [x / sum(pt) for x in pt]
        out.append(naive_sum(ps, pt, kind, beta, clip))
    return torch.tensor(out, dtype=torch.float64).view(ids.shape[:-1])


def logits_pair(shape=(3, 4), V=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, V, generator=g, dtype=dtype) * 2
    t = s + torch.randn(*shape, V, generator=g, dtype=dtype) * 1.5
    t[0, 0, 3] += 6.0  # one very confident teacher row: large entries for the clip to act on
    return s, t


def topk_inputs(s, t, K):
    ids = t.topk(K, dim=-1).indices
    return torch.log_softmax(s, -1).gather(-1, ids), torch.log_softmax(t, -1).gather(-1, ids), ids


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_topk_divergence_matches_loop(kind, tail, clip):
    s, t = logits_pair()
    ls, lt, ids = topk_inputs(s, t, K=4)
    got = topk_divergence(ls, lt, kind, beta=0.3, tail=tail, entry_clip=clip)
    assert got.shape == (3, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, naive_topk(s, t, ids, kind, 0.3, tail, clip), atol=1e-10, rtol=0)
    f32 = topk_divergence(ls.float(), lt.float(), kind, beta=0.3, tail=tail, entry_clip=clip)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_full_vocab_divergence_matches_loop(kind, clip, chunk):
    s, t = logits_pair()
    got = full_vocab_divergence(s, t, kind, beta=0.7, entry_clip=clip, chunk_size=chunk, temperature=0.8)
    torch.testing.assert_close(got, naive_full(s, t, kind, 0.7, clip, T=0.8), atol=1e-10, rtol=0)
    sl = full_vocab_divergence(s.float()[:, 1:], t.float()[:, 1:], kind, beta=0.7, entry_clip=clip,
                               chunk_size=chunk)  # non-contiguous fp32 slice
    assert sl.dtype == torch.float32
    torch.testing.assert_close(sl.double(), naive_full(s[:, 1:], t[:, 1:], kind, 0.7, clip), atol=1e-5, rtol=0)


def test_the_clip_acts_in_these_cases():
    """Guard for the clip tests above: some entries really exceed 0.05, so clipping changes the value."""
    s, t = logits_pair()
    assert (naive_full(s, t, "forward", clip=0.05) < naive_full(s, t, "forward") - 1e-3).any()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_topk_with_the_whole_vocabulary_equals_full_vocab(kind, tail, clip):
    """K = V: the tail mass is 0, so every tail mode is the full-vocabulary divergence."""
    s, t = logits_pair(V=9)
    ls, lt, ids = topk_inputs(s, t, K=9)
    got = topk_divergence(ls, lt, kind, tail=tail, entry_clip=clip)
    torch.testing.assert_close(got, full_vocab_divergence(s, t, kind, entry_clip=clip), atol=1e-10, rtol=0)
    # and the gradient w.r.t. the student logits, through the gathered log-probs
    z1, z2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    topk_divergence(gather_log_softmax(z1, ids), lt, kind, tail=tail, entry_clip=clip).sum().backward()
    full_vocab_divergence(z2, t, kind, entry_clip=clip).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------ gradients
def test_forward_kl_gradient_is_p_student_minus_p_teacher_times_the_weight():
    s, t = logits_pair()
    w = torch.rand(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z = s.clone().requires_grad_()
    (w * full_vocab_divergence(z, t, "forward", chunk_size=5)).sum().backward()
    want = w[..., None] * (torch.softmax(s, -1) - torch.softmax(t, -1))
    torch.testing.assert_close(z.grad, want, atol=1e-12, rtol=0)
    # same through the top-k path with K = V (tail bucket)
    ls, lt, ids = topk_inputs(s, t, K=12)
    z = s.clone().requires_grad_()
    (w * topk_divergence(gather_log_softmax(z, ids), lt, "forward")).sum().backward()
    torch.testing.assert_close(z.grad, want, atol=1e-10, rtol=0)


def dense_reference(z, t, kind, beta, clip, T=1.0):
    """Plain autograd on the dense formula (log-probs), for gradient comparisons."""
    ls, lt = torch.log_softmax(z / T, -1), torch.log_softmax(t / T, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":
        terms = pt * (lt - ls)
    elif kind == "reverse":
        terms = ps * (ls - lt)
    else:
        lm = torch.log(beta * pt + (1 - beta) * ps)
        terms = beta * pt * (lt - lm) + (1 - beta) * ps * (ls - lm)
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(-1)


@pytest.mark.parametrize("kind", ["reverse", "jsd", "forward"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_full_vocab_gradient_matches_dense_autograd(kind, clip):
    s, t = logits_pair()
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z1, z2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    (w * full_vocab_divergence(z1, t, kind, beta=0.4, entry_clip=clip, chunk_size=3, temperature=1.5)).sum().backward()
    (w * dense_reference(z2, t, kind, 0.4, clip, T=1.5)).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradcheck(kind):
    s, t = logits_pair(shape=(2, 2), V=5, seed=3)
    assert torch.autograd.gradcheck(
        lambda z: full_vocab_divergence(z, t, kind, beta=0.3, chunk_size=3, temperature=0.9),
        (s.clone().requires_grad_(),))
    ls, lt, _ = topk_inputs(s, t, K=3)
    for tail in TAIL_MODES:
        assert torch.autograd.gradcheck(lambda x: topk_divergence(x, lt, kind, beta=0.3, tail=tail),
                                        (ls.clone().requires_grad_(),))


def test_teacher_gets_no_gradient():
    s, t = logits_pair()
    z, tt = s.clone().requires_grad_(), t.clone().requires_grad_()
    full_vocab_divergence(z, tt, "forward").sum().backward()
    assert tt.grad is None and z.grad is not None
    ls, lt, _ = topk_inputs(s, t, K=3)
    lt = lt.clone().requires_grad_()
    out = topk_divergence(ls, lt, "reverse")
    assert not out.requires_grad


def test_jsd_endpoints_are_zero_and_half_is_symmetric():
    """beta = 0 makes M = pS and beta = 1 makes M = pT: both give 0 (value and gradient)."""
    s, t = logits_pair()
    for beta in (0.0, 1.0):
        z = s.clone().requires_grad_()
        v = full_vocab_divergence(z, t, "jsd", beta=beta)
        assert float(v.detach().abs().max()) < 1e-12
        v.sum().backward()
        assert float(z.grad.abs().max()) < 1e-12
        ls, lt, _ = topk_inputs(s, t, K=4)
        x = ls.clone().requires_grad_()
        vt = topk_divergence(x, lt, "jsd", beta=beta)
        vt.sum().backward()
        assert float(vt.detach().abs().max()) < 1e-12 and torch.isfinite(x.grad).all() and float(x.grad.abs().max()) < 1e-12
    # JSD_0.5 is symmetric and bounded by log 2; near the endpoints it is small but positive
    a, b = full_vocab_divergence(s, t, "jsd", beta=0.5), full_vocab_divergence(t, s, "jsd", beta=0.5)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert float(a.max()) <= math.log(2) and float(a.min()) > 0
    assert (full_vocab_divergence(s, t, "jsd", beta=0.01) > 0).all()


def test_clipped_entries_give_no_gradient():
    """Forward KL on the top-k, no tail: d/d ls_k = -pT_k where pT_k (log pT_k - ls_k) <= c, else 0."""
    s, t = logits_pair()
    ls, lt, _ = topk_inputs(s, t, K=4)
    x = ls.clone().requires_grad_()
    c = 0.05
    topk_divergence(x, lt, "forward", tail="ignore", entry_clip=c).sum().backward()
    pt = lt.exp()
    clipped = pt * (lt - ls) > c
    assert clipped.any() and (~clipped).any()
    want = torch.where(clipped, torch.zeros_like(pt), -pt)
    torch.testing.assert_close(x.grad, want, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------ edge cases, memory, errors
def test_padding_like_inputs_stay_finite():
    """Zero-filled padding rows (student sum exp > 1: the tail clamps) and a teacher with -inf entries."""
    ls = torch.zeros(2, 3, requires_grad=True)
    lt = torch.tensor([[0.0, 0.0, 0.0], [-0.1, -math.inf, -math.inf]])
    for kind in DIVERGENCES:
        for tail in TAIL_MODES:
            out = topk_divergence(ls, lt, kind, tail=tail, entry_clip=0.05)
            assert torch.isfinite(out).all(), (kind, tail)
            g, = torch.autograd.grad(out.sum(), ls)
            assert torch.isfinite(g).all(), (kind, tail)


def test_full_vocab_is_chunked():
    N, V, chunk = 32, 128, 4
    s = torch.randn(N, V, dtype=torch.float32, requires_grad=True)
    t = torch.randn(N, V, dtype=torch.float32)
    frozen = s.detach()
    with MaxTensorSize() as probe:
        full_vocab_divergence(frozen, t, "jsd", chunk_size=chunk, entry_clip=0.05)
    assert probe.max_numel <= chunk * V
    out = full_vocab_divergence(s, t, "reverse", chunk_size=chunk)
    with MaxTensorSize() as probe:
        out.sum().backward()
    assert probe.max_numel <= N * V  # the gradient itself


def test_sampled_kl_is_kl_estimate_with_a_detached_teacher():
    g = torch.Generator().manual_seed(8)
    lp = torch.randn(3, 5, generator=g).requires_grad_()
    tp = torch.randn(3, 5, generator=g).requires_grad_()
    for est in ("k1", "k2", "k3"):
        torch.testing.assert_close(sampled_kl(lp, tp, est), kl_estimate(lp, tp, est))
    sampled_kl(lp, tp, "k3").sum().backward()
    assert tp.grad is None and lp.grad is not None


def test_bad_arguments_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown divergence kind 'fwd'"):
        topk_divergence(x, x, "fwd")
    with pytest.raises(ValueError, match="unknown tail mode 'drop'"):
        topk_divergence(x, x, tail="drop")
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
        full_vocab_divergence(x, x, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="entry_clip must be a positive"):
        topk_divergence(x, x, entry_clip=0.0)
    with pytest.raises(ValueError, match=r"student_logprobs \(2, 3\) and teacher_logprobs \(2, 4\)"):
        topk_divergence(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="student_logits must be floating point"):
        full_vocab_divergence(torch.zeros(2, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="chunk_size"):
        full_vocab_divergence(x, x, chunk_size=0)
