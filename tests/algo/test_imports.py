"""trace_rl/algo imports only torch and the standard library (DESIGN.md: "The algorithm core is pure torch")."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ALGO = Path(__file__).resolve().parents[2] / "trace_rl" / "algo"
ALLOWED_TOP = set(sys.stdlib_module_names) | {"torch"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import; relative imports are reported as ''."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "" if node.level else (node.module or "")))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def violations(source: str) -> list[str]:
    bad = []
    for line, mod in imported_modules(ast.parse(source)):
        if mod == "":  # relative import inside the package
            continue
        if mod == "trace_rl.algo" or mod.startswith("trace_rl.algo."):
            continue
        if mod.split(".")[0] in ALLOWED_TOP:
            continue
        bad.append(f"line {line}: {mod}")
    return bad


def test_files_exist():
    names = {p.name for p in ALGO.glob("*.py")}
    assert {"__init__.py", "__main__.py", "logprobs.py", "advantages.py", "policy_loss.py", "kl.py",
            "aggregation.py", "channels.py", "schedules.py", "exposure.py"} <= names
    assert (ALGO / "methods" / "__init__.py").is_file()  # a package: one file per method


@pytest.mark.parametrize("path", sorted(ALGO.rglob("*.py")), ids=lambda p: p.name)
def test_only_torch_and_stdlib(path):
    bad = violations(path.read_text())
    assert not bad, f"{path.relative_to(ALGO.parents[1])} imports outside torch/stdlib: {bad}"


def test_checker_catches_forbidden_imports():
    assert violations("import numpy as np") == ["line 1: numpy"]
    assert violations("from trace_rl.config import AlgorithmConfig") == ["line 1: trace_rl.config"]
    assert violations("from trace_rl import batch") == ["line 1: trace_rl"]
    assert violations("def f():\n    import ray\n") == ["line 2: ray"]
    assert violations("import importlib\nimportlib.import_module('transformers')") == ["line 2: transformers"]
    assert violations("import math, torch.nn\nfrom . import kl\nfrom trace_rl.algo.kl import kl_estimate") == []


def test_import_pulls_in_no_heavy_packages():
    code = ("import sys, trace_rl.algo; "
            "bad = [m for m in ('ray', 'transformers', 'deepspeed', 'vllm', 'hydra', 'omegaconf', "
            "'trace_rl.config', 'trace_rl.batch') if m in sys.modules]; print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ALGO.parents[1]), env={**os.environ, "PYTHONPATH": str(ALGO.parents[1])})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing trace_rl.algo loaded {res.stdout.strip()}"
