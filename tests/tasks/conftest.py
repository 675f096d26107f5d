"""A tiny chat tokenizer built here (the project's own lives in trace_rl/models/, built by its owner)."""
from __future__ import annotations

import pytest

# ChatML, as used by Qwen: one block per message, then the assistant header.
CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE (about 300 tokens) trained on a few strings, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Ana has 7 pens. She buys 5 more. How many pens does Ana have?",
              "Step 1: 7 + 5 = 12.", "The answer is \\boxed{12}.", "What is $2 + 3$?"] * 20
    tok.train_from_iterator(corpus, trainer)
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", **kwargs)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The tiny ChatML tokenizer."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def make_chat_tokenizer():
    """The factory itself, for tests that need a variant (e.g. no chat template)."""
    return make_tokenizer
