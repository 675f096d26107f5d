"""Check pyproject.toml's declared GPU stack ([tool.trace_rl.gpu-stack]) against what pip resolves for the
`gpu` extra's vLLM pin (run it on Linux x86-64, the image's platform): the torch version vLLM pins and the CUDA runtime that torch wheel
pulls (its major.minor must be the image's CUDA). Needs PyPI; downloads wheel metadata only (PEP 658).

    python scripts/check_gpu_stack.py            # exit 0 when the declaration holds, 1 with the differences

tests/test_docker.py checks, offline, that the Dockerfile and the extra agree with the declaration.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def resolve(vllm: str) -> dict[str, str]:
    """name -> version of everything ``pip install vllm==<vllm>`` would install here (run it on Linux x86-64,
    as the image is)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f"vllm=={vllm}"], check=True)
        data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in data["install"]}


def main() -> int:
    stack = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["trace_rl"]["gpu-stack"]
    got = resolve(stack["vllm"])
    runtime = got.get("nvidia-cuda-runtime") or next((v for k, v in got.items()
                                                      if k.startswith("nvidia-cuda-runtime")), None)
    cuda = ".".join(runtime.split(".")[:2]) if runtime else None
    problems = []
    if got.get("torch") != stack["torch"]:
        problems.append(f"vllm=={stack['vllm']} resolves torch {got.get('torch')}, declared {stack['torch']}")
    if cuda != stack["cuda"]:
        problems.append(f"torch {got.get('torch')} pulls the CUDA {cuda} runtime ({runtime}), declared {stack['cuda']}")
    print(f"vllm {stack['vllm']} -> torch {got.get('torch')}, CUDA runtime {runtime}, "
          f"NCCL {next((f'{k} {v}' for k, v in got.items() if k.startswith('nvidia-nccl')), None)}")
    for p in problems:
        print("MISMATCH:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
