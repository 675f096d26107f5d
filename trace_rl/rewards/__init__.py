"""Outcome rewards: boxed-answer extraction, math-verify scoring, and the killable verifier pool."""
from __future__ import annotations

from trace_rl.rewards.math_reward import extract_boxed, math_verify_score
from trace_rl.rewards.pool import VerifierPool

__all__ = ["VerifierPool", "extract_boxed", "math_verify_score"]
