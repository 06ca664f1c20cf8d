#!/usr/bin/env bash
# Issue 21: finish the MiniCanvas v2 training, build it and ship it, in one background command that survives being
# run again in a later session:
#
#   mkdir -p build && nohup benchmarks/minicanvas/v2_chain.sh > build/v2_chain.log 2>&1 &
#
# 1. benchmarks/minicanvas/v2_sitting.sh: restore the committed training state, train until STEPS (default 20000) or
#    TIME_LIMIT seconds (default 9000), copy the state back into benchmarks/minicanvas/v2_train_state/. If the steps
#    are not done, the script stops there: commit that folder before the session ends and run it again next session.
# 2. the build's stages but the gates (collection 1 min, SAEs 4 min, concepts + detectors 3 min), then a copy of the
#    build (model, checkpoint, BUILD.json; about 15 MB) into the committed benchmarks/minicanvas/v2_build, and
#    detectors over every latent's top-k code (--latents 0; the build's are sparse) into
#    benchmarks/minicanvas/v2_eval/dense_det_ckpt, for v2_finish.sh's comparison (both need the build's activation
#    store, which dies with the session): commit both at once;
# 3. the gates stage (15-22 min), and gates.json into v2_build too. If the session ends first, the gates can be made
#    later from the committed model: `saeuron minicanvas gates --pipeline benchmarks/minicanvas/v2_build/model --out
#    benchmarks/minicanvas/v2_build/gates.json --threads 2`;
# 4. unless SHIP=0, benchmarks/minicanvas/v2_ship.sh: copy the build into saeuron/minicanvas/assets/ (refused when a
#    gate fails); run the asset tests (see v2_ship.sh) and commit saeuron/minicanvas/assets: from then on v2_finish.sh
#    (sweeps, SAeUron + UCE, probe_anchor, levers) reads it from there. With SHIP=0 (a session that has no time left
#    for the asset tests), ship later from the committed copy: OUT=benchmarks/minicanvas/v2_build v2_ship.sh.
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
keep() {  # copy the build's shippable parts into the committed $KEEP (swapped in whole)
  rm -rf "$KEEP.tmp" && mkdir -p "$KEEP.tmp"
  cp -r "$OUT/model" "$OUT/checkpoint" "$OUT/BUILD.json" "$KEEP.tmp"/
  [ ! -f "$OUT/gates.json" ] || cp "$OUT/gates.json" "$KEEP.tmp"/
  find "$KEEP.tmp" -name .saeuron.lock -delete
  rm -rf "$KEEP.old" && { [ ! -d "$KEEP" ] || mv "$KEEP" "$KEEP.old"; } && mv "$KEEP.tmp" "$KEEP" && rm -rf "$KEEP.old"
}
KEEP=benchmarks/minicanvas/v2_build
BUILD=($SAE minicanvas build --out "$OUT" --work "$WORK" --threads 2 --set "model=$MODEL" --set 'classifiers_from="shipped"')
say "build, every stage but the gates (nothing is built from them; about 8 min)"
"${BUILD[@]}" --stages classifiers model collect sae concepts
say "the build so far into $KEEP (committed: a build does not outlive the session in build/)"
keep
D=benchmarks/minicanvas/v2_eval/dense_det_ckpt
if [ ! -f "$D/detectors.json" ]; then
  say "every-latent detectors (--latents 0) beside the build's sparse ones, into $D (issue 22: compared in v2_finish.sh)"
  rm -rf "$D.tmp" && mkdir -p "$(dirname "$D")" && cp -r "$OUT/checkpoint" "$D.tmp"
  find "$D.tmp" -name .saeuron.lock -delete
  $PY - "$OUT" "$WORK/activations" "$D.tmp" <<'PYEOF'
import json, sys
from saeuron.detectors import fit_detectors
from saeuron.minicanvas.build import collect_forms, concept_prompts
from saeuron.store import ActivationStore
st = json.load(open(sys.argv[1] + "/BUILD.json"))["settings"]
det = fit_detectors(ActivationStore(sys.argv[2]), sys.argv[3], hookpoints=st["hookpoints"], latents=0, progress=False,
                    concepts=concept_prompts(st["collect_repeats"], collect_forms(st)))
print("every-latent detectors, lowest training accuracy:", det.metadata["train_accuracy_min_over_timesteps"])
PYEOF
  rm -rf "$D" && mv "$D.tmp" "$D"
fi
say "the gates (about 15-22 min)"
"${BUILD[@]}"
keep
say "the whole build is in $KEEP"
if [ "${SHIP:-1}" = 1 ]; then
  say "ship"
  benchmarks/minicanvas/v2_ship.sh
else
  say "not shipped (SHIP=0): later, OUT=$KEEP benchmarks/minicanvas/v2_ship.sh, the asset tests, commit"
fi
say "all done: commit benchmarks/minicanvas/v2_build, v2_eval (and, shipped, saeuron/minicanvas/assets) now"
