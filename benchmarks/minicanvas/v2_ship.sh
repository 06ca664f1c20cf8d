#!/usr/bin/env bash
# Ship the MiniCanvas v2 build as the package's defaults (issue 21): copy build/minicanvas_v2/{model, classifiers,
# gates.json, BUILD.json} and a checkpoint (the swept one, build/minicanvas_v2_sweep, when it exists, else the build's
# own) into saeuron/minicanvas/assets/, replacing what is there (OUT: another build folder; when build/minicanvas_v2
# is gone, the committed copy v2_chain.sh keeps, benchmarks/minicanvas/v2_build, which holds no classifiers: the v2
# build takes the shipped judges). Each part is copied beside its target and swapped in,
# so an interrupted copy leaves the old part whole. Then commit saeuron/minicanvas/assets (the build lives in git from
# then on: build/ does not survive a fresh checkout) and check the asset-reading tests:
#
#   benchmarks/minicanvas/v2_ship.sh && TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_compare.py \
#     tests/test_damage.py tests/test_demo.py tests/test_demo_damage.py tests/test_minicanvas_model.py
#
# CHECKPOINT=DIR ships another checkpoint (SAE folders + concept file + detectors). CHECKPOINT_ONLY=1 ships only
# that checkpoint (e.g. the swept one of v2_finish.sh, benchmarks/minicanvas/v2_eval/sweep_ckpt, in a later session
# when build/ is gone); its SAEs must be the shipped ones (byte for byte), so it fits the shipped model.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/minicanvas_v2}
[ -f "$OUT/BUILD.json" ] || [ ! -f benchmarks/minicanvas/v2_build/BUILD.json ] || OUT=benchmarks/minicanvas/v2_build
CK=${CHECKPOINT:-build/minicanvas_v2_sweep}
[ -f "$CK/concepts.json" ] || CK="$OUT/checkpoint"
ASSETS=saeuron/minicanvas/assets
say() { echo "[v2 ship $(date -u +%H:%M:%S)] $*"; }
swap() {  # swap SRC into DST (a file or a folder) through DST.new
  rm -rf "$2.new" && cp -r "$1" "$2.new" && rm -rf "$2.old" && { [ ! -e "$2" ] || mv "$2" "$2.old"; } \
    && mv "$2.new" "$2" && rm -rf "$2.old"
}
if [ -n "${CHECKPOINT_ONLY:-}" ]; then
  [ -f "$CK/concepts.json" ] && [ -f "$CK/detectors.json" ] || { echo "v2 ship: $CK holds no concept file + detectors" >&2; exit 1; }
  for sae in "$ASSETS"/checkpoint/*/; do
    h=$(basename "$sae")
    for f in "$sae"*; do
      cmp -s "$f" "$CK/$h/$(basename "$f")" || { echo "v2 ship: $CK/$h/$(basename "$f") differs from the shipped SAE; not shipping" >&2; exit 1; }
    done
  done
  say "checkpoint only, from $CK"
  swap "$CK" "$ASSETS/checkpoint"
  find "$ASSETS" -name .saeuron.lock -delete
  say "done: commit $ASSETS"
  exit 0
fi
for need in "$OUT/BUILD.json" "$OUT/gates.json" "$OUT/model/model_index.json" "$CK/concepts.json" "$CK/detectors.json"; do
  [ -e "$need" ] || { echo "v2 ship: $need is missing; finish the build (v2_chain.sh) first" >&2; exit 1; }
done
grep -q '"pass": false' "$OUT/gates.json" && { echo "v2 ship: a gate in $OUT/gates.json fails; not shipping" >&2; exit 1; }
say "model, classifiers, gates.json, BUILD.json from $OUT; checkpoint from $CK"
swap "$OUT/model" "$ASSETS/model"
[ ! -d "$OUT/classifiers" ] || swap "$OUT/classifiers" "$ASSETS/classifiers"  # the v2 build takes the shipped judges
swap "$CK" "$ASSETS/checkpoint"
rm -f "$ASSETS/checkpoint/.saeuron.lock"
swap "$OUT/gates.json" "$ASSETS/gates.json"
swap "$OUT/BUILD.json" "$ASSETS/BUILD.json"
find "$ASSETS" -name .saeuron.lock -delete
du -sh "$ASSETS"
say "done: commit $ASSETS, run the asset tests and \`make demo\`, look at the grids, update README's figures"
