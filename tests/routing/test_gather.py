"""The driver's input gathering (trace_rl/routing.py) with a real teacher service and the oracle annotator."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_rl.annotate import get_annotator
from trace_rl.rollout.base import Sample
from trace_rl.rollout.pool import samples_to_batch
from trace_rl.routing import InputGatherer
from trace_rl.tasks.arith import ARITH_INSTRUCTION, generate
from trace_rl.tasks.base import render_prompt
from trace_rl.teacher import PrivilegedPromptBuilder

pytestmark = pytest.mark.slow


def make_batch(tok, problems):
    """Two responses per problem: the reference solution (correct) and one with a wrong first step."""
    prompts, samples, rewards = [], [], []
    for i, p in enumerate(problems):
        prompts.append(tok(render_prompt(p, tok, instruction=ARITH_INSTRUCTION), add_special_tokens=False)["input_ids"])
        lines = p.solution.splitlines()
        head, _, rhs = lines[0].rpartition("= ")
        wrong = "\n".join([f"{head}= {int(rhs.rstrip('.')) + 1}."] + lines[1:])
        for text, r in ((p.solution, 1.0), (wrong, 0.0)):
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            samples.append(Sample(i, ids, [-1.0] * len(ids), "stop"))
            rewards.append(r)
    batch = samples_to_batch(prompts, samples, pad_token_id=tok.pad_token_id, version=0,
                             meta={"uid": [p.uid for p in problems]})
    batch.rewards = torch.tensor(rewards)
    return batch


def test_annotations_and_teacher_rows(ray_cluster, tiny_random_model):
    from trace_rl.teacher.service import TeacherService

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    problems = generate("test", 4, seed=9)
    batch = make_batch(tok, problems)
    # a right response scored as wrong: the oracle finds no error in it, so the row gets no span
    batch.rewards[0] = 0.5
    teacher = TeacherService(tiny_random_model, kind="frozen", engine="hf", top_k=4)
    try:
        builder = PrivilegedPromptBuilder(fields=("solution",), instruction=ARITH_INSTRUCTION)
        g = InputGatherer(tokenizer=tok, problems={p.uid: p for p in problems}, annotator=get_annotator("oracle"),
                          span_cap=0.25, teacher=teacher, prompt_builder=builder)
        timings: dict[str, float] = {}
        extra, metrics = g.gather(frozenset({"annotations", "teacher_topk"}), batch, 0, timings,
                                  teacher_rows="annotated")
        key, err = extra["key_mask"], extra["error_mask"]
        n = batch.response_mask.sum(1)
        # the cap: at most 25% of each response's tokens
        assert bool(((key | err).sum(1) <= (0.25 * n).floor()).all())
        # wrong responses (odd rows) get an error span on their first step and no key span
        assert bool(err[1::2].any(1).all()) and not bool(key[1::2].any())
        annotated = (key | err).any(1)
        assert not bool(annotated[0]) and int(annotated.sum()) == len(batch) - 1
        assert metrics["teacher/scored_frac"] == pytest.approx(float(annotated.float().mean()))
        assert "timing_s/annotate" in timings and "timing_s/teacher" in timings
        # scored rows equal an independent forward on the privileged prompt; unscored rows are zero
        model = AutoModelForCausalLM.from_pretrained(tiny_random_model, dtype=torch.float32).eval()
        for i in range(len(batch)):
            r = batch.response_ids[i][batch.response_mask[i]].tolist()
            if not annotated[i]:
                assert bool((batch.teacher_logprobs[i] == 0).all())
                continue
            uid = batch.meta["uid"][i]
            p = tok(builder.render(g.problems[uid], tok), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
            want = logp[len(p) - 1:len(p) - 1 + len(r)].gather(1, torch.tensor(r)[:, None]).squeeze(1)
            torch.testing.assert_close(batch.teacher_logprobs[i, :len(r)], want, atol=1e-4, rtol=0)
        assert teacher.stats()["teacher/tokens"] == int(batch.response_mask[annotated].sum())
    finally:
        teacher.shutdown()
