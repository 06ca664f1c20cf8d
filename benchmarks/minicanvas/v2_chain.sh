#!/usr/bin/env bash
# Issues 21 and 22: finish the MiniCanvas v2 retrain, build it, sweep its concept defaults on tuning seed 1, then
# run three of issue 22's levers on it (token-weighted scores; wider 8x8 SAEs; both 8x8 blocks at once). Every
# step resumes where an interrupted run stopped (the training from its last checkpoint, the build stage by stage,
# the sweeps point by point, the levers' statistics and SAEs from their files), so the script is simply run again
# after a kill. Meant for the background on the 2-core CPU machine:
#
#   nohup benchmarks/minicanvas/v2_chain.sh [PID_TO_WAIT_FOR] > build/v2_chain.log 2>&1 &
#
# PID_TO_WAIT_FOR: a training process already running on build/minicanvas_v2.work/model (two would refuse each
# other: the folder is locked). Nothing else should run beside it: two 2-thread jobs stall each other on 2 cores;
# pause it with `kill -STOP` / `kill -CONT` (of the running python) for a short measurement instead.
# Outputs (git-ignored, under build/): minicanvas_v2/ (the build: BUILD.json, gates.json, model, judges, SAEs,
# concept file), minicanvas_v2_sweep/ (the checkpoint with swept defaults), lever_token_v2_seed1.jsonl,
# lever_width_e64k16/ckpt and lever_both_ckpt (their concept files hold the levers' sweeps).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SAE=${SAE:-.venv/bin/saeuron}
OUT=build/minicanvas_v2
WORK=build/minicanvas_v2.work
CK=build/minicanvas_v2_sweep
MODEL="{\"caption_forms\": true, \"steps\": ${STEPS:-20000}}"
say() { echo "[v2 chain $(date -u +%H:%M:%S)] $*"; }

if [ -n "${1:-}" ]; then
  say "waiting for process $1"
  while kill -0 "$1" 2>/dev/null; do sleep 30; done
fi
say "training (resumes; returns at once when the ${STEPS:-20000} steps are done; the state: v2_sitting.sh)"
$PY -c "from saeuron.minicanvas.train_model import train_model; train_model('$WORK/model', 'cpu', seed=0, device='cpu', steps=${STEPS:-20000}, caption_forms=True, num_threads=2, progress=False)"
say "build"
$SAE minicanvas build --out "$OUT" --work "$WORK" --threads 2 --set "model=$MODEL" --set 'classifiers_from="shipped"'
if [ ! -f "$CK/concepts.json" ]; then
  rm -rf "$CK.tmp" && cp -r "$OUT/checkpoint" "$CK.tmp" && mv "$CK.tmp" "$CK"
fi
say "object sweep (tuning seed 1, the shipped build's all-style grid)"
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$CK" --domain object --seeds 1 \
  --hookpoints up_blocks.0.attentions.0 up_blocks.0.attentions.1 --thresholds 1 10 --top-ns 2 8 \
  --multipliers -20 -50 --batch-size 55
say "style sweep (tuning seed 1)"
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$CK" --domain style --seeds 1 \
  --hookpoints up_blocks.1.attentions.1 --thresholds 1 4 10 --top-ns 2 --multipliers -0.2 -1 -3 -10 --batch-size 55
say "token-score lever (issue 22), tuning seed 1, at each object's swept block and threshold"
DONE=$( [ -f build/lever_token_v2_seed1.jsonl ] && wc -l < build/lever_token_v2_seed1.jsonl || echo 0 )
if [ "$DONE" -lt 20 ]; then
  rm -f build/lever_token_v2_seed1.jsonl  # its statistics are cached beside it; the points are rescored
  THREADS=2 $PY benchmarks/minicanvas/lever_token_scores.py 1 circle,ring,hexagon,cross,arrow 2,8 -20,-50 1 \
    build/lever_token_v2_seed1.jsonl "$OUT/model" "$CK"
fi
say "width lever (issue 22): 8x8 SAEs with 4x the latents (expansion 64, k 16), the same object grid"
THREADS=2 $PY benchmarks/minicanvas/lever_width.py "$OUT" build/lever_width_e64k16 64 16 circle,ring,hexagon,cross,arrow
say "several-blocks lever (issue 22): each object also at both 8x8 blocks at once (the other points reused)"
BOTH=build/lever_both_ckpt
if [ ! -f "$BOTH/concepts.json" ]; then
  rm -rf "$BOTH.tmp" && cp -r "$CK" "$BOTH.tmp" && mv "$BOTH.tmp" "$BOTH"
fi
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$BOTH" --domain object --seeds 1 \
  --hookpoints up_blocks.0.attentions.0 up_blocks.0.attentions.1 up_blocks.0.attentions.0,up_blocks.0.attentions.1 \
  --thresholds 1 10 --top-ns 2 8 --multipliers -20 -50 --batch-size 55
say "all done"
