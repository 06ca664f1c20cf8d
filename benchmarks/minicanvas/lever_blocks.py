"""Probe (issue 22): SAEs and concept statistics at other blocks of a MiniCanvas build (e.g. the down and mid blocks,
which the build does not hook), for the edit-mode probes (``lever_replace_modes.py``) to use as a checkpoint.

    python benchmarks/minicanvas/lever_blocks.py BUILD WORK HOOKPOINTS
    python benchmarks/minicanvas/lever_blocks.py build/minicanvas_v2 build/lever_blocks_down \\
        down_blocks.1.attentions.0,down_blocks.2.attentions.0,mid_block.attentions.0

Collects the build's own training prompts (its collect settings: repeats, caption forms, steps, guidance, cond half,
dtype, seed) at HOOKPOINTS into ``WORK/activations``, trains one SAE per hookpoint with the build's SAE settings into
``WORK/ckpt/<hookpoint>`` and writes the concept file there (the build's top-n default rule). Every step resumes:
a finished store, SAE or concept file is kept. Prints each SAE's FVU on shard 0 and the times.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron.collection import collect
from saeuron.minicanvas.build import collect_forms, concept_prompts, training_prompts
from saeuron.minicanvas.model import load_pipeline
from saeuron.sae import SparseAutoencoder
from saeuron.selection import build_concept_file
from saeuron.store import ActivationStore
from saeuron.trainer import TrainConfig, train

if len(sys.argv) != 4:
    raise SystemExit(__doc__)
build, work, hps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
record = json.loads((build / "BUILD.json").read_text())
st = record["settings"]
t0 = time.time()
acts = work / "activations"
if not (acts / "DONE").exists():
    pipe = load_pipeline(build / "model")
    collect(pipe, training_prompts(st["collect_repeats"], collect_forms(st)), acts, hps, batch_size=st["collect_batch"],
            num_inference_steps=st["sample_steps"], guidance_scale=st["guidance"], halves="cond", seed=record["seed"],
            dtype=st["collect_dtype"], progress=False)
    (acts / "DONE").write_text("collected\n")
    print(f"collected {hps} in {time.time() - t0:.0f}s", flush=True)
store = ActivationStore(acts)
ck = work / "ckpt"
for hp in hps:
    if not (ck / hp / "cfg.json").exists():
        sae = train(store, work / "sae_work", hp, TrainConfig(seed=record["seed"], **st["sae"]), device="cpu")
        sae.cpu().save(ck / hp)
    x = store.read_shard(hp, 0)["x"].float()
    print(f"SAE {hp}: FVU on shard 0 {SparseAutoencoder.load(ck / hp).fvu(x):.4f} ({time.time() - t0:.0f}s)", flush=True)
if not (ck / "concepts.json").exists():
    build_concept_file(store, ck, hookpoints=hps, concepts=concept_prompts(st["collect_repeats"], collect_forms(st)),
                       multiplier=st["multiplier"], percentile=None, top_n=st["top_n"])
    print(f"concept file in {time.time() - t0:.0f}s", flush=True)
