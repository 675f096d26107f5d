"""``ReplayBuffer``: batches held in the Ray object store, referenced by the driver.

The driver never keeps a batch's tensors once it is stored: the learners fetch the object
themselves. Entries carry the policy version that sampled them so that a consumer can bound
staleness (on-policy training takes the newest batch and drops it once consumed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from trace_rl.batch import Batch


@dataclass
class BufferEntry:
    ref: Any            # ray.ObjectRef of a Batch
    version: int        # policy version (learner step) that generated it
    sequences: int
    tokens: int


class ReplayBuffer:
    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: deque[BufferEntry] = deque()
        self.evicted = 0

    def put(self, batch: Batch) -> BufferEntry:
        """Store ``batch`` in the object store; the oldest entry is evicted when full."""
        import ray

        batch.validate()
        entry = BufferEntry(ray.put(batch), int(batch.policy_version.min().item()) if len(batch) else 0,
                            len(batch), batch.num_response_tokens())
        self._entries.append(entry)
        while len(self._entries) > self.capacity:
            self._entries.popleft()
            self.evicted += 1
        return entry

    def pop(self, *, min_version: int | None = None) -> BufferEntry:
        """Remove and return the newest entry whose version is >= ``min_version``; staler ones are dropped."""
        while self._entries:
            entry = self._entries.pop()
            if min_version is None or entry.version >= min_version:
                return entry
            self.evicted += 1
        raise IndexError("ReplayBuffer is empty" + (f" (nothing at version >= {min_version})" if min_version else ""))

    def get(self, entry: BufferEntry) -> Batch:
        import ray

        return ray.get(entry.ref)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, float]:
        return {"buffer/size": float(len(self._entries)), "buffer/evicted": float(self.evicted)}
