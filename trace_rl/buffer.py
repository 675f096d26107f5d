"""``ReplayBuffer``: routed batches waiting for the learners, held as Ray object refs, with a staleness bound.

The driver never holds a batch's tensors: an entry is the object refs of a step's rank shards (cut by the
routing stage, fetched by each learner rank itself) and the policy version that sampled its rows. The
learners consume entries in the order they were produced. With ``max_staleness = k`` an entry whose
oldest row was sampled more than ``k`` policy versions before the learners' current one is dropped when
it would be consumed, and counted (``buffer/dropped_batches``, ``buffer/dropped_sequences``); ``k = 0``
is on-policy training. When more than ``capacity`` entries wait, the oldest is evicted and counted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from trace_rl.batch import Batch

__all__ = ["BufferEntry", "ReplayBuffer"]


@dataclass
class BufferEntry:
    ref: Any            # ray.ObjectRef of a Batch, or the list of the rank shards' refs
    version: int        # policy version (learner updates) of the oldest row's sampling weights
    sequences: int
    tokens: int
    step: int = -1      # the learner step it was produced for
    info: Any = None    # the routing summary (trace_rl.pipeline.RouteInfo), when routed


class ReplayBuffer:
    def __init__(self, capacity: int = 4, max_staleness: int = 0):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.capacity, self.max_staleness = int(capacity), int(max_staleness)
        self._entries: deque[BufferEntry] = deque()
        self.evicted = 0
        self.dropped_batches = 0
        self.dropped_sequences = 0
        self.consumed = 0

    def put(self, item: Batch | BufferEntry) -> BufferEntry:
        """Add an entry (a routed step's shard refs), or store a whole ``Batch`` in the object store as one;
        the oldest entry is evicted when more than ``capacity`` wait."""
        if isinstance(item, Batch):
            import ray

            item.validate()
            item = BufferEntry(ray.put(item), int(item.policy_version.min().item()) if len(item) else 0,
                               len(item), item.num_response_tokens())
        self._entries.append(item)
        while len(self._entries) > self.capacity:
            self._entries.popleft()
            self.evicted += 1
        return item

    def stale(self, entry: BufferEntry, learner_version: int) -> bool:
        """Whether ``entry`` was sampled more than ``max_staleness`` versions before ``learner_version``."""
        return learner_version - entry.version > self.max_staleness

    def pop(self, learner_version: int | None = None) -> BufferEntry | None:
        """The oldest entry within the staleness bound of ``learner_version`` (None: no bound), dropping and
        counting the staler ones before it; None when every waiting entry was too stale."""
        while self._entries:
            entry = self._entries.popleft()
            if learner_version is None or not self.stale(entry, learner_version):
                self.consumed += 1
                return entry
            self.dropped_batches += 1
            self.dropped_sequences += entry.sequences
        if learner_version is None:
            raise IndexError("ReplayBuffer is empty")
        return None

    def get(self, entry: BufferEntry) -> Batch:
        import ray

        return ray.get(entry.ref)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, float]:
        return {"buffer/size": float(len(self._entries)), "buffer/evicted": float(self.evicted),
                "buffer/dropped_batches": float(self.dropped_batches),
                "buffer/dropped_sequences": float(self.dropped_sequences), "buffer/consumed": float(self.consumed)}
