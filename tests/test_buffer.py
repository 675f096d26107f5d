from __future__ import annotations

import pytest
import torch

from tests.test_batch import make_batch
from trace_rl.buffer import BufferEntry, ReplayBuffer


def test_buffer_holds_object_refs_and_evicts_beyond_capacity(ray_cluster):
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
    e = buf.pop()                                       # oldest first (no bound)
    assert e.version == 1 and e.tokens == make_batch(seed=1).num_response_tokens()
    assert buf.pop().version == 2
    with pytest.raises(IndexError, match="empty"):
        buf.pop()


def entry(version: int, sequences: int = 4) -> BufferEntry:
    return BufferEntry(ref=[f"shard-{version}"], version=version, sequences=sequences, tokens=10 * sequences)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_staleness_bound_drops_and_counts_stale_entries(k):
    """An entry sampled more than k versions before the learners' version is dropped when it would be
    consumed (counted); within the bound entries come out in production order."""
    buf = ReplayBuffer(capacity=8, max_staleness=k)
    for v in (0, 1, 2, 3, 4):
        buf.put(entry(v, sequences=v + 1))
    learner = 4
    got = buf.pop(learner)
    assert got.version == learner - k                     # the oldest within the bound
    stale = list(range(0, learner - k))
    assert buf.dropped_batches == len(stale) and buf.dropped_sequences == sum(v + 1 for v in stale)
    assert [buf.pop(learner).version for _ in range(len(buf))] == list(range(learner - k + 1, 5))
    stats = buf.stats()
    assert stats["buffer/dropped_batches"] == len(stale) and stats["buffer/consumed"] == k + 1


def test_pop_returns_none_when_everything_waiting_is_too_stale():
    buf = ReplayBuffer(capacity=4, max_staleness=1)
    buf.put(entry(0))
    buf.put(entry(1))
    assert buf.pop(5) is None
    assert buf.dropped_batches == 2 and len(buf) == 0
    assert not buf.stale(entry(4), 5) and buf.stale(entry(3), 5)
    with pytest.raises(ValueError, match="max_staleness"):
        ReplayBuffer(max_staleness=-1)


def test_buffer_rejects_a_malformed_batch(ray_cluster):
    b = make_batch()
    b.rewards = torch.zeros(7)
    with pytest.raises(ValueError, match="rewards"):
        ReplayBuffer().put(b)
