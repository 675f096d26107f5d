"""The shared start-up (trace_rl/startup.py): services decided once from the method's needs, the whole
configuration checked by the subsystems that own it, and the module boundaries the design asks for."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trace_rl.algo import METHODS, TEACHER_NEEDS
from trace_rl.config import Config, ConfigError, to_config
from trace_rl.startup import algorithm_for_learners, decide_services, subsystem_checks, validate

PKG = Path(__file__).resolve().parent.parent / "trace_rl"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (at any depth of the file: functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_eval_shares_the_start_up_not_the_driver():
    mods = imported_modules(PKG / "eval.py")
    assert not any(m == "trace_rl.train" or m.startswith("trace_rl.train.") for m in mods), mods
    assert "trace_rl.startup" in mods


def test_the_central_config_imports_no_subsystem():
    subsystems = ("rollout", "learner", "annotate", "teacher", "sync", "placement", "eval", "train", "routing",
                  "pipeline", "startup", "rewards", "tasks", "models", "buffer", "cluster")
    mods = imported_modules(PKG / "config.py")
    bad = [m for m in mods if m.startswith("trace_rl.") and m.split(".")[1] in subsystems]
    assert bad == [], bad


@pytest.mark.parametrize("name", sorted(METHODS))
def test_services_follow_the_methods_declared_needs(name):
    cfg = to_config({"algorithm": {"name": name}})
    s = decide_services(cfg)
    needs = METHODS[name].needs
    assert s.teacher == bool(needs & TEACHER_NEEDS)
    assert (s.annotator is not None) == ("annotations" in needs)
    assert s.entropy == ("entropy" in needs)
    assert not s.annotator_actors  # oracle by default: it runs in the annotate stage, no actors of its own


def test_api_annotator_with_actors_gets_its_own_service():
    cfg = to_config({"algorithm": {"name": "trace"}, "annotator": {"kind": "api", "num_actors": 2,
                                                                   "base_url": "http://127.0.0.1:9/v1", "model": "m"}})
    assert decide_services(cfg).annotator_actors
    assert not decide_services(to_config({"algorithm": {"name": "grpo"}, "annotator": {"kind": "api",
                                                                                        "num_actors": 2}})).annotator


def test_every_subsystem_checks_its_own_section():
    """The core validation alone accepts subsystem mistakes; the start-up's validate rejects each, named."""
    from trace_rl.config import validate as validate_core

    cases = {"rollout": {"rollout": {"n": 0}}, "learner": {"learner": {"zero_stage": 4}},
             "teacher": {"teacher": {"top_k": 0}}, "annotator": {"annotator": {"span_cap": 2.0}},
             "data": {"data": {"prompts_per_step": 0}}, "eval": {"eval": {"k": 0}},
             "cluster": {"cluster": {"placement_strategy": "X"}}}
    for section, bad in cases.items():
        cfg = to_config(bad)
        validate_core(cfg)  # not its business
        with pytest.raises(ConfigError, match=section):
            validate(cfg)
    assert len(subsystem_checks(Config())) >= 7


def test_behaviour_is_auto_turns_on_with_asynchronous_training():
    assert algorithm_for_learners(to_config({})).behaviour_is == "off"
    assert algorithm_for_learners(to_config({"trainer": {"max_staleness": 2}})).behaviour_is == "on"
    assert algorithm_for_learners(to_config({"trainer": {"max_staleness": 2},
                                             "algorithm": {"behaviour_is": "off"}})).behaviour_is == "off"
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        validate(to_config({"trainer": {"max_staleness": -1}}))


def test_prompt_table_tokenizes_when_drawn_and_skips_long_prompts(tiny_random_model):
    from transformers import AutoTokenizer

    from trace_rl.startup import PromptTable, tokenize_prompts
    from trace_rl.tasks.arith import generate
    from trace_rl.train import PromptSampler

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    problems = generate("train", 40, seed=1)
    kept, ids, dropped = tokenize_prompts(problems, tok, 10_000, "arith")
    assert dropped == 0 and len(kept) == 40
    table = PromptTable(problems, tok, 10_000, "arith")
    idx, got = table.draw(PromptSampler(40, seed=0), 8)
    assert got == [ids[i] for i in idx] and table.dropped == 0  # same ids as the eager path, nothing dropped
    lengths = sorted(len(x) for x in ids)
    limit = lengths[len(lengths) // 2]  # about half the prompts are too long
    table = PromptTable(problems, tok, limit, "arith")
    sampler = PromptSampler(40, seed=0)
    idx, got = table.draw(sampler, 8)
    assert len(idx) == 8 and all(len(x) <= limit for x in got)
    want = [i for i in PromptSampler(40, seed=0).next(40) if len(ids[i]) <= limit][:8]
    assert idx == want  # the sampler's order, too-long prompts skipped
    assert table.dropped == sum(len(ids[i]) > limit for i in PromptSampler(40, seed=0).next(sampler.position))
    with pytest.raises(ValueError, match="max_prompt_length"):
        PromptTable(problems, tok, 1, "arith").draw(PromptSampler(40, seed=0), 1)


def _model_dir(tmp_path, name: str, context: int) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(f'{{"max_position_embeddings": {context}}}')
    return str(d)


def test_engine_contexts_stay_within_each_models_context(tmp_path):
    """The self-annotating TRACE recipe's lengths on a 40,960-token model: the rollout engine's context grows for
    the annotator's longer prompts but stops at the model's limit, the teacher's gets its privileged-prompt
    allowance within its own model's limit (the engines refuse anything longer)."""
    from trace_rl.startup import engine_contexts

    policy = _model_dir(tmp_path, "policy", 40960)
    cfg = to_config({"algorithm": {"name": "trace"}, "annotator": {"kind": "self", "max_new_tokens": 2048},
                     "data": {"max_prompt_length": 1024}, "rollout": {"max_new_tokens": 8192},
                     "eval": {"max_new_tokens": 4096}})
    # annotator prompts: up to 4 x (prompt + response) + its reply; the teacher: 2 x max_prompt_length more
    assert engine_contexts(cfg, policy, decide_services(cfg)) == (4 * (1024 + 8192) + 2048, 1024 + 8192 + 2 * 1024)
    long_prompts = to_config({**cfg_dict(cfg), "data": {"max_prompt_length": 16384}, "rollout": {"max_new_tokens": 16384}})
    rollout, teacher = engine_contexts(long_prompts, policy, decide_services(long_prompts))
    assert rollout == teacher == 40960  # 32,768 + 2 x 16,384 of privileged context, capped
    small_teacher = to_config({**cfg_dict(cfg), "teacher": {"model_path": _model_dir(tmp_path, "teacher", 4096)}})
    assert engine_contexts(small_teacher, policy, decide_services(small_teacher))[1] == 4096
    grpo = to_config({"data": {"max_prompt_length": 256}, "rollout": {"max_new_tokens": 128}})
    assert engine_contexts(grpo, policy, decide_services(grpo)) == (256 + 160, None)  # eval.max_new_tokens 160


def test_a_rollout_longer_than_the_models_context_is_a_config_error(tmp_path):
    from trace_rl.startup import engine_contexts

    policy = _model_dir(tmp_path, "policy", 1024)
    cfg = to_config({"data": {"max_prompt_length": 1056}, "rollout": {"max_new_tokens": 200}})
    with pytest.raises(ConfigError, match=r"data.max_prompt_length \+ rollout.max_new_tokens: 1056 \+ 200 = 1256 "
                                          r"tokens is more than the model's context \(1024"):
        engine_contexts(cfg, policy, decide_services(cfg))
    cfg = to_config({"data": {"max_prompt_length": 512}, "rollout": {"max_new_tokens": 128},
                     "eval": {"max_new_tokens": 600}})
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        engine_contexts(cfg, policy, decide_services(cfg))


def cfg_dict(cfg) -> dict:
    import dataclasses

    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name))}
