"""A small byte-level BPE tokenizer with a Qwen-style ChatML chat template, trained locally.

Nothing can be downloaded, so the tiny model needs its own tokenizer. It follows the shape of
Qwen's tokenizer closely enough that code written for a real Qwen3 checkpoint works unchanged:

* byte-level BPE (every string is encodable, no unknown token), trained with ``tokenizers``;
* a GPT-4/Qwen-style pre-tokenisation regex that splits digits one by one, which also makes
  arithmetic much easier for a tiny model (each digit is its own token);
* special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (end of a chat turn,
  the eos for chat generation);
* a ChatML Jinja template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and
  ``<|im_start|>assistant\\n`` appended when ``add_generation_prompt=True``.

Offsets are exact (no whitespace trimming), so ``text[s:e]`` over every token's
``offset_mapping`` concatenates back to the text for ASCII input, which is what span
annotation relies on (character span of a response -> token positions).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# ChatML, as used by Qwen: one block per message, optional generation prompt at the end.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Pre-tokenisation split in the style of GPT-4 / Qwen2: contractions, letter runs (with one
# leading non-letter), SINGLE digits, punctuation runs, newlines, whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chat_template_samples() -> list[str]:
    """Strings produced by the chat template, so the BPE learns the ChatML scaffolding."""
    roles = ("system", "user", "assistant")
    return [f"{IM_START}{r}\n" for r in roles] + [f"{IM_END}\n"]


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    Deterministic: the same corpus (in the same order) and settings give byte-identical files.
    ``vocab_size`` counts the 256 byte tokens and the 3 special tokens, so it must be at least 259.
    The result has ``pad_token=<|endoftext|>``, ``eos_token=<|im_end|>`` and the ChatML
    ``chat_template``; save it with ``save_pretrained(dir)`` and load with ``AutoTokenizer``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: byte-level BPE needs at least "
                         f"{min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    texts = [t for t in corpus]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"corpus item {bad[0]} is a {type(texts[bad[0]]).__name__}, expected str")
    if not texts:
        raise ValueError("corpus is empty: give the texts the tokenizer should learn merges from")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        # use_regex=False: the split above already did the word splitting.
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # No post-processor: no BOS is added (Qwen adds none), and offsets stay untrimmed.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads prompts on the left
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` into ``out_dir`` (created if needed); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    # transformers 5 writes its internal class name ("TokenizersBackend"); the public alias
    # "PreTrainedTokenizerFast" loads with transformers 4.x and 5.x alike (and in vLLM).
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return out


def load_pretrained_tokenizer(path: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path)``, minus ~6 CPU-seconds of imports where it can be.

    When the checkpoint's ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (this project's
    tokenizer, and any plain ``tokenizers``-backed one) and asks for no remote code, that class is what
    ``AutoTokenizer`` would build; importing it directly skips the auto-class machinery, which imports
    the configuration of every model family (measured here: 1.9 s vs 7.9 s wall, in each process that
    loads a tokenizer: the driver and the reward / annotate stages). Anything else goes through
    ``AutoTokenizer`` unchanged."""
    cls_name = None
    try:
        with open(Path(path) / "tokenizer_config.json") as f:
            conf = json.load(f)
        if not conf.get("auto_map"):
            cls_name = conf.get("tokenizer_class")
    except (OSError, ValueError):
        pass
    if cls_name == "PreTrainedTokenizerFast" and not trust_remote_code:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
