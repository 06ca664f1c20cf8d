"""The built-in default (``make demo``): every stage of the method end to end, offline.

With the shipped MiniCanvas defaults (``saeuron/minicanvas/assets``, made by ``saeuron minicanvas
build``) the demo

1. loads the trained MiniCanvas model, its classifiers and its SAE + concept file;
2. runs the method at small scale to show every stage works: collects a block's activations over a
   few concept-labelled prompts, trains an SAE briefly, computes statistics and selects features;
3. with the *shipped* SAE, unlearns one style and one object, writes before/after grids (PNG) and a
   UA/IRA/CRA table judged by the shipped classifiers, with the damage measure (:mod:`.evaluate.damage`,
   calibrated on the unedited model's own images of every training prompt, as ``saeuron minicanvas eval``
   calibrates): the damaged share of the target and of the kept images and UA counting only undamaged
   images; the reading never calls a concept removed when its images are damaged. It prints where
   everything is.

Without the shipped defaults it runs the same stages on a small pipeline built from configs with
random weights (the pictures then show *where* the edit acts, not a concept vanishing).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .utils import locks_folder

STYLE_TARGET, OBJECT_TARGET = "mosaic", "crescent"


def _stage(name):
    print(f"\n== {name}", flush=True)
    return time.time()


def _small_scale(pipe, prompts: dict, hookpoint: str, out: Path, steps: int, quick: bool, guidance: float):
    """Stages collect -> train -> select on a handful of prompts; returns (store, checkpoint dir, table).

    They take seconds, so ``out`` is cleared first: a rerun after an upgrade (new sampling defaults, say)
    never resumes from activations or an SAE made by the old one."""
    from .collection import collect
    from .selection import build_concept_file
    from .trainer import TrainConfig, train

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
    fvu = sae.fvu(store.read_shard(hookpoint, 0)["x"].float())
    print(f"   FVU {fvu:.3f} on the first shard with per-token top-{cfg.k}, as the edit encodes (the bar's fvu is "
          f"the training loss on batches, BatchTopK); saved to {ckpt / hookpoint} ({time.time() - t:.1f}s)")

    t = _stage("select: per-concept, per-timestep statistics and features")
    table = build_concept_file(store, ckpt, concepts=prompts, top_n=2, multiplier=-1.0)
    feats = table.select(hookpoint, table.names[0], top_n=2)
    print(f"   concepts {table.names}; {table.names[0]!r} selects features {feats[0].tolist()} at t="
          f"{table.timesteps[0]:.0f} ... ({time.time() - t:.1f}s)")
    return store, ckpt, table


@locks_folder("out", "running the demo into")
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


# (domain, target, kept concepts of the same domain, the other domain's values that make the grid's rows).
# Chosen among the targets the five-seed evaluation (benchmarks/RESULTS.md) removes cleanly, so the grid shows
# what the method does when it works; the legend and the reading say what the numbers over these images are.
DEMO_CASES = (("style", STYLE_TARGET, ("dots", "sketch"), ("circle", "square", "star", "heart")),
              ("object", OBJECT_TARGET, ("circle", "star"), (None, "dots", "sketch", "gradient")))
LEGEND = ("UA (unlearning accuracy): share of the target's images in which the judge no longer sees the target; "
          "IRA (in-domain retain accuracy): share of the kept concepts' images still judged correctly; "
          "CRA (cross-domain retain accuracy): share of all edited images whose other attribute (the object when a "
          "style is unlearned, and the reverse) is still judged correctly; kept change: mean absolute pixel change "
          "of the kept images, in % of the pixel range (0 = untouched); damaged target / kept: share of the target's "
          "/ the kept concepts' images that are no clean picture of what they should still show (saeuron.evaluate."
          "damage, calibrated on the unedited model's images); UA undamaged: UA counting an image as unlearned only "
          "if it is undamaged. Judges: the shipped MiniCanvas classifiers.")
CALIBRATION_SEED = 188  # the demo's damage measure is calibrated on the unedited images of every training prompt here


def fit_demo_damage(pipe, judges, steps: int):
    """The demo's damage measure: calibrated on the unedited model's images of every training-form prompt (seed
    ``CALIBRATION_SEED``, ``steps`` steps), as ``saeuron minicanvas eval`` calibrates on its unedited images."""
    from .evaluate.common import judge, sample_images
    from .evaluate.damage import fit_damage_measure
    from .minicanvas import data

    pairs = [(o, s) for s in list(data.STYLES) + [None] for o in data.OBJECTS]
    images = sample_images(pipe, [data.caption(o, s) for o, s in pairs], [CALIBRATION_SEED] * len(pairs),
                           num_inference_steps=steps, batch_size=len(pairs))
    return fit_damage_measure(judges, {**judge(judges, images), "objects": [o for o, _ in pairs],
                                       "styles": [s for _, s in pairs],
                                       "source": f"unedited model, training form, seed {CALIBRATION_SEED}"})


def _unlearn_case(pipe, judges, ckpt, case, out: Path, steps: int, damage=None) -> dict:
    """Images of the target and the kept concepts, before and after unlearning the target; grid + metrics
    (``damage``: a fitted damage measure, which adds the damaged shares and UA undamaged)."""
    from .evaluate.common import judge, sample_images, to_pil
    from .evaluate.metrics import Record, target_metrics
    from .images import add_caption, image_grid, save_png
    from .minicanvas import data
    from .patching import patched

    domain, target, kept, rows = case
    other = "style" if domain == "object" else "object"
    cols = (target,) + tuple(kept)
    cells = [(r, c) for r in rows for c in cols]  # (other-domain value, same-domain concept)
    pairs = [(r, c) if domain == "style" else (c, r) for r, c in cells]  # (object, style) of each cell
    prompts = [data.caption(o, s) for o, s in pairs]
    seeds = [188] * len(prompts)
    before = sample_images(pipe, prompts, seeds, num_inference_steps=steps, batch_size=len(prompts))
    with patched(pipe, [target], checkpoint=ckpt):
        after = sample_images(pipe, prompts, seeds, num_inference_steps=steps, batch_size=len(prompts))
    # the metrics are the evaluation's own (saeuron.evaluate.metrics)
    is_target = torch.tensor([c == target for _, c in cells])
    res = {}
    for name, imgs in (("unedited", before), ("unlearned", after)):
        judged = judge(judges, imgs)
        flags = [None] * len(pairs)
        if damage is not None:
            flags = damage.score(judged, [o for o, _ in pairs], [s for _, s in pairs], (target,), domain)["damaged"]
            flags = [bool(f) for f in flags]
        records = [Record((target,), domain, data.object_id(o), None if s is None else data.style_id(s), int(po),
                          int(ps), d)
                   for (o, s), po, ps, d in zip(pairs, judged["pred_object"], judged["pred_style"], flags)]
        m = target_metrics(records)
        res[name] = {"UA": 100 * m["ua"], "IRA": 100 * m["ira"], "CRA": 100 * m["cra"]}
        if damage is not None:
            res[name].update({"damaged target": 100 * m["damage_target"], "damaged kept": 100 * m["damage_kept"],
                              "UA undamaged": 100 * m["ua_undamaged"]})
    res["unlearned"]["kept change"] = 100 * float((after[~is_target] - before[~is_target]).abs().mean())
    res["unedited"]["kept change"] = 0.0
    res["images"] = {"target": int(is_target.sum()), "kept": int((~is_target).sum())}
    label = (lambda r: "unstyled" if r is None else r)
    grid_rows = [[to_pil(im, 128) for j in range(len(cols)) for im in (before[i * len(cols) + j],
                                                                         after[i * len(cols) + j])]
                 for i in range(len(rows))]
    col_labels = [f"{c} ({'TARGET' if c == target else 'kept'}): {w}" for c in cols for w in ("original", "unlearned")]
    grid = image_grid(grid_rows, row_labels=[f"{other}: {label(r)}" for r in rows], col_labels=col_labels,
                      label_width=110, font_size=13)
    reading = _reading(domain, target, res)
    u = res["unlearned"]
    dmg = (f"  damaged: target {u['damaged target']:.0f}%, kept {u['damaged kept']:.0f}%  UA undamaged "
           f"{u['UA undamaged']:.0f}" if "damaged target" in u else "")
    grid = add_caption(grid, [f"Unlearning the {domain} {target!r} with the shipped SAE (seed 188, {steps} steps). "
                              f"UA {u['UA']:.0f}  IRA {u['IRA']:.0f}  CRA {u['CRA']:.0f}  kept change "
                              f"{u['kept change']:.1f}%" + dmg, reading])
    res["grid"] = str(save_png(grid, out / f"unlearn_{domain}_{target}.png"))
    res["reading"] = reading
    return res


def _reading(domain: str, target: str, res: dict) -> str:
    """One line saying what the numbers mean, including when the effect is not clean.

    With the damage measure (``"damaged target"``, ``"damaged kept"``, ``"UA undamaged"`` in ``res["unlearned"]``)
    a removal is only called clean when UA counting undamaged images alone reaches 75 and at most 25 % of the kept
    images are damaged: an image the judge misreads because it is broken is not an unlearned one."""
    u, b = res["unlearned"], res["unedited"]
    other = "styles" if domain == "object" else "objects"
    if b["UA"] > 25:
        return (f"Reading: the unedited model itself draws {target!r} recognisably in only {100 - b['UA']:.0f}% of "
                f"these images, so this small model cannot show its removal clearly.")
    dt, dk, uu = u.get("damaged target"), u.get("damaged kept"), u.get("UA undamaged")
    weak = []
    if u["UA"] < 75:
        weak.append(f"the target survives (UA {u['UA']:.0f})")
    elif uu is not None and uu < 75:
        weak.append(f"the target's images are damaged ({dt:.0f}% flagged: UA undamaged {uu:.0f}, not UA "
                    f"{u['UA']:.0f})")
    if u["IRA"] < 75:
        weak.append(f"kept concepts suffer (IRA {u['IRA']:.0f})")
    if u["CRA"] < 75:
        weak.append(f"{other} suffer (CRA {u['CRA']:.0f})")
    if dk is not None and dk > 25:
        weak.append(f"kept images are damaged ({dk:.0f}% flagged)")
    if not weak:
        undamaged = "" if uu is None else f", {uu:.0f}% as undamaged pictures"
        return (f"Reading: the judge no longer finds {target!r} in {u['UA']:.0f}% of its images{undamaged}, and still "
                f"recognises the kept {domain}s in {u['IRA']:.0f}% and the {other} in {u['CRA']:.0f}% (compare the "
                f"pictures: a judge can be fooled by a damaged image).")
    return ("Reading: not a clean removal here: " + "; ".join(weak)
            + ". See benchmarks/RESULTS.md for the five-seed figures.")


def _table(results: dict) -> str:
    dmg = all("damaged target" in r["unlearned"] for r in results.values())
    head = "| unlearned | images (target / kept) | UA | IRA | CRA | kept change |"
    head += " damaged target / kept | UA undamaged |" if dmg else ""
    head += " unedited UA / IRA / CRA |" + (" unedited damaged target / kept |" if dmg else "")
    lines = [head, "|---" * head.count(" |") + "|"]
    for (domain, target), r in results.items():
        u, b = r["unlearned"], r["unedited"]
        line = (f"| {domain} {target!r} | {r['images']['target']} / {r['images']['kept']} | {u['UA']:.1f} | "
                f"{u['IRA']:.1f} | {u['CRA']:.1f} | {u['kept change']:.2f}% |")
        if dmg:
            line += f" {u['damaged target']:.1f}% / {u['damaged kept']:.1f}% | {u['UA undamaged']:.1f} |"
        line += f" {b['UA']:.1f} / {b['IRA']:.1f} / {b['CRA']:.1f} |"
        if dmg:
            line += f" {b['damaged target']:.1f}% / {b['damaged kept']:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def _minicanvas_demo(out: Path, quick: bool) -> dict:
    from .concepts import ConceptTable
    from .minicanvas import data, defaults
    from .minicanvas.model import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from .utils import atomic_write_json

    t0 = t = _stage("1/3 load the shipped MiniCanvas model, classifiers, SAEs and concept file")
    pipe = defaults.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    judges = defaults.load_classifiers()
    ckpt = defaults.checkpoint_dir()
    table = ConceptTable.load(ckpt)
    hp = table.hookpoints[0]
    print(f"   model {defaults.model_dir()}\n   checkpoint {ckpt} ({len(table.names)} concepts, SAEs at "
          f"{', '.join(table.hookpoints)}) ({time.time() - t:.1f}s)")

    objs, styles = list(data.OBJECTS[:3]), list(data.STYLES[:3])
    prompts = {o: [data.caption(o, s) for s in styles] for o in objs}
    prompts.update({s: [data.caption(o, s) for o in objs] for s in styles})
    _stage("2/3 the method at small scale: fresh activations, a briefly trained SAE, feature selection")
    _small_scale(pipe, prompts, hp, out / "small_scale", 4 if quick else 8, quick, DEFAULT_GUIDANCE)

    steps = 10 if quick else DEFAULT_STEPS
    t = _stage("3/3 unlearn with the shipped SAEs: a style and an object, the target beside kept concepts")
    damage = fit_demo_damage(pipe, judges, steps)
    cal = damage.calibration
    print(f"   damage measure calibrated on {cal['images']} unedited images ({cal['source']}; "
          f"{100 * cal['flagged_clean']:.1f}% of them flagged)")
    results = {}
    for case in DEMO_CASES:
        r = _unlearn_case(pipe, judges, ckpt, case, out, steps, damage)
        results[(case[0], case[1])] = r
        print(f"   {r['grid']}")
    tables = _table(results)
    readings = [r["reading"] for r in results.values()]
    text = "\n".join(["## saeuron demo: unlearning on MiniCanvas", "", tables, "", *readings, "", LEGEND, ""])
    (out / "metrics.md").write_text(text)
    atomic_write_json({**{f"{d}:{t}": r for (d, t), r in results.items()},
                       "damage": {**damage.config(), "calibration": damage.calibration}}, out / "metrics.json")
    print("\n" + tables + "\n\n" + "\n".join(readings) + "\n\n" + LEGEND)
    grids = [r["grid"] for r in results.values()]
    print(f"\nDone in {time.time() - t0:.0f}s (unlearning stage {time.time() - t:.0f}s).\nGrids (each row: the "
          "same seed, original | unlearned, target first, kept concepts after):\n  " + "\n  ".join(grids)
          + f"\nMetrics: {out / 'metrics.md'} and metrics.json")
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
