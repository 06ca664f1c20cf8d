"""SAeUron, UCE and ESD side by side on MiniCanvas: one protocol, one table (``saeuron minicanvas compare``).

For every method and every target (styles and objects, one at a time) the method is applied to the
pipeline, every prompt x seed of the grid is generated and judged by both classifiers
(:func:`.unlearn_eval.evaluate_run`, the same code as ``saeuron minicanvas eval``), UA/IRA/CRA come from
:mod:`.metrics`, and then, with the edit still in place, an UnlearnDiffAtk-style attack (:mod:`.attack`)
runs on each prompt of the grid that holds the target: its target images are the *unedited* model's
images of that prompt (the cached baseline, as uint8), the adversarial prompt is sampled with the same
seeds, and "UA after attack" is the target classifier's UA on those images ("UA before attack": on the
same prompts and seeds without the prefix). The prefix starts from random words that name no concept
(``init_exclude``: 20 of MiniCanvas's 31 ordinary words are objects or styles, and a prefix starting at
"blur star" would ask for other concepts by itself). Afterwards the edit is undone (SAE patch removed, UCE/ESD
weights restored bit-exactly, which is checked). The same attack also runs on the unedited model, as a
control: on a small model the optimised prefix can by itself stop the concept being drawn, and the
unedited row's "UA after attack" shows how much of any method's "after" is the prefix rather than the edit.
The control's movement (its UA under the attack minus its UA without, in points) is reported with a pass/fail
against ``CONTROL_BAR`` (5 points, issue 21): ``result["control"]``, a note under the table, and
:func:`attack_control` measures it alone (the build's gates use it).

Every run is also judged by the damage measure (:mod:`.damage`, ``damage=True``), exactly as ``saeuron minicanvas
eval`` does (:func:`.unlearn_eval.fit_run_damage`: calibrated on the unedited model's training-form images of the
grid; :func:`.unlearn_eval.evaluate_run` with the measure): the damaged share of the target images, of the kept
images, and UA counting only undamaged images, per target, per seed and as means (the "Damage" table).

How each method is applied to target T:

- ``saeuron``: ``patch(pipe, T, saes=..., table=...)`` (the concept file's defaults unless
  ``patch_kwargs`` say otherwise); time = installing the patch (the SAE and the concept file are built
  beforehand, once for every concept);
- ``uce``: :func:`.baselines.uce_edit` erasing T towards the unconditional "" (as published for
  unconditional erasure) with the concept in every training-form caption of the grid (``templates``:
  "An image of {object} in {} style." per object for a style; "An image of {} in {style} style." per
  style and "An image of {}." for an object), preserving the other concepts of T's domain in the same
  captions (:func:`uce_arguments`); closed form, time = the solve;
- ``esd``: :func:`.baselines.esd_train` with its published settings (lr 1e-5, 1000 iterations, eta 1,
  start guidance 3), ESD-x (cross-attention) for styles and ESD-u (everything but cross-attention) for
  objects, as published, on the same training-form captions holding T, one per iteration in turn
  (:func:`esd_prompts`): the published short phrase ("mosaic style") is a prompt this model never saw,
  its conditional and unconditional predictions hardly differ, and ESD then has nothing to learn;
  ``ddim_steps`` defaults to the evaluation's sampling steps; time = the training.

``uce_kwargs``/``esd_kwargs`` override any argument of those calls. Memory: the peak while applying
the method (CUDA ``max_memory_allocated``, else the process RSS, as :mod:`.baselines` measures it) and
its increase over the memory before.

Every (method, target) run, and the control's attacks, are cached in
``out_dir/runs/<method or "unedited">/<domain>_<target>.json`` with the configuration they were computed
under, so a rerun skips what is done. The unedited baseline is
``out_dir/baseline.safetensors`` (the same file and key as ``evaluate_unlearning``'s). Outputs:
``comparison.json`` (fractions) and ``comparison.md`` (percents): one table, rows = methods (plus the
unedited model for reference), columns = style UA/IRA/CRA, object UA/IRA/CRA, UA before and after the
attack, time and memory; then the damage table (rows = method x seed, and the mean over seeds), with the
per-target detail below it; grids in ``out_dir/grids/<method>/``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..minicanvas import classifiers as clf
from ..minicanvas import data, rendering
from ..patching import get_patch, patch
from ..utils import atomic_write, atomic_write_json, locks_folder
from .attack import attack as run_attack
from .attack import generate_adversarial
from .baselines import PeakMemory, esd_train, process_rss, uce_edit, unet_device
from .common import (check_classifiers, check_patch_kwargs, resolve_assets, resolve_sampling, sample_images, slug,
                     with_detectors)
from .metrics import DAMAGE_METRICS, DOMAINS, mean_metrics, target_metrics
from .protocol import METHODS
from .unlearn_eval import (baseline_config, build_jobs, damage_flags, edit_signature, evaluate_run, fit_run_damage,
                           json_roundtrip, load_cached_result, run_records, unedited_baseline, weights_fingerprint)

METHOD_NAMES = {"saeuron": "SAeUron", "uce": "UCE", "esd": "ESD"}
ESD_VARIANT = {"style": "xattn", "object": "noxattn"}  # ESD-x for styles, ESD-u for objects (as published)
COMPARISON_FILE = "comparison.json"
ATTACK_BAR = 5.0  # points: the SAE edit's averaged UA may drop at most this much under the attack
CONTROL_BAR = 5.0  # points: the unedited model's averaged UA may move (either way) at most this much (issue 21)
COLUMNS = ("style_ua", "style_ira", "style_cra", "object_ua", "object_ira", "object_cra", "ua_before_attack",
           "ua_after_attack")
MiB = 2 ** 20


def caption_templates(domain: str, objects, styles) -> list:
    """The grid's training-form captions with ``{}`` where a concept of ``domain`` goes.

    Style: "An image of {object} in {} style." per object; object: "An image of {} in {style} style." per
    style, and "An image of {}." when the unstyled variant (``None`` in ``styles``) is in the grid.
    """
    if domain == "style":
        return [f"An image of {o} in {{}} style." for o in objects]
    if domain == "object":
        return ([f"An image of {{}} in {s} style." for s in styles if s is not None]
                + (["An image of {}."] if None in styles else []))
    raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")


def esd_prompts(target: str, domain: str, objects, styles) -> list:
    """ESD's prompts for ``target``: every training-form caption of the grid holding it (used in turn)."""
    return [t.format(target) for t in caption_templates(domain, objects, styles)]


def uce_arguments(target: str, domain: str, objects, styles) -> dict:
    """``uce_edit`` arguments erasing ``target`` in every training-form caption of the grid (see the module docstring).

    ``objects``/``styles``: names in the prompt grid (``None`` in ``styles`` = the unstyled caption).
    """
    templates = caption_templates(domain, objects, styles)
    pool = styles if domain == "style" else objects
    others = [c for c in pool if c is not None and c != target]
    return dict(erase=[target], guide="", preserve=others, templates=templates)


def _memory_now(dev) -> int:
    """Memory in use now, measured as :class:`.baselines.PeakMemory` does (CUDA allocated, else the process RSS)."""
    return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else process_rss()


@contextmanager
def applied(pipe, method: str, target: str, domain: str, *, saes=None, table=None, patch_kwargs=None,
            uce_kwargs=None, esd_kwargs=None):
    """Within the block ``pipe`` has ``target`` unlearned by ``method``; yields the edit record (time, memory, config).

    On exit the SAE patch is removed, or the UCE/ESD weights are restored (and checked to be bit-exact).
    """
    dev = unet_device(pipe)
    before = _memory_now(dev)
    if method == "saeuron":
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            handle = patch(pipe, target, saes=saes, table=table, **(patch_kwargs or {}))
            seconds = time.perf_counter() - t0
        info = dict(seconds=seconds, peak_memory_bytes=mem.peak, memory_kind=mem.kind,
                    config=edit_signature(table, [target], patch_kwargs or {}))
        restore = handle.remove
    elif method in ("uce", "esd"):
        if method == "uce":
            edit = uce_edit(pipe, **(uce_kwargs or {}))
        else:
            edit = esd_train(pipe, **(esd_kwargs or {}))
        info = {k: v for k, v in edit.to_json().items() if k != "method"}
        info["method"] = edit.method

        def restore():
            edit.restore()
            if edit.changed():
                raise RuntimeError(f"{method}: restoring the original weights failed for {edit.changed()[:3]}")
    else:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    info["added_memory_bytes"] = max(0, int(info["peak_memory_bytes"]) - before)
    try:
        yield info
    finally:
        restore()


def attack_target(pipe, classifiers: dict, jobs, run: dict, base_images: torch.Tensor, target: str, domain: str, *,
                  prompts: Optional[int] = None, iterations: int = 40, sampling: Optional[dict] = None,
                  attack_kwargs: Optional[dict] = None) -> dict:
    """UA before/after the prefix attack on each prompt of ``jobs`` holding ``target`` (``pipe`` as it is: edited).

    ``run``: the evaluation of the same jobs under the edit (its predictions give "before");
    ``base_images``: the unedited images of the jobs ([N, 3, H, W] in [0, 1]): the attack's targets.
    ``prompts``: attack only the first n such prompts (None: all of the first template).
    """
    tid = data.style_id(target) if domain == "style" else data.object_id(target)
    truth = (lambda j: data.style_id(j.style)) if domain == "style" else (lambda j: j.object)
    held = [i for i, j in enumerate(jobs) if truth(j) == tid and j.template == jobs[0].template]
    chosen = list(dict.fromkeys(jobs[i].prompt for i in held))[:prompts]
    if not chosen:
        raise ValueError(f"no prompt of the grid holds the target {target!r}")
    sampling = dict(sampling or {})
    gen = dict(num_inference_steps=sampling.get("num_inference_steps"), guidance_scale=sampling.get("guidance_scale"),
               batch_size=sampling.get("batch_size", 16))
    before_pred, rows, after_all = run[f"pred_{domain}"], [], []
    for k, prompt in enumerate(chosen):
        idx = [i for i in held if jobs[i].prompt == prompt]
        seeds = [jobs[i].seed for i in idx]
        images = rendering.to_uint8(base_images[idx]).float() / 127.5 - 1  # as cached: fresh and resumed runs agree
        t0 = time.perf_counter()
        res = run_attack(pipe, prompt, images, iterations=iterations, seed=k, progress=False, **(attack_kwargs or {}))
        adv = torch.stack(generate_adversarial(pipe, res, seeds, output_type="pt", **gen))
        after = clf.predict(classifiers[domain], adv.float().cpu()).tolist()
        before = [before_pred[i] for i in idx]
        after_all += after
        rows.append(dict(prompt=prompt, seeds=seeds, ua_before=1 - sum(p == tid for p in before) / len(before),
                         ua_after=1 - sum(p == tid for p in after) / len(after), pred_after=after,
                         final_loss=res.loss_history[-1], seconds=time.perf_counter() - t0))
    before_all = [before_pred[i] for i in held if jobs[i].prompt in set(chosen)]
    return dict(ua_before=1 - sum(p == tid for p in before_all) / len(before_all),
                ua_after=1 - sum(p == tid for p in after_all) / len(after_all), prompts=rows)


def attack_settings(attack_kwargs: Optional[dict] = None) -> dict:
    """The attack's keyword arguments as the comparison runs it: the prefix starts from no MiniCanvas concept word
    (``init_exclude``: every object and style), then ``attack_kwargs``."""
    return {"init_exclude": list(data.OBJECTS + data.STYLES), **(attack_kwargs or {})}


def control_movement(ua_before: float, ua_after: float, bar: float = CONTROL_BAR) -> dict:
    """The attack control's movement: ``{"ua_before", "ua_after", "move_points" (after - before, in points),
    "bar_points", "pass"}``; it passes when the unedited model's UA moves by at most ``bar`` points either way."""
    move = 100 * (float(ua_after) - float(ua_before))
    return {"ua_before": float(ua_before), "ua_after": float(ua_after), "move_points": move, "bar_points": float(bar),
            "pass": abs(round(move, 6)) <= bar}


def attack_control(pipe, classifiers: dict, *, seeds=(188,), style_targets=None, object_targets=None,
                   prompts: Optional[int] = 5, iterations: int = 40, attack_kwargs: Optional[dict] = None,
                   num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                   batch_size: int = 16, base_images: Optional[torch.Tensor] = None, progress: bool = True) -> dict:
    """The comparison's attack control alone: the prefix attack on the unedited ``pipe`` for every target.

    The grid is every object x style (+ unstyled) in the training form x ``seeds``; targets default to every
    style and every object. Each target is attacked as in :func:`compare_methods` (:func:`attack_target` on its
    first ``prompts`` prompts, ``iterations`` Adam steps, the unedited images as the attack's targets).
    ``base_images``: the unedited images of that grid ([N, 3, H, W] in [0, 1], in ``build_jobs`` order), when
    already generated. Returns :func:`control_movement` of the mean UA over targets (before = the same prompts
    and seeds without the prefix) plus ``"per_target": {domain: {target: attack}}``, ``"targets"``,
    ``"attacked_images"``, ``"prompts_per_target"``, ``"iterations"``, ``"seeds"``, ``"sampling"``.
    """
    check_classifiers(classifiers)
    if get_patch(pipe) is not None:
        raise ValueError("the attack control runs on the unedited model: remove the pipeline's SAE patch first")
    if iterations < 1 or (prompts is not None and prompts < 1):
        raise ValueError(f"iterations ({iterations}) and prompts ({prompts}, or None: all) must be >= 1")
    seeds = [int(x) for x in ([seeds] if isinstance(seeds, int) else seeds)]
    jobs = build_jobs(None, None, seeds, (0,))
    targets = {"style": _targets("style", style_targets, jobs, None, False),
               "object": _targets("object", object_targets, jobs, None, False)}
    if not targets["style"] and not targets["object"]:
        raise ValueError("no target to attack: give style_targets and/or object_targets (None: all)")
    steps, guidance = resolve_sampling(pipe, num_inference_steps, guidance_scale)
    sampling = dict(num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size)
    if base_images is None:
        base_images = sample_images(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], **sampling)
    if len(base_images) != len(jobs):
        raise ValueError(f"base_images holds {len(base_images)} images but the grid has {len(jobs)} (objects x "
                         "styles + unstyled x seeds)")
    pred = clf.classify(classifiers, base_images.float().cpu())
    run = {"pred_object": pred["object"].tolist(), "pred_style": pred["style"].tolist()}
    kw = attack_settings(attack_kwargs)
    todo = [(d, t) for d in DOMAINS for t in targets[d]]
    per: dict = {d: {} for d in DOMAINS if targets[d]}
    for domain, target in tqdm(todo, desc="attack control (unedited)", unit="target", disable=not progress):
        per[domain][target] = attack_target(pipe, classifiers, jobs, run, base_images, target, domain, prompts=prompts,
                                            iterations=iterations, sampling=sampling, attack_kwargs=kw)
    flat = [a for d in per for a in per[d].values()]
    out = control_movement(sum(a["ua_before"] for a in flat) / len(flat), sum(a["ua_after"] for a in flat) / len(flat))
    out.update(per_target=per, targets=len(flat), attacked_images=sum(len(p["seeds"]) for a in flat
                                                                     for p in a["prompts"]),
               prompts_per_target=prompts, iterations=iterations, seeds=seeds,
               sampling={"num_inference_steps": steps, "guidance_scale": guidance},
               attack={k: v for k, v in kw.items() if k != "init_exclude"},
               rule=f"the unedited model's UA under the attack minus without it, mean over targets; passes when it "
                    f"moves by at most {CONTROL_BAR:g} points")
    return out


def per_seed_metrics(jobs, group, domain: str, pred_o, pred_s, damaged=None) -> dict:
    """``{seed: metrics}``: :func:`.metrics.target_metrics` of one run on the images of each seed on its own (with the
    damage metrics when the per-image ``damaged`` flags are given). Seeds are keys as text ("188"), as JSON has them."""
    out = {}
    for seed in dict.fromkeys(j.seed for j in jobs):
        idx = [i for i, j in enumerate(jobs) if j.seed == seed]
        records = run_records([jobs[i] for i in idx], group, domain, [pred_o[i] for i in idx],
                              [pred_s[i] for i in idx], None if damaged is None else [damaged[i] for i in idx])
        out[str(seed)] = target_metrics(records, group, domain)
    return out


def _targets(domain: str, given, jobs, table, need_table: bool) -> list:
    """The targets of a domain: ``given`` checked against the grid (and the concept file), or the grid's concepts."""
    labels = data.STYLES if domain == "style" else data.OBJECTS
    held = {data.STYLES[j.style] if domain == "style" else data.OBJECTS[j.object] for j in jobs
            if domain == "object" or j.style is not None}
    if given is None:
        given = [c for c in labels if c in held and (not need_table or c in table.names)]
    given = [given] if isinstance(given, str) else list(given)
    for t in given:
        if t not in labels:
            raise ValueError(f"target {t!r} is not a MiniCanvas {domain}; valid: {', '.join(labels)}")
        if t not in held:
            raise ValueError(f"no prompt holds the target {t!r}: add it to the evaluated {domain}s")
        if need_table:
            table.index(t)  # unknown concept -> error naming the known ones
    return list(dict.fromkeys(given))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:.1f}"


def _secs(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def summarise(runs: dict, methods) -> dict:
    """Per method: mean style/object UA, IRA, CRA (and, when measured, damage_target, damage_kept, ua_undamaged),
    mean UA before/after the attack, mean time, max memory; ``per_seed``: the same metrics per seed when the runs
    carry ``per_seed`` (means over targets)."""
    out = {}
    for m in methods:
        per = runs.get(m, {})
        row = {}
        for d in DOMAINS:
            ms = {t: r["metrics"] for t, r in per.get(d, {}).items()}
            keys = ("ua", "ira", "cra") + (DAMAGE_METRICS if any("damage_target" in x for x in ms.values()) else ())
            row.update({f"{d}_{k}": v for k, v in mean_metrics(ms, keys).items()})
        flat = [r for d in DOMAINS for r in per.get(d, {}).values()]
        atk = [r["attack"] for r in flat if r.get("attack")]
        row["ua_before_attack"] = sum(a["ua_before"] for a in atk) / len(atk) if atk else None
        row["ua_after_attack"] = sum(a["ua_after"] for a in atk) / len(atk) if atk else None
        row["attack_drop_points"] = (None if not atk else 100 * (row["ua_before_attack"] - row["ua_after_attack"]))
        edits = [r["edit"] for r in flat if r.get("edit")]
        row["seconds"] = sum(e["seconds"] for e in edits) / len(edits) if edits else None
        row["peak_memory_bytes"] = max((e["peak_memory_bytes"] for e in edits), default=None)
        row["added_memory_bytes"] = max((e["added_memory_bytes"] for e in edits), default=None)
        row["memory_kind"] = edits[0]["memory_kind"] if edits else None
        row["targets"] = len(flat)
        seeds = list(dict.fromkeys(s for r in flat for s in r.get("per_seed", {})))
        if seeds:
            row["per_seed"] = {}
            for seed in seeds:
                cell = {}
                for d in DOMAINS:
                    ms = {t: r["per_seed"][seed] for t, r in per.get(d, {}).items() if seed in r.get("per_seed", {})}
                    keys = ("ua", "ira", "cra") + (DAMAGE_METRICS if any("damage_target" in x for x in ms.values())
                                                   else ())
                    cell.update({f"{d}_{k}": v for k, v in mean_metrics(ms, keys).items()})
                row["per_seed"][seed] = cell
        out[m] = row
    return out


DAMAGE_COLUMNS = tuple(f"{d}_{k}" for d in DOMAINS for k in ("ua", "ua_undamaged", "damage_target", "damage_kept"))


def damage_table(result: dict) -> str:
    """The damage table: rows = method x seed and the method's mean over seeds; per domain UA, UA undamaged, and the
    damaged share of target and of kept images (percent). Empty when no run was judged for damage."""
    rows = {**result["summary"], "unedited": result["unedited"]["summary"]}
    if not any(r.get(c) is not None for r in rows.values() for c in DAMAGE_COLUMNS[1:4] + DAMAGE_COLUMNS[5:]):
        return ""
    names = {"ua": "UA", "ua_undamaged": "UA undamaged", "damage_target": "damage target", "damage_kept": "damage kept"}
    head = ["method", "seed"] + [f"{c.split('_', 1)[0]} {names[c.split('_', 1)[1]]}" for c in DAMAGE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m, row in rows.items():
        name = METHOD_NAMES.get(m, m) if m != "unedited" else "*(unedited)*"
        for seed, cell in row.get("per_seed", {}).items():
            lines.append(f"| {name} | {seed} | " + " | ".join(_pct(cell.get(c)) for c in DAMAGE_COLUMNS) + " |")
        lines.append(f"| {name} | **mean** | " + " | ".join(_pct(row.get(c)) for c in DAMAGE_COLUMNS) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The comparison as markdown: one table (rows = methods, percents), notes, then the per-target detail."""
    head = ("| method | style UA | style IRA | style CRA | object UA | object IRA | object CRA | UA before attack "
            "| UA after attack | time (s) | peak memory (MiB) | added memory (MiB) |\n" + "|---" * 12 + "|\n")
    lines = []
    for m, row in {**result["summary"], "unedited": result["unedited"]["summary"]}.items():
        name = METHOD_NAMES.get(m, m) if m != "unedited" else "*(unedited)*"
        lines.append(f"| {name} | " + " | ".join(_pct(row.get(k)) for k in COLUMNS)
                     + f" | {_secs(row.get('seconds'))} | {_mib(row.get('peak_memory_bytes'))}"
                     + f" | {_mib(row.get('added_memory_bytes'))} |")
    c = result["config"]
    kinds = sorted({r["memory_kind"] for r in result["summary"].values() if r.get("memory_kind")})
    notes = [f"UA/IRA/CRA in percent, averaged over {len(c['style_targets'])} style and {len(c['object_targets'])} "
             f"object targets; {c['num_images_per_run']} images per run (seeds {c['seeds']}, "
             f"steps {c['num_inference_steps']}, guidance {c['guidance_scale']})."]
    if c["attack"]:
        which = "every prompt" if c["attack_prompts"] is None else f"the first {c['attack_prompts']} prompt(s)"
        notes.append(f"Attack: UnlearnDiffAtk-style prefix, {c['attack_iterations']} iterations, on {which} holding "
                     "each target, targets = the unedited model's images; UA before = the same prompts and seeds "
                     "without the prefix; both averaged over all targets. The unedited row's attack is the control: "
                     "the same attack on the model no method touched, i.e. what the prefix does by itself.")
    notes.append(f"Time: seconds to apply the method, mean per target. Memory ({', '.join(kinds) or '-'}): peak while "
                 "applying it (max over targets) and its increase over the memory in use before.")
    ctrl = result.get("control")
    if ctrl:
        d = round(ctrl["move_points"], 1)
        notes.append(f"Control (the unedited model under the attack): UA {_pct(ctrl['ua_before'])} -> "
                     f"{_pct(ctrl['ua_after'])}, moves by {d + 0.0:+.1f} points (bar: at most {ctrl['bar_points']:g} "
                     f"either way): {'PASS' if ctrl['pass'] else 'FAIL'}.")
    dmg = result.get("damage")
    if dmg:
        cal = dmg.get("calibration", {})
        notes.append(f"Damage (saeuron.evaluate.damage, as `saeuron minicanvas eval`): an image is damaged when it is "
                     f"no clean picture of what it should still show; calibrated on {cal.get('images')} unedited "
                     f"images ({cal.get('source')}), of which {_pct(cal.get('flagged_clean'))} % are flagged. UA "
                     "undamaged counts a target image as unlearned only if it is undamaged.")
    s = result["summary"].get("saeuron", {})
    if s.get("attack_drop_points") is not None:
        ok = s["attack_drop_points"] <= ATTACK_BAR
        d = round(s["attack_drop_points"], 1)  # so float noise reads as 0.0, never "-0.0" or "drops by 0.0"
        how = f"drops by {d:.1f} points" if d > 0 else f"does not drop (changes by {0.0 - d:+.1f} points)"
        notes.append(f"SAeUron's UA {how} under the attack (bar: a drop of at most {ATTACK_BAR:g}): "
                     f"{'PASS' if ok else 'FAIL'}.")
    damaged = bool(dmg)
    detail = ["| method | domain | target | UA | IRA | CRA | UA before attack | UA after attack | time (s) "
              "| peak memory (MiB) |" + (" damage target | damage kept | UA undamaged |" if damaged else ""),
              "|---" * (13 if damaged else 10) + "|"]
    for m, per in {**result["per_target"], "unedited": result["unedited"]["per_target"]}.items():
        for d in DOMAINS:
            for t, r in per.get(d, {}).items():
                mt, a, e = r["metrics"], r.get("attack") or {}, r.get("edit") or {}
                name = METHOD_NAMES.get(m, "*(unedited)*")
                detail.append(f"| {name} | {d} | {t} | {_pct(mt['ua'])} | {_pct(mt['ira'])} | {_pct(mt['cra'])} | "
                              f"{_pct(a.get('ua_before'))} | {_pct(a.get('ua_after'))} | "
                              f"{_secs(e.get('seconds'))} | {_mib(e.get('peak_memory_bytes'))} |"
                              + ("".join(f" {_pct(mt.get(k))} |" for k in DAMAGE_METRICS) if damaged else ""))
    dtab = damage_table(result)
    return (head + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
            + (f"\n\n### Damage, per seed and mean\n\n{dtab}" if dtab else "") + "\n\n### Per target\n\n"
            + "\n".join(detail) + "\n")


@locks_folder("out_dir", "comparing methods into")
def compare_methods(pipe, classifiers: dict, checkpoint=None, *, saes=None, table=None, methods=METHODS,
                    style_targets=None, object_targets=None, seeds=(188,), objects=None, styles=None, templates=(0,),
                    attack: bool = True, attack_iterations: int = 40, attack_prompts: Optional[int] = None,
                    attack_kwargs: Optional[dict] = None, esd_iterations: int = 1000, esd_kwargs: Optional[dict] = None,
                    uce_kwargs: Optional[dict] = None, patch_kwargs: Optional[dict] = None,
                    num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                    batch_size: int = 16, out_dir="minicanvas_compare", grid_rows: int = 6, resume: bool = True,
                    progress: bool = True, damage: bool = True) -> dict:
    """Apply each method to each target, evaluate UA/IRA/CRA and UA under the attack; write and return one table.

    ``classifiers``: ``{"object", "style"}`` judges. ``checkpoint`` (or ``saes``/``table``): the SAEs and
    concept file, needed for the "saeuron" method. ``style_targets``/``object_targets``: None = every
    concept of that domain in the grid (and the concept file); ``[]`` skips the domain. ``objects``/
    ``styles``/``seeds``/``templates``: the prompt grid, as in ``evaluate_unlearning`` (default all objects,
    all styles + unstyled). ``attack_prompts``: attack the first n prompts per target (None: all).
    ``esd_kwargs``/``uce_kwargs``/``patch_kwargs``/``attack_kwargs`` override the methods' and the attack's
    arguments. ``num_inference_steps``/``guidance_scale``: None keeps the pipeline's defaults. ``damage``: judge
    every run with the damage measure, as ``saeuron minicanvas eval`` does.

    Returns ``{"config", "summary": {method: row}, "per_target": {method: {domain: {target: run}}},
    "unedited", "control", "damage", "table", "files"}``; rows hold fractions (style_ua ... ua_after_attack, and
    with ``damage`` {style,object}_{damage_target,damage_kept,ua_undamaged}), attack_drop_points, seconds,
    peak/added memory bytes and ``per_seed`` ({seed: the metrics on that seed's images}); a run holds metrics,
    per_seed, edit (time, memory, config) and attack. ``control``: :func:`control_movement` of the unedited row
    under the attack (None without the attack); ``damage``: the measure and its calibration (None without).
    """
    methods = list(dict.fromkeys([methods] if isinstance(methods, str) else methods))
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"unknown methods {bad or methods}; valid: {', '.join(METHODS)}")
    check_classifiers(classifiers)
    check_patch_kwargs(patch_kwargs or {})
    if attack and attack_iterations < 1:
        raise ValueError(f"attack_iterations must be >= 1, got {attack_iterations}")
    if attack_prompts is not None and attack_prompts < 1:
        raise ValueError(f"attack_prompts must be None (all) or >= 1, got {attack_prompts}")
    if "esd" in methods and esd_iterations < 1:
        raise ValueError(f"esd_iterations must be >= 1, got {esd_iterations}")
    need_table = "saeuron" in methods
    if need_table or checkpoint is not None or table is not None:
        saes, table = resolve_assets(checkpoint, saes, table)
        patch_kwargs = with_detectors(patch_kwargs or {}, checkpoint, table)
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    templates = [templates] if isinstance(templates, int) else list(templates)
    jobs = build_jobs(objects, styles, seeds, templates)
    grid_objects = [data.OBJECTS[o] for o in dict.fromkeys(j.object for j in jobs)]
    grid_styles = [None if s is None else data.STYLES[s] for s in dict.fromkeys(j.style for j in jobs)]
    targets = {"style": _targets("style", style_targets, jobs, table, need_table),
               "object": _targets("object", object_targets, jobs, table, need_table)}
    if not targets["style"] and not targets["object"]:
        raise ValueError("no target to unlearn: give style_targets and/or object_targets")
    out = Path(out_dir)
    num_inference_steps, guidance_scale = resolve_sampling(pipe, num_inference_steps, guidance_scale)
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size)
    base_cfg = baseline_config(pipe, classifiers, jobs, num_inference_steps, guidance_scale)
    opts = dict(saes=saes, table=table, patch_kwargs=patch_kwargs or {}, uce_kwargs=uce_kwargs or {},
                esd_kwargs=esd_kwargs or {}, esd_iterations=esd_iterations,
                steps=num_inference_steps, grid=(grid_objects, grid_styles), attack=attack,
                attack_iterations=attack_iterations, attack_prompts=attack_prompts,
                attack_kwargs=attack_settings(attack_kwargs), sampling=sampling, grid_rows=grid_rows, damage=None)
    prev = get_patch(pipe)  # the methods must start from the unedited model
    if prev is not None:
        prev.remove()
    try:
        base = unedited_baseline(pipe, classifiers, jobs, out, base_cfg, sampling, resume, progress)
        measure = opts["damage"] = fit_run_damage(classifiers, jobs, base) if damage else None
        control = (_attack_unedited(pipe, classifiers, jobs, targets, base, base_cfg, out, opts, resume, progress)
                   if attack else {})
        runs = _run_all(pipe, classifiers, jobs, targets, methods, base, base_cfg, out, opts, resume, progress)
    finally:
        if prev is not None:
            prev.install()

    bpo, bps = base["pred_object"].tolist(), base["pred_style"].tolist()
    unedited = {d: {} for d in DOMAINS}
    for d in DOMAINS:
        for t in targets[d]:
            flags = damage_flags(measure, base, jobs, (t,), d) if measure is not None else None
            unedited[d][t] = {"metrics": target_metrics(run_records(jobs, (t,), d, bpo, bps, flags), (t,), d),
                              "per_seed": per_seed_metrics(jobs, (t,), d, bpo, bps, flags),
                              **({"attack": control[d][t]} if control else {})}
    for m in methods:
        for d, per in runs[m].items():
            for t, r in per.items():
                r["per_seed"] = per_seed_metrics(jobs, (t,), d, r["pred_object"], r["pred_style"], r.get("damaged"))
    unedited_summary = summarise({"unedited": unedited}, ["unedited"])["unedited"]
    result = {
        "config": {"methods": methods, "style_targets": targets["style"], "object_targets": targets["object"],
                   "seeds": seeds, "templates": templates, "objects": grid_objects, "styles": grid_styles,
                   "num_images_per_run": len(jobs), "num_inference_steps": num_inference_steps,
                   "guidance_scale": guidance_scale, "attack": attack, "attack_iterations": attack_iterations,
                   "attack_prompts": attack_prompts, "esd_iterations": esd_iterations,
                   "checkpoint": None if checkpoint is None else str(checkpoint), "damage": damage,
                   "units": "metrics are fractions; seconds per target; memory in bytes; move_points in points"},
        "summary": summarise(runs, methods),
        "per_target": runs,
        "unedited": {"summary": unedited_summary, "per_target": unedited},
        "control": (control_movement(unedited_summary["ua_before_attack"], unedited_summary["ua_after_attack"])
                    if control else None),
        "damage": None if measure is None else {**measure.config(), "calibration": measure.calibration},
    }
    result["table"] = markdown(result)
    result["files"] = {"json": str(out / COMPARISON_FILE), "markdown": str(out / "comparison.md")}
    atomic_write_json(result, out / COMPARISON_FILE)
    atomic_write(out / "comparison.md", lambda tmp: Path(tmp).write_text(result["table"]))
    if progress:
        print(result["table"])
    return result


def _run_all(pipe, classifiers, jobs, targets, methods, base, base_cfg, out: Path, o: dict, resume, progress) -> dict:
    """Every (method, target) run: read from its cache file, or apply, evaluate, attack, restore and cache it."""
    todo = [(m, d, t) for m in methods for d in DOMAINS for t in targets[d]]
    runs: dict = {m: {d: {} for d in DOMAINS if targets[d]} for m in methods}
    fp = weights_fingerprint(o["saes"], o["table"]) if "saeuron" in methods else None
    bar = tqdm(todo, desc="compare", unit="run", disable=not progress)
    for method, domain, target in bar:
        bar.set_postfix_str(f"{method} {target}")
        kw = {}
        if method == "saeuron":
            edit_cfg = {"edit": edit_signature(o["table"], [target], o["patch_kwargs"]), "fingerprint": fp}
        elif method == "uce":
            kw["uce_kwargs"] = {**uce_arguments(target, domain, *o["grid"]), **o["uce_kwargs"]}
            edit_cfg = kw["uce_kwargs"]
        else:
            kw["esd_kwargs"] = {"concept": esd_prompts(target, domain, *o["grid"]), "method": ESD_VARIANT[domain],
                                "iterations": o["esd_iterations"], "ddim_steps": o["steps"], "progress": progress,
                                **o["esd_kwargs"]}
            edit_cfg = {k: v for k, v in kw["esd_kwargs"].items() if k != "progress"}
        cfg = {"baseline": base_cfg, "method": method, "domain": domain, "target": target, "edit": edit_cfg,
               "attack": _attack_config(o), "grid_rows": o["grid_rows"]}
        if o["damage"] is not None:
            cfg["damage"] = o["damage"].config()
        path = out / "runs" / method / f"{domain}_{slug(target)}.json"
        res = load_cached_result(path, cfg) if resume else None
        if res is None:
            with applied(pipe, method, target, domain, saes=o["saes"], table=o["table"],
                         patch_kwargs=o["patch_kwargs"], **kw) as info:
                t0 = time.perf_counter()
                run = evaluate_run(pipe, classifiers, jobs, (target,), domain, base, sampling=o["sampling"],
                                   grid_path=out / "grids" / method / f"{domain}_{slug(target)}.png",
                                   grid_rows=o["grid_rows"], progress=progress, damage=o["damage"])
                run["eval_seconds"] = time.perf_counter() - t0
                if o["attack"]:
                    run["attack"] = _attack(pipe, classifiers, jobs, run, base, target, domain, o)
            res = {**run, "edit": info}
            atomic_write_json({"config": json_roundtrip(cfg), "result": res}, path)
        runs[method][domain][target] = res
    bar.close()
    return runs


def _attack_config(o: dict) -> Optional[dict]:
    """The attack's settings as they key the cache (None: no attack)."""
    if not o["attack"]:
        return None
    return {"iterations": o["attack_iterations"], "prompts": o["attack_prompts"], **o["attack_kwargs"]}


def _attack(pipe, classifiers, jobs, run: dict, base: dict, target: str, domain: str, o: dict) -> dict:
    """:func:`attack_target` on ``pipe`` as it is, with the comparison's attack settings."""
    return attack_target(pipe, classifiers, jobs, run, base["images"], target, domain, prompts=o["attack_prompts"],
                         iterations=o["attack_iterations"], sampling=o["sampling"], attack_kwargs=o["attack_kwargs"])


def _attack_unedited(pipe, classifiers, jobs, targets, base, base_cfg, out: Path, o: dict, resume, progress) -> dict:
    """The attack on the unedited model for every target (cached like the runs): the control for the prefix alone."""
    run = {"pred_object": base["pred_object"].tolist(), "pred_style": base["pred_style"].tolist()}
    found: dict = {d: {} for d in DOMAINS}
    todo = [(d, t) for d in DOMAINS for t in targets[d]]
    for domain, target in tqdm(todo, desc="attack, unedited", unit="target", disable=not progress):
        cfg = {"baseline": base_cfg, "method": "unedited", "domain": domain, "target": target,
               "attack": _attack_config(o)}
        path = out / "runs" / "unedited" / f"{domain}_{slug(target)}.json"
        res = load_cached_result(path, cfg) if resume else None
        if res is None:
            res = _attack(pipe, classifiers, jobs, run, base, target, domain, o)
            atomic_write_json({"config": json_roundtrip(cfg), "result": res}, path)
        found[domain][target] = res
    return found


__all__ = ["compare_methods", "applied", "attack_target", "attack_control", "attack_settings", "control_movement",
           "per_seed_metrics", "caption_templates", "esd_prompts", "uce_arguments", "summarise", "markdown",
           "damage_table", "METHODS", "CONTROL_BAR", "ATTACK_BAR", "DAMAGE_COLUMNS"]
