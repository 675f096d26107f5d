"""The driver's side of token routing: gather what a method needs at a step, in the batch schema.

A method declares its needs (``trace_rl.algo.KNOWN_NEEDS``); at each step the driver asks
``spec.needs_at(step, params)`` (TRACE stops needing its teacher and annotator once its coefficient
has annealed to 0) and :class:`InputGatherer` produces exactly those inputs:

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

Stage timings ``annotate`` and ``teacher`` are recorded; annotator problems are counted
(``annotate/<reason>``) and never stop training.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable

import torch

from trace_rl.batch import Batch

log = logging.getLogger(__name__)


class InputGatherer:
    def __init__(self, *, tokenizer: Any, problems: dict[str, Any], annotator: Callable | None = None,
                 span_cap: float = 0.25, teacher: Any = None, prompt_builder: Any = None,
                 learners: Any = None, temperature: float = 1.0):
        self.tok = tokenizer
        self.problems = problems
        self.annotator = annotator
        self.span_cap = span_cap
        self.teacher = teacher
        self.builder = prompt_builder
        self.learners = learners
        self.temperature = temperature
        self._prompt_cache: dict[tuple[str, str | None], list[int]] = {}
        self.annotate_counts: Counter = Counter()

    # ------------------------------------------------------------------------------ public
    def gather(self, needs: frozenset[str], batch: Batch, step: int, timings: dict[str, float],
               teacher_rows: str = "all", before_learners: Callable[[], None] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The ``MethodInputs.extra`` tensors for ``needs`` (teacher fields are also set on ``batch``).
        ``teacher_rows="annotated"``: only rollouts with a key or error token are sent to the teacher
        (the others get zero-filled teacher fields, which the method never reads). ``before_learners`` is
        called after annotation and before the first stage that reads the learners (teacher re-sync,
        entropy): colocation hands them the accelerators there."""
        extra: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        labels: list[str | None] = [None] * len(batch)
        if "annotations" in needs:
            t0 = time.perf_counter()
            key, err, labels, m = self.annotate(batch)
            extra.update(key_mask=key, error_mask=err)
            metrics.update(m)
            timings["timing_s/annotate"] = time.perf_counter() - t0
        if before_learners is not None and needs & {"teacher_topk", "teacher_logprobs", "entropy"}:
            before_learners()
        if needs & {"teacher_topk", "teacher_logprobs"}:
            t0 = time.perf_counter()
            rows = None
            if teacher_rows == "annotated" and "key_mask" in extra:
                rows = (extra["key_mask"] | extra["error_mask"]).any(dim=1)
            out, m = self.score_teacher(batch, step, labels, rows=rows)
            batch.teacher_logprobs = out["teacher_logprobs"]
            batch.teacher_topk_ids = out["teacher_topk_ids"]
            batch.teacher_topk_logprobs = out["teacher_topk_logprobs"]
            extra.update(out)
            metrics.update(m)
            timings["timing_s/teacher"] = time.perf_counter() - t0
        if "entropy" in needs:
            t0 = time.perf_counter()
            extra["entropy"] = self.learners.entropy(batch, temperature=self.temperature).float()
            timings["timing_s/entropy"] = time.perf_counter() - t0
        if "prefix_tree" in needs:
            extra["response_ids"] = batch.response_ids
        if "reference" in needs:
            raise ValueError("no method shipped with trace_rl needs reference log-probs yet; the driver has no "
                             "reference model (use algorithm.kl_coef for a KL penalty to the initial policy)")
        return extra, metrics

    # ------------------------------------------------------------------------------ annotate
    def responses(self, batch: Batch) -> list[list[int]]:
        return [batch.response_ids[i][batch.response_mask[i]].tolist() for i in range(len(batch))]

    def annotate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[str | None], dict[str, float]]:
        from trace_rl.algo.spans import batch_span_masks
        from trace_rl.annotate import response_token_offsets

        if self.annotator is None:
            raise ValueError("the method needs annotations but no annotator is configured (annotator.kind)")
        correct = (batch.rewards > 0.5).tolist()
        counts: Counter = Counter()
        texts, offsets, items, where = [], [], [], []
        for i, ids in enumerate(self.responses(batch)):
            text, offs = response_token_offsets(self.tok, ids)
            texts.append(text)
            offsets.append(offs)
            problem = self.problems.get(batch.meta["uid"][i])
            if problem is None:
                counts["no_problem"] += 1
                continue
            items.append((problem, text, bool(correct[i])))
            where.append(i)
        anns: list[Any] = [None] * len(batch)
        for i, ann in zip(where, annotate_items(self.annotator, items, counts)):
            anns[i] = ann
        for ann in anns:
            if ann is not None and ann.skipped:
                counts[ann.skipped] += 1
        key_spans = [a.key_spans if a else [] for a in anns]
        err_spans = [a.error_spans if a else [] for a in anns]
        labels = [a.label if a else None for a in anns]
        text_lens = [len(t) for t in texts]
        key, kstats = batch_span_masks(key_spans, offsets, batch.response_mask, max_frac=self.span_cap,
                                       text_lens=text_lens)
        err, estats = batch_span_masks(err_spans, offsets, batch.response_mask, max_frac=self.span_cap,
                                       text_lens=text_lens)
        self.annotate_counts.update(counts)
        n_tok = max(int(batch.response_mask.sum()), 1)
        metrics = {"annotate/key_token_frac": float(key.sum()) / n_tok,
                   "annotate/error_token_frac": float(err.sum()) / n_tok,
                   "annotate/annotated_frac": sum(1 for k, e in zip(key_spans, err_spans) if k or e) / max(len(batch), 1)}
        for name, v in kstats.items():
            metrics[f"annotate/{name}"] = float(v + estats.get(name, 0))
        for reason, v in counts.items():
            metrics[f"annotate/skipped_{reason}"] = float(v)
        stats = getattr(self.annotator, "stats", None)
        if callable(stats):  # LLM annotators: cumulative request / parse counters
            try:
                metrics.update({k: float(v) for k, v in stats().items()})
            except Exception as e:  # counters must not stop training
                log.warning("annotator stats failed: %s", e)
        return key, err, labels, metrics

    # ------------------------------------------------------------------------------ teacher
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

    def score_teacher(self, batch: Batch, step: int, labels: list[str | None], rows: torch.Tensor | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if self.teacher is None:
            raise ValueError("the method needs a teacher but no TeacherService was started")
        metrics: dict[str, float] = {}
        if self.teacher.wants_sync(step) and self.teacher.version != step:
            metrics["timing_s/teacher_sync"] = self.teacher.sync(self.learners.state_dict_ref(), version=step)
        idx = list(range(len(batch))) if rows is None else rows.nonzero().flatten().tolist()
        responses = self.responses(batch)
        prompts = [self.teacher_prompt(batch.meta["uid"][i], labels[i]) for i in idx]
        B, R = len(batch), batch.response_len
        out = self.teacher.empty(B, R)
        if idx:
            scored = self.teacher.score(prompts, [responses[i] for i in idx], R)
            for k, v in scored.items():
                out[k][idx] = v
        metrics["teacher/scored_frac"] = len(idx) / max(B, 1)
        mask = batch.response_mask if rows is None else batch.response_mask & rows[:, None]
        gap = (batch.behaviour_logprobs - out["teacher_logprobs"])[mask]
        metrics.update(self.teacher.stats())
        metrics["teacher/prompt_len"] = sum(map(len, prompts)) / max(len(prompts), 1)
        metrics["teacher/student_minus_teacher_logprob"] = float(gap.mean()) if gap.numel() else 0.0
        return out, metrics


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
