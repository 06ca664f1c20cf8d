"""The built-in default (``make demo``): every stage of the method end to end, offline, on a small world.

Stages: build a small text-to-image pipeline from configs and save it; collect a UNet block's
activations over concept-labelled prompts; train a TopK SAE on them; compute per-concept statistics
and select features; unlearn one concept with ``saeuron.patch`` and write before/after grids plus a
metrics table saying how much the edit touched the target concept versus the others.

The pipeline has random weights (no weights can be downloaded here), so the pictures show *that*
and *where* the edit acts, not a recognisable concept vanishing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

HOOKPOINT = "up_blocks.1.attentions.1"
OBJECTS = ("cat", "dog", "car", "tree")
STYLES = ("photo", "cartoon", "sketch", "watercolor", "oil painting")


def concept_prompts() -> dict:
    """{object: ["An image of {object} in {style} style.", ...]} for the demo's concepts."""
    return {o: [f"An image of {o} in {s} style." for s in STYLES] for o in OBJECTS}


def _stage(name):
    print(f"\n== {name}", flush=True)
    return time.time()


def run_demo(out="demo_out", quick: bool = False) -> dict:
    """Run every stage into ``out`` and return the paths and metrics; prints where everything is."""
    from diffusers import StableDiffusionPipeline

    from .collect import collect
    from .concepts import build_concept_file
    from .generate import generate
    from .patch import patch
    from .store import ActivationStore
    from .toy import tiny_pipeline
    from .train import TrainConfig, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    steps = 4 if quick else 10
    prompts = concept_prompts()
    words = [p for ps in prompts.values() for p in ps]

    t = _stage("1/5 model: a small StableDiffusionPipeline built from configs, saved and reloaded")
    model_dir = out / "model"
    if not (model_dir / "model_index.json").is_file():
        tiny_pipeline(words=words, seed=0, unet_config=None).save_pretrained(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    print(f"   {model_dir} ({time.time() - t:.1f}s)")

    t = _stage(f"2/5 collect: {HOOKPOINT} over {len(words)} prompts x {steps} steps (conditional half)")
    store = collect(pipe, prompts, out / "activations", [HOOKPOINT], batch_size=5, num_inference_steps=steps,
                    guidance_scale=7.5, seed=0)
    print(f"   {store.num_rows(HOOKPOINT)} rows in {store.root} ({time.time() - t:.1f}s)")

    t = _stage("3/5 train: TopK SAE")
    ckpt = out / "checkpoint"
    d = store.d_in(HOOKPOINT)
    cfg = TrainConfig(k=4, num_latents=8 * d, batch_size=256, lr=2e-3, epochs=2 if quick else 6,
                      dead_tokens_threshold=50_000, save_every=10_000, batch_topk=True)
    sae = train(store, ckpt, HOOKPOINT, cfg)
    print(f"   FVU {sae.fvu(store.read_shard(HOOKPOINT, 0)['x'].float()):.3f}, saved to {ckpt / HOOKPOINT} "
          f"({time.time() - t:.1f}s)")

    t = _stage("4/5 select: per-concept, per-timestep statistics and features")
    table = build_concept_file(ActivationStore(store.root), ckpt, top_n=2, multiplier=-2.0)
    print(f"   concepts {table.names}; concept file in {ckpt} ({time.time() - t:.1f}s)")

    t = _stage("5/5 unlearn: patch the pipeline and generate before/after")
    target = OBJECTS[0]
    eval_prompts = [prompts[o][1] for o in OBJECTS]
    gen = generate(pipe, eval_prompts, out / "images", concepts=[target], checkpoint=ckpt, seeds=[188, 288],
                   num_inference_steps=steps, guidance_scale=7.5)
    metrics = _metrics(gen, eval_prompts, target)
    print(f"   grid: {gen['grid']} ({time.time() - t:.1f}s)")

    with patch(pipe, [target], checkpoint=ckpt):  # the context-manager form also works
        pass
    lines = ["| prompt | target? | mean abs pixel change |", "|---|---|---|"]
    for p, v in metrics["change"].items():
        lines.append(f"| {p} | {'yes' if target in p else 'no'} | {v:.4f} |")
    table_md = "\n".join(lines)
    (out / "metrics.md").write_text(table_md + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\n" + table_md)
    print(f"\nDone. Grid: {gen['grid']}\nMetrics: {out / 'metrics.md'}\nCheckpoint: {ckpt}")
    return {"grid": gen["grid"], "metrics": metrics, "checkpoint": str(ckpt)}


def _metrics(gen: dict, prompts, target) -> dict:
    """Mean absolute pixel change per prompt between original and unlearned images."""
    import numpy as np
    from PIL import Image

    change = {}
    for p in prompts:
        diffs = [np.abs(np.asarray(Image.open(a), dtype=np.float32) - np.asarray(Image.open(b), dtype=np.float32)).mean() / 255
                 for (pp, a, b) in gen["pairs"] if pp == p]
        change[p] = float(np.mean(diffs))
    return {"target": target, "change": change}
