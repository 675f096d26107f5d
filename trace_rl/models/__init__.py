"""The project's tiny model: tokenizer, Qwen3 builder, SFT trainer and the on-disk cache.

``tiny_model_path("sft")`` is what the rest of the system needs: a local HF checkpoint directory of
the tiny Qwen3 warm-started on the arith task, built on first use (``python -m trace_rl.prepare``).
Names are imported lazily, so ``python -m trace_rl.models.sft`` runs without a double import. The
SFT trainer is ``trace_rl.models.sft.sft`` (not re-exported: the name would clash with the module).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TinyModelSpec": "trace_rl.models.tiny",
    "build_tiny_model": "trace_rl.models.tiny",
    "build_tokenizer": "trace_rl.models.tokenizer",
    "TinyRecipe": "trace_rl.models.build",
    "cache_root": "trace_rl.models.cache",
    "tiny_model_path": "trace_rl.models.cache",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trace_rl.models' has no attribute {name!r}")
