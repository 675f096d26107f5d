"""Registered methods, one file each; :mod:`.base` holds the registry and the input/output types.

Importing this package registers every built-in method. Adding a method is one new file here,
decorated with :func:`register_method`, plus its import below.
"""
from __future__ import annotations

from .base import (KNOWN_NEEDS, METHODS, TEACHER_NEEDS, MethodInputs, MethodOutput, MethodSpec, compute_method,
                   get_method, param_bool, param_choice, param_float, param_schedule, param_step, register_method,
                   registry_names)
from .grpo import (GRPO_DEFAULTS, dapo_method, dr_grpo_method, grpo_method, grpo_seq_advantages,
                   outcome_advantage_output)
from .self_opd import self_opd_method
from .trace import trace_method
from .scope import scope_method
from .tempo import tempo_method
from .tip import tip_method
from .div_weighted import div_weighted_method

__all__ = [
    "KNOWN_NEEDS", "TEACHER_NEEDS", "MethodSpec", "MethodInputs", "MethodOutput", "METHODS", "register_method",
    "get_method", "compute_method", "registry_names", "outcome_advantage_output", "grpo_seq_advantages",
    "GRPO_DEFAULTS", "param_bool", "param_choice", "param_float", "param_schedule", "param_step",
    "grpo_method", "dapo_method", "dr_grpo_method", "self_opd_method", "trace_method", "scope_method",
    "tempo_method", "tip_method", "div_weighted_method",
]
