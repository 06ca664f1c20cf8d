#!/usr/bin/env bash
# Issue 21's last measurement on the v2 build, then issue 22's: the tuning sweeps (seed 1; they resume point by point;
# scored over undamaged images), SAeUron (the swept concept file) and UCE on the five protocol seeds with the damage
# measure, both domains (about 2 h of sampling on 2 threads; every run is cached in build/v2_compare and reused), then
# issue 22's probe_anchor held out on the same seeds (objects; training form and the two held-out caption forms 1 and
# 2), five objects at once, and the styled-anchor lever on tuning seed 1; then v2_chain.sh's levers (it skips what is
# done). Run in the background, alone on the 2 cores, after v2_chain.sh has built the model (and v2_ship.sh shipped
# it, so the build is in git):
#
#   nohup benchmarks/minicanvas/v2_finish.sh > build/v2_finish.log 2>&1 &
#
# Kill and rerun it freely. Output: build/v2_compare/ (comparison.json/.md, per-run JSON, grids), build/v2_anchor_eval/,
# build/v2_anchor_multi5/, build/lever_probe_rerun/. Copy each table's JSON into benchmarks/minicanvas/ with its command.
set -euo pipefail
cd "$(dirname "$0")/../.."
SAE=${SAE:-.venv/bin/saeuron}
PY=${PY:-.venv/bin/python}
OUT=build/minicanvas_v2
CK=build/minicanvas_v2_sweep
SEEDS="188 288 588 688 888"
OBJ8="up_blocks.0.attentions.0 up_blocks.0.attentions.1"
say() { echo "[v2 finish $(date -u +%H:%M:%S)] $*"; }
[ -f "$OUT/BUILD.json" ] || { echo "no v2 build at $OUT: run benchmarks/minicanvas/v2_chain.sh first" >&2; exit 1; }
if [ ! -f "$CK/concepts.json" ]; then
  rm -rf "$CK.tmp" && cp -r "$OUT/checkpoint" "$CK.tmp" && mv "$CK.tmp" "$CK"
fi
say "object sweep (tuning seed 1; resumes)"
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$CK" --domain object --seeds 1 \
  --hookpoints $OBJ8 --thresholds 1 10 --top-ns 2 8 --multipliers -20 -50 --batch-size 55
say "style sweep (tuning seed 1; resumes)"
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$CK" --domain style --seeds 1 \
  --hookpoints up_blocks.1.attentions.1 --thresholds 1 4 10 --top-ns 2 --multipliers -0.2 -1 -3 -10 --batch-size 55
say "SAeUron (the method's scale edit, swept) and UCE, 5 protocol seeds, both domains, damage measure"
OMP_NUM_THREADS=2 $SAE minicanvas compare --model "$OUT/model" --checkpoint "$CK" --methods saeuron uce \
  --seeds $SEEDS --no-attack --out build/v2_compare --batch-size 55
say "probe_anchor (issue 22; gate 0.5 and the automatic anchor, chosen on seed 1) held out, objects, forms 0 1 2"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$OUT/model" --checkpoint "$CK" --domain object --seeds $SEEDS \
  --templates 0 1 2 --hookpoints $OBJ8 --mode probe_anchor --out build/v2_anchor_eval --batch-size 55
say "probe_anchor, 1..5 objects at once (seed 188)"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$OUT/model" --checkpoint "$CK" --domain object --seeds 188 \
  --hookpoints $OBJ8 --mode probe_anchor --multi 5 --out build/v2_anchor_multi5 --batch-size 55
say "styled-anchor lever (issue 22, tuning seed 1): the anchor names the image's style; the 16x16 block re-run too"
STYLED=1 HOOKS=up_blocks.0.attentions.0,up_blocks.0.attentions.1,up_blocks.1.attentions.1 \
  $PY benchmarks/minicanvas/lever_probe_rerun.py "$OUT/model" "$CK" build/lever_probe_rerun/styled_up11_seed1 1 \
  circle,ring,square,triangle,star,cross,heart,crescent,hexagon,arrow
say "levers (v2_chain.sh; finished steps return at once)"
benchmarks/minicanvas/v2_chain.sh
say "all done"
