"""The weight-sync interface's cheap contracts: unknown kinds, backend resolution, the CPU refusal of CUDA IPC."""
from __future__ import annotations

import pytest
import torch

from trace_rl.sync import KINDS, make_weight_sync
from trace_rl.sync.collective import resolve_backend


def test_unknown_kind_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"rollout.weight_sync='nccl' is unknown; use one of object_store"):
        make_weight_sync("nccl", learners=None, pool=None)
    assert KINDS == ("object_store", "collective", "cuda_ipc")


@pytest.mark.parametrize("backend, learner_gpu, engine_gpu, expected", [
    ("auto", False, False, "gloo"),
    ("auto", True, False, "gloo"),
    ("auto", True, True, "nccl"),
    ("gloo", True, True, "gloo"),
    ("nccl", True, True, "nccl"),
])
def test_backend_resolution(backend, learner_gpu, engine_gpu, expected):
    assert resolve_backend(backend, learner_on_gpu=learner_gpu, engines_on_gpu=engine_gpu) == expected


def test_nccl_without_gpus_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="use gloo or auto"):
        resolve_backend("nccl", learner_on_gpu=False, engines_on_gpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_ipc_refuses_on_cpu():
    from trace_rl.sync.ipc import export_tensor, require_cuda

    with pytest.raises(RuntimeError, match="weight_sync=collective"):
        require_cuda()
    with pytest.raises(ValueError, match="CUDA tensors"):
        export_tensor(torch.zeros(2))


def test_cuda_ipc_sync_refuses_cpu_learners_before_touching_them():
    from types import SimpleNamespace

    learners = SimpleNamespace(lc=SimpleNamespace(gpus_per_rank=0.0))
    with pytest.raises(RuntimeError, match=r"learner.gpus_per_rank > 0"):
        make_weight_sync("cuda_ipc", learners, pool=[])
