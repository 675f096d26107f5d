"""Token routing's inputs, produced by the pipeline's stages (``trace_rl.pipeline``) in the batch schema.

A method declares its needs (``trace_rl.algo.KNOWN_NEEDS``); for the step that will learn a batch the
producer asks ``spec.needs_at(step, params)`` (TRACE stops needing its teacher and annotator once its
coefficient has annealed to 0) and chains exactly the stages that produce them:

==================  ==========================================================================
need                how
==================  ==========================================================================
annotations         decode each response with per-token character offsets, run the annotator on
                    (problem, text, correct), align its character spans to tokens and cap them
                    (``trace_rl.algo.spans``): ``key_mask`` / ``error_mask`` [B, R]
teacher_topk,       build each response's privileged prompt, score the response under it with the
teacher_logprobs    TeacherService (re-synced from the learner when due): top-k ids / log-probs and
                    the sampled-token log-prob, also written into the batch for the learner
entropy             the learner's per-token entropy of the responses (one forward pass)
prefix_tree         the response token ids
==================  ==========================================================================

The annotate stage uses :func:`annotate_batch`, the teacher stage :class:`TeacherScorer`; annotator problems
are counted (``annotate/<reason>``) and never stop training.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

import torch

from trace_rl.batch import Batch

log = logging.getLogger(__name__)


def annotate_batch(annotator: Callable, batch: Batch, tokenizer: Any, problems: dict[str, Any], span_cap: float,
                   counts: Counter) -> tuple[torch.Tensor, torch.Tensor, list[str | None], dict[str, float]]:
    """``(key_mask, error_mask, labels, metrics)`` of ``batch``: each response decoded with per-token
    character offsets, annotated as ``(problem, text, correct)``, its spans aligned to tokens and capped at
    ``span_cap`` of the response. Problems are counted into ``counts`` (``annotate/skipped_<reason>``)."""
    from trace_rl.algo.spans import batch_span_masks
    from trace_rl.annotate import response_token_offsets

    if annotator is None:
        raise ValueError("the method needs annotations but no annotator is configured (annotator.kind)")
    correct = (batch.rewards > 0.5).tolist()
    step_counts: Counter = Counter()
    texts, offsets, items, where = [], [], [], []
    for i, ids in enumerate(responses(batch)):
        text, offs = response_token_offsets(tokenizer, ids)
        texts.append(text)
        offsets.append(offs)
        problem = problems.get(batch.meta["uid"][i])
        if problem is None:
            step_counts["no_problem"] += 1
            continue
        items.append((problem, text, bool(correct[i])))
        where.append(i)
    anns: list[Any] = [None] * len(batch)
    for i, ann in zip(where, annotate_items(annotator, items, step_counts)):
        anns[i] = ann
    for ann in anns:
        if ann is not None and ann.skipped:
            step_counts[ann.skipped] += 1
    key_spans = [a.key_spans if a else [] for a in anns]
    err_spans = [a.error_spans if a else [] for a in anns]
    labels = [a.label if a else None for a in anns]
    text_lens = [len(t) for t in texts]
    key, kstats = batch_span_masks(key_spans, offsets, batch.response_mask, max_frac=span_cap, text_lens=text_lens)
    err, estats = batch_span_masks(err_spans, offsets, batch.response_mask, max_frac=span_cap, text_lens=text_lens)
    counts.update(step_counts)
    metrics = {"annotate/key_tokens": float(key.sum()), "annotate/error_tokens": float(err.sum()),
               "annotate/annotated_rows": float(sum(1 for k, e in zip(key_spans, err_spans) if k or e))}
    for name, v in kstats.items():
        metrics[f"annotate/{name}"] = float(v + estats.get(name, 0))
    for reason, v in step_counts.items():
        metrics[f"annotate/skipped_{reason}"] = float(v)
    return key, err, labels, metrics


def responses(batch: Batch) -> list[list[int]]:
    """Each row's response token ids (without padding)."""
    return [batch.response_ids[i][batch.response_mask[i]].tolist() for i in range(len(batch))]


class TeacherScorer:
    """The teacher stage's work on one chunk: each response's privileged prompt (cached per problem and
    label), scored by a :class:`~trace_rl.teacher.service.TeacherService`; the teacher fields are written
    into the batch (zero-filled on rows that need no teacher)."""

    def __init__(self, teacher: Any, tokenizer: Any, problems: dict[str, Any], prompt_builder: Any):
        self.teacher, self.tok, self.problems, self.builder = teacher, tokenizer, problems, prompt_builder
        self._prompt_cache: dict[tuple[str, str | None], list[int]] = {}

    def teacher_prompt(self, uid: str, label: str | None) -> list[int]:
        key = (uid, label if "label" in self.builder.fields else None)
        ids = self._prompt_cache.get(key)
        if ids is None:
            text = self.builder.render(self.problems[uid], self.tok, label=key[1])
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(self._prompt_cache) > 100_000:
                self._prompt_cache.clear()
            self._prompt_cache[key] = ids
        return ids

    def score(self, batch: Batch, rows: torch.Tensor | None = None) -> tuple[Batch, dict[str, float]]:
        """``batch`` with its teacher fields; ``rows`` [B] bool limits scoring to those rows."""
        labels = batch.meta.get("label") or [None] * len(batch)
        idx = list(range(len(batch))) if rows is None else rows.nonzero().flatten().tolist()
        resp = responses(batch)
        prompts = {i: self.teacher_prompt(batch.meta["uid"][i], labels[i]) for i in idx}
        # a privileged prompt + response longer than the teacher's context cannot be scored: the row is
        # marked (meta "teacher_skipped") and routing keeps the teacher away from it (trace_rl.pipeline.route)
        limit = getattr(self.teacher, "max_model_len", None)
        skipped = [False] * len(batch)
        if limit:
            for i in idx:
                skipped[i] = len(prompts[i]) + len(resp[i]) > limit
            idx = [i for i in idx if not skipped[i]]
        B, R = len(batch), batch.response_len
        out = self.teacher.empty(B, R)
        if idx:
            scored = self.teacher.score([prompts[i] for i in idx], [resp[i] for i in idx], R)
            for k, v in scored.items():
                out[k][idx] = v
        scored_rows = torch.zeros(B, dtype=torch.bool)
        scored_rows[idx] = True
        gap = (batch.behaviour_logprobs - out["teacher_logprobs"])[batch.response_mask & scored_rows[:, None]]
        metrics = {"teacher/scored_rows": float(len(idx)),
                   "teacher/prompt_tokens": float(sum(len(prompts[i]) for i in idx)),
                   "teacher/gap_sum": float(gap.sum()), "teacher/gap_tokens": float(gap.numel())}
        scored_batch = batch.replace(**out)
        scored_batch.meta = {**batch.meta, "teacher_skipped": skipped}
        return scored_batch, metrics


def annotate_items(annotator: Callable, items: list, counts: Counter | None = None) -> list:
    """Annotations of ``(problem, text, correct)`` items, in order: one ``annotate_batch`` call when the
    annotator has it (LLM annotators send the requests together), else one call per item. An
    annotator that raises costs only the affected items (None, counted as ``error``)."""
    counts = counts if counts is not None else Counter()
    if not items:
        return []
    batch_fn = getattr(annotator, "annotate_batch", None)
    if callable(batch_fn):
        try:
            out = list(batch_fn(items))
            if len(out) == len(items):
                return out
            log.warning("annotator returned %d annotations for %d responses; annotating one by one",
                        len(out), len(items))
        except Exception as e:  # an annotator bug must not stop training
            log.warning("annotator batch failed (%s: %s); annotating one by one", type(e).__name__, e)
    out = []
    for problem, text, correct in items:
        try:
            out.append(annotator(problem, text, correct))
        except Exception as e:  # no spans for this response
            log.warning("annotator failed on %s: %s", getattr(problem, "uid", "?"), e)
            counts["error"] += 1
            out.append(None)
    return out


def key_token_probe(problems: list, prompt_ids: list[list[int]], tokenizer: Any, annotator: Callable,
                    span_cap: float, limit: int = 32) -> tuple[Batch, torch.Tensor] | None:
    """A fixed probe set for the key-token log-prob lift between evaluations: the reference solutions
    of up to ``limit`` problems as responses (with eos), and their annotated key tokens as a mask.
    None when the annotator marks nothing on them (e.g. a task without a step checker)."""
    from trace_rl.algo.spans import batch_span_masks
    from trace_rl.annotate import response_token_offsets
    from trace_rl.rollout.base import Sample
    from trace_rl.rollout.pool import samples_to_batch

    eos = tokenizer.eos_token_id
    samples, items, offsets, lens = [], [], [], []
    for i, p in enumerate(problems[:limit]):
        if not p.solution:
            continue
        ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        text, offs = response_token_offsets(tokenizer, ids)
        samples.append(Sample(i, ids, [0.0] * len(ids), "stop"))
        items.append((p, text, True))
        offsets.append(offs)
        lens.append(len(text))
    spans = [ann.key_spans if ann is not None else [] for ann in annotate_items(annotator, items)]
    if not samples or not any(spans):
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    batch = samples_to_batch(prompt_ids[:limit], samples, pad_token_id=pad, version=0)
    key, _ = batch_span_masks(spans, offsets, batch.response_mask, max_frac=span_cap, text_lens=lens)
    return batch, key
