"""Held-out evaluation through the rollout pool: avg@k and unbiased pass@k.

avg@k is the mean accuracy over k samples per problem (the paper's metric); pass@k uses the
unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1): 1 - C(n-c, k) / C(n, k).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from trace_rl.rollout.base import SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalSet:
    name: str
    problems: list[Any]          # trace_rl.tasks.base.Problem
    prompt_ids: list[list[int]]


def evaluate(pool, verifier, eval_set: EvalSet, tokenizer, *, k: int, temperature: float, top_p: float,
             top_k: int, max_new_tokens: int, seed: int | None = 0) -> dict[str, float]:
    """Sample k responses per problem, score them, and return accuracy statistics."""
    t0 = time.perf_counter()
    spec = SamplingSpec(n=k, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed)
    samples = pool.generate_samples(eval_set.prompt_ids, spec)
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    scores, vstats = verifier.score([(t, eval_set.problems[s.prompt_index].answer) for t, s in zip(texts, samples)])
    n = len(eval_set.problems)
    correct = [0] * n
    counts = [0] * n
    for s, score in zip(samples, scores):
        counts[s.prompt_index] += 1
        correct[s.prompt_index] += int(score > 0.5)
    lengths = [len(s.response_ids) for s in samples]
    return {
        "accuracy": sum(scores) / max(len(scores), 1),          # avg@k
        f"avg@{k}": sum(scores) / max(len(scores), 1),
        "pass@1": sum(pass_at_k(counts[i], correct[i], 1) for i in range(n)) / max(n, 1),
        f"pass@{k}": sum(pass_at_k(counts[i], correct[i], k) for i in range(n)) / max(n, 1),
        "response_length": sum(lengths) / max(len(lengths), 1),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / max(len(samples), 1),
        "verifier_timeouts": float(vstats.get("timeouts", 0)),
        "n_problems": float(n),
        "k": float(k),
        "seconds": time.perf_counter() - t0,
    }
