from __future__ import annotations

import json
import math
import random

import pytest
import torch

from trace_rl.models.sft import (SFTExample, build_parser, collate, length_grouped_batches, lr_at, main,
                                 read_jsonl, response_token_loss_sum, sft, tokenize_rows)


def _chat(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def _rows(tok, n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        rows.append({"prompt": _chat(tok, f"What is {a} + {b}?"),
                     "response": f"{a} + {b} = {a + b}\nThe answer is \\boxed{{{a + b}}}"})
    return rows


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_loss_ignores_prompt_tokens_naive_reference(small_model_dir):
    """The batched, padded loss equals a per-sequence loop over response positions only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(small_model_dir)).eval()
    examples, skipped = tokenize_rows(_rows(tok, 5), tok, max_len=256)
    assert not skipped and len(examples) == 5
    # Different lengths, so padding is exercised.
    examples[1] = SFTExample(examples[1].prompt_ids + examples[1].prompt_ids, examples[1].response_ids)
    ids, att, labels = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        loss_sum, n_tok = response_token_loss_sum(model, ids, att, labels)

        ref, ref_n = 0.0, 0
        for e in examples:
            seq = torch.tensor([e.prompt_ids + e.response_ids])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), dim=-1)
            for t in range(len(e.prompt_ids), seq.shape[1]):  # response tokens (eos included) only
                ref -= float(logp[t - 1, seq[0, t]])
                ref_n += 1
    assert n_tok == ref_n == sum(len(e.response_ids) for e in examples)
    assert float(loss_sum) == pytest.approx(ref, rel=1e-4)

    # Changing prompt tokens' labels cannot matter: they are -100 in the labels.
    assert (labels[0, : len(examples[0].prompt_ids)] == -100).all()
    assert labels[0, len(examples[0]) - 1] == tok.eos_token_id


def test_tokenize_rows_formats_and_bad_rows(small_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    good = {"prompt": _chat(tok, "What is 1 + 2?"), "response": "\\boxed{3}"}
    msgs = {"messages": [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "\\boxed{3}"}]}
    bad = [
        [1, 2],                                            # not an object
        {"prompt": "x"},                                   # no response
        {"prompt": 3, "response": "y"},                    # non-string
        {"prompt": "x", "response": "   "},                # empty response
        {"messages": [{"role": "user", "content": "hi"}]},  # too few messages
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # last not assistant
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},            # no content
        {"prompt": "word " * 300, "response": "y"},         # prompt longer than max_len
    ]
    examples, skipped = tokenize_rows([good, msgs] + bad, tok, max_len=64)
    assert len(examples) == 2
    # The messages row renders to exactly the prompt/response row.
    assert examples[0] == examples[1]
    assert examples[0].response_ids[-1] == tok.eos_token_id
    assert examples[0].prompt_ids == tok(good["prompt"], add_special_tokens=False)["input_ids"]
    assert sum(skipped.values()) == len(bad)
    assert skipped["too_long"] == 1 and skipped["empty_response"] == 1 and skipped["not_an_object"] == 1
    # A long response is truncated to max_len (its eos is then lost).
    long = {"prompt": good["prompt"], "response": "1 " * 100}
    (ex,), _ = tokenize_rows([long], tok, max_len=40)
    assert len(ex) == 40 and ex.response_ids[-1] != tok.eos_token_id


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    p = _write_jsonl(tmp_path / "d.jsonl", [{"a": 1}], extra_lines=["{not json", "", "[1]"])
    rows, skipped = read_jsonl(p)
    assert rows == [{"a": 1}, [1]] and skipped["bad_json"] == 1


def test_lr_schedule_matches_reference():
    total, warmup, floor = 20, 4, 0.1
    for s in range(total):
        if s < warmup:
            ref = (s + 1) / warmup
        else:
            frac = (s - warmup) / (total - warmup - 1)
            ref = floor + (1 - floor) * (1 + math.cos(math.pi * frac)) / 2
        assert lr_at(s, total, warmup, floor) == pytest.approx(ref)
    assert lr_at(warmup, total, warmup, floor) == pytest.approx(1.0)
    assert lr_at(total - 1, total, warmup, floor) == pytest.approx(floor)


def test_length_grouped_batches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(103)]
    batches = length_grouped_batches(lengths, 8, random.Random(1), group_factor=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(103))                      # every row exactly once
    assert all(len(b) <= 8 for b in batches)
    # Within a batch lengths are close: the spread is far below that of random batches.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30
    assert batches == length_grouped_batches(lengths, 8, random.Random(1), group_factor=4)  # seeded


def test_sft_lowers_loss_and_saves(small_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    rows = _rows(tok)
    data = _write_jsonl(tmp_path / "train.jsonl", rows, extra_lines=["garbage", json.dumps({"prompt": "x"})])
    out = tmp_path / "out"
    res = sft(small_model_dir, data, out, steps=40, lr=1e-2, batch_size=16, seed=0, log_every=0, log=None)
    assert res["rows_used"] == len(rows) and res["rows_skipped"] == 2
    assert res["skip_reasons"] == {"bad_json": 1, "missing_prompt_or_response": 1}
    assert res["steps"] == 40 and len(res["losses"]) == 40
    assert res["final_loss"] < 0.5 * res["first_loss"]

    # The checkpoint loads and fits the data better than the base model.
    examples, _ = tokenize_rows(rows, tok, 256)
    ids, att, labels = collate(examples, tok.pad_token_id)

    def mean_loss(path):
        m = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        with torch.no_grad():
            s, n = response_token_loss_sum(m, ids, att, labels)
        return float(s) / n

    assert mean_loss(out) < 0.5 * mean_loss(small_model_dir)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tok.chat_template
    assert (out / "generation_config.json").exists()
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 40 and summary["args"]["lr"] == 1e-2


def test_sft_micro_batching_and_seed(small_model_dir, tmp_path):
    """Gradient accumulation gives the same losses (global token normalisation); same seed, same run."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    data = _write_jsonl(tmp_path / "train.jsonl", _rows(tok, 24))
    kw = dict(steps=4, lr=5e-3, batch_size=12, seed=3, log_every=0, log=None, save=False)
    a = sft(small_model_dir, data, tmp_path / "a", **kw)
    b = sft(small_model_dir, data, tmp_path / "b", micro_batch_size=5, **kw)
    c = sft(small_model_dir, data, tmp_path / "c", **kw)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    assert a["losses"] == c["losses"]
    d = sft(small_model_dir, data, tmp_path / "d", **{**kw, "seed": 4})
    assert d["losses"] != a["losses"]


def test_sft_errors(small_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sft(small_model_dir, tmp_path / "nope.jsonl", tmp_path / "o", steps=1, log=None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable rows"):
        sft(small_model_dir, empty, tmp_path / "o", steps=1, log=None)
    junk = _write_jsonl(tmp_path / "junk.jsonl", [{"text": "x"}], extra_lines=["{"])
    with pytest.raises(ValueError, match="no usable rows"):
        sft(small_model_dir, junk, tmp_path / "o", steps=1, log=None)
    with pytest.raises(ValueError, match="either steps or epochs"):
        sft(small_model_dir, junk, tmp_path / "o", steps=1, epochs=1, log=None)
    with pytest.raises(ValueError, match="lr="):
        sft(small_model_dir, junk, tmp_path / "o", lr=0, log=None)


def test_cli(small_model_dir, tmp_path, capsys):
    help_text = build_parser().format_help()
    for flag in ("--model", "--data", "--out", "--steps", "--epochs", "--lr", "--batch-size", "--micro-batch-size",
                 "--max-len", "--warmup-steps", "--min-lr-ratio", "--weight-decay", "--grad-clip", "--seed",
                 "--log-every", "--num-threads", "--device", "--dtype"):
        assert flag in help_text, flag
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_model_dir))
    data = _write_jsonl(tmp_path / "train.jsonl", _rows(tok, 10))
    res = main(["--model", str(small_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                "--epochs", "2", "--batch-size", "4", "--log-every", "1"])
    assert res["steps"] == 6  # ceil(2 * 10 / 4)
    printed = capsys.readouterr().out
    assert "step 6/6" in printed and '"rows_used": 10' in printed
    assert (tmp_path / "o" / "model.safetensors").exists()
