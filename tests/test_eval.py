from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from trace_rl.eval import pass_at_k

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def naive_pass_at_k(outcomes: list[int], k: int) -> float:
    """Average over every k-subset of the samples of 'at least one correct'."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(naive_pass_at_k(outcomes, k))


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 5"):
        pass_at_k(4, 1, 5)


# ---------------------------------------------------------------------------------------------
# bootstrap intervals and per-benchmark summaries, against independent naive references
def naive_bootstrap_ci(values: list[float], n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """A plain loop: resample the problems one bootstrap replicate at a time, sort the means, and read
    the two percentiles by linear interpolation between order statistics."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(values)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        means.append(sum(values[int(i)] for i in idx) / n)
    means.sort()

    def percentile(q: float) -> float:
        pos = q * (n_boot - 1)
        lo = int(pos)
        hi = min(lo + 1, n_boot - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    return percentile((1 - level) / 2), percentile((1 + level) / 2)


@pytest.mark.parametrize("n, n_boot, level, seed", [(1, 10, 0.9, 0), (7, 200, 0.95, 1), (40, 501, 0.8, 7)])
def test_bootstrap_ci_equals_a_resampling_loop(n, n_boot, level, seed):
    from trace_rl.eval import bootstrap_ci

    rng = random.Random(seed)
    values = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)]
    assert bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed) == pytest.approx(
        naive_bootstrap_ci(values, n_boot, level, seed), abs=1e-12)


def test_bootstrap_ci_matches_the_normal_approximation_and_is_seeded():
    from trace_rl.eval import bootstrap_ci

    rng = random.Random(3)
    values = [float(rng.random() < 0.4) for _ in range(400)]
    mean = sum(values) / len(values)
    half = 1.96 * math.sqrt(mean * (1 - mean) / len(values))  # an independent reference for a large n
    lo, hi = bootstrap_ci(values, n_boot=4000, level=0.95, seed=0)
    assert lo < mean < hi
    assert lo == pytest.approx(mean - half, abs=0.2 * half) and hi == pytest.approx(mean + half, abs=0.2 * half)
    assert bootstrap_ci(values, n_boot=500, seed=5) == bootstrap_ci(values, n_boot=500, seed=5)
    assert bootstrap_ci(values, n_boot=500, seed=5) != bootstrap_ci(values, n_boot=500, seed=6)
    assert bootstrap_ci([1.0] * 5, n_boot=50) == (1.0, 1.0)
    with pytest.raises(ValueError, match="eval.n_boot"):
        bootstrap_ci(values, n_boot=0)
    with pytest.raises(ValueError, match="eval.ci_level"):
        bootstrap_ci(values, n_boot=10, level=1.0)


def test_summarize_equals_naive_per_problem_averages():
    from trace_rl.eval import bootstrap_ci, summarize

    rng = random.Random(11)
    k = 6
    outcomes = [[rng.random() < p for _ in range(k)] for p in (0.0, 0.1, 0.5, 0.9, 1.0, 0.3, 0.6)]
    correct = [sum(o) for o in outcomes]
    out = summarize(correct, [k] * len(outcomes), k=k, pass_k=[1, 2, 6], n_boot=300, ci_level=0.9, seed=4)
    assert out[f"avg@{k}"] == pytest.approx(sum(map(sum, outcomes)) / (k * len(outcomes)))
    for j in (1, 2, 6):
        per_problem = [naive_pass_at_k(o, j) for o in outcomes]
        assert out[f"pass@{j}"] == pytest.approx(sum(per_problem) / len(per_problem))
        assert out[f"pass@{j}_ci"] == pytest.approx(list(naive_bootstrap_ci(per_problem, 300, 0.9, 4)))
        assert out[f"pass@{j}_ci"][0] <= out[f"pass@{j}"] <= out[f"pass@{j}_ci"][1]
    assert out["pass@1"] == pytest.approx(out[f"avg@{k}"])  # pass@1 is the mean accuracy
    assert out[f"avg@{k}_ci"] == list(bootstrap_ci([c / k for c in correct], n_boot=300, level=0.9, seed=4))
    assert "pass@1_ci" not in summarize(correct, [k] * len(correct), k=k, n_boot=0)
    assert set(summarize(correct, [k] * len(correct), k=k)) == {f"avg@{k}", "pass@1", f"pass@{k}"}


def test_markdown_table_shows_every_benchmark_and_interval():
    from trace_rl.eval import markdown_table

    res = {"math500": {"n_problems": 3.0, "avg@4": 0.5, "avg@4_ci": [0.25, 0.75], "pass@1": 0.5,
                       "pass@1_ci": [0.25, 0.75], "pass@4": 2 / 3, "response_length": 12.0, "truncated_frac": 0.25}}
    table = markdown_table(res, k=4, pass_k=[1, 4], ci_level=0.95)
    lines = table.splitlines()
    assert lines[0] == "| benchmark | problems | avg@4 | pass@1 | pass@4 | mean length | truncated |"
    assert lines[2] == "| math500 | 3 | 50.0 [25.0, 75.0] | 50.0 [25.0, 75.0] | 66.7 | 12 | 25.0% |"
    assert "95% percentile bootstrap" in table


# ---------------------------------------------------------------------------------------------
# eval / data configuration checks (trace_rl.eval.check_config, run by validate)
@pytest.mark.parametrize("change, field, fix", [
    (dict(eval=dict(pass_k=[1, 5])), "eval.pass_k", "raise eval.k"),
    (dict(eval=dict(n_boot=-1)), "eval.n_boot", "1000"),
    (dict(eval=dict(ci_level=1.5)), "eval.ci_level", "0.95"),
    (dict(eval=dict(top_p=0.0)), "eval.top_p", "0.95"),
    (dict(eval=dict(top_k=0)), "eval.top_k", "20"),
    (dict(eval=dict(benchmarks=["/no/such/math500.jsonl"])), "eval.benchmarks", "local .jsonl"),
    (dict(eval=dict(benchmarks=[str(FIXTURES / "math_small.jsonl"), str(FIXTURES / "math_small.jsonl")])),
     "eval.benchmarks", "name them apart"),
    (dict(data=dict(task="/no/such/train.jsonl")), "data.task", "local .jsonl/.parquet"),
    (dict(data=dict(eval_test="/no/such/test.jsonl")), "data.eval_test", "arith:test"),
    (dict(data=dict(max_prompt_length=0)), "data.max_prompt_length", "1024"),
])
def test_bad_eval_and_data_config_names_the_field_and_the_fix(change, field, fix):
    from trace_rl.config import Config, ConfigError
    from trace_rl.startup import validate

    cfg = Config()
    for group, values in change.items():
        for name, value in values.items():
            setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert field in str(e.value) and fix in str(e.value)


def test_good_eval_config_validates():
    from trace_rl.config import Config
    from trace_rl.startup import validate

    cfg = Config()
    cfg.eval.k, cfg.eval.pass_k, cfg.eval.n_boot = 8, [1, 4, 8], 100
    cfg.eval.benchmarks = [str(FIXTURES / "benchmarks" / "math500.jsonl"),
                           f"gpqa={FIXTURES / 'benchmarks' / 'gpqa_diamond.jsonl'}"]
    cfg.data.task = cfg.data.eval_test = str(FIXTURES / "math_small.jsonl")
    validate(cfg)
