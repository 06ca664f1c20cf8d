"""The MiniCanvas UnlearnCanvas protocol: unlearn each target in turn, generate every prompt x seed, judge, score.

For every run (one target, or several unlearned at once with ``multi``) the pipeline is patched, every
prompt "An image of {object} in {style} style." (plus unstyled, and the paraphrase templates when
asked) is generated for every seed, both classifiers judge the images, and :mod:`.metrics` gives UA,
IRA and CRA, and (``damage=True``, the default) :mod:`.damage` flags damaged images: each run reports its
damage rate on target and on kept images and ``ua_undamaged`` (an image counts as unlearned only if it is
undamaged), the measure calibrated on the unedited model's training-form images of the same prompts. The
unedited baseline is generated once and cached; each run's Frechet distance on
classifier features compares its images with the baseline's. Every run is cached in
``out_dir/runs/<run>.json`` with the configuration it was computed under, so a rerun skips runs that
are done (and redoes those whose configuration, e.g. a concept's swept defaults, changed).

Outputs: ``out_dir/results.json`` and ``out_dir/results.md`` (written atomically), ``out_dir/grids/<run>.png``
(rows = a few prompts, columns = original | unlearned), ``out_dir/baseline.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..hookpoints import get_unet, normalize_hookpoint
from ..images import image_grid, save_png
from ..minicanvas import data, rendering
from ..patching import get_patch, patched
from ..utils import atomic_write, atomic_save_file, atomic_write_json, locks_folder
from .common import (EVAL_SEEDS, check_classifiers, check_patch_kwargs, judge, resolve_assets, resolve_sampling,
                     sample_images, slug, to_pil, with_detectors)
from .damage import fit_damage_measure
from .metrics import DAMAGE_METRICS, DOMAINS, METRICS, Record, frechet_distance, mean_metrics, run_key, target_metrics

BASELINE_FILE = "baseline.safetensors"
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Job:
    """One image to generate: its prompt, what the prompt holds, the seed and the template index."""

    prompt: str
    object: int
    style: Optional[int]  # None = unstyled
    seed: int
    template: int


def build_jobs(objects=None, styles=None, seeds=EVAL_SEEDS, templates=(0,)) -> list:
    """Every (template, style, object, seed) job; ``styles`` may hold None for the unstyled prompts."""
    objects = data.OBJECTS if objects is None else objects
    styles = data.STYLES + (None,) if styles is None else styles
    oids = [data.object_id(o) for o in objects]
    sids = [None if data.style_id(s) == len(data.STYLES) else data.style_id(s) for s in styles]
    seeds, templates = [int(s) for s in seeds], [int(t) for t in templates]
    if not (oids and sids and seeds and templates):
        raise ValueError(f"need at least one object, style, seed and template; got {len(oids)}, {len(sids)}, "
                         f"{len(seeds)}, {len(templates)}")
    return [Job(data.caption(o, s, t), o, s, seed, t) for t in templates for s in sids for o in oids for seed in seeds]


def json_roundtrip(obj):
    """``obj`` as it reads back from JSON (tuples -> lists), for comparing cached configurations."""
    return json.loads(json.dumps(obj, default=str))


def _checksum(module) -> float:
    """A cheap checksum of a module's weights (sum of all parameters), to tell cached results of other weights."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().cpu() for p in module.parameters()))


def weights_fingerprint(saes: dict, table) -> dict:
    """Checksums of the SAEs and concept statistics, so cached runs of other weights are not reused."""
    return {hp: [float(table.mu[hp].double().sum()), _checksum(saes[hp])] for hp in sorted(saes)}


def edit_signature(table, concepts, patch_kwargs: dict) -> dict:
    """The effective edit rule of every concept of a run (explicit patch arguments, else the concept's defaults)."""
    def pick(v, c):
        return v.get(c) if isinstance(v, dict) else v

    out = {}
    for c in concepts:
        kind, val = table.rule(c, pick(patch_kwargs.get("percentile"), c), pick(patch_kwargs.get("top_n"), c))
        mult = pick(patch_kwargs.get("multiplier"), c)
        hps = patch_kwargs.get("hookpoints")
        hps = table.concept_hookpoints(c) if hps is None else [hps] if isinstance(hps, str) else list(hps)
        out[c] = {"rule": kind, "value": val,
                  "multiplier": float(table.defaults[c]["multiplier"] if mult is None else mult),
                  "hookpoints": sorted(normalize_hookpoint(h) for h in hps),
                  "threshold": table.threshold(c, pick(patch_kwargs.get("threshold"), c))}
        mode = pick(patch_kwargs.get("mode"), c)
        if mode is None and table.edit_mode(c)[0] != "scale":  # the concept's default mode (absent: scale)
            out[c]["mode"], gate = table.edit_mode(c)
            if gate is not None:
                out[c]["gate"] = gate
            if table.default_anchor(c) is not None and patch_kwargs.get("anchor") is None:
                out[c]["anchor"] = table.default_anchor(c)
    rest = {k: v for k, v in patch_kwargs.items()
            if k not in ("percentile", "top_n", "multiplier", "hookpoints", "threshold")}
    return {"concepts": out, "patch": json_roundtrip(rest)}


def _domain_targets(domain, targets, table, jobs) -> list:
    labels = data.STYLES if domain == "style" else data.OBJECTS
    if targets is None:
        targets = [c for c in labels if c in table.names]
        if not targets:
            raise ValueError(f"the concept file has no {domain} concepts (its concepts: {', '.join(table.names)}; "
                             f"{domain}s: {', '.join(labels)})")
    targets = [targets] if isinstance(targets, str) else list(targets)
    held = {j.style if domain == "style" else j.object for j in jobs}
    for t in targets:
        if t not in labels:
            raise ValueError(f"target {t!r} is not a MiniCanvas {domain}; valid: {', '.join(labels)}")
        table.index(t)  # unknown concept -> error with the known ones
        if labels.index(t) not in held:
            raise ValueError(f"no prompt holds the target {t!r}: add it to the evaluated {domain}s")
    return targets


def _groups(targets: list, multi) -> list:
    """Multi-concept runs: an int n -> the first 1..n targets at once; or a list of target lists."""
    if multi is None:
        return []
    if isinstance(multi, int) and not isinstance(multi, bool):
        if not 1 <= multi <= len(targets):
            raise ValueError(f"multi={multi} must lie in 1..{len(targets)} (the number of targets)")
        return [tuple(targets[:n]) for n in range(1, multi + 1)]
    groups = [tuple([g] if isinstance(g, str) else g) for g in multi]
    for g in groups:
        bad = [t for t in g if t not in targets]
        if not g or bad:
            raise ValueError(f"multi group {list(g)} must be a non-empty list of targets from {targets}")
    return groups


def load_cached_result(path: Path, config) -> Optional[dict]:
    """The cached ``result`` in the JSON file ``path`` if it was made with ``config``, else None."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return cached.get("result") if cached.get("config") == json_roundtrip(config) else None


def unedited_baseline(pipe, classifiers, jobs, out: Path, config: dict, sampling: dict, resume: bool,
                      progress: bool) -> dict:
    """Unedited images, predictions and features: read from ``out/baseline.safetensors`` or generated once."""
    from safetensors import safe_open

    path = out / BASELINE_FILE
    if resume and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("config") == json.dumps(json_roundtrip(config)):
                    base = {k: f.get_tensor(k) for k in f.keys()}
                    base["images"] = base["images"].float() / 255
                    return base
        except Exception:
            pass  # unreadable cache: regenerate
    prev = get_patch(pipe)
    if prev is not None:
        prev.remove()
    bar = tqdm(total=len(jobs), unit="img", desc="baseline", disable=not progress, leave=False)
    try:
        images = sample_images(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], bar=bar, **sampling)
    finally:
        bar.close()
        if prev is not None:
            prev.install()
    base = {"images": images, **judge(classifiers, images)}
    atomic_save_file({**{k: v for k, v in base.items() if k != "images"},
                      "images": rendering.to_uint8(images)}, path, metadata={"config": json.dumps(json_roundtrip(config))})
    return base


def _grid(jobs, group, domain, base_images, images, path: Path, rows: int) -> str:
    """Save the target(s) and every kept concept side by side: a pair of columns original | unlearned per concept
    of ``domain`` in the grid (targets first, then the kept ones in grid order, unstyled prompts as their own
    column), one row per value of the other domain (up to ``rows``), first seed and template, 96 px per image."""
    first = [i for i, j in enumerate(jobs) if j.seed == jobs[0].seed and j.template == jobs[0].template]
    same = (lambda j: j.style) if domain == "style" else (lambda j: j.object)
    other = (lambda j: j.object) if domain == "style" else (lambda j: j.style)
    tid = set(_group_ids(group, domain))
    concepts = list(dict.fromkeys(same(jobs[i]) for i in first))
    concepts = [c for c in concepts if c in tid] + [c for c in concepts if c not in tid]
    values = list(dict.fromkeys(other(jobs[i]) for i in first))[:rows]
    at = {(same(jobs[i]), other(jobs[i])): i for i in first}
    kind = "object" if domain == "style" else "style"  # the other domain: one row per value
    label = (lambda v, k: "unstyled" if v is None else (data.STYLES if k == "style" else data.OBJECTS)[v])  # noqa: E731
    blank = to_pil(torch.ones_like(base_images[0]), 96)
    grid_rows = [[im for c in concepts for im in ((to_pil(base_images[at[c, v]], 96), to_pil(images[at[c, v]], 96))
                                                  if (c, v) in at else (blank, blank))] for v in values]
    cols = [f"{label(c, domain)} ({'TARGET' if c in tid else 'kept'}): {w}" for c in concepts
            for w in ("original", "unlearned")]
    grid = image_grid(grid_rows, row_labels=[f"{kind}: {label(v, kind)}" for v in values], col_labels=cols,
                      label_width=110)
    return str(save_png(grid, path))


def _group_ids(group, domain) -> list:
    """Label ids of a run's targets (style ids or object ids)."""
    return [data.STYLES.index(t) if domain == "style" else data.OBJECTS.index(t) for t in group]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _has_damage(results: dict) -> bool:
    return any("damage_target" in m or "damage_kept" in m
               for section in ("per_target", "multi") for m in results.get(section, {}).values())


def markdown_table(results: dict) -> str:
    """The results of :func:`evaluate_unlearning` as a markdown table (percents; FD = Frechet distance on classifier
    features; with the damage measure, its columns: damaged share of target / kept images, UA counting only
    undamaged images, and the unedited model's damaged shares of the same images)."""
    dmg = _has_damage(results)
    cols = ["run", "UA", "IRA", "CRA", "CRA (rest)", "FD obj. feats", "FD style feats", "UA unedited"]
    if dmg:
        cols += ["Damage target", "Damage kept", "UA undamaged", "Damage unedited (target / kept)"]
    head = "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n"

    def damage_cells(m, b):
        if not dmg:
            return ""
        return (f" {_pct(m.get('damage_target'))} | {_pct(m.get('damage_kept'))} | {_pct(m.get('ua_undamaged'))} | "
                f"{_pct(b.get('damage_target'))} / {_pct(b.get('damage_kept'))} |")

    lines = []
    for section in ("per_target", "multi"):
        if section == "multi" and results.get("multi"):
            lines.append("| *several at once* |" + " |" * (len(cols) - 1))
        for key, m in results.get(section, {}).items():
            b = results["baseline"]["per_run"].get(key, {})
            lines.append(f"| {key} | " + " | ".join(_pct(m.get(k)) for k in METRICS)
                         + f" | {_num(m.get('frechet_object'))} | {_num(m.get('frechet_style'))} | "
                         + f"{_pct(b.get('ua'))} |" + damage_cells(m, b))
        if section == "per_target" and results.get("mean"):
            mean = results["mean"]
            lines.append("| **mean** | " + " | ".join(_pct(mean.get(k)) for k in METRICS)
                         + f" | {_num(mean.get('frechet_object'))} | {_num(mean.get('frechet_style'))} | "
                         + f"{_pct(results['baseline']['mean'].get('ua'))} |"
                         + damage_cells(mean, results["baseline"]["mean"]))
    b = results["baseline"]
    foot = f"\nUnedited accuracy: object {_pct(b['object_acc'])}, style {_pct(b['style_acc'])} ({b['images']} images)\n"
    if dmg and results.get("damage"):
        cal = results["damage"].get("calibration", {})
        foot += (f"\nDamage: an image is damaged when it is no clean picture of what it should still show (far from "
                 f"clean renders in the judges' feature spaces, or a judge unsure); calibrated on {cal.get('images')} "
                 f"unedited images ({cal.get('source')}), of which {_pct(cal.get('flagged_clean'))} % are flagged. "
                 "UA undamaged counts a target image as unlearned only if it is undamaged.\n")
    if results.get("per_template"):
        tcols = ["template", "UA", "IRA", "CRA", "CRA (rest)", "UA unedited", "images/run"]
        if dmg:
            tcols += ["Damage target", "Damage kept", "UA undamaged"]
        foot += ("\nPer caption template (0 = training form, 1-2 = paraphrases kept for evaluation), mean over "
                 "the single-target runs:\n\n| " + " | ".join(tcols) + " |\n" + "|---" * len(tcols) + "|\n")
        for t, r in results["per_template"].items():
            foot += (f"| {t} | " + " | ".join(_pct(r["mean"].get(k)) for k in METRICS)
                     + f" | {_pct(r['baseline_mean'].get('ua'))} | {r['images']} |"
                     + ("".join(f" {_pct(r['mean'].get(k))} |" for k in DAMAGE_METRICS) if dmg else "") + "\n")
    return head + "\n".join(lines) + "\n" + foot


def _per_template(jobs, groups, domain, preds: dict, base_preds) -> dict:
    """UA/IRA/CRA (and damage, when measured) of each caption template on its own (training form vs paraphrases),
    from the per-image predictions of every single-target run: ``{template: {"mean", "baseline_mean", "per_target"}}``.

    ``preds[group]`` and ``base_preds[group]``: (object predictions, style predictions, damage flags or None)."""
    out = {}
    for t in sorted({j.template for j in jobs}):
        idx = [i for i, j in enumerate(jobs) if j.template == t]
        sub = [jobs[i] for i in idx]

        def pick(po, ps, dmg=None):
            return [po[i] for i in idx], [ps[i] for i in idx], None if dmg is None else [dmg[i] for i in idx]

        per = {run_key(g): target_metrics(run_records(sub, g, domain, *pick(*preds[g])), g, domain) for g in groups}
        base = {run_key(g): target_metrics(run_records(sub, g, domain, *pick(*base_preds[g])), g, domain)
                for g in groups}
        keys = METRICS + (DAMAGE_METRICS if any("damage_target" in m for m in per.values()) else ())
        out[str(t)] = {"mean": mean_metrics(per, keys), "baseline_mean": mean_metrics(base, keys), "per_target": per,
                       "images": len(idx)}
    return out


def run_records(jobs, group, domain, pred_o, pred_s, damaged=None) -> list:
    """One :class:`Record` per job of a run (``group`` unlearned in ``domain``) from both classifiers' predictions
    (and the damage measure's per-image flags, when given)."""
    damaged = [None] * len(jobs) if damaged is None else [bool(d) for d in damaged]
    return [Record(tuple(group), domain, j.object, j.style, int(o), int(s), d)
            for j, o, s, d in zip(jobs, pred_o, pred_s, damaged)]


def damage_flags(measure, judged: dict, jobs, group, domain) -> list:
    """The damage measure's per-image verdicts (bools) on judged images of ``jobs`` in a run unlearning ``group``."""
    return measure.score(judged, [j.object for j in jobs], [j.style for j in jobs], tuple(group),
                         domain)["damaged"].tolist()


def fit_run_damage(classifiers: dict, jobs, base: dict):
    """The damage measure of an evaluation: references from clean renders, calibrated on the unedited model's
    images of the training-form jobs (all jobs when none is in the training form; renders when under 2 images)."""
    cal = [i for i, j in enumerate(jobs) if j.template == 0] or list(range(len(jobs)))
    if len(cal) < 2:
        return fit_damage_measure(classifiers)
    return fit_damage_measure(classifiers, {
        "feat_object": base["feat_object"][cal], "feat_style": base["feat_style"][cal],
        "objects": [jobs[i].object for i in cal], "styles": [jobs[i].style for i in cal],
        "source": "unedited model, " + ("training form" if jobs[cal[0]].template == 0 else "all templates")})


def baseline_config(pipe, classifiers: dict, jobs, num_inference_steps=None, guidance_scale=None) -> dict:
    """The cache key of the unedited baseline of ``jobs``: model, weight checksums, prompts x seeds, sampling."""
    return {"model": getattr(pipe, "name_or_path", None) or type(pipe).__name__,
            "weights": {"unet": _checksum(get_unet(pipe)),
                        **{k: _checksum(classifiers[k]) for k in ("object", "style")}},
            "jobs": [[j.prompt, j.seed] for j in jobs], "steps": num_inference_steps, "guidance": guidance_scale}


def evaluate_run(pipe, classifiers: dict, jobs, group, domain: str, base: dict, *, sampling: Optional[dict] = None,
                 grid_path=None, grid_rows: int = 6, progress: bool = True, damage=None) -> dict:
    """Generate every job with ``pipe`` as it is now (the caller has unlearned ``group``), judge and score one run.

    ``base``: the unedited baseline of the same jobs (images, features), for the Frechet distances and the
    grid (saved to ``grid_path`` when given). ``damage``: a fitted :class:`.damage.DamageMeasure` (None: no
    damage measure). Returns ``{"metrics", "pred_object", "pred_style"}`` (and ``"damaged"``, per-image flags).
    """
    bar = tqdm(total=len(jobs), unit="img", desc=run_key(group), disable=not progress, leave=False)
    try:
        images = sample_images(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], bar=bar, **(sampling or {}))
    finally:
        bar.close()
    j = judge(classifiers, images)
    po, ps = j["pred_object"].tolist(), j["pred_style"].tolist()
    dmg = damage_flags(damage, j, jobs, group, domain) if damage is not None else None
    m = target_metrics(run_records(jobs, group, domain, po, ps, dmg), group, domain)
    for kind in ("object", "style"):
        m[f"frechet_{kind}"] = frechet_distance(j[f"feat_{kind}"], base[f"feat_{kind}"]) if len(jobs) >= 2 else None
    if grid_path is not None:
        m["grid"] = _grid(jobs, group, domain, base["images"], images, Path(grid_path), grid_rows)
    out = {"metrics": m, "pred_object": po, "pred_style": ps}
    if dmg is not None:
        out["damaged"] = dmg
    return out


@locks_folder("out_dir", "evaluating into")
def evaluate_unlearning(pipe, classifiers: dict, checkpoint=None, *, saes=None, table=None, targets=None,
                        domain: str = "style", seeds=EVAL_SEEDS, templates=(0,), objects=None, styles=None,
                        num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                        batch_size: int = 16, multi=None, out_dir="minicanvas_eval", grid_rows: int = 6,
                        progress: bool = True, resume: bool = True, damage: bool = True, **patch_kwargs) -> dict:
    """Run the UnlearnCanvas protocol on a MiniCanvas pipeline; returns (and writes) the results.

    ``classifiers``: ``{"object": SmallCNN, "style": SmallCNN}``. ``checkpoint`` (SAE folders + concept
    file) or ``saes``/``table``. ``targets``: concepts of ``domain`` to unlearn one at a time (default:
    every concept of the file in that domain). ``objects``/``styles``: the prompt grid (default: all
    objects; all styles plus None, the unstyled prompt). ``templates``: caption template ids (0 =
    training form, 1-2 paraphrases). ``multi``: also unlearn several targets at once: an int n (the
    first 1..n targets) or a list of target lists. ``num_inference_steps``/``guidance_scale``: None
    keeps the pipeline's defaults. ``patch_kwargs`` go to :func:`saeuron.patching.patch` (multiplier,
    percentile, top_n, threshold, halves, error_term). ``progress`` shows bars and prints the markdown table.
    ``damage``: also run the damage measure (:mod:`.damage`, calibrated on the unedited images).

    Returns ``{"config", "baseline": {"object_acc", "style_acc", "images", "per_run", "mean"},
    "per_target": {target: metrics}, "mean": metrics, "multi": {run: metrics}, "table", "files"}`` (and
    "per_template": {template: {"mean", "baseline_mean", "per_target", "images"}} when several templates run);
    metrics hold ua, ira, cra, cra_rest (fractions), n_target, n_rest, frechet_object, frechet_style, grid, and
    with ``damage`` damage_target, damage_kept, ua_undamaged (the baseline's per_run and mean hold the unedited
    model's damage rates; ``results["damage"]`` describes the measure and its calibration).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    check_classifiers(classifiers)
    check_patch_kwargs(patch_kwargs)
    saes, table = resolve_assets(checkpoint, saes, table)
    patch_kwargs = with_detectors(patch_kwargs, checkpoint, table)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    templates = [templates] if isinstance(templates, int) else list(templates)
    jobs = build_jobs(objects, styles, seeds, templates)
    targets = _domain_targets(domain, targets, table, jobs)
    groups = [(t,) for t in targets]
    multi_groups = _groups(targets, multi)
    out = Path(out_dir)
    num_inference_steps, guidance_scale = resolve_sampling(pipe, num_inference_steps, guidance_scale)
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size)
    base_cfg = baseline_config(pipe, classifiers, jobs, num_inference_steps, guidance_scale)
    base = unedited_baseline(pipe, classifiers, jobs, out, base_cfg, sampling, resume, progress)
    measure = fit_run_damage(classifiers, jobs, base) if damage else None

    def records(group, pred_o, pred_s, damaged=None):
        return run_records(jobs, group, domain, pred_o, pred_s, damaged)

    fp = weights_fingerprint(saes, table)
    done, preds = {}, {}
    all_groups = list(dict.fromkeys(groups + multi_groups))
    bar_runs = tqdm(all_groups, desc=f"unlearn {domain}", unit="run", disable=not progress)
    for group in bar_runs:
        key = run_key(group)
        bar_runs.set_postfix_str(key)
        cfg = {**base_cfg, "domain": domain, "targets": list(group), "edit": edit_signature(table, group, patch_kwargs),
               "fingerprint": fp, "grid_rows": grid_rows}
        if measure is not None:
            cfg["damage"] = measure.config()
        path = out / "runs" / f"{slug(key)}.json"
        res = load_cached_result(path, cfg) if resume else None
        if res is None:
            with patched(pipe, list(group), saes=saes, table=table, **patch_kwargs):
                res = evaluate_run(pipe, classifiers, jobs, group, domain, base, sampling=sampling,
                                   grid_path=out / "grids" / f"{slug(key)}.png", grid_rows=grid_rows, progress=progress,
                                   damage=measure)
            atomic_write_json({"config": json_roundtrip(cfg), "result": res}, path)
        done[group] = res["metrics"]
        preds[group] = (res["pred_object"], res["pred_style"], res.get("damaged"))
    bar_runs.close()

    bpo, bps = base["pred_object"].tolist(), base["pred_style"].tolist()
    base_dmg = {g: damage_flags(measure, base, jobs, g, domain) if measure is not None else None for g in all_groups}
    per_run_base = {run_key(g): target_metrics(records(g, bpo, bps, base_dmg[g]), g, domain) for g in all_groups}
    n = len(jobs)
    extra = ("frechet_object", "frechet_style")
    results = {
        "config": {"domain": domain, "targets": targets, "seeds": seeds, "templates": templates,
                   "objects": list(dict.fromkeys(j.object for j in jobs)),
                   "styles": list(dict.fromkeys(j.style for j in jobs)), "num_images_per_run": n,
                   "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                   "checkpoint": None if checkpoint is None else str(checkpoint), "patch": json_roundtrip(patch_kwargs),
                   "cra": "other-domain classifier accuracy on all images of the run (cra_rest: non-target images)"},
        "baseline": {"object_acc": sum(int(p == j.object) for p, j in zip(bpo, jobs)) / n,
                     "style_acc": sum(int(p == data.style_id(j.style)) for p, j in zip(bps, jobs)) / n, "images": n,
                     "per_run": per_run_base,
                     "mean": mean_metrics({k: per_run_base[k] for k in map(run_key, groups)},
                                          METRICS + (DAMAGE_METRICS if measure is not None else ()))},
        "per_target": {run_key(g): done[g] for g in groups},
        "multi": {run_key(g): {**done[g], "n": len(g)} for g in multi_groups},
    }
    results["mean"] = mean_metrics(results["per_target"],
                                   METRICS + extra + (DAMAGE_METRICS if measure is not None else ()))
    if measure is not None:
        results["damage"] = {**measure.config(), "calibration": measure.calibration,
                             "rule": "damaged: no clean picture of what the image should still show (saeuron.evaluate."
                                     "damage); ua_undamaged counts a target image as unlearned only if undamaged"}
    if len(templates) > 1:
        results["per_template"] = _per_template(jobs, groups, domain, preds,
                                                {g: (bpo, bps, base_dmg[g]) for g in groups})
    results["table"] = markdown_table(results)
    results["files"] = {"json": str(out / RESULTS_FILE), "markdown": str(out / "results.md"),
                        "baseline": str(out / BASELINE_FILE)}
    atomic_write_json(results, out / RESULTS_FILE)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(results["table"]))
    if progress:
        print(results["table"])
    return results
