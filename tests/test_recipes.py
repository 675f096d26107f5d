"""The paper recipes in conf/experiment/: each composes with only the model and data paths set, validates
on a CPU machine (no GPU needed), carries the paper's settings, and refuses to run without its paths."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trace_rl.config import ConfigError, hydra_schema, require_set, to_config
from trace_rl.startup import validate
from trace_rl.train import CONF_DIR, tokenize_prompts

ROOT = Path(__file__).resolve().parent.parent
DATA = str(ROOT / "tests" / "fixtures" / "math_small.jsonl")
RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def compose(overrides=()):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="trace_rl_schema", node=hydra_schema())
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


def paths(model: str) -> list[str]:
    return [f"model.path={model}", f"data.task={DATA}", f"data.eval_test={DATA}"]


def test_the_paper_recipes_exist():
    for method in ("trace", "grpo", "self_opd"):
        for size in ("qwen3_1p7b", "qwen3_8b"):
            assert f"{method}_{size}" in RECIPES
    assert not any(r.startswith("base") for r in RECIPES)  # the shared bases live in experiment/base/


def naive_trace_lambda(step: int) -> float:
    """The paper's schedule: 0.5 for 10 steps, then linearly to 0 over 30."""
    return 0.5 if step < 10 else max(0.0, 0.5 * (1 - (step - 10) / 30))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates_with_only_paths_set(recipe, tiny_random_model):
    from trace_rl.algo.schedules import Schedule

    hcfg = compose([f"experiment={recipe}", *paths(tiny_random_model)])
    require_set(hcfg)
    cfg = validate(to_config(hcfg))  # no GPU here: nothing in validation needs the live cluster
    method, size = recipe.split("_qwen3_")
    assert cfg.algorithm.name == method
    assert cfg.model.path == tiny_random_model and cfg.data.task == DATA and cfg.data.eval_test == DATA
    # the paper's setting (DESIGN.md): DAPO clip, thinking mode, the eval sampling, TRACE's schedule / cap / resync
    assert (cfg.algorithm.clip_eps_low, cfg.algorithm.clip_eps_high) == (0.2, 0.28)
    assert cfg.model.chat_template_kwargs == {"enable_thinking": True} and cfg.model.dtype == "bfloat16"
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (0.6, 0.95, 20)
    assert cfg.eval.max_new_tokens >= 8192 and cfg.rollout.max_new_tokens >= 8192
    assert cfg.rollout.engine == "vllm" and cfg.rollout.gpus_per_engine >= 1 and cfg.learner.gpus_per_rank >= 1
    assert cfg.teacher.resync_every == 10 and cfg.annotator.span_cap == 0.25
    lam = Schedule(**dataclasses.asdict(cfg.algorithm.trace_lambda))
    assert [lam.value(s) for s in range(60)] == pytest.approx([naive_trace_lambda(s) for s in range(60)])
    if size == "8b":
        assert cfg.rollout.tensor_parallel_size == 2 and cfg.learner.zero_stage == 3
    else:
        assert cfg.rollout.tensor_parallel_size == 1 and cfg.learner.zero_stage == 2


@pytest.mark.parametrize("recipe", ["trace_qwen3_1p7b", "grpo_qwen3_8b"])
def test_recipe_without_paths_names_them(recipe):
    hcfg = compose([f"experiment={recipe}"])
    with pytest.raises(ConfigError) as e:
        require_set(hcfg)
    msg = str(e.value)
    for key in ("model.path", "data.task", "data.eval_test"):
        assert f"{key}: mandatory value not set" in msg
    assert "model.path=/path/to/hf_checkpoint" in msg
    hcfg = compose([f"experiment={recipe}", f"data.task={DATA}", f"data.eval_test={DATA}"])
    with pytest.raises(ConfigError, match="model.path: mandatory value not set") as e:
        require_set(hcfg)
    assert "data.task" not in str(e.value)
    # the defaults do not change: the default job still needs no path
    assert compose().model.path == "tiny"


def test_cfg_job_dry_run_in_a_subprocess(tiny_random_model):
    out = subprocess.run([sys.executable, "-m", "trace_rl.train", "experiment=trace_qwen3_8b",
                          *paths(tiny_random_model), "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    composed = yaml.safe_load(out.stdout)
    cfg = validate(to_config(composed))
    assert cfg.algorithm.name == "trace" and cfg.model.path == tiny_random_model
    assert cfg.learner.zero_stage == 3 and cfg.rollout.tensor_parallel_size == 2


def test_eval_cli_without_model_path_fails_naming_it(tmp_path):
    bench = ROOT / "tests" / "fixtures" / "benchmarks" / "math500.jsonl"
    out = subprocess.run([sys.executable, "-m", "trace_rl.eval", "experiment=grpo_qwen3_1p7b",
                          f"eval.benchmarks=[{bench}]", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "model.path: mandatory value not set" in out.stderr + out.stdout
    assert "data.task" not in out.stderr + out.stdout  # evaluation does not need the training data


def test_chat_template_kwargs_reach_the_prompt(tiny_random_model):
    from transformers import AutoTokenizer

    from trace_rl.tasks import load_task_problems
    from trace_rl.tasks.base import render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}"
                         "{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}")
    problems = load_task_problems(DATA, "test", n=3)
    _, plain, _ = tokenize_prompts(problems, tok, 10_000, DATA)
    _, on, _ = tokenize_prompts(problems, tok, 10_000, DATA, chat_template_kwargs={"enable_thinking": True})
    _, off, _ = tokenize_prompts(problems, tok, 10_000, DATA, chat_template_kwargs={"enable_thinking": False})
    # no kwargs: exactly render_prompt's text; the kwargs reach the template
    assert plain == [tok(render_prompt(p, tok), add_special_tokens=False)["input_ids"] for p in problems]
    assert on == plain
    assert all(tok.decode(ids).endswith("NOTHINK") for ids in off)
    assert not any("NOTHINK" in tok.decode(ids) for ids in on)
