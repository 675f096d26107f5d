"""TeacherService on a real local Ray cluster: its log-probs and top-k equal an independent forward
pass of the same model on the privileged prompt (HF and vLLM engines), calls are counted, and a
`self` teacher takes new weights when synced."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_rl.tasks.arith import ARITH_INSTRUCTION, generate
from trace_rl.teacher import PrivilegedPromptBuilder
from trace_rl.teacher.service import TeacherService

pytestmark = pytest.mark.slow


def reference(model, prompt: list[int], response: list[int], k: int):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(response)]
    return rows.gather(1, torch.tensor(response)[:, None]).squeeze(1), rows.topk(k, dim=-1)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_teacher_scores_equal_an_independent_forward_on_the_privileged_prompt(ray_cluster, tiny_random_model, engine):
    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model, dtype=torch.float32).eval()
    builder = PrivilegedPromptBuilder(fields=("solution",), instruction=ARITH_INSTRUCTION)
    problems = generate("test", 3, seed=4)
    prompts = [tok(builder.render(p, tok), add_special_tokens=False)["input_ids"] for p in problems]
    responses = [tok(p.solution, add_special_tokens=False)["input_ids"][: 5 + 7 * i] for i, p in enumerate(problems)]
    K, R = 8, max(len(r) for r in responses) + 3
    teacher = TeacherService(tiny_random_model, kind="frozen", engine=engine, top_k=K, max_model_len=512)
    try:
        # the engines' payload: arrays (not nested Python lists), one row per scored position
        import numpy as np
        import ray

        raw = ray.get(teacher.pool.actors[0].score_topk.remote([prompts[0] + responses[0]], [len(prompts[0])], K))[0]
        assert isinstance(raw["topk_ids"], np.ndarray) and raw["topk_ids"].shape == (len(responses[0]), K)
        assert raw["topk_ids"].dtype == np.int64 and raw["logprobs"].dtype == raw["topk_logprobs"].dtype == np.float32
        out = teacher.score(prompts, responses, response_len=R)
        assert out["teacher_logprobs"].shape == (3, R) and out["teacher_topk_ids"].shape == (3, R, K)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            lp, top = reference(model, p, r, K)
            n = len(r)
            torch.testing.assert_close(out["teacher_logprobs"][i, :n].double(), lp, atol=1e-3, rtol=0)
            torch.testing.assert_close(out["teacher_topk_logprobs"][i, :n].double(), top.values, atol=1e-3, rtol=0)
            # ids agree wherever the reference's neighbouring values are not (near-)ties
            gap = (top.values[:, :-1] - top.values[:, 1:]).abs() > 1e-3
            same = out["teacher_topk_ids"][i, :n, :-1] == top.indices[:, :-1]
            assert bool(same[gap].all())
            assert bool((out["teacher_logprobs"][i, n:] == 0).all())
        assert teacher.stats()["teacher/calls"] == 1 and teacher.stats()["teacher/tokens"] == sum(map(len, responses))
    finally:
        teacher.shutdown()


def test_self_teacher_resync_schedule_and_new_weights(ray_cluster, tiny_random_model):
    import ray

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model, dtype=torch.float32).eval()
    teacher = TeacherService(tiny_random_model, kind="self", engine="hf", top_k=4, resync_every=10)
    try:
        assert [s for s in range(31) if teacher.wants_sync(s)] == [10, 20, 30]
        prompt = tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]
        resp = tok("Step 1: 2 + 3 = 5.", add_special_tokens=False)["input_ids"]
        before = teacher.score([prompt], [resp], len(resp))["teacher_logprobs"]
        state = {k: v + 0.05 * torch.randn_like(v) if v.dim() == 2 else v for k, v in model.state_dict().items()
                 if k != "lm_head.weight"}
        teacher.sync(ray.put(state), version=10)
        model.load_state_dict(state, strict=False)
        after = teacher.score([prompt], [resp], len(resp))["teacher_logprobs"]
        lp, _ = reference(model, prompt, resp, 4)
        assert (after[0] - before[0]).abs().max() > 1e-3
        torch.testing.assert_close(after[0].double(), lp, atol=1e-4, rtol=0)
        assert teacher.stats()["teacher/syncs"] == 1 and teacher.stats()["teacher/calls"] == 2
    finally:
        teacher.shutdown()
    frozen = TeacherService.__new__(TeacherService)
    frozen.kind, frozen.resync_every = "frozen", 10
    assert not any(frozen.wants_sync(s) for s in range(50))


def test_ema_teacher_blends_the_synced_weights(ray_cluster, tiny_random_model):
    import ray

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model, dtype=torch.float32).eval()
    base = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in base.items()}
    teacher = TeacherService(tiny_random_model, kind="self", engine="hf", top_k=4, resync_every=1, ema_decay=0.75)
    try:
        teacher.sync(ray.put(base), version=0)   # seeds the EMA
        teacher.sync(ray.put(moved), version=1)  # 0.75 * base + 0.25 * moved
        model.load_state_dict({k: 0.75 * base[k] + 0.25 * moved[k] for k in base}, strict=False)
        prompt = tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]
        resp = tok("Step 1: 2 + 3 = 5.", add_special_tokens=False)["input_ids"]
        got = teacher.score([prompt], [resp], len(resp))["teacher_logprobs"][0]
        want, _ = reference(model, prompt, resp, 4)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    finally:
        teacher.shutdown()
    with pytest.raises(ValueError, match="ema_decay"):
        TeacherService(tiny_random_model, kind="frozen", ema_decay=0.5)


def test_scorer_leaves_rows_longer_than_the_teachers_context_unscored(ray_cluster, tiny_random_model):
    """A privileged prompt + response longer than the teacher engine's context is not sent (the engine would
    refuse the whole call): the row keeps the empty teacher fields and is marked ``teacher_skipped``; the
    others are scored as an independent forward pass scores them."""
    from trace_rl.batch import Batch
    from trace_rl.routing import TeacherScorer

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model, dtype=torch.float32).eval()
    builder = PrivilegedPromptBuilder(fields=("solution",), instruction=ARITH_INSTRUCTION)
    problems = generate("test", 3, seed=7)
    prompts = [tok(builder.render(p, tok), add_special_tokens=False)["input_ids"] for p in problems]
    resp = [tok(p.solution, add_special_tokens=False)["input_ids"][:6] for p in problems]
    limit = max(len(prompts[i]) + len(resp[i]) for i in (0, 2))
    resp[1] = (resp[1] * 100)[: limit - len(prompts[1]) + 1]  # row 1: one token more than the teacher's context
    lengths = [len(p) + len(r) for p, r in zip(prompts, resp)]
    assert lengths[1] > limit
    R = max(map(len, resp))
    ids = torch.zeros(3, R, dtype=torch.long)
    mask = torch.zeros(3, R, dtype=torch.bool)
    for i, r in enumerate(resp):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    batch = Batch(prompt_ids=torch.ones(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.bool),
                  response_ids=ids, response_mask=mask, behaviour_logprobs=torch.zeros(3, R),
                  group_ids=torch.arange(3), policy_version=torch.zeros(3, dtype=torch.long),
                  meta={"uid": [p.uid for p in problems]})
    teacher = TeacherService(tiny_random_model, kind="frozen", engine="hf", top_k=4, max_model_len=limit)
    try:
        out, metrics = TeacherScorer(teacher, tok, {p.uid: p for p in problems}, builder).score(batch)
        assert out.meta["teacher_skipped"] == [False, True, False]
        assert metrics["teacher/scored_rows"] == 2.0
        assert bool((out.teacher_logprobs[1] == 0).all()) and bool((out.teacher_topk_logprobs[1] == -1e4).all())
        for i in (0, 2):
            lp, _ = reference(model, prompts[i], resp[i], 4)
            torch.testing.assert_close(out.teacher_logprobs[i, :len(resp[i])].double(), lp, atol=1e-3, rtol=0)
    finally:
        teacher.shutdown()
