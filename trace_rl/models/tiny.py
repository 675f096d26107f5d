"""The project's tiny Qwen3-architecture causal LM, built locally from a seed.

``build_tiny_model(spec, tokenizer, out_dir)`` writes a normal Hugging Face checkpoint
(``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files), so
transformers, vLLM and DeepSpeed load it exactly like a real Qwen3 checkpoint. Like Qwen3-0.6B /
1.7B it ties the input embedding and the LM head; the rollout engine must handle the tie
(STACK_NOTES.md, "vLLM": the CPU backend's packed lm_head copy).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny Qwen3 model. Defaults were chosen by measurement (see prepare.py).

    The default is 1.04 M parameters (vocab 442): one SFT step on 8 arith rows (~100 tokens each)
    takes ~0.12 s on 2 CPU cores. Wider (192) or deeper (6 layers) models learned no faster per
    second of CPU time, and hidden 256 costs ~3x per step.
    """

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention (query) heads; head_dim = hidden_size / num_heads (vLLM's CPU backend needs 32, 64, ...)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen3); must divide num_heads."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 1024
    """Longest sequence the model is configured for (prompt + response)."""
    vocab_size: int | None = None
    """Vocabulary size; None = exactly ``len(tokenizer)``."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head (as Qwen3-0.6B/1.7B do)."""
    rope_theta: float = 10000.0
    """RoPE base; short contexts need no more."""
    initializer_range: float = 0.06
    """Std of the normal initialisation of linear and embedding weights. Larger than HF's 0.02 on
    purpose: at width 128 it makes the copy-from-the-question behaviour appear about twice as early
    in SFT (measured: ~400 vs ~800 steps), which the few-minute budget needs."""
    seed: int = 0
    """Seed of the random initialisation (same seed -> identical weights)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the field that makes the spec unbuildable."""
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TinyModelSpec.{name}={v!r} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TinyModelSpec.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; pick heads so that head_dim is an integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyModelSpec.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads} (grouped-query attention)")
        if self.head_dim % 16:
            raise ValueError(f"TinyModelSpec head_dim={self.head_dim} (hidden_size/num_heads) must be a "
                             "multiple of 16; vLLM's CPU attention supports 32, 64, 80, 96, 128, ...")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def qwen3_config(spec: TinyModelSpec, tokenizer):
    """The ``Qwen3Config`` for ``spec`` with the tokenizer's special-token ids filled in."""
    from transformers import Qwen3Config

    from trace_rl.models.tokenizer import IM_END, PAD_TOKEN

    spec.validate()
    vocab = spec.vocab_size if spec.vocab_size is not None else len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"TinyModelSpec.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)})")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
        max_window_layers=spec.num_layers,
        bos_token_id=pad_id,  # Qwen3 sets bos to <|endoftext|> but never prepends it
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["Qwen3ForCausalLM"],
        dtype="float32",
    )


def build_tiny_model(spec: TinyModelSpec, tokenizer, out_dir: str | Path) -> Path:
    """Save a randomly initialised fp32 ``Qwen3ForCausalLM`` (+ tokenizer, generation config) to ``out_dir``.

    The weights depend only on ``spec`` (its seed included) and the vocabulary size: two builds
    give identical files. Returns ``out_dir``.
    """
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from trace_rl.models.tokenizer import save_tokenizer

    config = qwen3_config(spec, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Seed a private generator state: the init must not depend on what ran before in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    (out / "tiny_spec.json").write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    return out


def count_parameters(model) -> int:
    """Number of distinct parameters (a tied embedding counts once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return int(sum(seen.values()))
