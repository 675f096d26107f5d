"""The pipeline: the producer side of training (rollout -> reward -> annotate -> teacher -> advantage) as
stage actors joined by object refs, and the driver's small helpers around it.

- :mod:`.producer`: :class:`Producer`, the thread that draws a step's prompts, starts the engines and
  chains each streamed chunk through the stages, then the routing stage.
- :mod:`.stages`: the reward / annotate / teacher stage actors and :class:`Stages`, the driver's handle.
- :mod:`.route`: the ``advantage`` stage, :class:`RouteStage` (method, filtering, padding, global counts, rank shards), hosted by the reward stage's actor.
- here: :class:`StepTimeline` (stage timings and idle time per role), :class:`DriverTraffic` (bytes the
  driver fetches and puts per step) and :func:`remote_verifier`.

The replay buffer that joins this side to the learners is :class:`trace_rl.buffer.ReplayBuffer`; the
loop that consumes it is ``trace_rl/train.py``. docs/pipeline.md describes the whole.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

from trace_rl.pipeline.producer import Producer, StepRollout
from trace_rl.pipeline.route import RouteInfo, RouteSpec, route_batch
from trace_rl.pipeline.stages import AnnotateStage, RewardStage, Stages, TeacherStage

__all__ = ["Producer", "StepRollout", "RouteSpec", "RouteInfo", "route_batch", "Stages", "RewardStage",
           "AnnotateStage", "TeacherStage", "StepTimeline", "DriverTraffic", "payload_bytes", "remote_verifier"]


class StepTimeline:
    """Per-step stage timings and idle time, from the wall-clock windows the engines and stages report.

    ``timing_s/rollout`` is the wall time of the step's generation (first chunk started to last chunk
    handed on, over all engines); ``timing_s/<stage>`` (reward, annotate, teacher) the seconds that stage
    was busy on the step; ``timing_s/advantage`` the routing stage's. ``idle_s/rollout`` is how long the
    engines sat without a request between the previous step's generation and this one's;
    ``idle_s/learner`` how long the learners waited for this step's data. :meth:`summary` adds them up
    over the run (busy seconds and busy fraction of the training loop per role).
    """

    def __init__(self) -> None:
        self._prev_end: float | None = None
        self.busy: dict[str, float] = {}
        self.idle_total: dict[str, float] = {}

    def stage_timings(self, engine_stats: list[dict], stage_stats: dict[str, list[dict]], info: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        if engine_stats:
            start, end = min(s["start"] for s in engine_stats), max(s["end"] for s in engine_stats)
            out["timing_s/rollout"] = end - start
            self._gen_window = (start, end)
        for name, stats in stage_stats.items():
            out[f"timing_s/{name}"] = sum(float(s["busy_s"]) for s in stats)
        out["timing_s/advantage"] = float(info.seconds)
        for key in ("rollout", "reward", "annotate", "teacher", "advantage", "learn", "sync"):
            if f"timing_s/{key}" in out:
                self.busy[key] = self.busy.get(key, 0.0) + out[f"timing_s/{key}"]
        return out

    def idle(self, engine_stats: list[dict], timings: dict[str, float]) -> dict[str, float]:
        out = {"idle_s/learner": float(timings.get("timing_s/wait_data", 0.0))}
        for key in ("learn", "sync"):
            self.busy[key] = self.busy.get(key, 0.0) + float(timings.get(f"timing_s/{key}", 0.0))
        window = getattr(self, "_gen_window", None)
        if window is not None:
            if self._prev_end is not None:
                out["idle_s/rollout"] = max(window[0] - self._prev_end, 0.0)
            self._prev_end = window[1]
        for k, v in out.items():
            self.idle_total[k] = self.idle_total.get(k, 0.0) + v
        return out

    def summary(self, loop_s: float) -> dict[str, Any]:
        return {"loop_s": loop_s, "busy_s": dict(self.busy),
                "busy_frac": {k: v / loop_s for k, v in self.busy.items()} if loop_s > 0 else {},
                "idle_s": dict(self.idle_total)}


def payload_bytes(obj: Any, _depth: int = 0) -> int:
    """An estimate of the bytes ``obj`` carries: tensors and arrays by their buffers, strings and bytes by
    length, containers and dataclasses by their contents (8 bytes per other scalar)."""
    if _depth > 12:
        return 8
    nbytes = getattr(obj, "nbytes", None)
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.numel() * obj.element_size())
    if isinstance(nbytes, int) and not isinstance(obj, type):
        return nbytes
    if isinstance(obj, (str, bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(k, _depth + 1) + payload_bytes(v, _depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(payload_bytes(v, _depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_bytes(getattr(obj, f.name), _depth + 1) for f in dataclasses.fields(obj))
    return 8


class DriverTraffic:
    """Counts what the driver process fetches from (``ray.get``) and puts into (``ray.put``) the object
    store while the context is active (:func:`payload_bytes` of each value): ``driver/fetched_bytes`` and
    ``driver/put_bytes`` per step, the evidence that no batch passes through the driver."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.fetched_bytes = 0
        self.put_bytes = 0
        self.largest_fetch = 0
        self._saved: tuple | None = None

    def reset(self) -> None:
        self.fetched_bytes = self.put_bytes = self.largest_fetch = 0

    def __enter__(self) -> "DriverTraffic":
        import ray

        get, put = ray.get, ray.put

        def counted_get(refs, *args, **kwargs):
            out = get(refs, *args, **kwargs)
            n = payload_bytes(out)
            self.fetched_bytes += n
            self.largest_fetch = max(self.largest_fetch, n)
            return out

        def counted_put(value, *args, **kwargs):
            self.put_bytes += payload_bytes(value)
            return put(value, *args, **kwargs)

        with self._lock:
            self._saved = (get, put)
            ray.get, ray.put = counted_get, counted_put
        return self

    def __exit__(self, *exc) -> None:
        import ray

        with self._lock:
            if self._saved is not None:
                ray.get, ray.put = self._saved
                self._saved = None


class remote_verifier:  # noqa: N801 - used like a function returning a verifier
    """A verifier with ``score(items) -> (scores, stats)`` (what evaluation calls) backed by the reward
    stage's pool, so that evaluation and training share one set of worker processes."""

    def __init__(self, actor: Any):
        self.actor = actor

    def score(self, items: list[tuple[str, str]]) -> tuple[list[float], dict[str, float]]:
        import ray

        return ray.get(self.actor.score_texts.remote(items))

    @property
    def stats(self) -> dict[str, float]:
        import ray

        return ray.get(self.actor.verifier_stats.remote())
