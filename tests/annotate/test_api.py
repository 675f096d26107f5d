"""The ``api`` annotator against a crafted OpenAI-compatible server on 127.0.0.1 (tests/annotate/conftest.py):
valid and malformed replies, retries, timeouts, fallbacks, the concurrency bound, the cache, the API key."""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from trace_rl.annotate import Annotation, get_annotator, segment_spans, split_segments
from trace_rl.annotate.llm import ApiBackend, LLMAnnotator
from trace_rl.tasks.arith import generate
from trace_rl.tasks.base import Problem

KEY = "sk-test-5ecret-Zq9"
KEY_ENV = "TRACE_RL_TEST_ANNOTATOR_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def items(mode: str, n: int = 4, seed: int = 0, correct=(True, False)) -> list[tuple[Problem, str, bool]]:
    """Arith problems whose text carries the server's MODE word; responses = their reference solutions."""
    out = []
    for i, p in enumerate(generate("test", n, seed=seed)):
        p.question = f"{p.question} MODE={mode}"
        out.append((p, p.solution, correct[i % len(correct)]))
    return out


def annotator(server, **kw) -> LLMAnnotator:
    opts = dict(base_url=server.base_url, model="crafted", api_key_env=KEY_ENV, timeout_s=5.0, max_retries=2,
                backoff_s=0.01, backoff_max_s=0.05, concurrency=4)
    opts.update(kw)
    return get_annotator("api", **opts)


# ----------------------------------------------------------------------------------------- replies
def test_valid_replies_become_segment_spans_and_labels(server):
    ann = annotator(server)
    batch = items("valid", 6)
    out = ann.annotate_batch(batch)
    assert server.count == 6
    for (p, response, correct), a in zip(batch, out):
        segs = split_segments(response)
        if correct:
            assert a == Annotation(key_spans=segment_spans(segs, [2]), label="key step")
        else:
            assert a == Annotation(error_spans=segment_spans(segs, [1]), label="arithmetic")
    req = server.requests[0]
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["body"]["model"] == "crafted" and req["body"]["temperature"] == 0.0
    user = req["body"]["messages"][-1]["content"]
    assert "[1] Step 1:" in user and "[2] Step 2:" in user and "Reference solution" in user
    s = ann.stats()
    assert s["annotate/requests"] == 6 and s["annotate/annotated"] == 6 and s["annotate/parse_failures"] == 0
    # the per-response interface gives the same annotation
    p, response, correct = batch[0]
    assert ann(p, response, correct) == out[0]


def test_malformed_and_non_completion_replies_are_counted_and_survived(server):
    ann = annotator(server)
    batch = items("malformed", 3) + items("html", 2, seed=1) + items("valid", 1, seed=2)
    out = ann.annotate_batch(batch)
    assert [a.skipped for a in out] == ["parse_failure"] * 3 + ["request_failed"] * 2 + [None]
    assert all(not a.key_spans and not a.error_spans for a in out[:5])
    s = ann.stats()
    assert s["annotate/parse_failures"] == 3 and s["annotate/request_failures"] == 2
    assert s["annotate/retries"] == 0  # a 200 that is not a completion is not retried


def test_empty_response_sends_no_request(server):
    ann = annotator(server)
    p = generate("test", 1)[0]
    assert ann(p, "  \n", True).skipped == "empty_response" and server.count == 0


# ----------------------------------------------------------------------------------------- failures
def test_429_is_retried_with_backoff_then_succeeds(server):
    ann = annotator(server, max_retries=3)
    out = ann.annotate_batch(items("429x2", 2))
    assert all(a.skipped is None and (a.key_spans or a.error_spans) for a in out)
    assert server.count == 6 and sorted(server.per_prompt.values()) == [3, 3]
    s = ann.stats()
    assert s["annotate/requests"] == 2 and s["annotate/retries"] == 4


def test_500_gives_up_after_max_retries_without_leaking_the_key(server, caplog):
    ann = annotator(server, max_retries=2)
    with caplog.at_level(logging.DEBUG, logger="trace_rl"):
        out = ann.annotate_batch(items("500", 2))
    assert [a.skipped for a in out] == ["request_failed"] * 2
    assert sorted(server.per_prompt.values()) == [3, 3]  # 1 + max_retries attempts each
    s = ann.stats()
    assert s["annotate/retries"] == 4 and s["annotate/request_failures"] == 2
    assert "HTTP 500" in caplog.text and "internal error for Bearer ***" in caplog.text
    assert KEY not in caplog.text


def test_no_retry_on_404_and_the_warning_names_base_url(server, caplog):
    ann = annotator(server, base_url=server.base_url[:-3])  # forgot the /v1
    with caplog.at_level(logging.WARNING, logger="trace_rl"):
        assert ann(*items("valid", 1)[0]).skipped == "request_failed"
    assert "annotator.base_url" in caplog.text and "/v1" in caplog.text
    assert ann.stats()["annotate/retries"] == 0


def test_slow_server_times_out_and_the_batch_goes_on(server):
    ann = annotator(server, timeout_s=0.3, max_retries=1)
    t0 = time.perf_counter()
    out = ann.annotate_batch(items("slow", 2) + items("valid", 2, seed=1))
    elapsed = time.perf_counter() - t0
    assert [a.skipped for a in out] == ["timeout", "timeout", None, None]
    assert ann.stats()["annotate/timeouts"] == 4  # 2 prompts x (1 + 1 retry)
    assert elapsed < 1.4  # two 0.3 s attempts in parallel per prompt, not the server's 1.5 s


def test_a_trickling_reply_meets_the_per_request_deadline(server):
    # every byte arrives well within the socket timeout, but the whole reply takes ~15 s
    ann = annotator(server, timeout_s=0.5, max_retries=0)
    t0 = time.perf_counter()
    assert ann(*items("trickle", 1)[0]).skipped == "timeout"
    assert time.perf_counter() - t0 < 1.5


def test_connection_refused_is_retried_then_counted():
    with socket.socket() as s:  # a free port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ann = get_annotator("api", base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, backoff_s=0.01)
    out = ann.annotate_batch(items("valid", 2))
    assert [a.skipped for a in out] == ["request_failed"] * 2
    assert ann.stats()["annotate/retries"] == 4


# ----------------------------------------------------------------------------------------- concurrency, cache
def test_concurrency_is_bounded(server):
    server.delay_s = 0.15
    ann = annotator(server, concurrency=3)
    out = ann.annotate_batch(items("bounded", 12))  # answered like "valid", counted on its own
    assert all(a.skipped is None for a in out)
    assert server.max_in_flight["bounded"] == 3


def test_the_bound_holds_across_callers_sharing_one_annotator(server):
    import threading

    server.delay_s = 0.15
    ann = annotator(server, concurrency=2)
    threads = [threading.Thread(target=ann.annotate_batch, args=(items("shared", 4, seed=s),)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.count == 12 and server.max_in_flight["shared"] == 2


def test_cache_makes_a_resumed_run_free_and_holds_no_secret(server, tmp_path):
    cache = tmp_path / "annotate_cache"
    batch = items("valid", 5) + items("malformed", 2, seed=3)
    first = annotator(server, cache_dir=str(cache)).annotate_batch(batch)
    assert server.count == 7
    again = annotator(server, cache_dir=str(cache))  # a new process after a restart, same cache dir
    second = again.annotate_batch(batch)
    assert server.count == 7, "the resumed run sent requests"
    assert second == first
    s = again.stats()
    assert s["annotate/cache_hits"] == 7 and s["annotate/requests"] == 0 and s["annotate/parse_failures"] == 2
    files = [f for f in cache.rglob("*") if f.is_file()]
    assert len(files) == 7
    for f in files:
        text = f.read_text()
        assert KEY not in text and "Authorization" not in text and "Bearer" not in text
    # a different model name is a different request
    annotator(server, cache_dir=str(cache), model="other").annotate_batch(batch[:1])
    assert server.count == 8


def test_identical_requests_in_a_batch_are_sent_once(server):
    one = items("valid", 1)[0]
    out = annotator(server).annotate_batch([one, one, one])
    assert server.count == 1 and out[0] == out[1] == out[2] and out[0].skipped is None


def test_a_corrupt_cache_file_is_asked_again(server, tmp_path):
    ann = annotator(server, cache_dir=str(tmp_path))
    batch = items("valid", 1)
    ann.annotate_batch(batch)
    (f,) = [f for f in Path(tmp_path).rglob("*.json")]
    f.write_text("{not json")
    assert annotator(server, cache_dir=str(tmp_path)).annotate_batch(batch)[0].skipped is None
    assert server.count == 2


# ----------------------------------------------------------------------------------------- the key, options
def test_the_key_is_in_no_repr_log_or_error(server, caplog, tmp_path):
    with caplog.at_level(logging.DEBUG):
        ann = annotator(server, cache_dir=str(tmp_path), max_retries=1)
        out = ann.annotate_batch(items("500", 1) + items("malformed", 1) + items("valid", 1) + items("429x2", 1)
                                 + items("echo", 1))
    assert out[-1].skipped == "parse_failure"  # the echoing reply is read (and cached) with the key masked
    assert KEY not in caplog.text
    assert KEY not in repr(ann.backend) and KEY not in repr(vars(ann.backend))
    assert KEY not in "".join(f.read_text() for f in tmp_path.rglob("*") if f.is_file())
    with pytest.raises(ValueError) as err:
        get_annotator("api", base_url=server.base_url, model="crafted", api_key_env=KEY_ENV, timeout_s=0)
    assert KEY not in str(err.value)


def test_missing_key_variable_names_the_field_and_the_fix(monkeypatch, server):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"annotator.api_key_env='{KEY_ENV}'.*export"):
        annotator(server)
    # no api_key_env: no Authorization header at all
    ann = annotator(server, api_key_env=None)
    ann(*items("valid", 1)[0])
    assert "Authorization" not in server.requests[0]["headers"]


@pytest.mark.parametrize("opts,match", [
    (dict(base_url="127.0.0.1:8000/v1", model="m"), "annotator.base_url"),
    (dict(base_url="http://127.0.0.1:1/v1", model=""), "annotator.model"),
    (dict(model="m"), "needs annotator.base_url"),
    (dict(base_url="http://127.0.0.1:1/v1", model="m", concurrency=0), "annotator.concurrency"),
    (dict(base_url="http://127.0.0.1:1/v1", model="m", timeout_s=-1), "annotator.timeout_s"),
    (dict(base_url="http://127.0.0.1:1/v1", model="m", max_retries=-1), "annotator.max_retries"),
    (dict(base_url="http://127.0.0.1:1/v1", model="m", temprature=0.5), r"does not take \['temprature'\]"),
])
def test_bad_options_name_the_field(opts, match):
    with pytest.raises(ValueError, match=match):
        get_annotator("api", **opts)


def test_driver_options_coverage_and_seed_are_accepted(server):
    ann = get_annotator("api", base_url=server.base_url, model="crafted", coverage=0.25, seed=3)
    assert isinstance(ann.backend, ApiBackend)


# ----------------------------------------------------------------------------------------- in the driver
def test_the_driver_annotate_stage_routes_spans_and_survives_malformed_replies(server, tiny_random_model):
    """The annotate stage's work (trace_rl.routing.annotate_batch) with the api annotator: replies become
    token masks under the cap, malformed replies leave their rows on GRPO and are counted, labels reach the
    teacher side."""
    import torch
    from transformers import AutoTokenizer

    from trace_rl.rollout.base import Sample
    from trace_rl.rollout.pool import samples_to_batch
    from collections import Counter

    from trace_rl.routing import annotate_batch

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    batch_items = items("valid", 2) + items("malformed", 2, seed=1)  # correct, incorrect, correct, incorrect
    problems = [p for p, _, _ in batch_items]
    samples = [Sample(i, tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], [], "stop")
               for i, (_, r, _) in enumerate(batch_items)]
    for s in samples:
        s.logprobs = [-1.0] * len(s.response_ids)
    batch = samples_to_batch([[1, 2]] * 4, samples, pad_token_id=tok.pad_token_id, version=0,
                             meta={"uid": [p.uid for p in problems]})
    batch.rewards = torch.tensor([1.0 if c else 0.0 for _, _, c in batch_items])
    counts: Counter = Counter()
    key, err, labels, metrics = annotate_batch(annotator(server), batch, tok, {p.uid: p for p in problems}, 0.25,
                                               counts)
    n = batch.response_mask.sum(1)
    assert bool(key[0].any()) and not bool(err[0].any()) and bool(err[1].any()) and not bool(key[1].any())
    assert not bool((key[2:] | err[2:]).any())  # malformed: GRPO only
    assert bool(((key | err).sum(1) <= (0.25 * n).floor()).all())
    assert labels == ["key step", "arithmetic", None, None]
    assert metrics["annotate/skipped_parse_failure"] == 2
