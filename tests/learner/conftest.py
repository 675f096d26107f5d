"""Learner tests: run the in-process torch work single-threaded.

On a 2-core machine shared with other processes, two intra-op threads that wait on each other
make a tiny forward/backward ~100x slower (measured: 0.04 s vs 4 s per train step) than one.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
