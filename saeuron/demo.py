"""The built-in default (``make demo``): every stage of the method end to end, offline.

With the shipped MiniCanvas defaults (``saeuron/minicanvas/assets``, made by ``saeuron minicanvas
build``) the demo

1. loads the trained MiniCanvas model, its classifiers and its SAE + concept file;
2. runs the method at small scale to show every stage works: collects a block's activations over a
   few concept-labelled prompts, trains an SAE briefly, computes statistics and selects features;
3. with the *shipped* SAE, unlearns one style and one object, writes before/after grids (PNG) and a
   UA/IRA/CRA table judged by the shipped classifiers, and prints where everything is.

Without the shipped defaults it runs the same stages on a small pipeline built from configs with
random weights (the pictures then show *where* the edit acts, not a concept vanishing).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

STYLE_TARGET, OBJECT_TARGET = "stripes", "triangle"


def _stage(name):
    print(f"\n== {name}", flush=True)
    return time.time()


def _small_scale(pipe, prompts: dict, hookpoint: str, out: Path, steps: int, quick: bool, guidance: float):
    """Stages collect -> train -> select on a handful of prompts; returns (store, checkpoint dir, table).

    They take seconds, so ``out`` is cleared first: a rerun after an upgrade (new sampling defaults, say)
    never resumes from activations or an SAE made by the old one."""
    from .collect import collect
    from .concepts import build_concept_file
    from .train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    flat = sorted({p for ps in prompts.values() for p in ps})
    t = _stage(f"collect: {hookpoint} over {len(flat)} prompts x {steps} steps (conditional half)")
    store = collect(pipe, flat, out / "activations", [hookpoint], batch_size=8, num_inference_steps=steps,
                    guidance_scale=guidance, seed=0)
    print(f"   {store.num_rows(hookpoint)} rows in {store.root} ({time.time() - t:.1f}s)")

    t = _stage("train: a TopK SAE, briefly")
    d = store.d_in(hookpoint)
    cfg = TrainConfig(k=8, num_latents=8 * d, batch_size=512, lr=2e-3, epochs=1 if quick else 3,
                      dead_tokens_threshold=100_000, save_every=10_000)
    ckpt = out / "checkpoint"
    sae = train(store, ckpt, hookpoint, cfg)
    print(f"   FVU {sae.fvu(store.read_shard(hookpoint, 0)['x'].float()):.3f}; saved to {ckpt / hookpoint} "
          f"({time.time() - t:.1f}s)")

    t = _stage("select: per-concept, per-timestep statistics and features")
    table = build_concept_file(store, ckpt, concepts=prompts, top_n=2, multiplier=-1.0)
    feats = table.select(hookpoint, table.names[0], top_n=2)
    print(f"   concepts {table.names}; {table.names[0]!r} selects features {feats[0].tolist()} at t="
          f"{table.timesteps[0]:.0f} ... ({time.time() - t:.1f}s)")
    return store, ckpt, table


def run_demo(out="demo_out", quick: bool = False) -> dict:
    """Run the demo into ``out``; returns paths and metrics and prints where everything is."""
    from .minicanvas import defaults

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if defaults.available():
        return _minicanvas_demo(out, quick)
    print(f"(the MiniCanvas defaults are not built: {defaults.assets_dir()} is incomplete; "
          f"running on a random toy pipeline instead. {defaults.BUILD_HINT})")
    return _toy_demo(out, quick)


def _minicanvas_demo(out: Path, quick: bool) -> dict:
    from .evaluate.unlearn_eval import evaluate_unlearning, markdown_table
    from .minicanvas import data, defaults
    from .minicanvas.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    t = _stage("1/3 load the shipped MiniCanvas model, classifiers, SAEs and concept file")
    pipe = defaults.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    judges = defaults.load_classifiers()
    ckpt = defaults.checkpoint_dir()
    from .concepts import ConceptTable

    table = ConceptTable.load(ckpt)
    hp = table.hookpoints[0]
    gates = defaults.gates() if (defaults.assets_dir() / "gates.json").exists() else {}
    print(f"   model {defaults.model_dir()}\n   checkpoint {ckpt} ({len(table.names)} concepts, hookpoints "
          f"{table.hookpoints}) ({time.time() - t:.1f}s)")
    for kind in ("heldout", "generated"):
        for judge, g in gates.get(kind, {}).items():
            print(f"   gate: {judge} classifier on {kind} images {100 * g['accuracy']:.1f}% (needs "
                  f"{100 * g['gate']:.0f}%: {'PASS' if g['pass'] else 'FAIL'})")

    steps = 8 if quick else 15
    objs, styles = list(data.OBJECTS[:3]), list(data.STYLES[:3])
    prompts = {o: [data.caption(o, s) for s in styles] for o in objs}
    prompts.update({s: [data.caption(o, s) for o in objs] for s in styles})
    _stage("2/3 the method at small scale (fresh activations, a briefly trained SAE, feature selection)")
    _small_scale(pipe, prompts, hp, out / "small_scale", steps, quick, DEFAULT_GUIDANCE)

    t = _stage(f"3/3 unlearn with the shipped SAEs (each concept at its own block): style {STYLE_TARGET!r} "
               f"and object {OBJECT_TARGET!r}")
    # the targets, their near neighbours (checker shares stripes' palette; ring/circle/hexagon are alike) and others
    eval_objs = [OBJECT_TARGET, "circle", "ring", "hexagon", "square"][:3 if quick else 5]
    eval_styles = [STYLE_TARGET, "checker", "dots", "gradient", "sketch"][:2 if quick else 5] + [None]
    results = {}
    for domain, target in (("style", STYLE_TARGET), ("object", OBJECT_TARGET)):
        results[domain] = evaluate_unlearning(
            pipe, judges, ckpt, targets=[target], domain=domain, seeds=(188,), objects=eval_objs,
            styles=eval_styles, num_inference_steps=DEFAULT_STEPS if not quick else 10, out_dir=out / f"unlearn_{domain}",
            grid_rows=6, progress=True)
    tables = "\n\n".join(f"### unlearning the {d} {t!r}\n\n{markdown_table(results[d])}"
                         for d, t in (("style", STYLE_TARGET), ("object", OBJECT_TARGET)))
    (out / "metrics.md").write_text(tables + "\n")
    grids = [results[d]["per_target"][t]["grid"] for d, t in (("style", STYLE_TARGET), ("object", OBJECT_TARGET))]
    print("\n" + tables)
    print(f"\nDone in {time.time() - t:.0f}s.\nGrids (original | unlearned):\n  " + "\n  ".join(grids)
          + f"\nMetrics: {out / 'metrics.md'}")
    return {"grids": grids, "metrics": str(out / "metrics.md"), "results": results}


def _toy_demo(out: Path, quick: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    from .generate import generate
    from .toy import tiny_pipeline

    objects, styles = ("cat", "dog", "car", "tree"), ("photo", "cartoon", "sketch", "watercolor")
    prompts = {o: [f"An image of {o} in {s} style." for s in styles] for o in objects}
    words = [p for ps in prompts.values() for p in ps]
    t = _stage("1/3 model: a small StableDiffusionPipeline built from configs, saved and reloaded")
    model_dir = out / "model"
    if not (model_dir / "model_index.json").is_file():
        tiny_pipeline(words=words, seed=0).save_pretrained(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    print(f"   {model_dir} ({time.time() - t:.1f}s)")

    _stage("2/3 the method: collect, train, select")
    hp = "up_blocks.1.attentions.1"
    _, ckpt, _ = _small_scale(pipe, prompts, hp, out, 4 if quick else 10, quick, 7.5)

    t = _stage(f"3/3 unlearn {objects[0]!r}: generate before/after")
    eval_prompts = [prompts[o][1] for o in objects]
    gen = generate(pipe, eval_prompts, out / "images", concepts=[objects[0]], checkpoint=ckpt, seeds=[188, 288],
                   num_inference_steps=4 if quick else 10, guidance_scale=7.5)
    import numpy as np
    from PIL import Image

    rows = ["| prompt | holds the target | mean abs pixel change |", "|---|---|---|"]
    for p in eval_prompts:
        diffs = [np.abs(np.asarray(Image.open(a), np.float32) - np.asarray(Image.open(b), np.float32)).mean() / 255
                 for (pp, a, b) in gen["pairs"] if pp == p]
        rows.append(f"| {p} | {'yes' if objects[0] in p else 'no'} | {float(np.mean(diffs)):.4f} |")
    (out / "metrics.md").write_text("\n".join(rows) + "\n")
    print("\n" + "\n".join(rows))
    print(f"\nDone ({time.time() - t:.0f}s). Grid: {gen['grid']}\nMetrics: {out / 'metrics.md'}")
    return {"grids": [gen["grid"]], "metrics": str(out / "metrics.md")}
