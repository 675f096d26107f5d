#!/usr/bin/env bash
# The annotator ablation of docs/results.md: TRACE with the oracle step checker, with online
# self-annotation by the policy, and with random spans of the same coverage (the "no annotator"
# ablation), in one Hydra multirun on the default job, then the report. (annotator=none is GRPO.) Extra arguments
# are passed to every run, e.g.  scripts/ablate_annotators.sh trainer.total_steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEP=${SWEEP:-multirun/ablate-annotators-$(date +%Y%m%d-%H%M%S)}
"$PY" -m trace_rl.train -m algorithm=trace annotator=oracle,self,random "hydra.sweep.dir=$SWEEP" "$@"
"$PY" -m trace_rl.report "$SWEEP"
