"""Shared fixtures: a real local Ray cluster on 127.0.0.1 (session-scoped, started once)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster bound to 127.0.0.1 with 8 logical CPUs, shared by the whole session."""
    import ray

    from trace_rl.cluster import init_ray

    info = init_ray(num_cpus=8, include_dashboard=False)
    yield info
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_random_model(tmp_path_factory) -> str:
    """A small randomly initialised Qwen3 checkpoint (tied embeddings) with the project's tokenizer
    code: the mechanics tests need real HF files, not a trained model."""
    return build_random_model(tmp_path_factory.mktemp("tiny_random"), max_position_embeddings=512)


def build_random_model(out_dir, max_position_embeddings: int) -> str:
    """The ``tiny_random_model`` checkpoint with ``max_position_embeddings`` positions, written to ``out_dir``."""
    from trace_rl.models.tiny import TinyModelSpec, build_tiny_model
    from trace_rl.models.tokenizer import build_tokenizer, chat_template_samples

    corpus = [f"Tom has {i} apples and buys {i % 7} more: {i} + {i % 7} = {i + i % 7}. \\boxed{{{i + i % 7}}}"
              for i in range(80)] + chat_template_samples() * 5
    tok = build_tokenizer(corpus, vocab_size=320)
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                         max_position_embeddings=max_position_embeddings, seed=0)
    return str(build_tiny_model(spec, tok, out_dir))
