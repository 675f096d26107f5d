"""trace_rl/learner/policy.py: the chunked log-prob head against the HF model's own full logits."""
from __future__ import annotations

import pytest
import torch

from trace_rl.batch import Batch
from trace_rl.learner.policy import PolicyModel, model_inputs

from .learner_helpers import load_hf, make_batch, make_tiny_model, naive_logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_policy"))


def _policy(model_dir, chunk=5) -> PolicyModel:
    return PolicyModel(load_hf(model_dir), chunk_size=chunk)


def _repad(batch: Batch, extra_left: int, extra_right: int) -> Batch:
    """The same sequences with more all-padding prompt columns (left) and response columns (right)."""
    B = len(batch)
    z = lambda n, like: torch.zeros(B, n, dtype=like.dtype)  # noqa: E731
    d = batch.to_dict()
    d["prompt_ids"] = torch.cat([z(extra_left, batch.prompt_ids), batch.prompt_ids], 1)
    d["prompt_mask"] = torch.cat([z(extra_left, batch.prompt_mask), batch.prompt_mask], 1)
    for k in ("response_ids", "response_mask", "behaviour_logprobs", "advantages"):
        d[k] = torch.cat([d[k], z(extra_right, d[k])], 1)
    d["channel_weights"] = torch.cat([d["channel_weights"], torch.zeros(1, B, extra_right)], 2)
    return Batch(**d)


def test_logprobs_and_entropy_match_full_logits_of_each_unpadded_sequence(model_dir):
    """Left-padded prompts, right-padded responses, temperature 0.7, chunks of 5 tokens."""
    policy, batch, T = _policy(model_dir), make_batch(B=6, seed=3), 0.7
    kw, r_kept = model_inputs(batch)
    with torch.no_grad():
        logp, ent = policy(**kw, temperature=T, with_entropy=True)
        want = naive_logprobs(load_hf(model_dir), batch, T)
    assert logp.shape == (6, r_kept)
    for i, (lp, h) in enumerate(want):
        n = len(lp)
        assert torch.allclose(logp[i, :n], lp, atol=1e-5)
        assert torch.allclose(ent[i, :n], h, atol=1e-5)
        assert (logp[i, n:] == 0).all() and (ent[i, n:] == 0).all()


def test_padding_columns_nobody_uses_are_trimmed_and_change_nothing(model_dir):
    policy, batch = _policy(model_dir), make_batch(B=4, seed=8)
    wide = _repad(batch, extra_left=3, extra_right=4)
    kw, r_kept = model_inputs(wide)
    kw0, r0 = model_inputs(batch)
    assert kw["input_ids"].shape == kw0["input_ids"].shape and r_kept == r0 <= batch.response_len
    with torch.no_grad():
        a = policy(**kw, temperature=1.0)[0]
        b = policy(**kw0, temperature=1.0)[0]
    assert torch.equal(a, b)


def test_gradients_match_the_full_logits_computation(model_dir):
    policy, batch, T = _policy(model_dir), make_batch(B=5, seed=4), 0.8
    weights = torch.randn(len(batch), batch.response_len, generator=torch.Generator().manual_seed(0))
    kw, r = model_inputs(batch)
    logp, ent = policy(**kw, temperature=T, with_entropy=True)
    ((logp * weights[:, :r]).sum() + 0.1 * ent.sum()).backward()
    got = {n: p.grad.clone() for n, p in policy.hf_named_parameters()}

    ref = load_hf(model_dir)
    total = 0
    for i, (lp, h) in enumerate(naive_logprobs(ref, batch, T)):
        total = total + (lp * weights[i, :len(lp)]).sum() + 0.1 * h.sum()
    total.backward()
    for name, p in ref.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_head_keeps_names_and_tying(model_dir):
    hf = load_hf(model_dir)
    names = [n for n, _ in hf.named_parameters()]
    policy = PolicyModel(hf)
    assert [n for n, _ in policy.hf_named_parameters()] == names
    assert policy.hf.lm_head.weight is policy.hf.model.embed_tokens.weight
    assert "hf.lm_head.weight" in policy.state_dict()


def test_a_micro_batch_without_response_tokens_still_runs_every_module(model_dir):
    """ZeRO-3 ranks must run the same modules; an all-padding micro-batch gives zeros and zero grads."""
    policy, batch = _policy(model_dir), make_batch(B=2, seed=1)
    empty = Batch(**{**batch.to_dict(), "response_mask": torch.zeros_like(batch.response_mask)})
    kw, r = model_inputs(empty)
    assert r == 1
    logp, _ = policy(**kw, temperature=1.0)
    assert (logp == 0).all()
    logp.sum().backward()
    grads = [p.grad for _, p in policy.hf_named_parameters()]
    assert all(g is not None and (g == 0).all() for g in grads)


def test_a_biased_lm_head_is_rejected(model_dir):
    hf = load_hf(model_dir)
    hf.lm_head = torch.nn.Linear(64, 128, bias=True)
    with pytest.raises(ValueError, match="bias"):
        PolicyModel(hf)
