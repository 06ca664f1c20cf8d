"""Probe (issue 22): which transformer block carries the prompt's object and style into the image (causal tracing).

    python benchmarks/minicanvas/probe_block_tracing.py MODEL OUT.json [SEED]

For each hooked set of transformer blocks (each block alone, all down + mid, all up), every UNet call replaces the
conditional half of the block's output with the unconditional half's (the whole map: the prompt then never reaches
the image through that block), and the 110 training-form prompts of SEED (default 1) are generated and judged.
Reports the object and style accuracy of the judges per set (high accuracy: the prompt still gets through the
other blocks). Writes OUT.json with the command.
"""
import json
import sys
import time

import torch

from saeuron.evaluate.common import judge, sample_images
from saeuron.evaluate.unlearn_eval import build_jobs
from saeuron.minicanvas import data, defaults
from saeuron.minicanvas.model import load_pipeline

torch.set_num_threads(2)
if len(sys.argv) not in (3, 4):
    raise SystemExit(__doc__)
model, out = sys.argv[1], sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
pipe = load_pipeline(model)
pipe.set_progress_bar_config(disable=True)
judges = defaults.load_classifiers()
jobs = build_jobs(None, None, [seed], (0,))
blocks = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
sets = [[b] for b in blocks] + [[b for b in blocks if not b.startswith("up")], [b for b in blocks if b.startswith("up")],
                                blocks]


def to_uncond(m, a, o):
    x = o[0] if isinstance(o, tuple) else o.sample
    b = x.shape[0]
    y = x.clone()
    y[b // 2:] = x[: b // 2]
    return (y,) + tuple(o[1:]) if isinstance(o, tuple) else type(o)(sample=y)


rows = []
for s in [[]] + sets:
    t0 = time.time()
    hs = [pipe.unet.get_submodule(b).register_forward_hook(to_uncond) for b in s]
    try:
        imgs = sample_images(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], batch_size=55)
    finally:
        for h in hs:
            h.remove()
    p = judge(judges, imgs)
    obj = sum(int(o == j.object) for o, j in zip(p["pred_object"].tolist(), jobs)) / len(jobs)
    styled = [(s_, j) for s_, j in zip(p["pred_style"].tolist(), jobs) if j.style is not None]
    sty = sum(int(s_ == data.style_id(j.style)) for s_, j in styled) / len(styled)
    rows.append({"blocks": s or ["(none)"], "object_acc": obj, "style_acc": sty, "seconds": round(time.time() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)
json.dump({"command": "python benchmarks/minicanvas/probe_block_tracing.py " + " ".join(sys.argv[1:]), "seed": seed,
           "images_per_set": len(jobs), "rows": rows}, open(out, "w"), indent=1)
