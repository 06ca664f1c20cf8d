#!/usr/bin/env bash
# Issue 21's last measurement on the shipped v2 build, then issue 22's, in priority order: the tuning sweeps (seed 1;
# scored over undamaged images), probe_anchor on seed 1 with sparse and every-latent detectors, SAeUron (the swept
# concept file) and UCE on the five protocol seeds with the damage
# measure, both domains; probe_anchor held out (objects; the training caption form and the held-out forms 1 and 2);
# five objects at once; probe_anchor as the objects' default under the attack with its control; styles in the
# detector modes on seed 1; the early-swap and
# styled-anchor levers on tuning seed 1; then the older levers (token-weighted scores, both
# 8x8 blocks at once). Run it in the background, alone on the 2 cores, once v2_chain.sh has shipped the build into
# saeuron/minicanvas/assets (it reads the model and checkpoint from there, not from build/):
#
#   mkdir -p build && nohup benchmarks/minicanvas/v2_finish.sh > build/v2_finish.log 2>&1 &
#
# Everything it writes lives in benchmarks/minicanvas/v2_eval/ (EVAL), which is committed: the work takes several
# sessions, and build/ does not survive a fresh checkout. Every step resumes (the sweeps point by point from the
# concept file in EVAL/sweep_ckpt, the evaluations run by run from their caches), so kill it freely and, BEFORE THE
# SESSION ENDS, stop it (kill the process group) and commit EVAL: `git add benchmarks/minicanvas/v2_eval && git commit`.
# Files are written atomically, so a commit never holds half a file; *.tmp files and locks are git-ignored.
# When the sweeps are done, `CHECKPOINT_ONLY=1 CHECKPOINT=EVAL/sweep_ckpt benchmarks/minicanvas/v2_ship.sh` ships
# the swept concept file as the package default. Copy each table's JSON into benchmarks/minicanvas/ with its command.
set -euo pipefail
cd "$(dirname "$0")/../.."
SAE=${SAE:-.venv/bin/saeuron}
PY=${PY:-.venv/bin/python}
ASSETS=${ASSETS:-saeuron/minicanvas/assets}
EVAL=${EVAL:-benchmarks/minicanvas/v2_eval}
MODEL=$ASSETS/model
CK=$EVAL/sweep_ckpt
SEEDS="188 288 588 688 888"
OBJ8="up_blocks.0.attentions.0 up_blocks.0.attentions.1"
say() { echo "[v2 finish $(date -u +%H:%M:%S)] $*"; }
$PY - "$ASSETS" <<'PYEOF' || exit 1
import json, sys
from pathlib import Path
info = json.loads((Path(sys.argv[1]) / "model" / "minicanvas.json").read_text())
if not info.get("hparams", {}).get("caption_forms"):
    sys.exit(f"v2 finish: {sys.argv[1]} holds a model trained without caption forms (the v1 build): "
             "ship the v2 build first (benchmarks/minicanvas/v2_chain.sh)")
PYEOF
mkdir -p "$EVAL"
if [ ! -f "$CK/concepts.json" ]; then
  rm -rf "$CK.tmp" && cp -r "$ASSETS/checkpoint" "$CK.tmp" && mv "$CK.tmp" "$CK"
fi
say "object sweep (tuning seed 1; resumes)"
OMP_NUM_THREADS=2 $SAE sweep --model "$MODEL" --checkpoint "$CK" --domain object --seeds 1 \
  --hookpoints $OBJ8 --thresholds 1 10 --top-ns 2 8 --multipliers -20 -50 --batch-size 55
say "style sweep (tuning seed 1; resumes)"
OMP_NUM_THREADS=2 $SAE sweep --model "$MODEL" --checkpoint "$CK" --domain style --seeds 1 \
  --hookpoints up_blocks.1.attentions.1 --thresholds 1 4 10 --top-ns 2 --multipliers -0.2 -1 -3 -10 --batch-size 55
say "probe_anchor on tuning seed 1 with the shipped sparse detectors and with every-latent ones (issue 22's cost)"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$MODEL" --checkpoint "$CK" --domain object --seeds 1 \
  --hookpoints $OBJ8 --mode probe_anchor --out "$EVAL/anchor_seed1" --batch-size 55
if [ -f "$EVAL/dense_det_ckpt/detectors.json" ]; then
  OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$MODEL" --checkpoint "$EVAL/dense_det_ckpt" --domain object \
    --seeds 1 --hookpoints $OBJ8 --mode probe_anchor --out "$EVAL/anchor_seed1_dense" --batch-size 55
fi
say "SAeUron (the method's scale edit, swept) and UCE, 5 protocol seeds, both domains, damage measure"
OMP_NUM_THREADS=2 $SAE minicanvas compare --model "$MODEL" --checkpoint "$CK" --methods saeuron uce \
  --seeds $SEEDS --no-attack --out "$EVAL/compare" --batch-size 55
say "probe_anchor (issue 22; gate 0.5 and the automatic anchor, chosen on seed 1) held out, objects, forms 0 1 2"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$MODEL" --checkpoint "$CK" --domain object --seeds $SEEDS \
  --templates 0 1 2 --hookpoints $OBJ8 --mode probe_anchor --out "$EVAL/anchor_eval" --batch-size 55
say "probe_anchor, 1..5 objects at once (seed 188)"
OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$MODEL" --checkpoint "$CK" --domain object --seeds 188 \
  --hookpoints $OBJ8 --mode probe_anchor --multi 5 --out "$EVAL/anchor_multi5" --batch-size 55
say "probe_anchor as the objects' default mode (a one-point sweep on tuning seed 1 stores it in a copy of the file)"
AK=$EVAL/anchor_ckpt
if [ ! -f "$AK/concepts.json" ]; then
  rm -rf "$AK.tmp" && cp -r "$CK" "$AK.tmp" && mv "$AK.tmp" "$AK"
fi
OMP_NUM_THREADS=2 $SAE sweep --model "$MODEL" --checkpoint "$AK" --domain object --seeds 1 --mode probe_anchor \
  --hookpoints up_blocks.0.attentions.0,up_blocks.0.attentions.1 --thresholds 1 --top-ns 2 --multipliers -20 \
  --batch-size 55
say "SAeUron with probe_anchor objects under the attack, with its control (seed 188, 5 attacked prompts per target)"
OMP_NUM_THREADS=2 $SAE minicanvas compare --model "$MODEL" --checkpoint "$AK" --methods saeuron --style-targets \
  --seeds 188 --attack-prompts 5 --out "$EVAL/anchor_attack" --batch-size 55
say "styles in the detector modes (issue 22's style bars), tuning seed 1, at the 16x16 block that carries style"
for m in probe_uncond probe_anchor; do
  OMP_NUM_THREADS=2 $SAE minicanvas eval --model "$MODEL" --checkpoint "$CK" --domain style --seeds 1 \
    --hookpoints up_blocks.1.attentions.1 --mode $m --out "$EVAL/style_${m}_seed1" --batch-size 55
done
say "early-swap lever (issue 22, tuning seed 1): flagged images get the anchor's text in the whole UNet early on"
THREADS=2 $PY benchmarks/minicanvas/lever_anchor_early.py "$MODEL" "$CK" "$EVAL/lever_anchor_early" 1 \
  circle,ring,square,triangle,star,cross,heart,crescent,hexagon,arrow 1000,700,400
say "styled-anchor lever (issue 22, tuning seed 1): the anchor names the image's style; the 16x16 block re-run too"
STYLED=1 HOOKS=up_blocks.0.attentions.0,up_blocks.0.attentions.1,up_blocks.1.attentions.1 \
  $PY benchmarks/minicanvas/lever_probe_rerun.py "$MODEL" "$CK" "$EVAL/lever_probe_rerun/styled_up11_seed1" 1 \
  circle,ring,square,triangle,star,cross,heart,crescent,hexagon,arrow
say "token-score lever (issue 22), tuning seed 1, at each object's swept block and threshold"
DONE=$( [ -f "$EVAL/lever_token_seed1.jsonl" ] && wc -l < "$EVAL/lever_token_seed1.jsonl" || echo 0 )
if [ "$DONE" -lt 20 ]; then
  rm -f "$EVAL/lever_token_seed1.jsonl"  # its statistics are cached beside it; the points are rescored
  THREADS=2 $PY benchmarks/minicanvas/lever_token_scores.py 1 circle,ring,hexagon,cross,arrow 2,8 -20,-50 1 \
    "$EVAL/lever_token_seed1.jsonl" "$MODEL" "$CK"
fi
say "several-blocks lever (issue 22): each object also at both 8x8 blocks at once (the other points reused)"
BOTH=$EVAL/lever_both_ckpt
if [ ! -f "$BOTH/concepts.json" ]; then
  rm -rf "$BOTH.tmp" && cp -r "$CK" "$BOTH.tmp" && mv "$BOTH.tmp" "$BOTH"
fi
OMP_NUM_THREADS=2 $SAE sweep --model "$MODEL" --checkpoint "$BOTH" --domain object --seeds 1 \
  --hookpoints up_blocks.0.attentions.0 up_blocks.0.attentions.1 up_blocks.0.attentions.0,up_blocks.0.attentions.1 \
  --thresholds 1 10 --top-ns 2 8 --multipliers -20 -50 --batch-size 55
say "all done (the width lever, lever_width.py, needs a build's activation store: run it in a session that built)"
