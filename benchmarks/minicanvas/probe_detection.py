"""Probe (issue 22): where a concept's selected features fire, as the share of a block's tokens they are detected on.

    python benchmarks/minicanvas/probe_detection.py MODEL CKPT HOOKPOINTS CONCEPT TOP_N THRESHOLD [POWER STATS]
    python benchmarks/minicanvas/probe_detection.py build/minicanvas_v2/model build/minicanvas_v2/checkpoint \\
        up_blocks.0.attentions.0,up_blocks.0.attentions.1 circle 2 3

Generates 4 prompts of seed 1 (circle in stripes, ring in stripes, square in dots, circle in dots; 25 steps, the
model's guidance) and at every UNet call applies the detection of ``saeuron.replace`` (the method's firing rule:
top-k member and ``f > THRESHOLD * tau``) for CONCEPT's top-n features per timestep at each hookpoint to the block's
output, both CFG halves. Prints the detected share per image, mean over steps 6-24, uncond half then cond half.
With POWER and STATS (a ``lever_token_scores.py`` statistics cache, ``OUT.stats.pt``), the features are selected by
the token-weighted scores of that power instead (tau stays the checkpoint's).
"""
import sys
from pathlib import Path

import torch

from saeuron import replace
from saeuron.concepts import ConceptTable
from saeuron.minicanvas.model import load_pipeline
from saeuron.sae import SparseAutoencoder, resolve_hookpoint_dir

PROMPTS = ["An image of circle in stripes style.", "An image of ring in stripes style.",
           "An image of square in dots style.", "An image of circle in dots style."]

if len(sys.argv) not in (7, 9):
    raise SystemExit(__doc__)
model, ck, hps, concept, top_n, thr = sys.argv[1:7]
ck, top_n, thr = Path(ck), int(top_n), float(thr)
torch.set_num_threads(2)
pipe = load_pipeline(model)
pipe.set_progress_bar_config(disable=True)
table = ConceptTable.load(ck)
pick = table
if len(sys.argv) == 9:
    stats = torch.load(sys.argv[8])[float(sys.argv[7])]
    pick = ConceptTable(table.names, table.counts, table.timesteps, {h: stats[h] for h in stats})
for hp in hps.split(","):
    sae = SparseAutoencoder.load(resolve_hookpoint_dir(ck, hp))
    ts, fi, ta, _ = pick.edit_tables(hp, [concept], None, None, top_n, thr)
    base = table.mu[table.stored_hookpoint(hp)].float().mean(0)  # the checkpoint's tau_t, [T, M]
    ta = torch.where(torch.isfinite(ta), thr * base.gather(1, fi.clamp(min=0)), ta)
    zero = replace.detection_scale(ta)
    W = sae.weights_for(torch.device("cpu"), torch.float32)
    state, res = {}, []

    def pre(m, a, kw):
        state["t"] = float(a[1] if len(a) > 1 else kw["timestep"])

    def post(m, a, o):
        x = o[0] if isinstance(o, tuple) else o.sample
        i = int((ts - state["t"]).abs().argmin())
        hit = replace.detect(x, W, sae.cfg.k, fi[i], ta[i], zero[i], x[0, 0].numel() * x.shape[0])
        res.append(hit.float().mean((1, 2)))
    h1 = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.unet.get_submodule(hp).register_forward_hook(post)
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=25, generator=[torch.Generator().manual_seed(1) for _ in PROMPTS],
             output_type="pt")
    h1.remove()
    h2.remove()
    r = torch.stack(res)[6:].mean(0)
    n = len(PROMPTS)
    print(f"{hp} {concept} top-{top_n} tau x{thr:g}: uncond {[round(v, 2) for v in r[:n].tolist()]} "
          f"cond {[round(v, 2) for v in r[n:].tolist()]}", flush=True)
