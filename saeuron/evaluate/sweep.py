"""Per-concept sweep: hookpoints x threshold x rule (percentile or top_n) x multiplier, maximising (UA + IRA) / 2,
where (with the MiniCanvas judges, by default) an image counts as unlearned or kept only if the damage measure
passes it.

The sweep scores every grid point on *tuning* seeds disjoint from the evaluation seeds (method.md
section 4: "a per-class sweep over percentile {99.99, 99.995, 99.999} x multiplier {-1, -5, ..., -30},
maximising (UA + IRA)/2"), then writes each concept's best point into the concept file's per-concept
defaults (``table.defaults[c]``; with the edit ``mode`` it was scored in, when not the method's scale edit: a
sweep run with ``mode="probe_anchor"`` makes that the concept's default mode) and the whole grid into ``table.metadata["sweep"][c]``, so a later
``patch``/evaluation uses them without arguments. ``hookpoints`` lists where to try editing: each
choice is one hookpoint or a set of them (default: one choice, every hookpoint of the concept file), so
objects and styles may each end up at the block that carries them. ``thresholds`` lists factors on the
edit threshold tau (default: 1, the method's alone); a larger one edits only where a feature fires
strongly. Ties keep the first grid point in grid order (hookpoint choices, thresholds, rule values,
then multipliers, each in the order given: mildest first by default).

Small dictionaries: a percentile of a few thousand scores selects at most one feature whatever the
percentile, so ``rule="auto"`` sweeps ``top_n`` {1, 2, 4, 8} unless the percentile grid can select
at least two features per timestep.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from tqdm.auto import tqdm

from ..concepts import ConceptTable, check_percentile, check_threshold, check_top_n
from ..patching import get_patch, patched
from ..utils import locks_folder
from .common import EVAL_SEEDS, check_patch_kwargs, judge, resolve_assets, sample_images, with_detectors
from .metrics import DOMAINS, kept_undamaged, target_metrics
from .protocol import MULTIPLIERS, PERCENTILES, THRESHOLDS, TOP_NS, TUNING_SEEDS
from .unlearn_eval import build_jobs, damage_flags, fit_run_damage, json_roundtrip, run_records

RULES = ("auto", "percentile", "top_n")
DAMAGE_KEYS = ("ua_undamaged", "ira_undamaged", "damage_target", "damage_kept")  # a grid row's damage figures


def choose_rule(table, percentiles=PERCENTILES) -> str:
    """"percentile" when the loosest percentile keeps >= 2 of the smallest dictionary's features, else "top_n"."""
    m = min(table.num_latents(h) for h in table.hookpoints)
    return "percentile" if m * (100 - min(percentiles)) / 100 >= 2 else "top_n"


def hookpoint_choices(table, hookpoints=None) -> list:
    """The sweep's hookpoint choices as sorted tuples of the table's hookpoints (None: one, all of them).

    ``hookpoints``: a list whose entries are a hookpoint name, a comma-joined set of names or a list of names.
    """
    if hookpoints is None:
        return [tuple(sorted(table.hookpoints))]
    if isinstance(hookpoints, str):
        hookpoints = [hookpoints]
    out = []
    for choice in hookpoints:
        names = choice.split(",") if isinstance(choice, str) else list(choice)
        hps = tuple(sorted({table.stored_hookpoint(h.strip()) for h in names if h.strip()}))  # unknown -> error naming the known
        if not hps:
            raise ValueError(f"empty hookpoint choice {choice!r}; hookpoints with statistics: {table.hookpoints}")
        if hps not in out:
            out.append(hps)
    if not out:
        raise ValueError(f"no hookpoint choices given; hookpoints with statistics: {table.hookpoints}")
    return out


def grid_points(rule: str, multipliers=MULTIPLIERS, percentiles=PERCENTILES, top_ns=TOP_NS,
                hookpoints=(None,), thresholds=THRESHOLDS) -> list:
    """``[(rule, value, multiplier, hookpoints, threshold)]`` in sweep order (hookpoint choices, thresholds,
    rule values, multipliers)."""
    if rule not in ("percentile", "top_n"):
        raise ValueError(f"rule must be 'percentile' or 'top_n' here, got {rule!r}")
    values = percentiles if rule == "percentile" else top_ns
    if not values or not multipliers:
        raise ValueError(f"empty sweep grid: {rule} values {list(values or [])}, multipliers {list(multipliers or [])}")
    for m in multipliers:
        if not (isinstance(m, (int, float)) and math.isfinite(m)):
            raise ValueError(f"multipliers must be finite numbers (gamma < 0 suppresses), got {m!r}")
    if not thresholds:
        raise ValueError("empty sweep grid: no thresholds (give 1 for the method's tau)")
    thresholds = [check_threshold(t, "the sweep's thresholds") for t in thresholds]
    values = [check_percentile(v, "the sweep's percentiles") if rule == "percentile" else
              check_top_n(v, "the sweep's top_ns") for v in values]
    return [(rule, float(v) if rule == "percentile" else int(v), float(m), h, t)
            for h in hookpoints for t in thresholds for v in values for m in multipliers]


def make_scorer(pipe, classifiers, saes, table, *, domain: str, seeds=TUNING_SEEDS, objects=None, styles=None,
                templates=(0,), num_inference_steps=None, guidance_scale=None, batch_size: int = 16,
                progress: bool = False, damage: bool = True, **patch_kwargs) -> Callable:
    """A ``scorer(concept, rule, value, multiplier, hookpoints, threshold) -> {"ua", "ira", "cra", ...}`` that
    generates on ``seeds``, editing at ``hookpoints`` (a tuple of names) with ``threshold`` times tau.

    ``damage``: also judge each image with the damage measure (:mod:`.damage`, calibrated on the unedited model's
    images of the same prompts, generated once), adding ``damage_target``, ``damage_kept``, ``ua_undamaged`` and
    ``ira_undamaged`` (a kept image counts as kept only if it is also undamaged).
    Grid points that select exactly the same features with the same multiplier and threshold are scored once.
    """
    jobs = build_jobs(objects, styles, seeds, templates)
    memo: dict = {}
    measure: list = []  # the damage measure, fitted at the first scored point

    def generate(bar_desc):
        bar = tqdm(total=len(jobs), unit="img", desc=bar_desc, disable=not progress, leave=False)
        try:
            return sample_images(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], bar=bar,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 batch_size=batch_size)
        finally:
            bar.close()

    def scorer(concept, rule, value, multiplier, hookpoints, threshold=1.0):
        sel = {"percentile": value} if rule == "percentile" else {"top_n": value}
        key = (concept, float(multiplier), float(threshold),
               tuple((h, tuple(tuple(t.tolist()) for t in table.select(h, concept, **sel)))
                     for h in sorted(hookpoints)))
        if key not in memo:
            if damage and not measure:
                prev = get_patch(pipe)  # the unedited images: without any patch the caller had installed
                if prev is not None:
                    prev.remove()
                try:
                    base = judge(classifiers, generate("unedited"))
                finally:
                    if prev is not None:
                        prev.install()
                measure.append(fit_run_damage(classifiers, jobs, base))
            with patched(pipe, concept, saes=saes, table=table, multiplier=multiplier, hookpoints=list(hookpoints),
                         threshold=threshold, **sel, **patch_kwargs):
                images = generate(f"{concept} {rule}={value} x{multiplier}")
            p = judge(classifiers, images)
            dmg = damage_flags(measure[0], p, jobs, (concept,), domain) if damage else None
            recs = run_records(jobs, (concept,), domain, p["pred_object"].tolist(), p["pred_style"].tolist(), dmg)
            memo[key] = target_metrics(recs, (concept,), domain)
            if damage:
                memo[key]["ira_undamaged"] = kept_undamaged(recs, (concept,), domain)
        return dict(memo[key])

    return scorer


@locks_folder("save_to", "sweeping into")
def sweep(pipe=None, classifiers=None, checkpoint=None, *, saes=None, table=None, concepts=None,
          domain: str = "style", seeds=TUNING_SEEDS, eval_seeds=EVAL_SEEDS, rule: str = "auto",
          multipliers=MULTIPLIERS, percentiles=PERCENTILES, top_ns=TOP_NS, hookpoints=None, thresholds=THRESHOLDS,
          objects=None, styles=None,
          templates=(0,), num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
          batch_size: int = 16, scorer: Optional[Callable] = None, save_to=None, resume: bool = True,
          progress: bool = True, damage: bool = True, **patch_kwargs) -> dict:
    """Pick each concept's best (hookpoints, threshold, rule value, multiplier) by (UA + IRA) / 2 and store it as
    its default.

    ``damage`` (with ``pipe`` and ``classifiers``): judge every image with the damage measure too and score by
    ``(ua_undamaged + ira_undamaged) / 2``, so that an edit which removes the concept by breaking the image, or
    breaks kept images, loses to a clean one (issue 21: an image counts as unlearned only if it is undamaged);
    a ``scorer`` that returns ``ua_undamaged`` and ``ira_undamaged`` is scored the same way.

    ``hookpoints``: the choices of where to edit (see :func:`hookpoint_choices`; default: every hookpoint).
    ``thresholds``: factors on the edit threshold tau to try (default: 1 only, the method's).
    ``scorer(concept, rule, value, multiplier, hookpoints, threshold) -> {"ua", "ira", ...}`` replaces generation
    (tests, custom protocols); otherwise ``pipe`` and ``classifiers`` generate on ``seeds``, which must not
    overlap ``eval_seeds``. ``concepts`` default to the concept file's MiniCanvas concepts of ``domain``.
    The concept file is saved to ``save_to`` (default: ``checkpoint``) after every scored point. With ``resume``,
    points the concept file already holds for the same seeds, prompts (objects, styles, templates), sampling and
    patch options are reused, not rescored: an interrupted sweep goes on where it stopped, and a wider grid
    scores only its new points. A concept's best is chosen among the points of this grid.
    Returns ``{concept: {"best": {...}, "grid": [...]}}``.
    """
    from ..minicanvas import data

    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    check_patch_kwargs(patch_kwargs, exclude=("multiplier", "percentile", "top_n", "hookpoints", "threshold"))  # swept
    seeds = [int(s) for s in seeds]
    overlap = sorted(set(seeds) & {int(s) for s in eval_seeds})
    if not seeds or overlap:
        raise ValueError(f"tuning seeds {seeds} must be non-empty and disjoint from the evaluation seeds "
                         f"{list(eval_seeds)} (shared: {overlap})")
    if scorer is None:
        if pipe is None or classifiers is None:
            raise ValueError("pass pipe= and classifiers= (or a scorer=) to sweep")
        saes, table = resolve_assets(checkpoint, saes, table)
        patch_kwargs = with_detectors(patch_kwargs, checkpoint, table)
        scorer = make_scorer(pipe, classifiers, saes, table, domain=domain, seeds=seeds, objects=objects,
                             styles=styles, templates=templates, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, batch_size=batch_size, damage=damage, **patch_kwargs)
    else:
        damage = False  # the scorer decides what it measures (its ua_undamaged / ira_undamaged, when given)
        if table is None:
            if checkpoint is None:
                raise ValueError("pass checkpoint= or table= so the sweep has a concept file to write into")
            table = ConceptTable.load(checkpoint)
    labels = data.STYLES if domain == "style" else data.OBJECTS
    concepts = [c for c in labels if c in table.names] if concepts is None else (
        [concepts] if isinstance(concepts, str) else list(concepts))
    if not concepts:
        raise ValueError(f"no {domain} concepts to sweep; the concept file has: {', '.join(table.names)}")
    for c in concepts:
        table.index(c)
    kind = choose_rule(table, percentiles) if rule == "auto" else rule
    points = grid_points(kind, multipliers, percentiles, top_ns, hookpoint_choices(table, hookpoints), thresholds)
    spec = {"rule": kind, "seeds": seeds, "domain": domain,  # how points are scored; the grid is in the rows
            "prompts": json_roundtrip({"objects": objects, "styles": styles, "templates": templates,  # what was scored
                              "steps": num_inference_steps, "guidance": guidance_scale, "patch": patch_kwargs})}
    if damage:  # absent when off: sweeps stored before the damage measure are reused as they were scored
        spec["damage"] = True
    several_hps = len({p[3] for p in points}) > 1
    save_to = save_to if save_to is not None else checkpoint
    stored = table.metadata.setdefault("sweep", {})
    out = {}
    bar = tqdm(total=len(concepts) * len(points), desc="sweep", unit="point", disable=not progress)
    for c in concepts:
        mode, gate, anchor = _edit_mode(table, c, patch_kwargs)
        cspec = spec if mode == "scale" or patch_kwargs.get("mode") is not None else {
            **spec, "mode": mode, "gate": gate, **({"anchor": anchor} if anchor is not None else {})}
        prev = stored.get(c) if resume else None
        known = {}  # points already scored on the same seeds, prompts and sampling: reused, not rescored
        if isinstance(prev, dict) and _same_scoring(prev.get("spec"), cspec):
            known = {_point_key(r): r for r in prev.get("grid") or []}
        rows, best = [], None
        for r, v, m, h, t in points:
            row = known.get(_point_key({"hookpoints": h, "threshold": t, "rule": r, "value": v, "multiplier": m}))
            if row is None:
                bar.set_postfix_str(f"{c} {'+'.join(h) + ' ' if several_hps else ''}"
                                    f"{f'tau x{t:g} ' if t != 1 else ''}{r}={v} x{m}")
                s = scorer(c, r, v, m, h, t)
                clean = s.get("ua_undamaged") is not None and s.get("ira_undamaged") is not None
                ua, ira = (s["ua_undamaged"], s["ira_undamaged"]) if clean else (s.get("ua"), s.get("ira"))
                row = {"hookpoints": list(h), "threshold": t, "rule": r, "value": v, "multiplier": m,
                       **{k: s.get(k) for k in ("ua", "ira", "cra")},
                       **{k: s[k] for k in DAMAGE_KEYS if s.get(k) is not None},
                       "score": None if ua is None or ira is None else (ua + ira) / 2}
                known[_point_key(row)] = row
                if save_to is not None:  # an interrupted sweep resumes at the next point
                    stored[c] = {**(prev if isinstance(prev, dict) else {}), "spec": cspec,
                                 "grid": list(known.values()), "partial": True}
                    table.save(save_to)
            else:
                row = {"threshold": 1.0, **row}  # rows stored before thresholds were swept edited at tau x1
            rows.append(row)
            if row["score"] is not None and (best is None or row["score"] > best["score"]):
                best = row
            bar.update()
        if best is None:
            raise ValueError(f"the sweep of {c!r} produced no score: UA or IRA is undefined (no target or no "
                             "other images among the prompts)")
        table.defaults[c] = {"multiplier": best["multiplier"],
                             "percentile": best["value"] if best["rule"] == "percentile" else None,
                             "top_n": best["value"] if best["rule"] == "top_n" else None,
                             "hookpoints": list(best["hookpoints"]), "threshold": best["threshold"],
                             **({"mode": mode, **({"gate": gate} if gate is not None else {}),
                                 **({"anchor": anchor} if anchor is not None else {})} if mode != "scale" else {})}
        stored[c] = out[c] = {"best": best, "grid": rows, "spec": cspec}
        if save_to is not None:
            table.save(save_to)
    bar.close()
    if progress:
        print(sweep_table(out))
    return out


def _edit_mode(table, concept, patch_kwargs) -> tuple:
    """``(mode, gate, anchor)`` the sweep scores ``concept`` with, which its new defaults keep: the ``mode`` (``gate``,
    ``anchor``) passed to the sweep, else the concept's current default mode (gate, anchor)."""
    pick = lambda v: v.get(concept) if isinstance(v, dict) else v  # noqa: E731
    mode, gate, anchor = pick(patch_kwargs.get("mode")), patch_kwargs.get("gate"), pick(patch_kwargs.get("anchor"))
    if mode is None:
        mode, own = table.edit_mode(concept)
        gate = own if gate is None else gate
        anchor = table.default_anchor(concept) if anchor is None else anchor
    return mode, gate, (anchor if mode == "probe_anchor" else None)


def _same_scoring(a, b) -> bool:
    """Whether two sweep specs scored points the same way (seeds, domain, rule, prompts, sampling); the "grid"
    that specs stored before point-wise reuse also hold is ignored."""
    strip = lambda spec: {k: v for k, v in spec.items() if k != "grid"}  # noqa: E731
    return isinstance(a, dict) and strip(a) == strip(b)


def _point_key(row) -> tuple:
    """A grid point's identity: (hookpoints, threshold, rule, value, multiplier), numbers as floats."""
    return (tuple(sorted(row["hookpoints"])), float(row.get("threshold", 1.0)), row["rule"], float(row["value"]),
            float(row["multiplier"]))


def sweep_table(result: dict) -> str:
    """The best point of every concept as a markdown table (percents)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    dmg = any(r["best"].get("ua_undamaged") is not None for r in result.values())
    extra = " UA undamaged | IRA undamaged | damage target / kept |" if dmg else ""
    lines = ["| concept | hookpoints | threshold | rule | value | multiplier | UA | IRA | CRA |" + extra
             + (" score |" if dmg else " (UA+IRA)/2 |"), "|---" * (14 if dmg else 10) + "|"]
    for c, r in result.items():
        b = r["best"]
        hps = " + ".join(b.get("hookpoints") or ["(all)"])
        more = (f" {pct(b.get('ua_undamaged'))} | {pct(b.get('ira_undamaged'))} | {pct(b.get('damage_target'))} / "
                f"{pct(b.get('damage_kept'))} |") if dmg else ""
        lines.append(f"| {c} | {hps} | {b.get('threshold', 1.0):g} | {b['rule']} | {b['value']} | {b['multiplier']:g} "
                     f"| {pct(b['ua'])} | {pct(b['ira'])} | {pct(b.get('cra'))} |{more} {pct(b['score'])} |")
    if dmg:
        lines.append("\nscore = (UA undamaged + IRA undamaged) / 2: an image counts as unlearned (or kept) only if "
                     "the damage measure passes it.")
    return "\n".join(lines) + "\n"
