"""Probe (issue 22): SAE width and k at the 8x8 blocks, on a MiniCanvas build, tuning seeds only.

    python benchmarks/minicanvas/lever_width.py BUILD WORK EXPANSION K OBJECTS [SEED]
    python benchmarks/minicanvas/lever_width.py build/minicanvas_v2 build/lever_width_e64k16 64 16 circle,ring,hexagon,cross,arrow

Trains, on the build's own activation store (``BUILD.work/activations``), one SAE per 8x8 up-block transformer with
the build's SAE settings except ``expansion_factor`` = EXPANSION and ``k`` = K, into ``WORK/ckpt``; writes the concept
file over the build's concept prompts (the collect stage's, caption forms included when the build used them); then
sweeps OBJECTS on SEED (default 1) over the grid of ``benchmarks/minicanvas/v2_chain.sh`` (both 8x8 blocks,
thresholds 1 and 10, top-n 2 and 8, multipliers -20 and -50), so each object's best point and every grid point
compare one to one with the build's own sweep (``build/minicanvas_v2_sweep``). The sweep record is in
``WORK/ckpt/concepts.json`` (``metadata.sweep``); a summary line per object is printed. Every step resumes.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron.concepts import ConceptTable
from saeuron.evaluate.sweep import sweep
from saeuron.minicanvas import defaults
from saeuron.minicanvas.build import collect_forms, concept_prompts
from saeuron.minicanvas.model import load_pipeline
from saeuron.sae import SparseAutoencoder
from saeuron.selection import build_concept_file
from saeuron.store import ActivationStore
from saeuron.trainer import TrainConfig, train

BLOCKS_8X8 = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
build, work = Path(sys.argv[1]), Path(sys.argv[2])
expansion, k = int(sys.argv[3]), int(sys.argv[4])
objects = sys.argv[5].split(",")
seed = int(sys.argv[6]) if len(sys.argv) > 6 else 1
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
record = json.loads((build / "BUILD.json").read_text())
st = record["settings"]
store = ActivationStore(build.with_name(build.name + ".work") / "activations")
BLOCKS_8X8 = [h for h in BLOCKS_8X8 if h in store.hookpoints]
prompts = concept_prompts(st["collect_repeats"], collect_forms(st))
t0 = time.time()
ck = work / "ckpt"
for hp in BLOCKS_8X8:
    if not (ck / hp / "cfg.json").exists():
        tc = TrainConfig(seed=record["seed"], **{**st["sae"], "expansion_factor": expansion, "k": k})
        sae = train(store, work / "sae_work", hp, tc, device="cpu")
        sae.cpu().save(ck / hp)
        x = store.read_shard(hp, 0)["x"].float()
        print(f"SAE {hp}: {sae.num_latents} latents, k {k}, FVU on shard 0 "
              f"{SparseAutoencoder.load(ck / hp).fvu(x):.4f} ({time.time() - t0:.0f}s)", flush=True)
if not (ck / "concepts.json").exists():
    build_concept_file(store, ck, hookpoints=BLOCKS_8X8, concepts=prompts, multiplier=st["multiplier"],
                       percentile=None, top_n=st["top_n"])
pipe = load_pipeline(build / "model")
res = sweep(pipe, defaults.load_classifiers(), ck, domain="object", concepts=objects, seeds=(seed,), rule="top_n",
            top_ns=(2, 8), multipliers=(-20, -50), thresholds=(1, 10), hookpoints=BLOCKS_8X8, batch_size=55)
for o, r in res.items():
    b = r["best"]
    print(json.dumps({"object": o, "expansion": expansion, "k": k, "best": b}), flush=True)
