"""UnlearnCanvas harness: the protocol of method.md section 6 on a real UnlearnCanvas model, one stage at a time.

For users who have the data: a local UnlearnCanvas-fine-tuned SD1.5 pipeline folder, a SAeUron checkpoint
(SAE folders + concept file) and the benchmark's classifier file(s). Nothing is downloaded; classifier
files are read by :mod:`.judges` with ``torch.load(..., weights_only=True)`` or safetensors, never with pickle.

A run folder::

    config.json                               model, checkpoint, styles, objects, template, seeds, domain,
                                              targets (and their concept names), steps, guidance, patch options
    images/<target>/<object>__<style>__<seed>.png   one per prompt x seed, generated with <target> unlearned
    images/_original/...                      the unedited model (optional, ``original=True``)
    predictions/<target>.json                 both classifiers' predictions for every image of <target>
    results.json, results.md                  UA / IRA / CRA per target and their mean (metrics.py)

Stages (each resumable): :func:`init_run` writes or checks ``config.json``; :func:`generate_images` writes
every missing image (existing files are skipped, each PNG is written atomically); :func:`classify_run`
writes the predictions of every target whose images are complete (kept when the classifier and the image
set are unchanged); :func:`report` aggregates them with :func:`.metrics.unlearning_metrics`.

Labels: class ``i`` of a classifier head is entry ``i`` of the style/object list, so the lists must be in
the order the classifier was trained with. The defaults below are a 50-style / 20-object list in the
order this project was given; they are not checked against the official benchmark files. Pass a JSON
file ``{"styles": [...], "objects": [...], "template": "..."}`` (template optional) for yours.
Prompts are ``template.format(object=..., style=...)`` with underscores in names shown as spaces.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from ..concepts import ConceptTable
from ..images import save_png
from ..patching import patched
from ..utils import atomic_write, atomic_write_json, locks_folder, read_json
from .common import EVAL_SEEDS, check_patch_kwargs, resolve_assets, sample_images, to_pil
from .judges import ARCHES, classifier_signature, load_judges, predict_files
from .metrics import DOMAINS, METRICS, Record, target_metrics, unlearning_metrics

STYLES = ("Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
          "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
          "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
          "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
          "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust",
          "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring", "Warm_Love", "Watercolor",
          "Winter", "Van_Gogh", "Vibrant_Flow", "Warm_Smear", "Woodcut")
OBJECTS = ("Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
           "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls")
TEMPLATE = "An image of {object} in {style} style."
ORIGINAL = "_original"  # images of the unedited model
FORMAT = "saeuron-unlearncanvas-run"
CONFIG_FILE, RESULTS_FILE, RESULTS_MD = "config.json", "results.json", "results.md"


# ---------------------------------------------------------------- labels, prompts, the run config

def _check_names(names, kind: str) -> list:
    names = list(names) if isinstance(names, (list, tuple)) else None
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{kind} must be a non-empty list of non-empty names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{kind} holds duplicates: {', '.join(dup)}")
    bad = [n for n in names if "/" in n or "\\" in n or "__" in n or n.startswith((".", "_"))]
    if bad:
        raise ValueError(f"{kind} names {bad} cannot be file names here: no '/', '\\' or '__', no leading '.' or '_'")
    return names


def load_labels(path=None) -> dict:
    """``{"styles", "objects", "template"}`` from a JSON file, or the defaults when ``path`` is None."""
    if path is None:
        return {"styles": list(STYLES), "objects": list(OBJECTS), "template": TEMPLATE}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"label file {p} not found (expected JSON {{\"styles\": [...], \"objects\": [...]}})")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"label file {p} is not valid JSON: {e}") from None
    keys = {"styles", "objects", "template"}
    if not isinstance(raw, dict) or not {"styles", "objects"} <= set(raw) or set(raw) - keys:
        raise ValueError(f"label file {p} must be a JSON object with keys 'styles', 'objects' and optionally "
                         f"'template'; got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    template = raw.get("template", TEMPLATE)
    if not isinstance(template, str) or "{object}" not in template or "{style}" not in template:
        raise ValueError(f"template {template!r} in {p} must be a string holding {{object}} and {{style}}")
    return {"styles": _check_names(raw["styles"], "styles"), "objects": _check_names(raw["objects"], "objects"),
            "template": template}


def prompt(obj: str, style: str, template: str = TEMPLATE) -> str:
    """The prompt for (object, style), underscores in names shown as spaces as the benchmark does."""
    return template.format(object=obj.replace("_", " "), style=style.replace("_", " "))


def image_name(obj: str, style: str, seed: int) -> str:
    """File name of one image: ``<object>__<style>__<seed>.png``."""
    return f"{obj}__{style}__{int(seed)}.png"


def jobs(config: dict) -> list:
    """Every ``(object, style, seed, prompt, file name)`` of a run, styles outermost."""
    return [(o, s, seed, prompt(o, s, config["template"]), image_name(o, s, seed))
            for s in config["styles"] for o in config["objects"] for seed in config["seeds"]]


def concept_for(table: ConceptTable, label: str) -> Optional[str]:
    """The concept-file name of a label: itself, with spaces for underscores, or a case-insensitive match."""
    for cand in (label, label.replace("_", " ")):
        if cand in table.names:
            return cand
    low = {n.lower().replace("_", " "): n for n in table.names}
    return low.get(label.lower().replace("_", " "))


def read_config(run) -> dict:
    """The ``config.json`` of a run folder (clear error when it is not one)."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not an UnlearnCanvas run folder (no {CONFIG_FILE}); start one with "
                                "`saeuron unlearncanvas generate --model SD_DIR --checkpoint CKPT --run DIR`")
    cfg = read_json(path, "UnlearnCanvas run config")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{path} is not an UnlearnCanvas run config (format={cfg.get('format') if isinstance(cfg, dict) else cfg!r})")
    return cfg


@locks_folder("run", "setting up the run")
def init_run(run, *, model=None, checkpoint=None, labels=None, domain: Optional[str] = None, targets=None,
             seeds=None, steps: Optional[int] = None, guidance: Optional[float] = None, height=None, width=None,
             **patch_kwargs) -> dict:
    """Create ``run/config.json``, or check that the given settings agree with it and add new targets.

    A new run needs ``model`` and ``checkpoint`` (folders); unset settings default to EVAL_SEEDS, 100 steps,
    guidance 9.0 and domain "style" (check them against the numbers you compare with). ``labels``: a label
    JSON path or a dict from :func:`load_labels`. ``targets`` default to every label of ``domain`` that the concept file
    knows. On an existing run every given setting must equal the stored one (images must share them);
    given targets not yet in the run are appended. ``patch_kwargs``: multiplier, percentile, top_n, threshold.
    """
    check_patch_kwargs(patch_kwargs, exclude=("hookpoints", "halves", "error_term"))
    run = Path(run)
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    lab = labels if isinstance(labels, dict) or labels is None else load_labels(labels)
    given = {"model": None if model is None else str(Path(model).resolve()),
             "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
             "styles": None if lab is None else lab["styles"], "objects": None if lab is None else lab["objects"],
             "template": None if lab is None else lab["template"],
             "seeds": None if seeds is None else [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)],
             "domain": domain, "steps": steps, "guidance": None if guidance is None else float(guidance),
             "height": height, "width": width, "patch": json.loads(json.dumps(patch_kwargs)) if patch_kwargs else None}
    if (run / CONFIG_FILE).is_file():
        cfg = read_config(run)
        diff = [f"{k}: run has {cfg.get(k)!r}, given {v!r}" for k, v in given.items()
                if v is not None and v != cfg.get(k)]
        if diff:
            raise ValueError(f"the run {run} was made with other settings (its images would mix); use a new --run "
                             "folder or drop these options:\n  " + "\n  ".join(diff))
    else:
        for k, what in (("model", "an UnlearnCanvas SD1.5 pipeline folder"), ("checkpoint", "a SAeUron checkpoint")):
            if given[k] is None:
                raise ValueError(f"a new run needs {k}= ({what})")
            if not Path(given[k]).is_dir():
                raise FileNotFoundError(f"{k} folder {given[k]} does not exist")
        lab = lab or load_labels()
        defaults = {"styles": lab["styles"], "objects": lab["objects"], "template": lab["template"],
                    "seeds": list(EVAL_SEEDS), "domain": "style", "steps": 100, "guidance": 9.0, "patch": {}}
        cfg = {"format": FORMAT, "version": 1,
               **{k: (defaults.get(k) if v is None else v) for k, v in given.items()}, "targets": [], "concepts": {}}
        if not cfg["seeds"]:
            raise ValueError("seeds must not be empty")
    table = ConceptTable.load(cfg["checkpoint"])
    names = cfg["styles"] if cfg["domain"] == "style" else cfg["objects"]
    if targets is None and not cfg["targets"]:
        targets = [n for n in names if concept_for(table, n) is not None]
        if not targets:
            raise ValueError(f"the concept file knows none of the {cfg['domain']}s (its concepts: "
                             f"{', '.join(table.names)}); name them in the concept file or pass targets=")
    for t in [targets] if isinstance(targets, str) else (targets or []):
        if t not in names:
            raise ValueError(f"target {t!r} is not one of the run's {cfg['domain']}s: {', '.join(names)}")
        c = concept_for(table, t)
        if c is None:
            raise ValueError(f"no concept for target {t!r} in {cfg['checkpoint']}; its concepts: "
                             f"{', '.join(table.names)}")
        if t not in cfg["targets"]:
            cfg["targets"].append(t)
            cfg["concepts"][t] = c
    atomic_write_json(cfg, run / CONFIG_FILE)
    return cfg


# ---------------------------------------------------------------- stage 1: images

def missing_images(run, targets=None, original: bool = False) -> dict:
    """``{folder name: [jobs whose PNG is missing]}`` for the given targets (default: all) and the original."""
    run, cfg = Path(run), read_config(run)
    folders = _targets(cfg, targets) + ([ORIGINAL] if original else [])
    return {f: [j for j in jobs(cfg) if not (run / "images" / f / j[4]).is_file()] for f in folders}


def _targets(cfg: dict, targets) -> list:
    if targets is None:
        return list(cfg["targets"])
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t not in cfg["targets"]]
    if bad:
        raise ValueError(f"targets {bad} are not in the run; its targets: {', '.join(cfg['targets'])}")
    return targets


@locks_folder("run", "generating images into", create=False)
def generate_images(run, pipe, *, targets=None, original: bool = False, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Write every missing image of the run's targets (and of the unedited model if ``original``); returns counts.

    ``pipe``: a pipeline, or a function returning one, called only when some image is missing (so a
    finished run never loads the model). Every target is unlearned alone with the run's patch options;
    existing PNGs are skipped, new ones written atomically. Returns ``{folder: images written}``.
    """
    run, cfg = Path(run), read_config(run)
    todo = missing_images(run, targets, original)
    written = {f: 0 for f in todo}
    if not any(todo.values()):
        return written
    pipe = pipe() if callable(pipe) and not hasattr(pipe, "unet") else pipe
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    saes, table = resolve_assets(cfg["checkpoint"])
    sampling = dict(num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance"], batch_size=batch_size,
                    **{k: cfg[k] for k in ("height", "width") if cfg.get(k) is not None})
    total = tqdm(total=sum(map(len, todo.values())), unit="img", desc="unlearncanvas generate", disable=not progress)
    try:
        for folder, js in todo.items():
            if not js:
                continue
            total.set_postfix_str(folder)
            edit = nullcontext() if folder == ORIGINAL else patched(pipe, [cfg["concepts"][folder]], saes=saes,
                                                                    table=table, **cfg["patch"])
            with edit:
                for i in range(0, len(js), batch_size):
                    chunk = js[i:i + batch_size]
                    images = sample_images(pipe, [j[3] for j in chunk], [j[2] for j in chunk], **sampling)
                    for j, im in zip(chunk, images):
                        save_png(to_pil(im), run / "images" / folder / j[4])
                    written[folder] += len(chunk)
                    total.update(len(chunk))
    finally:
        total.close()
    return written


# ---------------------------------------------------------------- stage 2: classifier predictions

@locks_folder("run", "classifying the images of", create=False)
def classify_run(run, arch: str, *, classifier=None, style_classifier=None, object_classifier=None,
                 device="cpu", batch_size: int = 32, image_size: Optional[int] = None, progress: bool = True) -> dict:
    """Write ``predictions/<target>.json`` for every target (and the original) whose images are complete.

    Kept when its classifier signature and image set are unchanged. Returns ``{folder: "done" | "kept" |
    "incomplete (n of m images)"}``; incomplete folders are skipped (run generate first).
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown classifier architecture {arch!r}; valid: {', '.join(ARCHES)}")
    run, cfg = Path(run), read_config(run)
    size = int(image_size or ARCHES[arch])
    files = {"classifier": classifier, "style_classifier": style_classifier, "object_classifier": object_classifier}
    for f in files.values():
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"classifier file {f} not found")
    sig = classifier_signature(arch, size, files)
    judges, status, js = None, {}, jobs(cfg)

    def load():
        return load_judges(arch, len(cfg["styles"]), len(cfg["objects"]), classifier=classifier,
                           style_classifier=style_classifier, object_classifier=object_classifier, device=device)

    folders = cfg["targets"] + ([ORIGINAL] if (run / "images" / ORIGINAL).is_dir() else [])
    for folder in folders:
        paths = [run / "images" / folder / j[4] for j in js]
        have = sum(p.is_file() for p in paths)
        if have < len(paths):
            status[folder] = f"incomplete ({have} of {len(paths)} images)"
            continue
        out = run / "predictions" / f"{folder}.json"
        names = [j[4][:-4] for j in js]
        if out.is_file():
            try:
                old = json.loads(out.read_text())
                if old.get("classifier") == json.loads(json.dumps(sig)) and list(old.get("predictions", {})) == names:
                    status[folder] = "kept"
                    continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # unreadable: redo
        judges = judges or load()
        bar = tqdm(total=len(paths), unit="img", desc=f"classify {folder}", disable=not progress, leave=False)
        try:
            pred = predict_files(judges, paths, size, batch_size, bar)
        finally:
            bar.close()
        preds = {n: {"style": cfg["styles"][s], "object": cfg["objects"][o]}
                 for n, s, o in zip(names, pred["style"], pred["object"])}
        atomic_write_json({"target": folder, "domain": cfg["domain"], "classifier": sig, "predictions": preds}, out)
        status[folder] = "done"
    if judges is None and "kept" not in status.values():
        load()  # nothing to classify yet: still check the classifier files now, not after generation
    return status


# ---------------------------------------------------------------- stage 3: the table

def records(cfg: dict, folder: str, preds: dict) -> list:
    """Metric records of one folder's predictions (targets = the folder's target; ids in the run's label lists)."""
    sty, obj = cfg["styles"], cfg["objects"]
    out = []
    for o, s, seed, _, name in jobs(cfg):
        p = preds.get(name[:-4])
        if p is None:
            raise ValueError(f"predictions for {folder} lack image {name}; rerun classify")
        out.append(Record((folder,), cfg["domain"], obj.index(o), sty.index(s), obj.index(p["object"]),
                          sty.index(p["style"])))
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown_table(res: dict) -> str:
    """The report as a markdown table (percents); "UA unedited" is the unedited model's UA, when generated."""
    base = res.get("baseline") or {}
    head = "| target | UA | IRA | CRA | CRA (rest) | images | UA unedited |\n" + "|---" * 7 + "|\n"
    rows = [f"| {t} | " + " | ".join(_pct(m[k]) for k in METRICS) + f" | {m['n_target'] + m['n_rest']} | "
            + _pct(base.get("per_target", {}).get(t, {}).get("ua")) + " |" for t, m in res["per_target"].items()]
    mean = res["mean"]
    rows.append("| **mean** | " + " | ".join(_pct(mean.get(k)) for k in METRICS) + " | | "
                + _pct((base.get("mean") or {}).get("ua")) + " |")
    text = f"UnlearnCanvas, {res['config']['domain']} unlearning ({len(res['per_target'])} targets)\n\n" + head
    text += "\n".join(rows) + "\n"
    if base:
        text += (f"\nUnedited model: object accuracy {_pct(base['object_acc'])}, "
                 f"style accuracy {_pct(base['style_acc'])}\n")
    if res["missing"]:
        text += f"\nNo predictions yet (run generate and classify): {', '.join(res['missing'])}\n"
    return text


@locks_folder("run", "writing the report of", create=False)
def report(run, progress: bool = True) -> dict:
    """Aggregate the predictions into UA/IRA/CRA per target and their mean; write results.json/.md atomically.

    Uses :func:`.metrics.unlearning_metrics` (CRA over all images of a target, cra_rest over the others).
    Targets without predictions are listed as missing. ``progress`` prints the markdown table.
    """
    run, cfg = Path(run), read_config(run)
    labels = {"style": cfg["styles"], "object": cfg["objects"]}
    recs, missing = [], []
    for t in cfg["targets"]:
        path = run / "predictions" / f"{t}.json"
        if path.is_file():
            recs += records(cfg, t, json.loads(path.read_text())["predictions"])
        else:
            missing.append(t)
    if not recs:
        raise ValueError(f"no predictions in {run / 'predictions'}; run `saeuron unlearncanvas classify` first")
    res = unlearning_metrics(recs, labels)
    res = {"config": cfg, "per_target": res["per_target"], "mean": res["mean"], "baseline": None, "missing": missing}
    orig = run / "predictions" / f"{ORIGINAL}.json"
    if orig.is_file():
        base = records(cfg, ORIGINAL, json.loads(orig.read_text())["predictions"])
        per = {t: target_metrics(base, (t,), cfg["domain"], labels) for t in res["per_target"]}
        res["baseline"] = {"object_acc": sum(r.pred_object == r.object for r in base) / len(base),
                           "style_acc": sum(r.pred_style == r.style for r in base) / len(base), "per_target": per,
                           "mean": {"ua": sum(m["ua"] for m in per.values()) / len(per)}}
    res["table"] = markdown_table(res)
    atomic_write_json(res, run / RESULTS_FILE)
    atomic_write(run / RESULTS_MD, lambda tmp: Path(tmp).write_text(res["table"]))
    if progress:
        print(res["table"])
    return res
