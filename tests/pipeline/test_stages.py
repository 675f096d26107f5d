"""The pipeline's stage actors (trace_rl/pipeline/stages.py) with a real teacher service and the oracle annotator."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_rl.rollout.base import Sample
from trace_rl.rollout.pool import samples_to_batch
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


def test_annotate_and_teacher_stages_on_object_refs(ray_cluster, tiny_random_model):
    """The annotate and teacher stage actors, chained on object refs as the producer chains them: spans
    under the cap on the right rows, teacher fields only on annotated rows, equal to an independent
    forward pass on the privileged prompt."""
    import ray

    from trace_rl.config import AnnotatorConfig
    from trace_rl.pipeline.stages import AnnotateStage, TeacherStage

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    problems = generate("test", 4, seed=9)
    batch = make_batch(tok, problems)
    # a right response scored as wrong: the oracle finds no error in it, so the row gets no span
    batch.rewards[0] = 0.5
    by_uid = {p.uid: p for p in problems}
    annotate = ray.remote(AnnotateStage).remote(AnnotatorConfig(kind="oracle"), seed=0,
                                                tokenizer_path=tiny_random_model, trust_remote_code=False,
                                                problems=by_uid, span_cap=0.25)
    teacher_kwargs = dict(model_path=tiny_random_model, kind="frozen", engine="hf", top_k=4)
    teacher = ray.remote(TeacherStage).remote(teacher_kwargs, tokenizer_path=tiny_random_model,
                                              trust_remote_code=False, problems=by_uid, privileged=("solution",),
                                              instruction=ARITH_INSTRUCTION, chat_template_kwargs=(),
                                              teacher_rows="annotated")
    try:
        ref, astats = annotate.annotate.options(num_returns=2).remote(ray.put(batch))
        ref, tstats = teacher.score.options(num_returns=2).remote(ref)
        out, astats, tstats = ray.get(ref), ray.get(astats), ray.get(tstats)
        key, err = out.key_mask, out.error_mask
        n = out.response_mask.sum(1)
        # the cap: at most 25% of each response's tokens
        assert bool(((key | err).sum(1) <= (0.25 * n).floor()).all())
        # wrong responses (odd rows) get an error span on their first step and no key span
        assert bool(err[1::2].any(1).all()) and not bool(key[1::2].any())
        annotated = (key | err).any(1)
        assert not bool(annotated[0]) and int(annotated.sum()) == len(batch) - 1
        assert tstats["teacher/scored_rows"] == int(annotated.sum())
        assert astats["annotate/annotated_rows"] == int(annotated.sum()) and astats["busy_s"] > 0
        # scored rows equal an independent forward on the privileged prompt; unscored rows are zero
        builder = PrivilegedPromptBuilder(fields=("solution",), instruction=ARITH_INSTRUCTION)
        model = AutoModelForCausalLM.from_pretrained(tiny_random_model, dtype=torch.float32).eval()
        for i in range(len(out)):
            r = out.response_ids[i][out.response_mask[i]].tolist()
            if not annotated[i]:
                assert bool((out.teacher_logprobs[i] == 0).all())
                continue
            p = tok(builder.render(by_uid[out.meta["uid"][i]], tok), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
            want = logp[len(p) - 1:len(p) - 1 + len(r)].gather(1, torch.tensor(r)[:, None]).squeeze(1)
            torch.testing.assert_close(out.teacher_logprobs[i, :len(r)], want, atol=1e-4, rtol=0)
        assert ray.get(teacher.stats.remote())["teacher/tokens"] == int(out.response_mask[annotated].sum())
    finally:
        for actor in (annotate, teacher):
            ray.get(actor.shutdown.remote())
            ray.kill(actor)
