"""The producer: the rollout side of the pipeline, in a background thread of the driver.

The driver's loop asks for the rollout of a learner step (:meth:`Producer.request`); the producer draws
that step's prompts, starts generation on every engine, and as each engine hands on a chunk of finished
groups (a Ray streaming generator of object refs) chains the chunk through the stages the method needs
at that step — reward, then annotate, then teacher — and, once the step's chunks are all chained, the
routing stage that cuts the learners' shards. It fetches nothing but the engines' stream items' refs: the
data goes engine -> stage actors -> routing stage -> learner ranks through the object store.

How far it may run ahead is decided by when the driver asks: with ``trainer.max_staleness = k`` the
driver asks for steps ``t+1 .. t+k`` before it trains step ``t``, and for step ``t+k+1`` only once the
weights of step ``t+1`` are queued on the engines, so no rollout is sampled by weights more than ``k``
versions older than the ones that learn from it (``k = 0`` is lockstep).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["StepRollout", "Producer"]


@dataclass
class StepRollout:
    """The refs of one produced step (nothing fetched): the learners' shards and the routing summary,
    plus the engines' and stages' small stats."""
    step: int
    shards: list
    info: Any
    engine_stats: list = field(default_factory=list)
    stage_stats: dict[str, list] = field(default_factory=dict)
    submitted: float = 0.0       # wall time the generation was asked for
    chained: float = 0.0         # wall time the last chunk was chained (the engines were done)


class Producer:
    """See the module docstring. ``run_step(step)`` does one step's work synchronously (the thread calls
    it per request); ``next()`` returns the produced steps in request order and re-raises a failure."""

    def __init__(self, *, pool: Any, stages: Any, learners: Any, sampler: Any, method: Any, params: dict,
                 prompts: Any, spec: Any, prompts_per_step: int, stream_chunks: int,
                 route_spec: Any, colocation: Any = None, temperature: float = 1.0, pad_token_id: int = 0):
        self.pool, self.stages, self.learners, self.sampler = pool, stages, learners, sampler
        self.method, self.params, self.spec = method, params, spec
        self.prompts = prompts  # trace_rl.startup.PromptTable
        self.prompts_per_step, self.stream_chunks = int(prompts_per_step), int(stream_chunks)
        self.route_spec, self.colocation = route_spec, colocation
        self.temperature, self.pad_token_id = float(temperature), int(pad_token_id)
        self._requests: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._sampler_states: dict[int, dict] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False

    # ------------------------------------------------------------------ the driver's side
    def start(self) -> "Producer":
        self._thread = threading.Thread(target=self._loop, name="trace_rl-producer", daemon=True)
        self._thread.start()
        return self

    def request(self, step: int) -> None:
        """Produce the rollout that learner step ``step`` will train on (requests are served in order)."""
        self._requests.put(int(step))

    def next(self, timeout: float | None = None) -> StepRollout:
        """The next produced step, in request order; re-raises the producer's error."""
        item = self._done.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped = True
        self._requests.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def sampler_state(self, step: int) -> dict:
        """The prompt sampler's state before the prompts of ``step`` were drawn (what a checkpoint taken
        before ``step`` trains must store, whatever the producer has drawn since)."""
        with self._lock:
            return dict(self._sampler_states.get(step) or self.sampler.state_dict())

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            step = self._requests.get()
            if step is None or self._stopped:
                return
            try:
                self._done.put(self.run_step(step))
            except BaseException as e:  # noqa: BLE001 - handed to the driver's thread
                self._done.put(e)
                return

    def run_step(self, step: int) -> StepRollout:
        """Draw the prompts of ``step``, start the engines and chain every chunk through its stages, then the
        routing stage. Returns as soon as everything is submitted (the routing may still be running)."""
        import ray

        from trace_rl.algo import TEACHER_NEEDS

        with self._lock:
            for old in [s for s in self._sampler_states if s < step]:
                del self._sampler_states[old]
            self._sampler_states[step] = self.sampler.state_dict()
            idx, prompts = self.prompts.draw(self.sampler, self.prompts_per_step)
        params = {**self.params, "step": step}
        needs = self.method.needs_at(step, params)
        problems = self.prompts.problems
        meta = {"uid": [problems[i].uid for i in idx], "answer": [problems[i].answer for i in idx]}
        colocated = self.colocation is not None and self.colocation.enabled
        if colocated:
            self.colocation.to_engines()
        submitted = time.time()
        streams = self.pool.generate_stream(prompts, self.spec, meta=meta, chunks=self.stream_chunks)
        chunks, before_learners, engine_stats = [], [], []
        stage_stats: dict[str, list] = {"reward": [], "annotate": [], "teacher": []}
        st = self.stages
        for stream in streams:
            for chunk in stream:
                engine_stats.append(next(stream))  # the stream alternates chunk, chunk stats
                ref, stats = st.reward.score.options(num_returns=2).remote(chunk)
                stage_stats["reward"].append(stats)
                if "annotations" in needs:
                    ref, stats = st.annotate.annotate.options(num_returns=2).remote(ref)
                    stage_stats["annotate"].append(stats)
                before_learners.append(ref)
                if needs & TEACHER_NEEDS:
                    ref, stats = st.teacher.score.options(num_returns=2).remote(ref)
                    stage_stats["teacher"].append(stats)
                chunks.append(ref)
        chained = time.time()
        if not chunks:
            raise RuntimeError(f"step {step}: the engines returned no samples")
        if colocated:
            # the engines keep the accelerators through annotation (annotator=self generates), then hand
            # them to the learners (entropy, training)
            ray.wait(before_learners, num_returns=len(before_learners), fetch_local=False)
            self.colocation.to_learners()
        parts, entropy = chunks, []
        if "entropy" in needs:
            whole = st.route.concat.remote(self.pad_token_id, *chunks)
            parts = [whole]
            entropy = self.learners.entropy_refs(whole, len(prompts) * int(self.spec.n), self.temperature)
        spec = _with_step(self.route_spec, params, needs)
        out = st.route.route.options(num_returns=spec.num_ranks + 1).remote(spec, len(parts), *parts, *entropy)
        return StepRollout(step=step, shards=list(out[:-1]), info=out[-1], engine_stats=engine_stats,
                           stage_stats=stage_stats, submitted=submitted, chained=chained)


def _with_step(spec: Any, params: dict, needs: frozenset) -> Any:
    from dataclasses import replace

    return replace(spec, params=params, needs=frozenset(needs))
