"""A pool of killable worker processes that score (response, gold) pairs with a hard timeout.

Why processes, and why killable: math-verify arms ``signal.alarm`` (so it fails inside threads
and threaded Ray actors), and some inputs (``\\boxed{10^{10^{10^{10}}}}``) can keep sympy busy far
past any soft timeout. Each worker scores one item at a time; when an item exceeds ``timeout_s``
the worker is SIGKILLed and replaced, the item scores 0.0 and is counted as a timeout. An
exception in the score function scores 0.0 and is counted as an error; it never stops the pool.

Workers are started with the ``spawn`` (or ``forkserver``) start method, never ``fork``: the
caller may be a Ray driver or actor with live threads, and forking a threaded process can
deadlock the child. As with any spawn-based code, a script that creates a pool needs an
``if __name__ == "__main__":`` guard. Workers exit on ``close()``, when the pool is garbage
collected, at interpreter exit, and by themselves when their parent process disappears.
"""
from __future__ import annotations

import collections
import importlib
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Union

log = logging.getLogger(__name__)

DEFAULT_SCORE_FN = "trace_rl.rewards.math_reward:math_verify_score"
ScoreFn = Union[str, Callable[[str, str], float]]

# How often an idle worker checks that its parent is still alive (seconds).
_PARENT_POLL_S = 1.0


# ---------------------------------------------------------------------------------- worker side
def resolve_score_fn(score_fn: ScoreFn) -> Callable[[str, str], float]:
    """A ``"package.module:function"`` string (or a callable) -> the callable."""
    if callable(score_fn):
        return score_fn
    if not isinstance(score_fn, str) or score_fn.count(":") != 1:
        raise ValueError(f"score_fn={score_fn!r} is not of the form 'package.module:function'; "
                         f"pass e.g. {DEFAULT_SCORE_FN!r} or a module-level function")
    module_name, attr = score_fn.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"score_fn={score_fn!r} cannot be imported ({e}); "
                         "check the module path and the function name") from e
    if not callable(fn):
        raise ValueError(f"score_fn={score_fn!r} names a {type(fn).__name__}, not a function")
    return fn


def _worker_main(conn: Connection, score_fn: ScoreFn, parent_pid: int) -> None:
    """Loop of one worker process: receive ``(index, response, gold)``, send back a score."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn = resolve_score_fn(score_fn)
        # Heavy first-call costs (importing sympy, compiling grammars) are paid before "ready",
        # so they never count against the first item's timeout.
        warmup = getattr(fn, "warmup", None)
        if callable(warmup):
            warmup()
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        return
    # math-verify logs every timeout together with the whole input (which may be 100 kB).
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    conn.send(("ready", os.getpid()))
    while True:
        if not conn.poll(_PARENT_POLL_S):
            # The parent's death normally shows up as EOF on the pipe; this also covers a parent
            # whose pipe end leaked into another live process.
            if os.getppid() != parent_pid:
                return
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, response, gold = msg
        try:
            score = float(fn(response, gold))
            if not math.isfinite(score):
                raise ValueError(f"score function returned {score}")
            reply = ("ok", index, score)
        except Exception as e:  # the item scores 0 and counts as an error; the worker lives on
            reply = ("error", index, f"{type(e).__name__}: {e}")
        conn.send(reply)


# ---------------------------------------------------------------------------------- parent side
@dataclass
class _Worker:
    proc: Any
    conn: Connection
    started: float
    ready: bool = False
    job: int | None = None
    deadline: float = math.inf


def _ask_to_exit(w: _Worker) -> bool:
    """Send an idle, live worker the exit message; False when it cannot take one (busy, dead, starting)."""
    if not (w.proc.is_alive() and w.job is None and w.ready):
        return False
    try:
        w.conn.send(None)
    except (OSError, ValueError):
        return False
    return True


def _stop_worker(w: _Worker, grace_s: float = 1.0, *, asked: bool = False) -> None:
    """Ask a worker to exit (unless ``asked`` already), then SIGKILL it if it has not within ``grace_s``;
    always reap it."""
    if asked or _ask_to_exit(w):
        w.proc.join(grace_s)
    if w.proc.is_alive():
        w.proc.kill()
        w.proc.join(5.0)
    try:
        w.conn.close()
    except OSError:
        pass


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    """Stop every worker (used by close(), the GC finaliser and atexit)."""
    if os.getpid() != owner_pid:  # a forked copy of the owner (e.g. a fork-based data loader) owns nothing
        return
    # ask every idle worker to exit first, so that they wind down together rather than one after another
    asked = {id(w) for w in workers if _ask_to_exit(w)}
    deadline = time.monotonic() + 0.5  # stateless workers: half a second to exit cleanly, then SIGKILL
    while workers:
        w = workers.pop()
        _stop_worker(w, grace_s=max(0.0, deadline - time.monotonic()), asked=id(w) in asked)


class VerifierPool:
    """Score ``(response, gold)`` pairs in worker processes with a hard per-item timeout.

    Args:
        num_workers: worker processes. ``0`` scores in the calling process with NO timeout (for
            tiny unit tests and trusted inputs only).
        timeout_s: hard limit per item, from the moment it is handed to a worker.
        score_fn: ``"package.module:function"`` or a module-level function ``(response, gold) -> float``.
        start_method: ``"spawn"`` (default) or ``"forkserver"``; ``"fork"`` is refused.
        startup_timeout_s: a worker that is not ready this long after it was started is an error.

    A score function may carry a ``warmup`` attribute (a no-argument callable); each worker calls it
    before it reports ready, so one-off import costs do not count against an item's timeout.

    ``score(items)`` returns the scores and the call's counters; ``stats`` holds the cumulative
    ones. Use as a context manager or call ``close()``; a forgotten pool is shut down when it is
    garbage collected or at interpreter exit.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, score_fn: ScoreFn = DEFAULT_SCORE_FN,
                 *, start_method: str = "spawn", startup_timeout_s: float = 120.0) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0 (0 = in-process, no timeout)")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds, e.g. 5.0")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method={start_method!r} is not allowed; use 'spawn' or 'forkserver' "
                             "('fork' can deadlock a child of a threaded process such as a Ray driver)")
        if not (callable(score_fn) or isinstance(score_fn, str)):
            raise ValueError(f"score_fn={score_fn!r} must be a 'module:function' string or a function")
        if isinstance(score_fn, str) and score_fn.count(":") != 1:
            resolve_score_fn(score_fn)  # raises the explanatory ValueError
        if callable(score_fn) and num_workers > 0:
            try:
                pickle.dumps(score_fn)
            except Exception as e:
                raise ValueError(f"score_fn={score_fn!r} cannot be sent to worker processes ({e}); "
                                 "pass a module-level function or a 'module:function' string") from e
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.score_fn = score_fn
        self.startup_timeout_s = float(startup_timeout_s)
        self.stats: dict[str, float] = {"timeouts": 0, "errors": 0, "scored": 0, "items": 0,
                                        "respawns": 0, "seconds": 0.0}
        self.last_errors: collections.deque[str] = collections.deque(maxlen=5)
        self._ctx = mp.get_context(start_method)
        self._lock = threading.Lock()
        self._closed = False
        self._fn: Callable[[str, str], float] | None = None
        # The finaliser holds the worker list, never ``self``, so the pool can be collected.
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, os.getpid())
        for _ in range(num_workers):
            self._workers.append(self._spawn())

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self.score_fn, os.getpid()),
                                 name="trace_rl-verifier", daemon=True)
        proc.start()
        child_conn.close()  # so the parent sees EOF when the child dies
        return _Worker(proc=proc, conn=parent_conn, started=time.monotonic())

    def _replace(self, w: _Worker) -> None:
        """SIGKILL ``w`` (busy or dead) and start a fresh worker in its slot."""
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5.0)
        try:
            w.conn.close()
        except OSError:
            pass
        self._workers[self._workers.index(w)] = self._spawn()
        self.stats["respawns"] += 1

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (empty for the in-process pool or once closed)."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Stop all workers and reap them; idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError("a VerifierPool owns local processes and cannot be pickled; "
                        "create it inside the process (or Ray actor) that scores")

    # ------------------------------------------------------------------ scoring
    def score(self, items: list[tuple[str, str]]) -> tuple[list[float], dict[str, float]]:
        """Score ``items`` = ``[(response, gold), ...]`` concurrently over the workers.

        Returns ``(scores, stats)`` with ``stats = {"timeouts", "errors", "scored", "items", "seconds"}``
        for this call: ``scored`` counts items the function answered, ``timeouts`` items killed after
        ``timeout_s``, ``errors`` items whose function raised (or whose worker died); the last two score 0.0.
        """
        if self._closed:
            raise RuntimeError("VerifierPool.score() called after close(); create a new pool")
        items = list(items)
        for i, it in enumerate(items):
            if not (isinstance(it, (tuple, list)) and len(it) == 2
                    and isinstance(it[0], str) and isinstance(it[1], str)):
                raise TypeError(f"items[{i}] must be a (response: str, gold: str) pair, got {it!r:.80}")
        with self._lock:
            t0 = time.monotonic()
            scores = [0.0] * len(items)
            counts = {"timeouts": 0, "errors": 0, "scored": 0}
            if self.num_workers == 0:
                self._score_in_process(items, scores, counts)
            else:
                self._score_in_workers(items, scores, counts)
            call = {**counts, "items": len(items), "seconds": time.monotonic() - t0}
            for k, v in call.items():
                self.stats[k] += v
            return scores, call

    def _record_error(self, counts: dict, message: str) -> None:
        counts["errors"] += 1
        self.last_errors.append(message)
        log.debug("verifier error: %s", message)

    def _score_in_process(self, items, scores, counts) -> None:
        if self._fn is None:
            self._fn = resolve_score_fn(self.score_fn)
        for i, (response, gold) in enumerate(items):
            try:
                s = float(self._fn(response, gold))
                if not math.isfinite(s):
                    raise ValueError(f"score function returned {s}")
                scores[i] = s
                counts["scored"] += 1
            except Exception as e:
                self._record_error(counts, f"{type(e).__name__}: {e}")

    def _score_in_workers(self, items, scores, counts) -> None:
        pending = collections.deque(range(len(items)))
        while True:
            now = time.monotonic()
            for w in self._workers:  # hand out work to idle, ready workers
                if pending and w.ready and w.job is None:
                    i = pending.popleft()
                    try:
                        w.conn.send((i, items[i][0], items[i][1]))
                    except (OSError, ValueError):  # died while idle: retry the item on a fresh worker
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w.job, w.deadline = i, now + self.timeout_s
            busy = [w for w in self._workers if w.job is not None]
            starting = [w for w in self._workers if not w.ready]
            if not pending and not busy:
                return
            deadlines = [w.deadline for w in busy] + [w.started + self.startup_timeout_s for w in starting]
            timeout = max(0.0, min(deadlines) - time.monotonic())
            for conn in wait([w.conn for w in busy + starting], timeout=timeout):
                w = next(w for w in self._workers if w.conn is conn)
                self._handle_message(w, items, scores, counts)
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.deadline:
                    counts["timeouts"] += 1
                    scores[w.job] = 0.0
                    self._replace(w)
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    self.close()
                    raise RuntimeError(f"a verifier worker did not start within {self.startup_timeout_s:.0f} s "
                                       f"(score_fn={self.score_fn!r}); raise startup_timeout_s or check the "
                                       "machine's load")

    def _handle_message(self, w: _Worker, items, scores, counts) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):  # the worker died (crash, os._exit, OOM kill)
            w.proc.join(1.0)  # reap it, so that its exit code is known
            if w.job is None and not w.ready:
                self.close()
                raise RuntimeError(f"a verifier worker died while starting (score_fn={self.score_fn!r}, "
                                   f"exit code {w.proc.exitcode})")
            if w.job is not None:
                scores[w.job] = 0.0
                self._record_error(counts, f"worker died (exit code {w.proc.exitcode}) on item {w.job}")
            self._replace(w)
            return
        kind = msg[0]
        if kind == "ready":
            w.ready = True
        elif kind == "fatal":
            self.close()
            raise RuntimeError(f"score_fn={self.score_fn!r} could not be loaded in a worker process:\n{msg[1]}")
        elif kind in ("ok", "error"):
            _, index, payload = msg
            if index != w.job:  # cannot happen with one pipe per worker; guard against silent mix-ups
                raise RuntimeError(f"verifier worker answered item {index} while scoring item {w.job}")
            if kind == "ok":
                scores[index] = payload
                counts["scored"] += 1
            else:
                scores[index] = 0.0
                self._record_error(counts, payload)
            w.job, w.deadline = None, math.inf
