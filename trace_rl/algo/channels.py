"""Channels: how a method routes each response token to one or more losses.

A channel is ``(name, weights [B, R], norm, coef)``. The learner computes one loss per channel,
chosen by the channel's *kind* (its name up to the first ``":"``: ``"fkl:key"`` -> ``"fkl"``):

  ============  ==================================================================================
  kind          loss (computed by the learner, ``trace_rl/learner/loss.py``)
  ============  ==================================================================================
  ``pg``        clipped policy gradient with ``Batch.advantages``
  ``fkl``       forward KL(teacher || student) on the vocabulary (teacher top-k)
  ``rkl``       reverse KL(student || teacher) on the vocabulary
  ``jsd``       generalized JSD-beta on the vocabulary
  ``mle``       cross-entropy ``-log p(sampled token)``
  ``logratio``  sampled-token ``teacher_lp - old_lp`` (detached) as a dense advantage in the PG loss
  ``skl``       sampled-token KL estimator (k1/k2/k3) of the student vs ``teacher_logprobs``
  ============  ==================================================================================

``norm`` says how the learner normalises ``sum(w * loss)`` (all counts global over the mini-batch):
  - ``"agg"``: with ``algo.loss_agg_mode`` and the channel's own counts (what ``pg`` uses);
  - ``"token"``: by the number of tokens with ``w != 0`` in the channel;
  - ``"seq"``: by the number of sequences with any ``w != 0`` in the channel. A per-sequence
    *span mean scaled by span_len / response_len* is encoded as weight ``1 / response_len`` on the
    span tokens with norm ``"seq"``: ``sum_{t in span} x_t / n_i = mean_span(x) * |span| / n_i``.

The coefficient (already evaluated by its schedule at the current step) is folded into the weights
that travel in the batch (:func:`fold_channels`), so the learner never sees a coefficient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["CHANNEL_NORMS", "CHANNEL_KINDS", "TEACHER_KINDS", "DIVERGENCE_KINDS", "Channel", "channel_kind",
           "fold_channels"]

CHANNEL_NORMS = ("agg", "token", "seq")
CHANNEL_KINDS = ("pg", "fkl", "rkl", "jsd", "mle", "logratio", "skl")
# Kinds whose gradient carries the teacher's (privileged) distribution. "mle" is not one: it fits the
# student's own sampled tokens; a teacher only chose *which* tokens (exposure.py counts the former).
TEACHER_KINDS = frozenset({"fkl", "rkl", "jsd", "skl", "logratio"})
# A method's ``*_divergence`` parameter -> the channel kind that computes it.
DIVERGENCE_KINDS = {"forward": "fkl", "reverse": "rkl", "jsd": "jsd", "skl": "skl", "logratio": "logratio"}


def channel_kind(name: str) -> str:
    """The loss kind of a channel: its name up to the first ``":"`` (``"fkl:key"`` -> ``"fkl"``)."""
    return name.split(":", 1)[0]


@dataclass
class Channel:
    """One routed loss: ``weights`` [B, R] (0 = token not in the channel), ``norm`` in
    :data:`CHANNEL_NORMS`, and ``coef`` (the scheduled coefficient at this step)."""
    name: str
    weights: Tensor
    norm: str = "agg"
    coef: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not channel_kind(self.name):
            raise ValueError(f"Channel.name must look like 'kind' or 'kind:tag', got {self.name!r}")
        if self.norm not in CHANNEL_NORMS:
            raise ValueError(f"Channel {self.name!r}: norm must be one of {CHANNEL_NORMS}, got {self.norm!r}")
        if not isinstance(self.weights, Tensor) or self.weights.dim() != 2:
            raise ValueError(f"Channel {self.name!r}: weights must be a [B, R] tensor")
        self.coef = float(self.coef)
        if not math.isfinite(self.coef):
            raise ValueError(f"Channel {self.name!r}: coef must be finite, got {self.coef}")


def fold_channels(channels: Sequence[Channel], response_mask: Tensor
                  ) -> tuple[tuple[str, ...], Tensor, tuple[str, ...], dict[str, float]]:
    """Fold each coefficient into its weights: ``(names, weights [C, B, R] float32, norms, metrics)``.

    A channel whose coefficient is exactly 0 is *left out* (it contributes nothing, and leaving it
    out means the learner does not ask for teacher fields once a teacher coefficient has annealed
    to 0). If every channel is left out, one all-zero ``"pg"`` channel is returned, so the batch
    never falls back to the learner's default (a full-weight ``pg`` channel).

    ``metrics``: ``coef/<name>`` for every channel given (0 for those left out) and
    ``route/<name>_token_frac``: the fraction of response tokens with a nonzero folded weight.
    """
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise ValueError(f"channel names must be unique, got {names}")
    mask = response_mask.bool()
    n_resp = max(int(mask.sum()), 1)
    kept, metrics = [], {}
    for c in channels:
        if tuple(c.weights.shape) != tuple(mask.shape):
            raise ValueError(f"Channel {c.name!r}: weights have shape {tuple(c.weights.shape)}, expected "
                             f"{tuple(mask.shape)} (like response_mask)")
        metrics[f"coef/{c.name}"] = c.coef
        w = torch.where(mask, c.weights.float() * c.coef, torch.zeros((), dtype=torch.float32))
        if c.coef != 0:
            kept.append((c.name, w, c.norm))
        metrics[f"route/{c.name}_token_frac"] = float((w != 0).sum()) / n_resp if c.coef != 0 else 0.0
    if not kept:
        kept = [("pg", torch.zeros(mask.shape, dtype=torch.float32, device=mask.device), "agg")]
    return (tuple(k[0] for k in kept), torch.stack([k[1] for k in kept]), tuple(k[2] for k in kept), metrics)
