from __future__ import annotations

import pytest

from trace_rl.models.tokenizer import (CHAT_TEMPLATE, IM_END, IM_START, PAD_TOKEN, build_tokenizer,
                                       save_tokenizer)

TEXTS = [
    "What is 12 + 345 * 6?",
    "Step 1: 345 * 6 = 2070\nStep 2: 12 + 2070 = 2082\nSo the answer is \\boxed{2082}.",
    "  leading spaces,\ttabs\n\nand  double  spaces  ",
    "",
    "x",
]


def _expected_chatml(messages, add_generation_prompt):
    # Written out by hand, independently of the Jinja template.
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_special_tokens(small_tokenizer):
    tok = small_tokenizer
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == IM_END
    for t in (PAD_TOKEN, IM_START, IM_END):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(t)], t
    assert len({tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, IM_END)}) == 3
    # No BOS is prepended (as in Qwen).
    assert tok("7", add_special_tokens=True)["input_ids"] == tok("7", add_special_tokens=False)["input_ids"]


def test_round_trip_and_reload(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(small_tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(small_tokenizer)
    for text in TEXTS + ["héllo wörld 日本 🙂", f"{IM_START}user\nhi{IM_END}\n"]:
        ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == text
    assert loaded.eos_token == IM_END and loaded.pad_token == PAD_TOKEN


def test_digits_are_single_tokens(small_tokenizer):
    ids = small_tokenizer("1234567890", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10


def test_chat_template_matches_chatml(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(small_tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.chat_template == CHAT_TEMPLATE
    convs = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
         {"role": "assistant", "content": "\\boxed{2}"}],
    ]
    for msgs in convs:
        for gen in (False, True):
            expected = _expected_chatml(msgs, gen)
            for tok in (small_tokenizer, loaded):
                assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == expected
    # The special tokens of the rendered template are single tokens, not byte pieces.
    rendered = loaded.apply_chat_template(convs[0], tokenize=False, add_generation_prompt=True)
    ids = loaded(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(loaded.convert_tokens_to_ids(IM_START)) == 2
    assert ids.count(loaded.convert_tokens_to_ids(IM_END)) == 1


@pytest.mark.parametrize("text", TEXTS[:3] + [_expected_chatml([{"role": "user", "content": "7 * 8 = ?"}], True)])
def test_offsets_reconstruct_text(small_tokenizer, text):
    enc = small_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    # Contiguous, non-overlapping, covering the whole text...
    pos = 0
    for s, e in offsets:
        assert s == pos and e > s
        pos = e
    assert pos == len(text)
    assert "".join(text[s:e] for s, e in offsets) == text
    # ...and each token's own text is exactly its character span (ASCII text).
    for tid, (s, e) in zip(enc["input_ids"], offsets):
        assert small_tokenizer.decode([tid]) == text[s:e]


def test_deterministic(tmp_path, corpus):
    a = build_tokenizer(corpus, vocab_size=300)
    b = build_tokenizer(corpus, vocab_size=300)
    save_tokenizer(a, tmp_path / "a")
    save_tokenizer(b, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # Merges were actually learned (not just the byte alphabet).
    assert len(a) == 300


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_tokenizer([], vocab_size=300)
    with pytest.raises(TypeError, match="corpus item 1"):
        build_tokenizer(["ok", 3], vocab_size=300)  # type: ignore[list-item]


def test_load_pretrained_tokenizer_equals_auto_tokenizer(small_tokenizer, tmp_path):
    """The direct PreTrainedTokenizerFast load (start-up speed) builds what AutoTokenizer builds; a
    checkpoint that names another class, or asks for remote code, goes through AutoTokenizer."""
    import json

    from transformers import AutoTokenizer

    from trace_rl.models.tokenizer import load_pretrained_tokenizer

    save_tokenizer(small_tokenizer, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    fast, auto = load_pretrained_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(fast) is type(auto)
    assert (fast.pad_token_id, fast.eos_token_id, fast.padding_side, len(fast)) == \
        (auto.pad_token_id, auto.eos_token_id, auto.padding_side, len(auto))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]}]
    assert fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for text in TEXTS:
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
        assert fast.decode(ids + [fast.eos_token_id], skip_special_tokens=True) == \
            auto.decode(ids + [auto.eos_token_id], skip_special_tokens=True)
    # any other class name, or remote code: the AutoTokenizer path (a spy that calls through records it)
    calls = []
    real = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *a, **kw):
        calls.append(kw)
        return real(cls, *a, **kw)

    import transformers

    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy))
        load_pretrained_tokenizer(str(tmp_path))
        assert calls == []  # PreTrainedTokenizerFast: loaded directly
        conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**conf, "tokenizer_class": "Qwen2Tokenizer"}))
        other = load_pretrained_tokenizer(str(tmp_path))
        assert len(calls) == 1 and other(TEXTS[1], add_special_tokens=False)["input_ids"] == \
            auto(TEXTS[1], add_special_tokens=False)["input_ids"]
    finally:
        monkeypatch.undo()
