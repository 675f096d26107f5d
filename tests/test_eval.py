from __future__ import annotations

import itertools
import random

import pytest

from trace_rl.eval import pass_at_k


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
