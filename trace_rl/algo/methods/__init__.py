"""Registered methods, one file each; :mod:`.base` holds the registry and the input/output types.

Importing this package registers every method: the built-in ones below, and every other module of
this folder, found and imported by name (so adding a method is one new file here, decorated with
:func:`register_method`, plus its ``conf/algorithm/<name>.yaml``; nothing else is edited).
"""
from __future__ import annotations

from .base import (KNOWN_NEEDS, METHODS, TEACHER_NEEDS, MethodInputs, MethodOutput, MethodSpec, compute_method,
                   get_method, method_param_fields, param_bool, param_choice, param_float, param_schedule,
                   param_step, register_method, registry_names)
from .grpo import (GRPO_DEFAULTS, dapo_method, dr_grpo_method, grpo_method, grpo_seq_advantages,
                   outcome_advantage_output)
from .self_opd import self_opd_method
from .trace import trace_method
from .scope import scope_method
from .tempo import tempo_method
from .tip import tip_method
from .div_weighted import div_weighted_method


def _import_all_methods() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all_methods()

__all__ = [
    "KNOWN_NEEDS", "TEACHER_NEEDS", "MethodSpec", "MethodInputs", "MethodOutput", "METHODS", "register_method",
    "get_method", "compute_method", "registry_names", "outcome_advantage_output", "grpo_seq_advantages",
    "GRPO_DEFAULTS", "method_param_fields", "param_bool", "param_choice", "param_float", "param_schedule", "param_step",
    "grpo_method", "dapo_method", "dr_grpo_method", "self_opd_method", "trace_method", "scope_method",
    "tempo_method", "tip_method", "div_weighted_method",
]
