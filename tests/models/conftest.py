"""Fixtures of tests/models: a small tokenizer and a very small Qwen3 checkpoint, built once per session."""
from __future__ import annotations

import pytest

from trace_rl.models.tiny import TinyModelSpec

# Much smaller than the default spec: the tests check behaviour, not quality.
TEST_SPEC = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                          max_position_embeddings=256, seed=0)


def sample_corpus() -> list[str]:
    """Arithmetic-looking text plus the ChatML scaffolding (no dependency on the task package)."""
    from trace_rl.models.tokenizer import chat_template_samples

    texts = []
    for i in range(60):
        a, b = 17 * i % 97, 31 * i % 89
        texts.append(f"What is {a} + {b}? Let's add the numbers.\n{a} + {b} = {a + b}\nThe answer is \\boxed{{{a + b}}}")
    return texts + chat_template_samples() * 5


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return sample_corpus()


@pytest.fixture(scope="session")
def small_tokenizer():
    from trace_rl.models.tokenizer import build_tokenizer

    return build_tokenizer(sample_corpus(), vocab_size=320)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, small_tokenizer):
    from trace_rl.models.tiny import build_tiny_model

    return build_tiny_model(TEST_SPEC, small_tokenizer, tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def test_spec() -> TinyModelSpec:
    return TEST_SPEC
