"""The engines' and ranks' colocation hooks on CPU: no-ops that still run and record themselves, in order.

The objects are made without their (expensive) constructors: on CPU the hooks touch no model.
"""
from __future__ import annotations

import pytest
import torch

from trace_rl.learner.worker import LearnerWorker
from trace_rl.rollout.hf_engine import HFEngine


def _engines():
    engines = [HFEngine.__new__(HFEngine)]
    engines[0].device = torch.device("cpu")
    try:
        from trace_rl.rollout.vllm_engine import VLLMEngine
    except ImportError:  # vLLM not installed: the HF engine alone
        return engines
    return engines + [VLLMEngine.__new__(VLLMEngine)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU no-op path")
@pytest.mark.parametrize("engine", _engines(), ids=lambda e: type(e).__name__)
def test_engine_sleep_wake_are_counted_noops_on_cpu(engine):
    assert engine.colocation_log() == []
    assert engine.wake_up() == {"event": "wake", "acted": False, "count": 1}
    assert engine.sleep(1) == {"event": "sleep", "acted": False, "count": 1}
    assert engine.wake_up()["count"] == 2
    log = engine.colocation_log()
    assert [e for e, _ in log] == ["wake", "sleep", "wake"]
    assert all(a[1] <= b[1] for a, b in zip(log, log[1:]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU no-op path")
def test_learner_offload_reload_are_counted_noops_on_cpu():
    worker = LearnerWorker.__new__(LearnerWorker)
    worker._ready, worker.device = False, torch.device("cpu")
    with pytest.raises(RuntimeError, match="setup"):
        worker.offload_states()  # like every collective call, only after setup
    worker._ready = True
    assert worker.offload_states() == {"event": "offload", "acted": False, "count": 1}
    assert worker.reload_states() == {"event": "reload", "acted": False, "count": 1}
    assert [e for e, _ in worker.colocation_log()] == ["offload", "reload"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU no-op path")
@pytest.mark.parametrize("engine", _engines(), ids=lambda e: type(e).__name__)
def test_engine_wakes_its_weights_and_kv_cache_apart(engine):
    """Colocated sync order: the weights wake before the sync, the KV cache after it (vLLM's tags)."""
    assert engine.wake_up(["weights"])["event"] == "wake_weights"
    assert engine.wake_up(["kv_cache"])["event"] == "wake_kv_cache"
    with pytest.raises(ValueError, match="'kv'"):
        engine.wake_up(["kv"])
    assert [e for e, _ in engine.colocation_log()] == ["wake_weights", "wake_kv_cache"]
