"""Channel kinds and norms of trace_rl/learner/loss.py (fkl, rkl, jsd, mle, logratio, skl) against naive
per-token loops; the student's top-k log-probs through PolicyModel; one LearnerGroup step with an fkl channel."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.batch import Batch
from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig
from trace_rl.learner.loss import check_channels, global_counts, micro_batch_loss, needs_topk

from .learner_helpers import VOCAB, load_hf, make_batch, make_tiny_model

K = 4
KINDS = ("pg", "fkl", "rkl", "jsd", "mle", "logratio", "skl")
NORMS = ("agg", "token", "seq")


def teacher_batch(B=8, R=7, seed=1, names=("pg",), weights=None, norms=()) -> Batch:
    """make_batch plus teacher fields: top-k ids / log-probs of a random teacher (normalised over VOCAB)
    and the teacher's log-prob of every sampled token; channels as given (default: the batch's pg)."""
    b = make_batch(B=B, R=R, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    t_logits = torch.randn(B, R, VOCAB, generator=g) * 2
    t_logp = torch.log_softmax(t_logits, -1)
    top = t_logp.topk(K, dim=-1)
    fields = {**b.to_dict(), "teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values,
              "teacher_logprobs": t_logp.gather(-1, b.response_ids[..., None])[..., 0] * b.response_mask,
              "channel_norms": tuple(norms)}
    if weights is not None:
        fields.update(channel_names=tuple(names), channel_weights=torch.stack(weights).float())
    return Batch(**fields)


def student_inputs(batch: Batch, seed=0):
    """logp, old (near logp), and the student's top-k log-probs at the teacher's ids (from a random
    student distribution, so the tail mass is real), all leaves that require grad where needed."""
    g = torch.Generator().manual_seed(seed)
    B, R = len(batch), batch.response_len
    m = batch.response_mask
    s_logp = torch.log_softmax(torch.randn(B, R, VOCAB, generator=g) * 2, -1)
    logp = (s_logp.gather(-1, batch.response_ids[..., None])[..., 0] * m).requires_grad_()
    old = (logp.detach() + 0.3 * torch.randn(B, R, generator=g)) * m
    topk = (s_logp.gather(-1, batch.teacher_topk_ids) * m[..., None]).requires_grad_()
    return logp, old, topk


def random_weights(batch: Batch, seed: int, p: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(batch.response_mask.shape, generator=g) < p).float() * (0.5 + torch.rand(
        batch.response_mask.shape, generator=g))
    w[3] = 0.0  # a sequence outside the channel (the "seq" count must skip it)
    return w * batch.response_mask


# ------------------------------------------------------------------------------------ naive per-token math
def naive_topk_div(ls, lt, kind, beta=0.5, tail="bucket", clip=None):
    """One token: lists of K student / teacher log-probs -> divergence (Python floats)."""
    ps, pt = [math.exp(v) for v in ls], [math.exp(v) for v in lt]
    if tail == "bucket":
        ps, pt = ps + [max(1 - sum(ps), 1e-300)], pt + [max(1 - sum(pt), 1e-300)]
    elif tail == "renorm":
        ps, pt = [x / sum(ps) for x in ps], [x / sum(pt) for x in pt]
    total = 0.0
    for s, t in zip(ps, pt):
        if kind == "forward":
            d = t * math.log(t / s)
        elif kind == "reverse":
            d = s * math.log(s / t)
        else:
            m = beta * t + (1 - beta) * s
            d = beta * t * math.log(t / m) + (1 - beta) * s * math.log(s / m)
        total += d if clip is None else min(d, clip)
    return total


def naive_per_token(kind, i, t, batch, logp, old, topk, algo):
    """The loss term of token (i, t) of channel kind ``kind`` (before weighting)."""
    lp, o = float(logp[i, t]), float(old[i, t])
    if kind in ("pg", "logratio"):
        A = float(batch.advantages[i, t]) if kind == "pg" else float(batch.teacher_logprobs[i, t]) - o
        r = math.exp(lp - o)
        return max(-A * r, -A * min(max(r, 1 - algo.clip_eps_low), 1 + algo.clip_eps_high))
    if kind == "mle":
        return -lp
    if kind == "skl":  # k3 of KL(student || teacher) on the sampled token
        d = float(batch.teacher_logprobs[i, t]) - lp
        return math.exp(d) - d - 1
    div = {"fkl": "forward", "rkl": "reverse", "jsd": "jsd"}[kind]
    return naive_topk_div(topk[i, t].tolist(), batch.teacher_topk_logprobs[i, t].tolist(), div,
                          getattr(algo, "jsd_beta", 0.5), getattr(algo, "vocab_kl_tail", "bucket"),
                          getattr(algo, "vocab_kl_entry_clip", None))


def naive_channel(kind, norm, w, batch, logp, old, topk, algo):
    """sum(w x) normalised by norm, token by token; 'agg' here is seq-mean-token-mean."""
    per_seq = []
    for i in range(len(batch)):
        terms = [(float(w[i, t]), naive_per_token(kind, i, t, batch, logp, old, topk, algo))
                 for t in range(batch.response_len) if w[i, t] != 0]
        per_seq.append(terms)
    n_tok = sum(len(s) for s in per_seq)
    n_seq = sum(1 for s in per_seq if s)
    if norm == "token":
        return sum(a * x for s in per_seq for a, x in s) / n_tok
    if norm == "seq":
        return sum(a * x for s in per_seq for a, x in s) / n_seq
    return sum(sum(a * x for a, x in s) / len(s) for s in per_seq if s) / n_seq


def _algo(**kw):
    a = AlgorithmConfig(loss_agg_mode="seq-mean-token-mean", **kw)
    a.vocab_kl_entry_clip, a.jsd_beta, a.vocab_kl_tail = 0.05, 0.3, "bucket"
    return a


# ------------------------------------------------------------------------------------ every kind, every norm
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_kind_and_norm_matches_naive_and_is_micro_batch_exact(kind, norm):
    base = teacher_batch()
    name = kind if kind == "pg" else f"{kind}:x"
    batch = teacher_batch(names=(name,), weights=[random_weights(base, 5)], norms=(norm,))
    algo = _algo()
    logp, old, topk = student_inputs(batch)
    counts = global_counts(batch)
    whole = micro_batch_loss(batch, logp, old, counts, algo, topk_logprobs=topk)
    want = naive_channel(kind, norm, batch.channel_weights[0], batch, logp.detach(), old, topk.detach(), algo)
    assert float(whole.loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(whole.parts[f"loss/{name}"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    g_whole = torch.autograd.grad(whole.loss, [logp, topk], allow_unused=True)
    total = sum(micro_batch_loss(batch.select(r), logp[r], old[r], counts, algo, topk_logprobs=topk[r]).loss
                for r in (slice(0, 3), slice(3, 4), slice(4, 8)))
    g_parts = torch.autograd.grad(total, [logp, topk], allow_unused=True)
    assert float(total.detach()) == pytest.approx(float(whole.loss.detach()), rel=1e-6, abs=1e-6)
    for a, b in zip(g_whole, g_parts):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    used = g_whole[1] if kind in ("fkl", "rkl", "jsd") else g_whole[0]
    assert used is not None and float(used.abs().sum()) > 0


def test_kl_metrics_are_unweighted_token_means_of_the_divergence():
    base = teacher_batch()
    names = ("fkl:a", "rkl:b", "jsd:c", "skl:d", "logratio:e")
    ws = [random_weights(base, s) for s in range(5)]
    batch = teacher_batch(names=names, weights=ws, norms=("token",) * 5)
    algo = _algo()
    logp, old, topk = student_inputs(batch)
    got = micro_batch_loss(batch, logp, old, global_counts(batch), algo, topk_logprobs=topk).token_metrics
    for name, w in zip(names, ws):
        kind = name.split(":")[0]
        toks = [(i, t) for i in range(len(batch)) for t in range(batch.response_len) if w[i, t] != 0]
        if kind == "logratio":  # k1 of KL(student || teacher): old - teacher
            vals = [float(old[i, t]) - float(batch.teacher_logprobs[i, t]) for i, t in toks]
        else:
            vals = [naive_per_token(kind, i, t, batch, logp.detach(), old, topk.detach(), algo) for i, t in toks]
        value, n = got[f"kl/{name}"]
        assert n == len(toks) and value == pytest.approx(sum(vals) / len(vals), rel=1e-5, abs=1e-7)
    assert "logratio:e/clipfrac" in got  # the PG metrics of a non-"pg" channel keep the channel prefix


def test_routed_batch_matches_a_per_token_reference():
    """TRACE-like routing: pg on the other tokens, forward KL on key spans of correct rollouts (span mean
    scaled by span / response length: weight coef / n_i, norm 'seq'), reverse KL on error spans of
    incorrect ones (norm 'token'); the loss is one per-token loop."""
    base = teacher_batch(B=8)
    g = torch.Generator().manual_seed(3)
    m = base.response_mask
    correct = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    span = (torch.rand(m.shape, generator=g) < 0.35) & m
    key, err = span & correct[:, None], span & ~correct[:, None]
    n_i = m.sum(1, keepdim=True).float()
    coef_f, coef_r = 0.5, 0.2
    w_pg = (m & ~span).float()
    w_f = key.float() * coef_f / n_i
    w_r = err.float() * coef_r
    batch = teacher_batch(B=8, names=("pg", "fkl:key", "rkl:error"), weights=[w_pg, w_f, w_r],
                          norms=("agg", "seq", "token"))
    algo = _algo()
    algo.loss_agg_mode = "token-mean"
    logp, old, topk = student_inputs(batch, seed=4)
    got = micro_batch_loss(batch, logp, old, global_counts(batch), algo, topk_logprobs=topk)

    lp, tk = logp.detach(), topk.detach()
    pg_sum, n_pg, f_sum, f_seqs, r_sum, n_r = 0.0, 0, 0.0, set(), 0.0, 0
    for i in range(8):
        L = int(m[i].sum())
        for t in range(L):
            if span[i, t]:
                if correct[i]:
                    f_sum += coef_f / L * naive_per_token("fkl", i, t, batch, lp, old, tk, algo)
                    f_seqs.add(i)
                else:
                    r_sum += coef_r * naive_per_token("rkl", i, t, batch, lp, old, tk, algo)
                    n_r += 1
            else:
                pg_sum += naive_per_token("pg", i, t, batch, lp, old, tk, algo)
                n_pg += 1
    want = pg_sum / n_pg + f_sum / len(f_seqs) + r_sum / n_r
    assert float(got.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(got.parts["loss/fkl:key"]) == pytest.approx(f_sum / len(f_seqs), rel=1e-5)
    assert float(got.parts["pg_loss"]) == pytest.approx(pg_sum / n_pg, rel=1e-5)
    assert abs(f_sum) > 1e-3 and abs(r_sum) > 1e-3  # (the entry clip can make a token's KL negative)


def test_missing_inputs_are_named():
    base = teacher_batch()
    w = random_weights(base, 1)
    batch = teacher_batch(names=("fkl:key",), weights=[w])
    logp, old, topk = student_inputs(batch)
    with pytest.raises(ValueError, match=r"channel 'fkl:key' needs the student's log-probs"):
        micro_batch_loss(batch, logp, old, global_counts(batch), _algo())
    with pytest.raises(ValueError, match=r"channel 'fkl:key' needs Batch\.teacher_topk_ids"):
        check_channels(Batch(**{**batch.to_dict(), "teacher_topk_ids": None, "teacher_topk_logprobs": None}))
    lr = teacher_batch(names=("logratio:x",), weights=[w])
    with pytest.raises(ValueError, match=r"channel 'logratio:x' needs Batch\.teacher_logprobs"):
        check_channels(Batch(**{**lr.to_dict(), "teacher_logprobs": None}))
    with pytest.raises(ValueError, match="channel_norms"):
        check_channels(Batch(**{**batch.to_dict(), "channel_norms": ("agg", "seq")}))


def test_needs_topk_only_for_vocabulary_divergence_channels():
    base = teacher_batch()
    w = random_weights(base, 1)
    assert needs_topk(teacher_batch(names=("pg", "rkl:e"), weights=[w, w]))
    assert not needs_topk(teacher_batch(names=("pg", "skl:e"), weights=[w, w]))
    assert not needs_topk(make_batch())


# ------------------------------------------------------------------------------------ the model side
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"))


def test_policy_returns_the_students_topk_logprobs_from_full_logits(model_dir):
    from trace_rl.learner.policy import PolicyModel, model_inputs

    batch = teacher_batch(B=4, R=6, seed=2)
    policy = PolicyModel(load_hf(model_dir), chunk_size=5)
    kw, r = model_inputs(batch)
    ids = batch.teacher_topk_ids[:, :r]
    logp, ent, topk = policy(**kw, temperature=0.7, with_entropy=True, topk_ids=ids)
    plain = policy(**kw, temperature=0.7, with_entropy=True)
    assert len(plain) == 2 and torch.equal(plain[0], logp)  # the old call is unchanged
    ref = load_hf(model_dir)
    with torch.no_grad():
        for i in range(len(batch)):
            p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            n = int(batch.response_mask[i].sum())
            seq = torch.cat([p, batch.response_ids[i, :n]])[None]
            lsm = torch.log_softmax(ref(input_ids=seq).logits[0, len(p) - 1: len(p) - 1 + n] / 0.7, -1)
            torch.testing.assert_close(topk[i, :n].detach(), lsm.gather(-1, ids[i, :n]), atol=1e-5, rtol=0)
            assert (topk[i, n:] == 0).all()
    # the gradient flows to the lm_head through the top-k path alone
    policy.zero_grad()
    topk.sum().backward()
    assert float(policy.hf.lm_head.weight.grad.abs().sum()) > 0


@pytest.mark.slow
def test_learner_group_trains_a_step_with_an_fkl_channel(ray_cluster, model_dir):
    """torch backend, 1 rank, micro-batches of 3 rows: pg + fkl:all. The reported fkl loss equals the naive
    forward KL of the initial model's full logits (one update: old = current), and is finite. Then the same
    two steps on 2 ZeRO-3 ranks (the top-k head gathers its sharded weight) give the same numbers."""
    from trace_rl.learner.group import LearnerGroup

    T = 0.7
    base = teacher_batch(B=6, R=7, seed=6)
    m = base.response_mask.float()
    batch = teacher_batch(B=6, R=7, seed=6, names=("pg", "fkl:all"), weights=[m, 0.5 * m], norms=("agg", "token"))
    algo = AlgorithmConfig(lr=1e-3, old_logprobs="recompute", loss_agg_mode="token-mean")
    algo.vocab_kl_entry_clip = 0.05
    model = load_hf(model_dir)
    want, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(batch)):
            p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            L = int(batch.response_mask[i].sum())
            seq = torch.cat([p, batch.response_ids[i, :L]])[None]
            lsm = torch.log_softmax(model(input_ids=seq).logits[0, len(p) - 1: len(p) - 1 + L] / T, -1)
            for t in range(L):
                ls = lsm[t, batch.teacher_topk_ids[i, t]].tolist()
                want += 0.5 * naive_topk_div(ls, batch.teacher_topk_logprobs[i, t].tolist(), "forward", clip=0.05)
                n += 1
    lc = LearnerConfig(backend="torch", num_ranks=1, micro_batch_size=3, logprob_chunk_size=5, threads_per_rank=1)
    with LearnerGroup(lc, algo, ModelConfig(), model_dir) as group:
        runs = [[group.train(batch, temperature=T, step=s) for s in range(2)]]
    metrics = runs[0][0]
    assert math.isfinite(metrics["loss"]) and metrics["nonfinite"] == 0 and metrics["updates"] == 1
    assert metrics["loss/fkl:all"] == pytest.approx(want / n, rel=1e-4)
    assert metrics["kl/fkl:all"] == pytest.approx(want / n / 0.5, rel=1e-4)
    assert metrics["grad_norm"] > 0

    z3 = LearnerConfig(backend="deepspeed", num_ranks=2, zero_stage=3, micro_batch_size=2, logprob_chunk_size=5,
                       deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
                       threads_per_rank=1)
    with LearnerGroup(z3, algo, ModelConfig(), model_dir) as group:
        runs.append([group.train(batch, temperature=T, step=s) for s in range(2)])
    for step in range(2):
        for k in ("loss", "loss/fkl:all", "kl/fkl:all", "grad_norm"):
            assert runs[1][step][k] == pytest.approx(runs[0][step][k], rel=1e-5), (step, k)
    assert runs[0][1]["loss/fkl:all"] != pytest.approx(runs[0][0]["loss/fkl:all"], rel=1e-4)  # it trained
