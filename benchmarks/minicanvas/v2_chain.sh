#!/usr/bin/env bash
# Issue 21: finish the MiniCanvas v2 training, build it and ship it, in one background command that survives being
# run again in a later session:
#
#   mkdir -p build && nohup benchmarks/minicanvas/v2_chain.sh > build/v2_chain.log 2>&1 &
#
# 1. benchmarks/minicanvas/v2_sitting.sh: restore the committed training state, train until STEPS (default 20000) or
#    TIME_LIMIT seconds (default 9000), copy the state back into benchmarks/minicanvas/v2_train_state/. If the steps
#    are not done, the script stops there: commit that folder before the session ends and run it again next session.
# 2. the build (`saeuron minicanvas build`: gates about 22 min, collection 1 min, SAEs 4 min, concepts + detectors
#    3 min; it resumes stage by stage within a session, but build/ does not outlive the session);
# 3. benchmarks/minicanvas/v2_ship.sh: copy the build into saeuron/minicanvas/assets/ (refused when a gate fails).
#    Commit saeuron/minicanvas/assets at once: from then on the build lives in git, and v2_finish.sh (sweeps,
#    SAeUron + UCE, probe_anchor, levers) reads it from there.
#
# Nothing else should run beside it: two 2-thread jobs stall each other on 2 cores; pause it with `kill -STOP` /
# `kill -CONT` (of the running python) for a short test run instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SAE=${SAE:-.venv/bin/saeuron}
OUT=build/minicanvas_v2
WORK=build/minicanvas_v2.work
STEPS=${STEPS:-20000}
MODEL="{\"caption_forms\": true, \"steps\": $STEPS}"
say() { echo "[v2 chain $(date -u +%H:%M:%S)] $*"; }

STEPS=$STEPS benchmarks/minicanvas/v2_sitting.sh
step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$WORK/model/train_state.json")
if [ "$step" -lt "$STEPS" ]; then
  say "training at step $step of $STEPS: commit benchmarks/minicanvas/v2_train_state and run this again next session"
  exit 0
fi
say "build"
$SAE minicanvas build --out "$OUT" --work "$WORK" --threads 2 --set "model=$MODEL" --set 'classifiers_from="shipped"'
say "ship"
benchmarks/minicanvas/v2_ship.sh
say "all done: commit saeuron/minicanvas/assets now; then benchmarks/minicanvas/v2_finish.sh"
