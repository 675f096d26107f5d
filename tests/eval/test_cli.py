"""``python -m trace_rl.eval`` end to end on the tiny random checkpoint: the real Hydra entry point (run
in-process, on the session's Ray cluster, to skip a second cluster start), HF rollout engine, verifier
pools, W&B offline; the JSON, markdown and per-sample outputs must exist and agree with each other."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "fixtures" / "benchmarks"


@pytest.mark.slow
def test_eval_cli_end_to_end(ray_cluster, tiny_random_model, tmp_path, monkeypatch):
    from trace_rl.eval import main

    out = tmp_path / "results"
    k, n_boot = 2, 200
    benches = {"math500": BENCH / "math500.jsonl", "gpqa": BENCH / "gpqa_diamond.jsonl",
               "olympiadbench": BENCH / "olympiadbench.jsonl"}
    spec = ",".join([str(benches["math500"]), f"gpqa:{benches['gpqa']}", str(benches["olympiadbench"])])
    monkeypatch.setattr(sys, "argv", [
        "trace_rl.eval", f"model.path={tiny_random_model}", f"eval.benchmarks=[{spec}]", f"eval.k={k}",
        "eval.pass_k=[1,2]", f"eval.n_boot={n_boot}", "eval.max_new_tokens=12", "rollout.engine=hf",
        "data.max_prompt_length=480", "trainer.verifier_workers=1", "logger.wandb_mode=offline",
        f"eval.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"])
    main()

    summary = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert list(summary["benchmarks"]) == ["math500", "gpqa", "olympiadbench"]
    assert summary["sampling"] == {"k": k, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 12,
                                   "seed": 0, "chat_template_kwargs": {}}
    n_rows = {"math500": 3, "gpqa": 3, "olympiadbench": 2}
    for name, res in summary["benchmarks"].items():
        samples = [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert res["n_problems"] == n_rows[name] and len(samples) == n_rows[name] * k
        assert all(s["length"] <= 12 for s in samples)
        # the reported numbers are those of the samples written out
        assert res[f"avg@{k}"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))
        assert res["response_length"] == pytest.approx(sum(s["length"] for s in samples) / len(samples))
        by_uid: dict[str, list[float]] = {}
        for s in samples:
            by_uid.setdefault(s["uid"], []).append(s["score"])
        assert res["pass@2"] == pytest.approx(sum(max(v) for v in by_uid.values()) / len(by_uid))
        for m in (f"avg@{k}", "pass@1", "pass@2"):
            lo, hi = res[f"{m}_ci"]
            assert lo <= res[m] <= hi
        assert res["score_fn"].endswith("choice_letter_score" if name == "gpqa" else "math_verify_score")
        assert f"| {name} | {n_rows[name]} | {100 * res[f'avg@{k}']:.1f} [" in table
    assert summary["mean"][f"avg@{k}"] == pytest.approx(
        sum(r[f"avg@{k}"] for r in summary["benchmarks"].values()) / 3)
    gpqa = [json.loads(line) for line in (out / "samples" / "gpqa.jsonl").read_text().splitlines()]
    assert {s["answer"] for s in gpqa} <= set("ABCD")
    # W&B (offline) and the metrics file got the same numbers
    assert list((out / "wandb").glob("offline-run-*"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    logged = json.loads(lines[0])
    assert logged[f"eval/mean/avg@{k}"] == pytest.approx(summary["mean"][f"avg@{k}"])
    assert logged[f"eval/math500/avg@{k}"] == summary["benchmarks"]["math500"][f"avg@{k}"]
    assert logged["eval/gpqa/pass@2"] == summary["benchmarks"]["gpqa"]["pass@2"]


def test_eval_longer_than_the_models_context_fails_before_any_service(tiny_random_model, tmp_path, monkeypatch):
    """The tiny checkpoint has 512 positions: a benchmark prompt + eval.max_new_tokens beyond that is a config
    error naming the field and the most it can be, raised before the cluster or an engine starts."""
    from trace_rl.config import ConfigError, to_config
    from trace_rl.eval import run_eval

    started = []
    monkeypatch.setattr("trace_rl.startup.start_cluster", lambda *a, **k: started.append(a))
    cfg = to_config({"model": {"path": tiny_random_model}, "eval": {
        "benchmarks": [str(BENCH / "math500.jsonl")], "max_new_tokens": 500, "output_dir": str(tmp_path)},
        "rollout": {"engine": "hf"}, "data": {"max_prompt_length": 480}, "logger": {"wandb": False}})
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens: the longest benchmark prompt \(\d+ tokens\) \+ "
                                          r"eval.max_new_tokens \(500\) = \d+ tokens is more than the model's "
                                          r"context \(512"):
        run_eval(cfg)
    assert not started
