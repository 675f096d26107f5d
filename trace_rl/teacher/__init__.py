"""The privileged-context teacher: a prompt builder (what the teacher may see) and the scoring service."""
from trace_rl.teacher.prompts import PRIVILEGED_FIELDS, PrivilegedPromptBuilder

__all__ = ["PRIVILEGED_FIELDS", "PrivilegedPromptBuilder"]
