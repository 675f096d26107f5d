#!/usr/bin/env bash
# The method comparison of docs/results.md: one Hydra multirun (GRPO, all-token self-OPD, TRACE) on the
# default job, then the report (markdown table + plots). Extra arguments are passed to every run, e.g.
#   scripts/compare_methods.sh trainer.total_steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEP=${SWEEP:-multirun/compare-$(date +%Y%m%d-%H%M%S)}
"$PY" -m trace_rl.train -m algorithm=grpo,self_opd,trace "hydra.sweep.dir=$SWEEP" "$@"
"$PY" -m trace_rl.report "$SWEEP"
