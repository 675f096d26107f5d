"""What the vLLM engine asks vLLM for, without building an engine: per-prompt seeds (a seeded call must not
give every prompt the same random stream) and the teacher's arrays (tests/teacher/test_service.py runs them)."""
from __future__ import annotations

import types

import pytest


def test_a_seeded_call_gives_each_prompt_its_own_seed(monkeypatch):
    pytest.importorskip("vllm")
    import torch

    from trace_rl.rollout.vllm_engine import VLLMEngine, prompt_seed

    fake = types.SimpleNamespace(detokenize=False)
    fake._params = types.MethodType(VLLMEngine._params, fake)
    spec = {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 32, "seed": 11}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the seeded path (vLLM's CPU sampler has none)
    params = VLLMEngine._sampling_params(fake, spec, 5)
    assert [p.seed for p in params] == [prompt_seed(11, i) for i in range(5)]
    assert len({p.seed for p in params}) == 5
    assert all((p.n, p.temperature, p.top_p, p.max_tokens) == (4, 0.7, 0.9, 32) for p in params)
    assert len({prompt_seed(s, i) for s in range(50) for i in range(50)}) == 2500  # calls do not collide either
    unseeded = VLLMEngine._sampling_params(fake, {**spec, "seed": None}, 5)
    assert unseeded.seed is None and unseeded.n == 4  # one SamplingParams for the whole call
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert VLLMEngine._sampling_params(fake, spec, 5).seed is None  # CPU: the engine-level seed only
