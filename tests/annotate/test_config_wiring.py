"""The ``annotator`` config group: validation before anything starts, and the annotator it builds."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trace_rl.annotate import Annotation
from trace_rl.annotate.llm import ApiBackend, GenerateBackend, LLMAnnotator
from trace_rl.annotate.service import make_annotator
from trace_rl.config import AnnotatorConfig, Config, ConfigError
from trace_rl.startup import validate
from trace_rl.routing import annotate_items
from trace_rl.tasks.arith import generate


def cfg_with(**annotator) -> Config:
    cfg = Config()
    cfg.algorithm.name = "trace"
    for k, v in annotator.items():
        setattr(cfg.annotator, k, v)
    return cfg


@pytest.mark.parametrize("fields, names", [
    (dict(kind="api"), ["annotator.base_url", "annotator.model"]),
    (dict(kind="api", base_url="127.0.0.1:8000/v1", model="m"), ["annotator.base_url"]),
    (dict(kind="api", base_url="http://127.0.0.1:8000/v1", model="m", api_key_env="TRACE_RL_SURELY_UNSET_VAR"),
     ["annotator.api_key_env", "TRACE_RL_SURELY_UNSET_VAR"]),
    (dict(kind="model"), ["annotator.model_path"]),
    (dict(kind="model", model_path="/nonexistent/ckpt"), ["annotator.model_path", "/nonexistent/ckpt"]),
    (dict(kind="oracle", num_actors=2), ["annotator.num_actors"]),
    (dict(kind="self", max_segments=0, concurrency=0, timeout_s=0.0, max_retries=-1),
     ["annotator.max_segments", "annotator.concurrency", "annotator.timeout_s", "annotator.max_retries"]),
    (dict(kind="psychic"), ["annotator.kind", "api"]),
])
def test_bad_annotator_config_fails_naming_the_field_and_the_fix(fields, names):
    with pytest.raises(ConfigError) as e:
        validate(cfg_with(**fields))
    for name in names:
        assert name in str(e.value)
    assert "Fix:" in str(e.value)


def test_good_llm_annotator_configs_validate(monkeypatch, tiny_random_model):
    monkeypatch.setenv("TRACE_RL_TEST_KEY", "k")
    validate(cfg_with(kind="api", base_url="http://127.0.0.1:8000/v1", model="m", api_key_env="TRACE_RL_TEST_KEY"))
    validate(cfg_with(kind="model", model_path=tiny_random_model, num_actors=2))
    validate(cfg_with(kind="self"))


def test_make_annotator_builds_the_configured_backend(tmp_path):
    extra = OmegaConf.create({"chat_template_kwargs": {"enable_thinking": False}})  # what Hydra hands over
    an = AnnotatorConfig(kind="api", base_url="http://127.0.0.1:9/v1", model="m", concurrency=3, max_ids=2,
                         cache_dir=str(tmp_path / "c"), extra_body=extra)
    ann = make_annotator(an)
    assert isinstance(ann, LLMAnnotator) and isinstance(ann.backend, ApiBackend)
    assert ann.max_ids == 2 and ann.backend.concurrency == 3 and ann.backend.cache_dir == Path(tmp_path / "c")
    assert ann.backend.params["chat_template_kwargs"] == {"enable_thinking": False}
    assert type(ann.backend.params["chat_template_kwargs"]) is dict
    an.cache_dir = ""  # "" = no cache
    assert make_annotator(an).backend.cache_dir is None

    calls = []
    ann = make_annotator(AnnotatorConfig(kind="self", max_segments=5), generate=lambda t: calls.append(t) or
                         ['{"key": [1], "error": [], "label": "x"}'] * len(t))
    assert isinstance(ann.backend, GenerateBackend) and ann.max_segments == 5
    p = generate("test", 1, seed=0)[0]
    out = ann(p, p.solution, True)
    assert out.key_spans and out.label == "x" and len(calls) == 1


@pytest.mark.slow
def test_annotate_stage_puts_the_api_cache_under_the_run_dir(ray_cluster, tmp_path, tiny_random_model):
    """The start-up gives an api annotator without annotator.cache_dir a cache in the run directory."""
    import ray

    from trace_rl.pipeline.stages import Stages
    from trace_rl.startup import Files, PromptTable, decide_services

    cfg = cfg_with(kind="api", base_url="http://127.0.0.1:9/v1", model="m")
    cfg.algorithm.name = "trace"
    cfg.teacher.kind = "frozen"
    files = Files(tiny_random_model, None, 0, PromptTable([], None, 256, "arith"), [], 256)
    closers: list = []
    svc = decide_services(cfg)
    stages = Stages.start(cfg, files, replace(svc, teacher=False), tmp_path, pool=_NoEngines(), closers=closers)
    try:
        info = ray.get(stages.annotate.info.remote())
        assert info["kind"] == "api" and info["cache_dir"] == str(tmp_path / "annotator_cache")
    finally:
        for _, close in reversed(closers):
            close()


class _NoEngines:
    actors: list = []


class _Batchy:
    def __init__(self, mode: str):
        self.mode, self.single = mode, 0

    def annotate_batch(self, items):
        if self.mode == "raise":
            raise RuntimeError("backend down")
        return [Annotation(label="batch")] * (len(items) - (self.mode == "short"))

    def __call__(self, problem, text, correct):
        self.single += 1
        if text == "boom":
            raise ValueError("bad item")
        return Annotation(label="single")


@pytest.mark.parametrize("mode", ["ok", "raise", "short"])
def test_annotate_items_batches_and_falls_back_item_by_item(mode):
    p = generate("test", 1, seed=0)[0]
    items = [(p, "a", True), (p, "boom", False), (p, "b", True)]
    ann, counts = _Batchy(mode), Counter()
    out = annotate_items(ann, items, counts)
    if mode == "ok":
        assert [a.label for a in out] == ["batch"] * 3 and ann.single == 0 and not counts
    else:  # the batch call failed or lost items: one call per item, a raising item costs only itself
        assert ann.single == 3 and out[1] is None and counts["error"] == 1
        assert [out[0].label, out[2].label] == ["single", "single"]
    assert annotate_items(ann, []) == []
