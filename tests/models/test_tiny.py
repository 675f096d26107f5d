from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from trace_rl.models.tiny import TinyModelSpec, build_tiny_model, count_parameters
from trace_rl.models.tokenizer import IM_END, PAD_TOKEN


def _naive_param_count(spec: TinyModelSpec, vocab: int) -> int:
    """Qwen3 decoder parameters counted by hand (tied embeddings counted once)."""
    H, I, hd = spec.hidden_size, spec.intermediate_size, spec.hidden_size // spec.num_heads
    per_layer = (
        H * spec.num_heads * hd            # q_proj
        + 2 * H * spec.num_kv_heads * hd   # k_proj, v_proj
        + spec.num_heads * hd * H          # o_proj
        + 2 * hd                           # q_norm, k_norm (Qwen3's per-head RMSNorm)
        + 3 * H * I                        # gate, up, down
        + 2 * H                            # input / post-attention RMSNorm
    )
    return vocab * H + spec.num_layers * per_layer + H  # + final norm


def test_builds_with_spec_param_count(small_model_dir, small_tokenizer, test_spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(small_model_dir))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.float32
    assert count_parameters(model) == _naive_param_count(test_spec, len(small_tokenizer))
    # Tied embeddings: one tensor, and the safetensors file stores it once.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(small_model_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())

    cfg = json.loads((small_model_dir / "config.json").read_text())
    assert cfg["hidden_size"] == test_spec.hidden_size and cfg["num_hidden_layers"] == test_spec.num_layers
    assert cfg["head_dim"] == test_spec.hidden_size // test_spec.num_heads
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == len(small_tokenizer)
    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    gen = json.loads((small_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(IM_END) == cfg["eos_token_id"]
    assert gen["pad_token_id"] == tok.convert_tokens_to_ids(PAD_TOKEN) == cfg["pad_token_id"]


def test_forward_and_generate(small_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(small_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "1 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert out.shape == (1, enc["input_ids"].shape[1] + 5)


def test_deterministic_and_seeded(tmp_path, small_tokenizer, test_spec):
    a = build_tiny_model(test_spec, small_tokenizer, tmp_path / "a")
    torch.manual_seed(1234)  # the global RNG state must not matter
    torch.rand(7)
    b = build_tiny_model(test_spec, small_tokenizer, tmp_path / "b")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_model(dataclasses.replace(test_spec, seed=1), small_tokenizer, tmp_path / "c")
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("change,field", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_heads": 3}, "num_heads"),          # 64 not divisible by 3
    ({"num_kv_heads": 3, "num_heads": 4, "hidden_size": 128}, "num_kv_heads"),
    ({"num_heads": 8}, "head_dim"),           # head_dim 8: unsupported by vLLM's CPU attention
])
def test_spec_validation(change, field, test_spec):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(test_spec, **change).validate()
