"""The learners: W data-parallel ranks (DeepSpeed ZeRO-1/2/3 or plain torch / DDP) as Ray actors.

- :class:`LearnerGroup` (group.py): what the driver uses: ``train``, ``logprobs``, ``state_dict_ref``,
  ``save`` / ``load``, ``export_hf``, ``shutdown``.
- :class:`LearnerWorker` (worker.py): one rank; plain Python, so a single rank also runs in-process.
- loss.py: the per-micro-batch loss, a sum of registered channel losses (``register_channel_loss``).
- policy.py: the HF model with a chunked log-prob head (no full logits).
"""
from __future__ import annotations

from .group import LearnerGroup, LearnerPlacementError, LearnerRankError
from .loss import CHANNEL_LOSSES, ChannelInputs, Counts, global_counts, micro_batch_loss, register_channel_loss
from .policy import PolicyModel
from .worker import LearnerWorker, learning_rate

__all__ = [
    "LearnerGroup", "LearnerPlacementError", "LearnerRankError", "LearnerWorker", "PolicyModel",
    "CHANNEL_LOSSES", "ChannelInputs", "Counts", "register_channel_loss", "global_counts", "micro_batch_loss",
    "learning_rate",
]
