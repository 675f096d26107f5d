"""Held-out evaluation through the rollout pool: avg@k, unbiased pass@k, bootstrap intervals.

Used two ways:

* by the training driver (``evaluate`` on its in-distribution / OOD sets, every ``eval.every`` steps);
* on its own, on a checkpoint and a list of benchmark files (``trace_rl.tasks.benchmarks``)::

      python -m trace_rl.eval model.path=/ckpt eval.benchmarks=[/data/math500.jsonl,/data/aime24.jsonl] \\
          eval.k=16 eval.max_new_tokens=16384 +model.chat_template_kwargs.enable_thinking=true

  (the same Hydra config as training: ``experiment=<recipe>`` brings a recipe's sampling and resources).
  It writes ``results.json``, ``results.md`` and per-sample ``samples/<benchmark>.jsonl`` to
  ``eval.output_dir`` (default: the Hydra job directory) and logs ``eval/<benchmark>/<metric>`` to W&B.

Metrics, per benchmark of n problems with k samples each (docs/evaluation.md):

* avg@k: the mean accuracy over all samples (the paper's metric), = mean over problems of c_i / k;
* pass@j for j in ``eval.pass_k``: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1),
  1 - C(k - c_i, j) / C(k, j), averaged over problems;
* a percentile bootstrap interval for each (Efron & Tibshirani 1993, ch. 13): problems resampled with
  replacement ``eval.n_boot`` times from a seeded generator; the k samples of a problem stay together.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from trace_rl.rollout.base import SamplingSpec

log = logging.getLogger("trace_rl.eval")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_ci(values: Sequence[float], *, n_boot: int, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per problem).

    ``n_boot`` resamples of len(values) problems drawn with replacement by
    ``numpy.random.default_rng(seed).integers(0, n, size=(n_boot, n))``; the bounds are the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation) of the resampled means.
    """
    import numpy as np

    if n_boot < 1:
        raise ValueError(f"bootstrap_ci(n_boot={n_boot}): use 1 or more resamples (eval.n_boot)")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci(level={level}): use a level in (0, 1), e.g. 0.95 (eval.ci_level)")
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(correct: Sequence[int], counts: Sequence[int], *, k: int, pass_k: Sequence[int] = (),
              n_boot: int = 0, ci_level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """avg@k and pass@j (j in ``pass_k``; default 1 and k) over problems, with bootstrap intervals
    ``<metric>_ci = [lo, hi]`` when ``n_boot`` > 0. ``correct[i]`` of ``counts[i]`` samples of problem i
    were right; every problem needs at least max(pass_k) samples."""
    n = len(counts)
    ks = sorted(set(pass_k or (1, k)))
    per_problem: dict[str, list[float]] = {f"avg@{k}": [c / m if m else 0.0 for c, m in zip(correct, counts)]}
    for j in ks:
        per_problem[f"pass@{j}"] = [pass_at_k(m, c, j) for c, m in zip(correct, counts)]
    out: dict[str, Any] = {}
    for name, vals in per_problem.items():
        out[name] = sum(vals) / n if n else float("nan")
        if n_boot > 0:
            out[f"{name}_ci"] = list(bootstrap_ci(vals, n_boot=n_boot, level=ci_level, seed=seed))
    return out


@dataclass
class EvalSet:
    name: str
    problems: list[Any]          # trace_rl.tasks.base.Problem
    prompt_ids: list[list[int]]


@dataclass
class ScoredSamples:
    """Every sample of an evaluation set with its score, grouped back per problem."""

    samples: list[Any]           # trace_rl.rollout.base.Sample, ordered by problem then sample
    texts: list[str]
    scores: list[float]
    correct: list[int]           # per problem: samples scoring > 0.5
    counts: list[int]            # per problem: samples
    verifier_stats: dict[str, float]
    seconds: float


def sample_and_score(pool, verifier, eval_set: EvalSet, tokenizer, spec: SamplingSpec) -> ScoredSamples:
    """Generate ``spec.n`` samples per problem through ``pool`` and score them with ``verifier``."""
    t0 = time.perf_counter()
    samples = pool.generate_samples(eval_set.prompt_ids, spec)
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    scores, vstats = verifier.score([(t, eval_set.problems[s.prompt_index].answer) for t, s in zip(texts, samples)])
    n = len(eval_set.problems)
    correct, counts = [0] * n, [0] * n
    for s, score in zip(samples, scores):
        counts[s.prompt_index] += 1
        correct[s.prompt_index] += int(score > 0.5)
    return ScoredSamples(samples, texts, scores, correct, counts, dict(vstats), time.perf_counter() - t0)


def evaluate(pool, verifier, eval_set: EvalSet, tokenizer, *, k: int, temperature: float, top_p: float,
             top_k: int, max_new_tokens: int, seed: int | None = 0, pass_k: Sequence[int] = (),
             n_boot: int = 0, ci_level: float = 0.95) -> dict[str, float]:
    """Sample k responses per problem, score them, and return accuracy statistics (``accuracy`` =
    avg@k, pass@1, pass@k, plus pass@j for j in ``pass_k`` and ``<metric>_ci`` intervals when
    ``n_boot`` > 0)."""
    spec = SamplingSpec(n=k, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed)
    scored = sample_and_score(pool, verifier, eval_set, tokenizer, spec)
    return _metrics(scored, k=k, pass_k=pass_k, n_boot=n_boot, ci_level=ci_level, seed=seed or 0)


def _metrics(scored: ScoredSamples, *, k: int, pass_k: Sequence[int], n_boot: int, ci_level: float,
             seed: int) -> dict[str, Any]:
    samples, scores = scored.samples, scored.scores
    n = len(scored.counts)
    stats = summarize(scored.correct, scored.counts, k=k, pass_k=sorted({1, k, *pass_k}), n_boot=n_boot,
                      ci_level=ci_level, seed=seed)
    lengths = [len(s.response_ids) for s in samples]
    return {
        "accuracy": sum(scores) / max(len(scores), 1),          # avg@k
        f"avg@{k}": sum(scores) / max(len(scores), 1),
        **{key: v for key, v in stats.items() if key != f"avg@{k}"},
        "response_length": sum(lengths) / max(len(lengths), 1),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / max(len(samples), 1),
        "verifier_timeouts": float(scored.verifier_stats.get("timeouts", 0)),
        "n_problems": float(n),
        "k": float(k),
        "seconds": scored.seconds,
    }


# ---------------------------------------------------------------------------------------------
# configuration checks (called by trace_rl.config.validate, before anything starts)
def check_config(cfg: Any, err: Callable[[str, str, str], None]) -> None:
    """Validate the ``eval`` and ``data`` groups; ``err(path, problem, fix)`` records a problem."""
    from trace_rl.tasks.benchmarks import parse_spec

    e, d = cfg.eval, cfg.data
    if e.k < 1:
        err("eval.k", f"{e.k} < 1", "use 1 or more")
    if d.prompts_per_step < 1:
        err("data.prompts_per_step", f"{d.prompts_per_step} < 1", "use 1 or more")
    if e.temperature < 0:
        err("eval.temperature", f"{e.temperature} < 0", "use 0.6 (the paper) or 0 for greedy")
    if not 0 < e.top_p <= 1:
        err("eval.top_p", f"{e.top_p} is outside (0, 1]", "use 0.95 (the paper)")
    if e.top_k == 0 or e.top_k < -1:
        err("eval.top_k", f"{e.top_k} is not a positive int or -1", "use 20 (the paper) or -1 for no top-k")
    if e.max_new_tokens < 1:
        err("eval.max_new_tokens", f"{e.max_new_tokens} < 1", "use e.g. 16384 for thinking models")
    if e.every < 0:
        err("eval.every", f"{e.every} < 0", "use 0 (never) or a number of steps")
    bad_k = [j for j in e.pass_k if not 1 <= j <= e.k]
    if bad_k:
        err("eval.pass_k", f"{bad_k} outside 1..eval.k={e.k} (pass@j needs j <= the samples per problem)",
            f"use values in 1..{e.k}, or raise eval.k")
    if e.n_boot < 0:
        err("eval.n_boot", f"{e.n_boot} < 0", "use 0 (no intervals) or e.g. 1000")
    if not 0 < e.ci_level < 1:
        err("eval.ci_level", f"{e.ci_level} is outside (0, 1)", "use 0.95")
    if e.limit < 0:
        err("eval.limit", f"{e.limit} < 0", "use 0 (all problems) or a positive count")
    names: dict[str, str] = {}
    for spec in e.benchmarks:
        name, path = parse_spec(spec)
        if not Path(path).is_file():
            err("eval.benchmarks", f"{spec!r}: {path!r} is not a file",
                "give local .jsonl/.json/.parquet files, optionally as name=path (nothing is downloaded)")
        elif Path(path).suffix.lower() not in (".jsonl", ".json", ".parquet"):
            err("eval.benchmarks", f"{spec!r} has an unknown extension", "convert it to .jsonl or .parquet")
        if name in names:
            err("eval.benchmarks", f"two benchmarks are named {name!r} ({names[name]!r}, {spec!r})",
                f"name them apart: eval.benchmarks=[{name}_a:...,{name}_b:...]")
        names[name] = spec

    for name in ("train_size", "eval_size"):
        if getattr(d, name) < 0:
            err(f"data.{name}", f"{getattr(d, name)} < 0", "use 0 (the whole file) or a positive count")
    if d.max_prompt_length < 1:
        err("data.max_prompt_length", f"{d.max_prompt_length} < 1", "use e.g. 1024")
    for name in ("task", "eval_test", "eval_ood"):
        spec = getattr(d, name)
        if not spec or spec.partition(":")[0] == "arith":
            if not spec and name == "task":
                err("data.task", "empty", "use data.task=arith or a local .jsonl/.parquet file")
            continue
        if not Path(spec).exists():
            err(f"data.{name}", f"{spec!r} does not exist",
                f"give a local .jsonl/.parquet file or directory, or data.{name}=arith"
                + (":test" if name == "eval_test" else ":ood" if name == "eval_ood" else ""))


# ---------------------------------------------------------------------------------------------
# python -m trace_rl.eval
def markdown_table(results: dict[str, dict[str, Any]], *, k: int, pass_k: Sequence[int], ci_level: float) -> str:
    """One row per benchmark: problems, avg@k and pass@j with their bootstrap intervals, length, truncation."""
    metrics = [f"avg@{k}"] + [f"pass@{j}" for j in pass_k]
    head = ["benchmark", "problems"] + metrics + ["mean length", "truncated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for name, r in results.items():
        cells = [name, str(int(r["n_problems"]))]
        for mname in metrics:
            ci = r.get(f"{mname}_ci")
            cells.append(f"{100 * r[mname]:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))
        cells += [f"{r['response_length']:.0f}", f"{100 * r['truncated_frac']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nScores in %; [lo, hi]: {100 * ci_level:.0f}% percentile bootstrap interval over problems. "
            f"avg@{k}: mean accuracy of {k} samples per problem; pass@j: unbiased estimator (Chen et al. 2021).\n")
    return "\n".join(lines) + "\n" + note


def run_eval(cfg: Any, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.model.path`` on ``cfg.eval.benchmarks``; returns (and writes) the results.

    Whatever happens, the services started here are shut down before it returns or raises.
    """
    from trace_rl.config import ConfigError
    from trace_rl.startup import validate, with_closers

    cfg = validate(cfg)
    if not cfg.eval.benchmarks:
        raise ConfigError("invalid configuration:\n  - eval.benchmarks: no benchmark files. Fix: "
                          "eval.benchmarks=[/data/math500.jsonl,/data/aime24.jsonl,...] (docs/evaluation.md)")
    out = Path(output_dir or cfg.eval.output_dir or _default_output_dir())
    return with_closers(lambda closers: _run_eval(cfg, out, closers))


def _default_output_dir() -> str:
    try:  # under Hydra: the job's own output directory
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:
        return os.path.join("outputs", "eval", time.strftime("%Y%m%d-%H%M%S"))


def _run_eval(cfg: Any, out_dir: Path, closers: list) -> dict[str, Any]:
    from trace_rl.rewards.pool import VerifierPool
    from trace_rl.config import ConfigError
    from trace_rl.startup import (load_tokenizer, model_context, resolve_model_path, start_cluster,
                                  start_rollout_pool, tokenize_prompts)
    from trace_rl.tasks.benchmarks import load_benchmark
    from trace_rl.tracking import Tracker

    t_job = time.perf_counter()
    e = cfg.eval
    pass_k = sorted(set(e.pass_k or (1, e.k)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples").mkdir(exist_ok=True)

    # ---- files first (no actor yet): a bad benchmark file fails here
    model_path = resolve_model_path(cfg.model.path)
    tokenizer, pad_id = load_tokenizer(cfg, model_path)
    benches, eval_sets, dropped = [], [], {}
    for spec in e.benchmarks:
        b = load_benchmark(spec, limit=e.limit, seed=e.seed)
        probs, ids, n_drop = tokenize_prompts(b.problems, tokenizer, cfg.data.max_prompt_length, b.path,
                                              chat_template_kwargs=cfg.model.chat_template_kwargs)
        if not probs:
            raise ValueError(f"benchmark {b.name}: every prompt is longer than data.max_prompt_length="
                             f"{cfg.data.max_prompt_length}; raise it")
        benches.append(b)
        eval_sets.append(EvalSet(b.name, probs, ids))
        dropped[b.name] = n_drop
    max_prompt = max(len(p) for es in eval_sets for p in es.prompt_ids)
    max_model_len = max_prompt + e.max_new_tokens
    limit = model_context(model_path)
    if limit is not None and max_model_len > limit:  # the engine would refuse it, after start-up
        raise ConfigError(
            f"invalid configuration:\n  - eval.max_new_tokens: the longest benchmark prompt ({max_prompt} tokens) + "
            f"eval.max_new_tokens ({e.max_new_tokens}) = {max_model_len} tokens is more than the model's context "
            f"({limit}, max_position_embeddings of {model_path}). Fix: lower eval.max_new_tokens to at most "
            f"{limit - max_prompt}, or data.max_prompt_length (longer prompts are dropped and counted)")

    # ---- services
    start_cluster(cfg, closers)
    run_name = cfg.logger.run_name or f"eval-{Path(model_path).name}"
    tracker = Tracker(out_dir, config=asdict(cfg), use_wandb=cfg.logger.wandb, wandb_mode=cfg.logger.wandb_mode,
                      project=cfg.logger.project, entity=cfg.logger.entity, run_name=run_name,
                      tags=[*cfg.logger.tags, "eval"], console="none")
    closers.append(("tracker", tracker.finish))
    verifiers: dict[str, VerifierPool] = {}
    for fn in dict.fromkeys(b.score_fn for b in benches):
        verifiers[fn] = VerifierPool(cfg.trainer.verifier_workers, cfg.trainer.verifier_timeout_s, score_fn=fn)
        closers.append((f"verifier pool {fn}", verifiers[fn].close))
    r = cfg.rollout
    pool = start_rollout_pool(cfg, model_path, max_model_len=max_model_len, seed=e.seed, pad_id=pad_id,
                              training=False, max_seqs=max(len(es.problems) for es in eval_sets) * e.k)
    closers.append(("rollout pool", pool.shutdown))

    # ---- one benchmark at a time
    spec = SamplingSpec(n=e.k, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                        max_new_tokens=e.max_new_tokens, seed=e.seed)
    results: dict[str, dict[str, Any]] = {}
    logged: dict[str, float] = {}
    for b, es in zip(benches, eval_sets):
        scored = sample_and_score(pool, verifiers[b.score_fn], es, tokenizer, spec)
        res = _metrics(scored, k=e.k, pass_k=pass_k, n_boot=e.n_boot, ci_level=e.ci_level, seed=e.seed)
        res.update({"format": b.format, "path": b.path, "prompts_dropped": dropped[b.name],
                    "rows_skipped": b.stats.skipped, "score_fn": b.score_fn})
        results[b.name] = res
        with open(out_dir / "samples" / f"{b.name}.jsonl", "w") as f:
            for s, text, score in zip(scored.samples, scored.texts, scored.scores):
                p = es.problems[s.prompt_index]
                f.write(json.dumps({"uid": p.uid, "answer": p.answer, "score": score, "response": text,
                                    "length": len(s.response_ids), "finish_reason": s.finish_reason}) + "\n")
        logged.update({f"eval/{b.name}/{m}": v for m, v in res.items() if isinstance(v, (int, float))})
        ci = res.get(f"avg@{e.k}_ci")
        print(f"{b.name}: avg@{e.k} {100 * res[f'avg@{e.k}']:.1f}"
              + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
              + "".join(f" | pass@{j} {100 * res[f'pass@{j}']:.1f}" for j in pass_k)
              + f" | {int(res['n_problems'])} problems, {res['seconds']:.1f} s", flush=True)

    summary = {
        "model_path": model_path,
        "sampling": {"k": e.k, "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k,
                     "max_new_tokens": e.max_new_tokens, "seed": e.seed,
                     "chat_template_kwargs": dict(cfg.model.chat_template_kwargs)},
        "pass_k": pass_k, "n_boot": e.n_boot, "ci_level": e.ci_level, "engine": r.engine,
        "benchmarks": results,
        "mean": {m: sum(res[m] for res in results.values()) / len(results) for m in [f"avg@{e.k}"] +
                 [f"pass@{j}" for j in pass_k]},
        "wall_time_s": time.perf_counter() - t_job,
    }
    tracker.log({**logged, **{f"eval/mean/{m}": v for m, v in summary["mean"].items()}}, step=0)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out_dir / "results.md").write_text(
        f"# Evaluation of `{model_path}`\n\nk={e.k}, temperature {e.temperature}, top-p {e.top_p}, "
        f"top-k {e.top_k}, max {e.max_new_tokens} new tokens, engine {r.engine}.\n\n"
        + markdown_table(results, k=e.k, pass_k=pass_k, ci_level=e.ci_level))
    print(f"results: {out_dir / 'results.json'} | {out_dir / 'results.md'}", flush=True)
    return summary


def prepare_eval_config(hcfg: Any) -> Any:
    """A composed Hydra config, ready for ``run_eval``: the training data fields a recipe leaves mandatory
    (``data.task``, ``data.eval_test``) are not used here and get the built-in task; every other
    mandatory value (``model.path``) must be set (ConfigError naming it otherwise)."""
    from omegaconf import OmegaConf

    from trace_rl.config import require_set

    for key, value in (("data.task", "arith"), ("data.eval_test", "arith:test")):
        group, _, name = key.partition(".")
        if OmegaConf.is_missing(hcfg[group], name):
            OmegaConf.update(hcfg, key, value)
    require_set(hcfg)
    return hcfg


def main() -> None:
    if any(a in ("--help", "-h") for a in sys.argv[1:]) and "hydra" not in " ".join(sys.argv):
        print(__doc__)
        print("Every field: python -m trace_rl.train --help (the eval.* group above all).")
        return
    from trace_rl.startup import hydra_main

    hydra_main(lambda hcfg: run_eval(prepare_eval_config(hcfg)))


if __name__ == "__main__":
    main()
