"""Annotator interface, the programmatic oracle, the random-span ablation, and token offsets.

An annotator maps ``(problem, response text, correct)`` to an :class:`Annotation`: character spans
of key steps (correct responses) or of the error (incorrect ones) and a coarse type label. It never
raises on a response it cannot handle: it returns an empty annotation with a reason, counted by
the driver (``annotate/<reason>``), and the response's tokens stay on the GRPO channel.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from trace_rl.algo.registry import decorator_into, lookup
from trace_rl.tasks.base import Problem

Span = tuple[int, int]


@dataclass
class Annotation:
    key_spans: list[Span] = field(default_factory=list)
    """Character spans of key steps (only for correct responses)."""
    error_spans: list[Span] = field(default_factory=list)
    """Character spans of the (first) error (only for incorrect responses)."""
    label: str | None = None
    """Coarse type label (e.g. "arithmetic", "carry"); the only annotator output a teacher may see."""
    skipped: str | None = None
    """Why nothing was annotated (e.g. "unsupported_task", "parse_failure"); None when annotated."""


Annotator = Callable[[Problem, str, bool], Annotation]
ANNOTATORS: dict[str, Callable[..., Annotator]] = {}


def register_annotator(name: str):
    """Decorator: register an annotator factory ``(**options) -> Annotator`` under ``name``."""
    return decorator_into(ANNOTATORS, "annotator", name)


def get_annotator(name: str, **options: Any) -> Annotator:
    """A ready annotator by name (``oracle``, ``random``, ``none``, ...)."""
    try:
        factory = lookup(ANNOTATORS, "annotator", name)
    except KeyError as e:
        raise ValueError(f"annotator.kind={name!r} is unknown; {e}") from None
    return factory(**options)


@register_annotator("none")
def _none(**_: Any) -> Annotator:
    def annotate(problem: Problem, response: str, correct: bool) -> Annotation:
        return Annotation(skipped="disabled")
    return annotate


@register_annotator("oracle")
def oracle_annotator(**_: Any) -> Annotator:
    """The embedded task's step checker (``trace_rl.tasks.arith.check_steps``): key spans are the
    hard steps of a correct response (else its last step), the error span is the first wrong step
    (or the answer line when only the answer is wrong); label = the error kind or "key_step".
    Problems of other tasks are skipped (``unsupported_task``)."""
    from trace_rl.tasks.arith import check_steps

    def annotate(problem: Problem, response: str, correct: bool) -> Annotation:
        if not {"start", "ops"} <= set(problem.meta or {}):
            return Annotation(skipped="unsupported_task")
        rep = check_steps(problem, response)
        if correct:
            return Annotation(key_spans=list(rep.key_step_spans), label="key_step")
        spans = [rep.first_error_span] if rep.first_error_span and rep.first_error_span[1] > rep.first_error_span[0] else []
        return Annotation(error_spans=spans, label=rep.error_kind)
    return annotate


@register_annotator("random")
def random_annotator(coverage: float = 0.25, seed: int = 0, **_: Any) -> Annotator:
    """The "no annotator" ablation: one random contiguous span covering ``coverage`` of the response's
    characters, as key span (correct) or error span (incorrect); seeded per response text."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"annotator.random_coverage={coverage} must be in (0, 1]")

    def annotate(problem: Problem, response: str, correct: bool) -> Annotation:
        n = len(response)
        if n == 0:
            return Annotation(skipped="empty_response")
        width = max(1, int(round(coverage * n)))
        rng = random.Random(f"{seed}/{problem.uid}/{response}")
        start = rng.randint(0, n - width)
        span = [(start, start + width)]
        return Annotation(key_spans=span, label="random") if correct else Annotation(error_spans=span, label="random")
    return annotate


def response_token_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """The decoded text of response token ids and each token's character span in it.

    Offsets come from incremental decoding (``len(decode(ids[:t]))``), so they describe exactly the
    text the annotator sees, whatever the tokenizer (a byte-level token that ends mid-character gets
    an empty span; special tokens are skipped, so they get empty spans too)."""
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    offsets: list[Span] = []
    prev = 0
    for t in range(1, len(ids) + 1):
        cur = len(tokenizer.decode(ids[:t], skip_special_tokens=True))
        cur = max(prev, min(cur, len(text)))
        offsets.append((prev, cur))
        prev = cur
    return text, offsets


# LLM annotators (trace_rl.annotate.llm): imported when asked for, so that the oracle does not pull in
# the HTTP client or transformers.
@register_annotator("api")
def _api_annotator(**options: Any) -> Annotator:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (``base_url``, ``model``, ``api_key_env``...)."""
    from trace_rl.annotate.llm import api_annotator
    return api_annotator(**options)


@register_annotator("model")
def _model_annotator(**options: Any) -> Annotator:
    """A frozen local Hugging Face checkpoint (``model_path``), greedy generation."""
    from trace_rl.annotate.llm import model_annotator
    return model_annotator(**options)


@register_annotator("self")
def _self_annotator(**options: Any) -> Annotator:
    """The current policy through a ``generate(prompt_texts) -> replies`` callable (the rollout pool)."""
    from trace_rl.annotate.llm import self_annotator
    return self_annotator(**options)
