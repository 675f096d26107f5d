"""Fixtures for the algorithm-core tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """These tests use tiny tensors: with 2 intra-op threads on a busy 2-core machine, each small
    op paid ~1 ms of thread hand-off (softmax of [4, 9]: 1.3 ms vs 11 us on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
