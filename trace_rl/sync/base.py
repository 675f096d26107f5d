"""The ``WeightSync`` interface and what its implementations share."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

__all__ = ["WeightSync", "WeightSyncError", "wait_sides", "rate"]


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out; the message names the side (learner / engine) that did."""


class WeightSync(ABC):
    """Moves the learners' current weights into every engine of a rollout pool.

    ``sync(version)`` returns after every engine serves the new weights (tagged ``version``) and
    gives its timings: ``seconds`` (wall time of the whole sync), ``bytes`` (payload per engine),
    ``mb_per_s`` and path-specific stages. ``close()`` releases what the path holds (a process
    group, buffers); it is idempotent, and the object is also a context manager.
    """

    kind: ClassVar[str] = ""

    def __init__(self, learners: Any, pool: Any):
        self.learners, self.pool = learners, pool
        self.syncs = 0

    @abstractmethod
    def sync(self, version: int) -> dict[str, float]:
        ...

    def submit(self, version: int) -> Callable[[], dict[str, float]]:
        """Start a sync and return a function that waits for it and returns :meth:`sync`'s stats. Once this
        returns, the engines' loads are queued behind whatever they were already asked to do (a rollout in
        flight finishes with the weights it started with) and before anything asked of them later, so
        the driver may ask for the next rollout at once (asynchronous training). The default syncs
        right away; paths that can queue the loads override it."""
        stats = self.sync(version)
        return lambda: stats

    def close(self) -> None:
        pass

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, engines={len(self.pool)})"


def rate(nbytes: float, seconds: float) -> float:
    """MiB per second (0 for an instant or empty transfer)."""
    return nbytes / 2**20 / seconds if seconds > 0 else 0.0


def wait_sides(sides: dict[str, list], timeout_s: float | None, what: str) -> dict[str, list]:
    """Wait for the ObjectRefs of several sides of one collective (e.g. ``{"learner": [...], "engine": [...]}``).

    A failure on any side raises at once (:class:`WeightSyncError` naming the side), instead of
    waiting for the others, which stay blocked in the collective until its timeout or until the
    caller tears the services down. Returns every side's results.
    """
    import ray

    pending = {ref: side for side, refs in sides.items() for ref in refs}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not done:
            waiting = sorted(set(pending.values()))
            raise WeightSyncError(f"{what}: the {' and '.join(waiting)} side(s) did not finish within {timeout_s:g} s")
        side = pending.pop(done[0])
        try:
            ray.get(done[0])
        except Exception as err:
            raise WeightSyncError(f"{what} failed on the {side} side: {err}") from err
    return {side: ray.get(refs) for side, refs in sides.items()}
