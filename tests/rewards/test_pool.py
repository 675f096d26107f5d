"""Tests of trace_rl/rewards/pool.py: the killable verifier pool."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trace_rl.rewards.pool import VerifierPool

from .score_helpers import controlled_score, pid_score

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie counts as gone: it runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids, timeout=10.0) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def math_pool():
    with VerifierPool(num_workers=2, timeout_s=2.0) as pool:
        yield pool


GOOD = [("so \\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{ 42 }", "42"), ("\\boxed{41}", "42"),
        ("no box", "1"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{7}", "7")]
GOOD_SCORES = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_scores_match_in_process(math_pool):
    scores, stats = math_pool.score(GOOD)
    assert scores == GOOD_SCORES
    assert stats["scored"] == len(GOOD) and stats["timeouts"] == 0 and stats["errors"] == 0
    assert stats["items"] == len(GOOD) and stats["seconds"] > 0
    with VerifierPool(num_workers=0) as local:  # the in-process path agrees
        assert local.score(GOOD)[0] == GOOD_SCORES
        assert local.pids == []
    assert math_pool.score([]) == ([], {"timeouts": 0, "errors": 0, "scored": 0, "items": 0,
                                        "seconds": pytest.approx(0, abs=0.5)})


def test_pathological_answers_do_not_hang(math_pool):
    tower = ("\\boxed{10^{10^{10^{10}}}}", "5")
    huge_boxed = ("\\boxed{" + "1+" * 50_000 + "1}", "3")  # 100 kB inside a box
    huge_plain = ("x" * 100_000, "3")                       # 100 kB, no box
    before = list(math_pool.pids)
    t0 = time.monotonic()
    scores, stats = math_pool.score([tower, huge_boxed, huge_plain] + GOOD)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0 + 6.0, elapsed  # one 2 s timeout, plus scoring and slack for a busy machine
    assert scores == [0.0, 0.0, 0.0] + GOOD_SCORES
    # the power tower hangs sympy: killed and counted; the 100 kB answers are refused at once (scored 0)
    assert stats["timeouts"] == 1 and stats["errors"] == 0
    assert stats["scored"] == 2 + len(GOOD)
    after = math_pool.pids
    killed = set(before) - set(after)
    assert len(killed) == 1 and not wait_gone(killed, timeout=0.5)  # SIGKILLed and reaped, not left running
    # the pool keeps working, with the respawned worker
    scores, stats = math_pool.score(GOOD * 2)
    assert scores == GOOD_SCORES * 2 and stats["timeouts"] == 0
    assert math_pool.stats["timeouts"] >= 1 and math_pool.stats["respawns"] >= 1


def test_timeout_is_hard_and_others_proceed():
    with VerifierPool(num_workers=2, timeout_s=1.0, score_fn=controlled_score) as pool:
        items = [("sleep", "x")] + [("a", "a"), ("a", "b")] * 5
        first = list(pool.pids)
        t0 = time.monotonic()
        scores, stats = pool.score(items)
        elapsed = time.monotonic() - t0
        assert scores == [0.0] + [1.0, 0.0] * 5
        assert (stats["timeouts"], stats["errors"], stats["scored"]) == (1, 0, 10)
        assert elapsed < 1.0 + 5.0, elapsed  # startup of two workers + the 1 s limit, never the 600 s sleep
        killed = set(first) - set(pool.pids)
        assert len(killed) == 1 and not wait_gone(killed, timeout=0.5)  # the sleeper is dead, not detached
        # two sleepers at once: both killed, in parallel
        t0 = time.monotonic()
        scores, stats = pool.score([("sleep", "x"), ("sleep", "x"), ("a", "a")])
        assert scores == [0.0, 0.0, 1.0] and stats["timeouts"] == 2
        assert time.monotonic() - t0 < 2 * 1.0 + 5.0
        assert pool.stats["timeouts"] == 3 and pool.stats["respawns"] == 3


def test_errors_are_counted_and_never_kill_the_pool():
    with VerifierPool(num_workers=2, timeout_s=5.0, score_fn=controlled_score) as pool:
        scores, stats = pool.score([("raise", "x"), ("a", "a"), ("nan", "x"), ("die", "x"), ("b", "b")])
        assert scores == [0.0, 1.0, 0.0, 0.0, 1.0]
        assert (stats["errors"], stats["timeouts"], stats["scored"]) == (3, 0, 2)
        assert any("boom" in e for e in pool.last_errors)
        assert any("exit code 3" in e for e in pool.last_errors)
        assert pool.score([("c", "c")] * 4)[0] == [1.0] * 4
    with VerifierPool(num_workers=0, score_fn=controlled_score) as local:
        scores, stats = local.score([("raise", "x"), ("a", "a")])
        assert scores == [0.0, 1.0] and stats["errors"] == 1


def test_items_are_spread_over_workers():
    with VerifierPool(num_workers=2, timeout_s=5.0, score_fn=pid_score) as pool:
        pool.score([("w", "w")] * 2)  # both workers ready
        t0 = time.monotonic()
        scores, _ = pool.score([("a", "a")] * 6)
        elapsed = time.monotonic() - t0
        assert {int(s) for s in scores} == set(pool.pids)
        assert elapsed < 6 * 0.2  # sequential would take 1.2 s


def test_close_gc_and_no_orphans():
    pool = VerifierPool(num_workers=2, timeout_s=5.0, score_fn="operator:eq")
    assert pool.score([("a", "a"), ("a", "b")])[0] == [1.0, 0.0]
    pids = pool.pids
    assert len(pids) == 2 and all(alive(p) for p in pids)
    pool.close()
    pool.close()  # idempotent
    assert not wait_gone(pids, timeout=5) and pool.pids == []
    with pytest.raises(RuntimeError, match="after close"):
        pool.score([("a", "a")])
    # a pool that is dropped without close() is shut down by the garbage collector
    pool = VerifierPool(num_workers=2, timeout_s=5.0, score_fn="operator:eq")
    pool.score([("a", "a")])
    pids = pool.pids
    del pool
    gc.collect()
    assert not wait_gone(pids, timeout=5)


def _child_script(action: str) -> str:
    return textwrap.dedent(f"""
        import sys, time
        from trace_rl.rewards.pool import VerifierPool
        if __name__ == "__main__":
            pool = VerifierPool(num_workers=2, timeout_s=5.0, score_fn="operator:eq")
            pool.score([("a", "a"), ("b", "b")])
            print(*pool.pids, flush=True)
            if {action!r} == "hang":
                time.sleep(600)
            # "exit": leave without close(); atexit must reap the workers
    """)


@pytest.mark.parametrize("action", ["exit", "hang"])
def test_no_orphans_when_the_parent_exits_or_is_killed(action, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_child_script(action))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2, line
        if action == "hang":
            proc.send_signal(signal.SIGKILL)  # no atexit, no finaliser: workers must notice by themselves
        assert proc.wait(timeout=30) in (0, -signal.SIGKILL)
        assert not wait_gone(pids, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(num_workers=1, timeout_s=0)
    with pytest.raises(ValueError, match="fork"):
        VerifierPool(num_workers=1, start_method="fork")
    with pytest.raises(ValueError, match="module:function|module.function"):
        VerifierPool(num_workers=1, score_fn="not_a_spec")
    with pytest.raises(ValueError, match="module-level"):
        VerifierPool(num_workers=1, score_fn=lambda r, g: 1.0)
    with VerifierPool(num_workers=0) as local:
        with pytest.raises(TypeError, match=r"items\[1\]"):
            local.score([("a", "b"), ("a", 3)])
    pool = VerifierPool(num_workers=1, score_fn="no_such_module_xyz:f")
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
        pool.score([("a", "a")])
    assert pool.pids == []  # the failed pool shut itself down
