#!/usr/bin/env bash
# Issue 21's last measurement on the v2 build, then issue 22's levers: finish the tuning sweeps (seed 1; they resume
# point by point), evaluate SAeUron (the swept concept file) and UCE on the five protocol seeds with the damage
# measure, both domains (about 2 h of sampling on 2 threads; every run is cached in build/v2_compare and reused), then
# hold out issue 22's share-gated edit and probe_uncond on the same seeds (objects, about 30 min each), then hand over to v2_chain.sh for the
# levers (it skips what is done). Run in the background, alone on the 2 cores:
#
#   nohup benchmarks/minicanvas/v2_finish.sh > build/v2_finish.log 2>&1 &
#
# Kill and rerun it freely. Output: build/v2_compare/ (comparison.json/.md, per-run JSON, grids), build/v2_gate_eval/, build/v2_probe_eval/.
set -euo pipefail
cd "$(dirname "$0")/../.."
SAE=${SAE:-.venv/bin/saeuron}
OUT=build/minicanvas_v2
CK=build/minicanvas_v2_sweep
say() { echo "[v2 finish $(date -u +%H:%M:%S)] $*"; }
[ -f "$OUT/BUILD.json" ] || { echo "no v2 build at $OUT: run benchmarks/minicanvas/v2_chain.sh first" >&2; exit 1; }
if [ ! -f "$CK/concepts.json" ]; then
  rm -rf "$CK.tmp" && cp -r "$OUT/checkpoint" "$CK.tmp" && mv "$CK.tmp" "$CK"
fi
[ -f "$CK/detectors.json" ] || cp "$OUT/checkpoint"/detectors.* "$CK"/  # a sweep copy made before detectors existed
say "object sweep (tuning seed 1; resumes)"
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$CK" --domain object --seeds 1 \
  --hookpoints up_blocks.0.attentions.0 up_blocks.0.attentions.1 --thresholds 1 10 --top-ns 2 8 \
  --multipliers -20 -50 --batch-size 55
say "style sweep (tuning seed 1; resumes)"
OMP_NUM_THREADS=2 $SAE sweep --model "$OUT/model" --checkpoint "$CK" --domain style --seeds 1 \
  --hookpoints up_blocks.1.attentions.1 --thresholds 1 4 10 --top-ns 2 --multipliers -0.2 -1 -3 -10 --batch-size 55
say "SAeUron and UCE, 5 protocol seeds, both domains, damage measure (runs cached in build/v2_compare)"
OMP_NUM_THREADS=2 $SAE minicanvas compare --model "$OUT/model" --checkpoint "$CK" --methods saeuron uce \
  --seeds 188 288 588 688 888 --no-attack --out build/v2_compare --batch-size 55
say "the gated edit (issue 22; chosen on tuning seed 1) held out on the 5 protocol seeds, objects"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$OUT/model" --checkpoint "$OUT/checkpoint" --domain object \
  --seeds 188 288 588 688 888 --hookpoints up_blocks.0.attentions.0 up_blocks.0.attentions.1 --top-n 2 --threshold 3 \
  --mode gate_uncond --gate 0.5 --out build/v2_gate_eval --batch-size 55
say "probe_uncond (issue 22: the fitted detectors, chosen on tuning seed 1) held out on the 5 protocol seeds, objects"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$OUT/model" --checkpoint "$OUT/checkpoint" --domain object \
  --seeds 188 288 588 688 888 --hookpoints up_blocks.0.attentions.0 up_blocks.0.attentions.1 --mode probe_uncond \
  --out build/v2_probe_eval --batch-size 55
say "levers (v2_chain.sh; finished steps return at once)"
benchmarks/minicanvas/v2_chain.sh
say "all done"
