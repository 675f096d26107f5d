"""Test-only score functions for the verifier pool (module-level, so spawned workers can import them)."""
from __future__ import annotations

import os
import time


def controlled_score(response: str, gold: str) -> float:
    """1.0 if response == gold; 'sleep' hangs, 'raise' raises, 'die' kills the worker process."""
    if response == "sleep":
        time.sleep(600)
    if response == "raise":
        raise RuntimeError("boom")
    if response == "die":
        os._exit(3)
    if response == "nan":
        return float("nan")
    return float(response == gold)


def pid_score(response: str, gold: str) -> float:
    """The worker's process id, after a short pause (to see that items are spread over the workers)."""
    time.sleep(0.2)
    return float(os.getpid())
