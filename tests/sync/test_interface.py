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


def test_object_store_sync_is_refused_for_a_large_model_on_gpus(tmp_path):
    """The 8B shape (Qwen3-8B's config) in bfloat16 is ~15 GiB per sync: the object-store path is refused on a
    GPU run, naming the alternative; a small model, or a CPU run, keeps it."""
    import json

    from trace_rl.config import to_config
    from trace_rl.sync import check_config, estimated_weight_gib

    big = tmp_path / "qwen3-8b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 36, "vocab_size": 151936, "intermediate_size": 12288,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}))
    # 8.19e9 parameters (Qwen3-8B's card: 8.2B) x 2 bytes
    assert estimated_weight_gib(str(big), "bfloat16") == pytest.approx(8.19e9 * 2 / 2**30, rel=0.01)

    def problems(**over):
        found = []
        cfg = to_config({"model": {"path": str(big), "dtype": "bfloat16"},
                         "rollout": {"weight_sync": "object_store", "gpus_per_engine": 1},
                         "learner": {"gpus_per_rank": 1}, **over})
        check_config(cfg, lambda field, problem, fix: found.append((field, problem, fix)))
        return found

    (found,) = problems()
    assert found[0] == "rollout.weight_sync" and "GiB" in found[1] and "rollout.weight_sync=collective" in found[2]
    (found,) = problems(cluster={"placement": "colocated"})
    assert "cuda_ipc" in found[2]
    assert problems(rollout={"weight_sync": "collective", "gpus_per_engine": 1, "sync_backend": "nccl"}) == []
    assert problems(rollout={"weight_sync": "object_store"}, learner={"gpus_per_rank": 0}) == []  # CPU run
    assert estimated_weight_gib(str(tmp_path / "nowhere"), "float32") is None
