"""RolloutPool with real engines (vLLM on CPU, and the HF fallback) on a real local Ray cluster.

The reference log-probs are computed independently here with a plain transformers forward pass."""
from __future__ import annotations

import pytest
import torch

from trace_rl.rollout.pool import _chunks, samples_to_batch
from trace_rl.rollout.base import Sample

pytestmark = pytest.mark.slow


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_logprobs(model, seq: list[int], start: int, temperature: float = 1.0) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float() / temperature
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[t - 1, seq[t]].item() for t in range(start, len(seq))]


@pytest.fixture(scope="module", params=["vllm", "hf"])
def pool(request, ray_cluster, tiny_random_model):
    from trace_rl.rollout.pool import RolloutPool

    p = RolloutPool(tiny_random_model, engine=request.param, num_engines=2 if request.param == "hf" else 1,
                    max_model_len=256, pad_token_id=0, seed=0)
    yield p
    p.shutdown()


def _prompts(tok):
    texts = ["Tom has 3 apples", "buys 5 more: 3 + 5 =", "\\boxed{", "apples and"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_generate_batch_layout_and_behaviour_logprobs(pool, tiny_random_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    prompts = _prompts(tok)
    if pool.engine == "vllm":  # the default engine is compiled (rollout.enforce_eager=false): the checks below hold
        assert all(info["compiled"] for info in pool.infos)
    for temperature in (1.0, 0.7):
        batch = pool.generate(prompts, {"n": 3, "temperature": temperature, "max_new_tokens": 24}, version=5,
                              meta={"uid": ["a", "b", "c", "d"]})
        batch.validate()
        assert len(batch) == 12
        assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        assert batch.meta["uid"] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3
        assert batch.policy_version.tolist() == [5] * 12
        model = hf_model(tiny_random_model)
        worst = 0.0
        for i in range(len(batch)):
            p = prompts[int(batch.group_ids[i])]
            # prompts are left-padded, responses right-padded
            assert batch.prompt_ids[i, batch.prompt_len - len(p):].tolist() == p
            assert batch.prompt_mask[i].sum().item() == len(p)
            L = int(batch.response_mask[i].sum())
            assert batch.response_mask[i, :L].all() and not batch.response_mask[i, L:].any()
            resp = batch.response_ids[i, :L].tolist()
            if batch.meta["finish_reason"][i] == "stop":
                assert resp[-1] == tok.eos_token_id
            else:
                assert L == 24
            ref = reference_logprobs(model, p + resp, len(p), temperature)
            got = batch.behaviour_logprobs[i, :L].tolist()
            worst = max(worst, max(abs(a - b) for a, b in zip(ref, got)))
        assert worst < 1e-3, f"behaviour logprobs differ from the HF forward by {worst} at T={temperature}"


def test_weight_update_matches_new_weights(pool, tiny_random_model):
    """After an update, the engine's log-probs of a fixed sequence equal an independent forward pass
    on the same weights (1e-3): the tied-embedding pitfall of the CPU backend would break this."""
    import ray

    model = hf_model(tiny_random_model)
    seq = list(range(5, 45))
    before = pool.score([seq], [10])[0]
    assert max(abs(a - b) for a, b in zip(before, reference_logprobs(model, seq, 10))) < 1e-3

    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    # a learner sends named_parameters(): the tied lm_head appears once, as the embedding
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert "lm_head.weight" not in state
    stats = pool.update_weights(ray.put(state), version=7)
    assert stats["seconds"] > 0
    assert pool.versions() == [7] * len(pool)

    ref = reference_logprobs(model, seq, 10)
    after = pool.score([seq], [10])[0]
    assert max(abs(a - b) for a, b in zip(before, ref)) > 0.05, "the update should change the log-probs"
    assert max(abs(a - b) for a, b in zip(after, ref)) < 1e-3
    # generation uses the new weights too (behaviour log-probs of fresh samples)
    batch = pool.generate([seq[:10]], {"n": 2, "temperature": 1.0, "max_new_tokens": 16}, version=7)
    L = int(batch.response_mask[0].sum())
    gen_ref = reference_logprobs(model, seq[:10] + batch.response_ids[0, :L].tolist(), 10)
    assert max(abs(a - b) for a, b in zip(gen_ref, batch.behaviour_logprobs[0, :L].tolist())) < 1e-3


def test_chunks_cover_everything_in_order():
    for n in range(0, 11):
        for k in range(1, 5):
            ch = _chunks(n, k)
            assert len(ch) == k and ch[0][0] == 0 and ch[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ch, ch[1:]))
            sizes = [e - s for s, e in ch]
            assert max(sizes) - min(sizes) <= 1


def test_samples_to_batch_pads_left_and_right():
    prompts = [[1, 2, 3], [4]]
    samples = [Sample(0, [7, 8], [-0.1, -0.2], "stop"), Sample(1, [9, 9, 9, 9], [-1.0] * 4, "length")]
    b = samples_to_batch(prompts, samples, pad_token_id=0, version=2)
    assert b.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b.prompt_mask.tolist() == [[True] * 3, [False, False, True]]
    assert b.response_ids.tolist() == [[7, 8, 0, 0], [9, 9, 9, 9]]
    assert b.behaviour_logprobs[0].tolist() == pytest.approx([-0.1, -0.2, 0, 0])
    # padding keeps the last position (it is masked anyway)
    assert b.position_ids().tolist() == [[0, 1, 2, 3, 4, 4, 4], [0, 0, 0, 1, 2, 3, 4]]


def test_generate_stream_hands_on_whole_groups_as_object_refs(pool, tiny_random_model):
    """The streaming generation (the producer's path): alternating Batch / stats refs, every group whole and
    in exactly one chunk, group ids global across engines, policy version stamped by the engine; with the
    HF engine the concatenated chunks equal a plain generate() with the same seed."""
    import ray
    from transformers import AutoTokenizer

    from trace_rl.batch import Batch
    from trace_rl.pipeline.route import concat_chunks

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    prompts = _prompts(tok) * 2  # 8 prompts over the pool's engines
    spec = {"n": 3, "temperature": 1.0, "max_new_tokens": 16}
    meta = {"uid": [f"u{i}" for i in range(8)], "answer": [str(i) for i in range(8)]}
    chunks, stats = [], []
    for stream in pool.generate_stream(prompts, spec, meta=meta, chunks=4):
        for ref in stream:
            assert isinstance(ref, ray.ObjectRef)
            chunks.append(ray.get(ref))
            stats.append(ray.get(next(stream)))
    assert all(isinstance(c, Batch) for c in chunks) and all(isinstance(s, dict) for s in stats)
    for c, s in zip(chunks, stats):
        c.validate()
        assert s["rows"] == len(c) and s["groups"] == len(set(c.group_ids.tolist())) and s["end"] >= s["start"]
        counts = torch.bincount(c.group_ids)
        assert set(counts[counts > 0].tolist()) == {3}  # whole groups only
        assert [c.meta["uid"][i] for i in range(len(c))] == [f"u{int(g)}" for g in c.group_ids]
    batch = concat_chunks(chunks, pad_token_id=0)
    assert batch.group_ids.tolist() == [g for g in range(8) for _ in range(3)]
    assert sum(s["tokens"] for s in stats) == batch.num_response_tokens()
    assert set(batch.policy_version.tolist()) == set(pool.versions())
    if pool.engine == "hf":  # the same sub-batches and seeds as generate(): identical samples
        from trace_rl.rollout.pool import RolloutPool

        fresh = RolloutPool(tiny_random_model, engine="hf", num_engines=len(pool), max_model_len=256, pad_token_id=0,
                            seed=7)
        fresh2 = RolloutPool(tiny_random_model, engine="hf", num_engines=len(pool), max_model_len=256,
                             pad_token_id=0, seed=7)
        try:
            want = fresh.generate(prompts, spec, meta=meta)
            items = [ray.get(r) for st in fresh2.generate_stream(prompts, spec, meta=meta, chunks=2) for r in st]
            got = concat_chunks([x for x in items if isinstance(x, Batch)], pad_token_id=0)
            assert torch.equal(got.response_ids, want.response_ids)
            assert torch.equal(got.behaviour_logprobs, want.behaviour_logprobs)
        finally:
            fresh.shutdown()
            fresh2.shutdown()
