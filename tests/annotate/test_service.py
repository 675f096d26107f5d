"""The ``model`` and ``self`` backends on a tiny checkpoint, and AnnotatorService: 2 Ray actors on the ``api``
backend against the crafted server (tests/annotate/conftest.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from trace_rl.annotate import AnnotatorService, LLMAnnotator, get_annotator, make_annotator, pool_text_generate
from trace_rl.tasks.arith import generate

from tests.annotate.test_api import KEY, KEY_ENV, items

REPLY_REASONS = (None, "parse_failure", "nothing_marked", "unknown_segments")


def arith_items(n: int, seed: int = 5):
    return [(p, p.solution, i % 2 == 0) for i, p in enumerate(generate("test", n, seed=seed))]


# ----------------------------------------------------------------------------------------- model / self
def test_model_backend_generates_greedily_and_every_reply_is_parsed_or_counted(tiny_chat_model):
    ann = get_annotator("model", model_path=tiny_chat_model, max_new_tokens=12, batch_size=3)
    batch = arith_items(4)
    out = ann.annotate_batch(batch)
    assert all(a.skipped in REPLY_REASONS for a in out)
    s = ann.stats()
    assert s["annotate/requests"] == 4
    assert s["annotate/parse_failures"] + sum(1 for a in out if a.skipped != "parse_failure") == 4
    replies = ann.backend.complete([[{"role": "user", "content": "hello"}]] * 2)
    assert replies[0].text == replies[1].text and replies[0].failure is None  # greedy


def test_model_backend_refuses_prompts_that_do_not_fit_its_context(tiny_chat_model):
    ann = get_annotator("model", model_path=tiny_chat_model, max_new_tokens=2000)
    out = ann.annotate_batch(arith_items(2))
    assert [a.skipped for a in out] == ["prompt_too_long"] * 2
    assert ann.stats()["annotate/requests"] == 0 and ann.stats()["annotate/prompt_too_long"] == 2
    with pytest.raises(ValueError, match="annotator.kind=model needs annotator.model_path"):
        get_annotator("model")


def test_self_backend_uses_the_generate_callable_and_survives_its_failures():
    seen: list[str] = []

    def generate_fn(prompts: list[str]) -> list[str | None]:
        seen.extend(prompts)
        return ['{"key": [1], "label": "first step"}', None, "no idea", '{"error": [2]}'][: len(prompts)]

    ann = get_annotator("self", generate=generate_fn)
    batch = arith_items(4)
    out = ann.annotate_batch(batch)
    assert [a.skipped for a in out] == [None, "prompt_too_long", "parse_failure", None]
    assert out[0].label == "first step" and out[0].key_spans and out[3].error_spans
    assert "[1] Step 1:" in seen[0] and seen[0].rstrip().endswith("Assistant:")  # plain-text rendering
    s = ann.stats()
    assert s["annotate/requests"] == 4 and s["annotate/parse_failures"] == 1

    def broken(prompts):
        raise RuntimeError("engine died")

    out = get_annotator("self", generate=broken).annotate_batch(batch)
    assert [a.skipped for a in out] == ["request_failed"] * 4
    out = get_annotator("self", generate=lambda prompts: ["{}"]).annotate_batch(batch)  # wrong length
    assert [a.skipped for a in out] == ["request_failed"] * 4
    with pytest.raises(ValueError, match="annotator.kind=self needs generate"):
        get_annotator("self")


@pytest.mark.slow
def test_self_annotation_through_the_rollout_pool(ray_cluster, tiny_chat_model):
    from transformers import AutoTokenizer

    from trace_rl.rollout.pool import RolloutPool

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    pool = RolloutPool(tiny_chat_model, engine="hf", num_engines=1, pad_token_id=tok.pad_token_id or 0)
    try:
        gen = pool_text_generate(pool, tok, max_new_tokens=12, max_model_len=2048)
        ann = get_annotator("self", generate=gen, tokenizer=tok)
        out = ann.annotate_batch(arith_items(3))
        assert all(a.skipped in REPLY_REASONS for a in out)
        assert ann.stats()["annotate/requests"] == 3
        replies = gen(["hello", "x" * 3000])
        assert isinstance(replies[0], str) and replies[1] is None  # the second does not fit 2048 positions
        assert gen(["hello"]) == replies[:1]  # greedy
    finally:
        pool.shutdown()


# ----------------------------------------------------------------------------------------- the service
def _env_in_a_worker(name: str):
    import ray

    @ray.remote(num_cpus=0)
    def read(n):
        import os
        return os.environ.get(n)
    return ray.get(read.remote(name))


@pytest.mark.slow
def test_service_splits_a_batch_across_two_actors(ray_cluster, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)  # set after the cluster started: Ray workers do not have it
    assert _env_in_a_worker(KEY_ENV) is None
    opts = dict(base_url=server.base_url, model="crafted", api_key_env=KEY_ENV, max_retries=2, backoff_s=0.01,
                backoff_max_s=0.05, concurrency=2)
    svc = AnnotatorService("api", num_actors=2, options=opts)
    try:
        batch = items("valid", 8)
        out = svc.annotate_batch(batch)
        assert server.count == 8
        assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {KEY}"}  # the key reached them
        assert out == get_annotator("api", **opts).annotate_batch(batch)  # same as in the driver, same order
        assert [s["annotate/requests"] for s in svc.actor_stats()] == [4, 4]
        assert svc.stats()["annotate/requests"] == 8 and svc.stats()["annotate/annotated"] == 8
        assert svc(*batch[0]) == out[0]

        mixed = items("malformed", 2, seed=1) + items("500", 2, seed=2) + items("429x2", 2, seed=3) + items("ok", 2, seed=4)
        out = svc.annotate_batch(mixed)
        assert [a.skipped for a in out] == ["parse_failure"] * 2 + ["request_failed"] * 2 + [None] * 4
        s = svc.stats()
        assert s["annotate/parse_failures"] == 2 and s["annotate/request_failures"] == 2
        assert s["annotate/retries"] == 4 + 4  # 500: 2 retries each; 429 twice: 2 retries each
    finally:
        svc.shutdown()


@pytest.mark.slow
def test_a_dead_actor_costs_only_its_chunk_and_is_replaced(ray_cluster, server, monkeypatch):
    import ray

    svc = AnnotatorService("api", num_actors=2, options=dict(base_url=server.base_url, model="crafted"))
    try:
        ray.kill(svc.actors[0], no_restart=True)
        out = svc.annotate_batch(items("valid", 4))
        assert [a.skipped for a in out] == ["annotator_error"] * 2 + [None] * 2
        assert svc.stats()["annotate/actor_failures"] == 1 and svc.stats()["annotate/annotator_errors"] == 2
        out = svc.annotate_batch(items("valid", 4, seed=1))
        assert [a.skipped for a in out] == [None] * 4
    finally:
        svc.shutdown()


@pytest.mark.slow
def test_service_checks_kind_and_options_before_starting_actors(ray_cluster, server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="AnnotatorService runs annotator.kind"):
        AnnotatorService("oracle")
    with pytest.raises(ValueError, match=f"annotator.api_key_env='{KEY_ENV}'"):
        AnnotatorService("api", options=dict(base_url=server.base_url, model="m", api_key_env=KEY_ENV))
    with pytest.raises(ValueError, match="annotator.base_url"):
        AnnotatorService("api", options=dict(base_url="localhost:1", model="m"))
    with pytest.raises(ValueError, match="annotator.num_actors"):
        AnnotatorService("api", num_actors=0, options=dict(base_url=server.base_url, model="m"))


@pytest.mark.slow
def test_make_annotator_reads_the_config_group(ray_cluster, server):
    assert callable(make_annotator(SimpleNamespace(kind="oracle", random_coverage=0.25)))
    cfg = SimpleNamespace(kind="api", base_url=server.base_url, model="crafted", api_key_env=None, num_actors=0,
                          timeout_s=5.0, max_retries=1, cache_dir=None, max_segments=32, span_cap=0.25,
                          random_coverage=0.25, model_path=None)
    local = make_annotator(cfg)
    assert isinstance(local, LLMAnnotator) and local.max_segments == 32 and local.backend.timeout_s == 5.0
    cfg.num_actors = 2
    svc = make_annotator(cfg)
    try:
        assert isinstance(svc, AnnotatorService) and len(svc.actors) == 2
        assert svc.annotate_batch(items("valid", 2)) == local.annotate_batch(items("valid", 2))
    finally:
        svc.shutdown()
    with pytest.raises(ValueError, match="annotator.kind=self needs generate"):
        make_annotator(SimpleNamespace(kind="self"))
    with pytest.raises(ValueError, match="annotator.kind='bogus' is unknown"):
        make_annotator(SimpleNamespace(kind="bogus"))
