#!/usr/bin/env bash
# The one prepared GPU check: `pytest -m gpu` and a 5-step TRACE run on locally built Qwen3-shaped models
# (vocabulary 151,936), figures written to <out>/gpu_check.json. Details: scripts/gpu_check.py, docs/cluster.md.
#   bash scripts/gpu_check.sh [--out DIR]     # a machine with >= 1 CUDA GPU, no network needed
#   bash scripts/gpu_check.sh --cpu-smoke     # the plumbing on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout "${GPU_CHECK_TIMEOUT_S:-900}" "$PY" scripts/gpu_check.py "$@"
