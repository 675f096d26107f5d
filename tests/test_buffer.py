from __future__ import annotations

import pytest
import torch

from tests.test_batch import make_batch
from trace_rl.buffer import ReplayBuffer


def test_buffer_holds_object_refs_and_bounds_staleness(ray_cluster):
    import ray

    buf = ReplayBuffer(capacity=2)
    entries = []
    for v in range(3):
        b = make_batch(seed=v)
        b.policy_version = torch.full((len(b),), v)
        entries.append(buf.put(b))
    assert isinstance(entries[0].ref, ray.ObjectRef)
    assert len(buf) == 2 and buf.evicted == 1           # capacity: the oldest went
    got = buf.get(entries[2])
    assert torch.equal(got.response_ids, make_batch(seed=2).response_ids)
    e = buf.pop(min_version=2)
    assert e.version == 2 and e.tokens == make_batch(seed=2).num_response_tokens()
    with pytest.raises(IndexError, match="version >= 2"):
        buf.pop(min_version=2)                          # version 1 is too stale: dropped
    assert buf.evicted == 2 and len(buf) == 0


def test_buffer_rejects_a_malformed_batch(ray_cluster):
    b = make_batch()
    b.rewards = torch.zeros(7)
    with pytest.raises(ValueError, match="rewards"):
        ReplayBuffer().put(b)
