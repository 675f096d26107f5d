"""trace_rl/prepare.py (kept with the model tests: it is the tiny model's build command)."""
from __future__ import annotations

import pytest
import torch

from trace_rl import prepare


def _model_and_tok(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def test_greedy_generation_matches_naive_argmax_loop(small_model_dir):
    model, tok = _model_and_tok(small_model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 3 + 4?", "Ana has 12 pens. She buys 7 more. How many pens does Ana have?")]
    out = prepare.generate_responses(model, tok, prompts, temperature=0.0, max_new_tokens=6)
    assert len(out) == 2
    for prompt, res in zip(prompts, out):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        gen = []
        with torch.no_grad():
            for _ in range(6):  # naive greedy decoding, one unpadded sequence, no KV cache
                nxt = int(model(input_ids=torch.tensor([ids + gen])).logits[0, -1].argmax())
                gen.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert res["num_tokens"] == len(gen)
        assert res["truncated"] == (tok.eos_token_id not in gen)
        assert res["text"] == tok.decode(gen, skip_special_tokens=True)
    assert tok.padding_side == "left"  # restored


def test_sampling_is_seeded(small_model_dir):
    model, tok = _model_and_tok(small_model_dir)
    prompts = ["<|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n"] * 4
    a = prepare.generate_responses(model, tok, prompts, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=5)
    b = prepare.generate_responses(model, tok, prompts, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=5)
    assert a == b
    assert len({r["text"] for r in a}) > 1  # a random model samples different texts


def test_evaluate_schema(small_model_dir):
    res = prepare.evaluate(small_model_dir, n_problems=3, settings=(("greedy", 0.0, 1.0),))
    for split in ("test", "ood"):
        r = res[split]["greedy"]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["truncated"] <= 1.0
        assert 1 <= r["mean_tokens"] <= prepare.MAX_NEW_TOKENS[split]
    # A random model never produces a boxed answer, and runs to the token limit.
    assert res["test"]["greedy"]["accuracy"] == 0.0
    assert res["seconds"] > 0


def test_main_quiet(monkeypatch, small_model_dir, capsys):
    import trace_rl.models.cache as cache

    calls = []

    def fake_path(stage="sft", *, force=False, log=None, recipe=None):
        calls.append((stage, force))
        return small_model_dir

    monkeypatch.setattr(cache, "tiny_model_path", fake_path)
    monkeypatch.setattr(prepare, "EVAL_SETTINGS", (("greedy", 0.0, 1.0),))
    assert prepare.main(["--quiet", "--force", "--eval-problems", "2"]) == 0
    out = capsys.readouterr().out
    assert f"tiny model (sft): {small_model_dir}" in out and "greedy" in out and "ood" in out
    assert calls == [("base", True), ("sft", True)]
    with pytest.raises(SystemExit):
        prepare.main(["--eval-problems", "0"])
    help_text = prepare.build_parser().format_help()
    for flag in ("--force", "--quiet", "--no-eval", "--eval-problems"):
        assert flag in help_text
