"""Probe (issue 22): concept-supervised SAEs (``TrainConfig.concept_supervision``) at the 8x8 blocks of the shipped
MiniCanvas model, objects unlearned with their reserved latents, tuning seeds only.

    python benchmarks/minicanvas/lever_supervised.py WORK SEED HOOKPOINT OBJECTS MULTIPLIERS THRESHOLDS OUT.jsonl [LPC]
    python benchmarks/minicanvas/lever_supervised.py runs/sup 1 up_blocks.0.attentions.0 circle,ring -1,-5 1 out.jsonl

Collects the build's training prompts (form 0, 2 repeats, the cond half, fp16) at both 8x8 blocks into WORK/acts,
trains there the SAE of HOOKPOINT with the shipped build's settings plus concept supervision of the 10 objects (one
reserved latent each, or LPC), writes a concept file (objects + styles; objects take the reserved rule) into WORK/ckpt, and
scores each object x multiplier x threshold on SEED (UA / IRA / CRA over the 110 training-form prompts). Every step
resumes: finished stores, SAEs and concept files are reused.
"""
import json
import sys
import time
from pathlib import Path

import torch

from saeuron.collection import collect
from saeuron.concepts import ConceptTable
from saeuron.evaluate.common import judge, sample_images
from saeuron.evaluate.metrics import Record, target_metrics
from saeuron.evaluate.unlearn_eval import build_jobs
from saeuron.minicanvas import data, defaults
from saeuron.minicanvas.build import concept_prompts, training_prompts
from saeuron.patching import patched
from saeuron.sae import SparseAutoencoder
from saeuron.selection import build_concept_file
from saeuron.store import ActivationStore
from saeuron.trainer import TrainConfig, train

HPS = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
work, seed, hp = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
objects = sys.argv[4].split(",")
mults = [float(m) for m in sys.argv[5].split(",")]
thrs = [float(t) for t in sys.argv[6].split(",")]
out = Path(sys.argv[7])
lpc = int(sys.argv[8]) if len(sys.argv) > 8 else 1
torch.set_num_threads(1)
pipe = defaults.load_pipeline()
t0 = time.time()
if not (work / "acts" / "DONE").exists():
    collect(pipe, training_prompts(2), work / "acts", HPS, batch_size=22, halves="cond", seed=0, dtype="fp16")
    (work / "acts" / "DONE").write_text("ok")
store = ActivationStore(work / "acts")
print(f"store ready {time.time() - t0:.0f}s", flush=True)
objs = {o: p for o, p in concept_prompts().items() if o in data.OBJECTS}
for h in [hp]:  # only the block evaluated (the store holds both)
    if not (work / "ckpt" / h / "cfg.json").exists():
        tc = TrainConfig(seed=0, k=16, expansion_factor=16, batch_size=4096, lr=8e-4, epochs=4,
                         dead_tokens_threshold=1_000_000, save_every=250, concept_supervision=1.0,
                         latents_per_concept=lpc)
        sae = train(store, work / "sae_work", h, tc, device="cpu", concepts=objs)
        sae.cpu().save(work / "ckpt" / h)
        x = store.read_shard(h, 0)["x"].float()
        print(f"SAE {h}: FVU shard 0 {SparseAutoencoder.load(work / 'ckpt' / h).fvu(x):.4f} ({time.time() - t0:.0f}s)",
              flush=True)
if hp not in (ConceptTable.load(work / "ckpt").hookpoints if (work / "ckpt" / "concepts.json").exists() else []):
    build_concept_file(store, work / "ckpt", hookpoints=[h for h in HPS if (work / "ckpt" / h / "cfg.json").exists()], concepts=concept_prompts(), multiplier=-1.0,
                       percentile=None, top_n=5, reserved=True)
table = ConceptTable.load(work / "ckpt")
saes = {h: SparseAutoencoder.load(work / "ckpt" / h) for h in table.hookpoints}
clf = defaults.load_classifiers()
jobs = build_jobs(None, None, (seed,), (0,))
for o in objects:
    print(o, "reserved", {h: table.select(h, o)[:1] for h in table.hookpoints}, flush=True)
    for m in mults:
        for t in thrs:
            t1 = time.time()
            with patched(pipe, o, saes=saes, table=table, multiplier=m, threshold=t, hookpoints=[hp]):
                imgs = sample_images(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], batch_size=55)
            p = judge(clf, imgs)
            recs = [Record((o,), "object", j.object, j.style, int(a), int(b))
                    for j, a, b in zip(jobs, p["pred_object"].tolist(), p["pred_style"].tolist())]
            r = target_metrics(recs, (o,), "object")
            rec = {"seed": seed, "object": o, "hookpoint": hp, "latents_per_concept": lpc, "multiplier": m, "threshold": t, "ua": r["ua"],
                   "ira": r["ira"], "cra": r["cra"], "s": round(time.time() - t1, 1)}
            print(json.dumps(rec), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
