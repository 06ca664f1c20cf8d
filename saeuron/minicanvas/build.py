"""Build every shipped MiniCanvas default with the project's own code (``saeuron minicanvas build``).

Stages, in order; each is skipped when ``out_dir/BUILD.json`` records it done and its artefacts exist,
and each resumes where a killed run stopped (classifiers are quick and simply redone):

1. ``classifiers``: object and style judges (``classifiers.train_classifier``) -> ``classifiers/{object,style}``;
   with the ``classifiers_from`` setting (a folder with ``object/`` and ``style/`` judges, or "shipped") they are
   loaded from there, checked and saved into the build instead (the judges read renders, not the model, so a
   rebuild for a retrained model may keep them; BUILD.json records the source and the weights' sha256);
2. ``model``: the text-to-image model (``train_model``, checkpoints in ``work_dir/model``) -> ``model/`` (fp16);
3. ``gates``: held-out render accuracy of both classifiers (gate >= 99 %) and their accuracy on the
   images the unedited model generates for every training prompt x seed (gate >= 95 %; for a model trained
   on caption forms the issue-21 gates: objects >= 98 %, styles >= 99 %, and also >= 90 % on every prompt in
   the held-out caption forms, and the prefix attack's control moving the unedited model's UA by at most 5
   points; :func:`model_gates`, also ``saeuron minicanvas gates`` on any saved pipeline), plus a check of the
   damage measure on this model's own images (calibrated on its first seed, flagged share of the others; not a
   gate: every evaluation calibrates the measure on the judged model's unedited images) -> ``gates.json``;
4. ``collect``: activations at the ``hookpoints`` setting's blocks over every object x style (+ unstyled)
   training prompt, ``collect_repeats`` times (``saeuron.collect``, in ``work_dir/activations``); for a model
   trained on caption forms (or with ``collect_forms`` true) the repeats after the first put each prompt in
   another training caption form (:func:`collect_captions`), so SAEs and statistics see words, not one sentence;
5. ``sae``: a TopK SAE per hookpoint (``saeuron.train``, state in ``work_dir/sae``) -> ``checkpoint/<hookpoint>/``;
6. ``concepts``: the concept file over every object and every style concept (a prompt belongs to its
   object and to its style) with a top-n-per-timestep default rule -> ``checkpoint/concepts.*``, and every
   concept's image-level detector at every hookpoint (``mode="probe_uncond"``, :mod:`saeuron.detectors`) ->
   ``checkpoint/detectors.*``.

A stage that runs makes everything built from it stale: the stages that depend on it (``DEPENDS``,
transitively) are marked not done and their resumable work state (activation store, SAE trainer
state) is deleted, so a retrained model is never paired with the old model's activations or SAE.
A build whose settings differ from the recorded ones redoes the stages that read a changed setting
(``STAGE_SETTINGS``) the same way, e.g. a new ``guidance`` redoes gates and collection (then SAE and
concept file) but keeps the classifiers and the trained model.

``out_dir/BUILD.json`` records the seed, the config, the exact command, the settings, library versions,
each stage's time and the gates. Gates are measured and reported, never enforced: a failed gate is
printed as such and recorded with ``"pass": false``.
"""
from __future__ import annotations

import copy
import json
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..store import derive_seed
from ..utils import atomic_write_json, file_sha256, locks_folder
from . import classifiers as clf
from . import data
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, model_config, save_pipeline

BUILD_FILE = "BUILD.json"
GATES_FILE = "gates.json"
FORMAT = "saeuron-minicanvas-build"
STAGES = ("classifiers", "model", "gates", "collect", "sae", "concepts")
# what each stage is built from: rerunning a stage invalidates its dependents, transitively
DEPENDS = {"classifiers": (), "model": (), "gates": ("classifiers", "model"), "collect": ("model",),
           "sae": ("collect",), "concepts": ("collect", "sae")}
# the settings each stage reads: changing one redoes that stage (and its dependents) on the next build
STAGE_SETTINGS = {"classifiers": ("classifier_steps", "classifier_batch", "classifiers_from"), "model": ("model",),
                  "gates": ("heldout_n", "gate_seeds", "sample_steps", "guidance", "sample_batch", "form_gate_seeds",
                            "attack_control"),
                  "collect": ("hookpoints", "collect_repeats", "collect_batch", "collect_dtype", "sample_steps",
                              "guidance", "collect_forms"),
                  "sae": ("sae", "supervise", "collect_forms"),
                  "concepts": ("top_n", "multiplier", "supervise", "collect_forms")}
GATE_SEEDS = (188, 288, 588, 688, 888)  # the UnlearnCanvas evaluation seeds
HELDOUT_GATE, GENERATED_GATE = 0.99, 0.95
# issue 21, for a model trained on caption forms: the training form on the protocol seeds, and the held-out forms
FORM_GATES = {"object": 0.98, "style": 0.99}
HELDOUT_FORM_GATE = 0.90
# the attack control of the gates (``model_gates(control=...)``, ``compare.attack_control`` arguments), per config:
# the protocol of benchmarks/RESULTS.md (seed 188, the first 5 prompts of every style and object, 40 iterations)
CONTROL_DEFAULTS = {"micro": dict(seeds=(188,), prompts=1, iterations=1, style_targets=("stripes",),
                                  object_targets=("circle",)),
                    "cpu": dict(seeds=(188,), prompts=5, iterations=40),
                    "gpu": dict(seeds=(188,), prompts=5, iterations=40)}
MAX_FILE_BYTES = 16 * 2 ** 20

# per model config: every setting of every stage (``settings=`` overrides any of them).
# ``model``: keyword arguments of ``train_model`` (its TRAIN_DEFAULTS fill the rest). Caption forms are off by
# default (the shipped model's recipe); ``--set 'model={"caption_forms": true}'`` trains on the training caption
# forms (``data.caption_forms("train")``) with the tokenizer over every form's words, and redoes the model stage.
# ``hookpoints``: where the SAEs go. The 16x16 up-block transformer is SD1.5's up_blocks.1.attentions.1 by
# analogy (styles are removed there); the two 8x8 up-block transformers carry the objects (an object sweep
# on tuning seed 1 scored (UA+IRA)/2 = 77 and 72 there against 64 at 16x16; benchmarks/RESULTS.md). Each
# concept's sweep picks its own hookpoint (``ConceptTable.defaults[c]["hookpoints"]``).
# ``supervise`` (None: off) trains the SAEs with concept supervision (issue 22's lever, see saeuron.supervision):
# ``{"concepts": "objects" | "styles" | "all", "weight": 1.0, "latents_per_concept": 1}`` (missing keys take these
# values); the concepts stage then makes each supervised concept's reserved latents its selection rule.
# ``form_gate_seeds`` (None: the ``gate_seeds``) and ``attack_control`` (None: ``CONTROL_DEFAULTS[config]``; a dict
# overrides entries of it; false skips the control) only act when the model is trained on caption forms. Both
# default to None, so builds recorded before they existed keep their gates. ``collect_forms`` (None: follow
# ``model["caption_forms"]``; true / false) collects, and so scores concepts, over the training caption forms.
# ``classifiers_from`` (None: train the judges) takes the judges from a folder (or "shipped": the package's own).
BUILD_DEFAULTS = {
    "micro": dict(hookpoints=("up_blocks.0.attentions.1",), classifier_steps=30, classifier_batch=32,
                  model=dict(steps=30, batch_size=16),
                  heldout_n=64, gate_seeds=(188,), sample_steps=4, guidance=DEFAULT_GUIDANCE, sample_batch=64,
                  collect_repeats=1, collect_batch=55, collect_dtype="fp32",
                  sae=dict(k=4, expansion_factor=4, batch_size=256, lr=2e-3, epochs=1, dead_tokens_threshold=100_000,
                           save_every=1000),
                  top_n=2, multiplier=-1.0, form_gate_seeds=None, attack_control=None, supervise=None,
                  collect_forms=None, classifiers_from=None),
    "cpu": dict(hookpoints=("up_blocks.1.attentions.1", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"),
                classifier_steps=2000, classifier_batch=128, model={}, heldout_n=2000, gate_seeds=GATE_SEEDS,
                sample_steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, sample_batch=64,
                collect_repeats=2, collect_batch=22, collect_dtype="fp16",
                sae=dict(k=16, expansion_factor=16, batch_size=4096, lr=8e-4, epochs=4, dead_tokens_threshold=1_000_000,
                         save_every=250),
                top_n=5, multiplier=-1.0, form_gate_seeds=None, attack_control=None, supervise=None,
                  collect_forms=None, classifiers_from=None),
    "gpu": dict(hookpoints=("up_blocks.1.attentions.1", "up_blocks.1.attentions.2", "up_blocks.0.attentions.1",
                            "up_blocks.0.attentions.2"),
                classifier_steps=4000, classifier_batch=256, model={}, heldout_n=5000, gate_seeds=GATE_SEEDS,
                sample_steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, sample_batch=256,
                collect_repeats=4, collect_batch=55, collect_dtype="fp16",
                sae=dict(k=16, expansion_factor=16, batch_size=4096, lr=6e-4, epochs=4, dead_tokens_threshold=2_000_000,
                         save_every=500),
                top_n=5, multiplier=-1.0, form_gate_seeds=None, attack_control=None, supervise=None,
                  collect_forms=None, classifiers_from=None),
}


def build_settings(config: str = "cpu", settings: Optional[dict] = None) -> dict:
    """The stage settings of a build: ``BUILD_DEFAULTS[config]`` updated by ``settings`` (dicts merged one level)."""
    if config not in BUILD_DEFAULTS:
        raise ValueError(f"unknown MiniCanvas build config {config!r}; valid: {', '.join(BUILD_DEFAULTS)}")
    out = copy.deepcopy(BUILD_DEFAULTS[config])
    for k, v in (settings or {}).items():
        if k not in out:
            raise ValueError(f"unknown build setting {k!r}; valid: {', '.join(out)}")
        out[k] = {**out[k], **v} if isinstance(out[k], dict) and isinstance(v, dict) else v
    return out


SUPERVISE_DEFAULTS = {"concepts": "objects", "weight": 1.0, "latents_per_concept": 1}


def supervision_settings(value) -> Optional[dict]:
    """The ``supervise`` build setting completed with :data:`SUPERVISE_DEFAULTS` (None when off); a clear error
    for anything else."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict) or set(value) - set(SUPERVISE_DEFAULTS):
        raise ValueError(f"supervise={value!r}: give null (off) or a dict with keys among "
                         f"{sorted(SUPERVISE_DEFAULTS)}, e.g. {SUPERVISE_DEFAULTS}")
    out = {**SUPERVISE_DEFAULTS, **value}
    if out["concepts"] not in ("objects", "styles", "all"):
        raise ValueError(f"supervise concepts={out['concepts']!r}; valid: objects, styles, all")
    return out


def supervised_concepts(which: str, repeats: int = 1, forms: bool = False) -> dict:
    """``{concept: [prompts]}`` of the concepts ``which`` ("objects", "styles", "all") names (see
    :func:`concept_prompts`, which ``repeats`` and ``forms`` go to)."""
    names = {"objects": data.OBJECTS, "styles": data.STYLES, "all": tuple(data.OBJECTS) + tuple(data.STYLES)}[which]
    return {c: p for c, p in concept_prompts(repeats, forms).items() if c in names}


def collect_captions(repeats: int = 1, forms: bool = False) -> list:
    """``[(object, style or None, caption)]``: what the collect stage generates, style-major, then object, ``repeats``
    times over. Without ``forms`` every repeat is the training form (form 0). With ``forms`` (a model trained on
    caption forms) the first repeat is form 0 and each later one puts every object x style in another *training*
    form (``data.caption_forms("train")``, form 0 left out), rotating so that the forms are used about equally;
    held-out forms never occur, so the held-out-form results stay held out."""
    if not (isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(forms, bool):
        raise ValueError(f"forms must be True or False, got {forms!r}")
    styles = list(data.STYLES) + [None]
    others = {u: [f for f in data.caption_forms("train", unstyled=u) if f != 0] for u in (False, True)}
    n = len(styles) * len(data.OBJECTS)
    out = []
    for r in range(repeats):
        for si, s in enumerate(styles):
            for oi, o in enumerate(data.OBJECTS):
                f = 0
                if forms and r > 0:
                    pool = others[s is None]
                    f = pool[((r - 1) * n + si * len(data.OBJECTS) + oi) % len(pool)]
                out.append((o, s, data.form_caption(o, s, f)))
    return out


def training_prompts(repeats: int = 1, forms: bool = False) -> list:
    """The collect stage's prompts: every object x style (+ unstyled), ``repeats`` times over, in the training form
    or (``forms``) in the training caption forms (:func:`collect_captions`)."""
    return [c for _, _, c in collect_captions(repeats, forms)]


def concept_prompts(repeats: int = 1, forms: bool = False) -> dict:
    """``{concept: [prompts]}`` over the collect stage's prompts (:func:`collect_captions` with the same ``repeats``
    and ``forms``; each prompt once): each object with its prompts in every style (+ unstyled), each style with its
    prompts of every object. A prompt belongs to one object and (unless unstyled) one style concept."""
    out = {c: [] for c in tuple(data.OBJECTS) + tuple(data.STYLES)}
    for o, s, cap in collect_captions(repeats, forms):
        for c in (o, s):
            if c is not None and cap not in out[c]:
                out[c].append(cap)
    return out


def classifiers_source(st: dict) -> Optional[Path]:
    """The folder the ``classifiers_from`` setting names (None: the build trains its judges); "shipped" is the
    package's own judges. A clear error, before any stage runs, when the folder lacks a judge."""
    v = st.get("classifiers_from")
    if v is None:
        return None
    if v == "shipped":
        from .defaults import assets_dir
        v = assets_dir() / "classifiers"
    if not isinstance(v, (str, Path)) or not str(v):
        raise ValueError(f"classifiers_from={v!r}: give null (train the judges), \"shipped\" or a folder path")
    root = Path(v)
    missing = [str(root / k / f) for k in clf.KINDS for f in (clf.WEIGHTS_FILE, clf.CONFIG_FILE)
               if not (root / k / f).is_file()]
    if missing:
        raise ValueError(f"classifiers_from={str(v)!r}: not a folder of MiniCanvas judges, missing {missing} (expected "
                         f"{'/, '.join(clf.KINDS)}/ each with {clf.WEIGHTS_FILE} and {clf.CONFIG_FILE}, as a build's "
                         "classifiers/ folder)")
    return root


def collect_forms(st: dict) -> bool:
    """Whether a build's collect stage (and so its SAEs and statistics) covers the training caption forms: the
    ``collect_forms`` setting, or, when that is None, whether the model is trained on caption forms."""
    v = st.get("collect_forms")
    if v is None:
        return bool((st.get("model") or {}).get("caption_forms"))
    if not isinstance(v, bool):
        raise ValueError(f"collect_forms={v!r}: give null (follow the model's caption_forms), true or false")
    return v


# ---------------------------------------------------------------- gates

def gate_jobs(seeds=GATE_SEEDS, forms: Optional[str] = None) -> list:
    """The images a gate generates: ``(object id, style id, seed)`` for every training prompt x seed (``forms``
    None: the training form, form 0), or ``(object id, style id, seed, form)`` for every prompt in every caption form
    of the split ``forms`` ("train", "heldout", "all"; styled prompts in ``data.caption_forms(split)``, unstyled ones
    in ``data.caption_forms(split, unstyled=True)``). Style-major, then object, then form, then seed."""
    seeds = [int(x) for x in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds:
        raise ValueError("need at least one seed")
    unstyled = len(data.STYLES)
    if forms is None:
        return [(o, s, seed) for s in range(len(data.STYLE_LABELS)) for o in range(len(data.OBJECTS)) for seed in seeds]
    data.check_split(forms)
    return [(o, s, seed, f) for s in range(len(data.STYLE_LABELS)) for o in range(len(data.OBJECTS))
            for f in data.caption_forms(forms, unstyled=s == unstyled) for seed in seeds]


def form_key(style_id: int, form: int) -> str:
    """The name of a caption form in gate reports: "styled 14" or "unstyled 10" (the indices of
    ``data.CAPTION_FORMS`` and ``data.UNSTYLED_CAPTION_FORMS`` differ)."""
    return f"{'unstyled' if style_id == len(data.STYLES) else 'styled'} {form}"


@torch.no_grad()
def generated_accuracy(pipe, classifiers: dict, seeds=GATE_SEEDS, num_inference_steps: int = DEFAULT_STEPS,
                       guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64, progress: bool = True,
                       return_images: bool = False, forms: Optional[str] = None) -> dict:
    """Accuracy of the object and style classifiers on the model's images for every training prompt x seed.

    One CPU generator per image (seeded by its seed), so batching never changes an image. Returns
    ``{"object": acc, "style": acc, "n": images, "per_object": {...}, "per_style": {...}}`` (and
    ``"images"`` [N, 3, H, W] in [0, 1] plus ``"jobs"`` (see :func:`gate_jobs`) when asked).
    ``forms``: None generates the training form; a caption-form split ("heldout", "train", "all") generates
    every prompt in each of its forms instead and adds ``"per_form": {form_key: {"object", "style", "n",
    "caption"}}``. The pipeline's warnings about prompt forms it was not trained on are silenced here: measuring
    those forms is the point.
    """
    from tqdm.auto import tqdm

    jobs = gate_jobs(seeds, forms)

    def prompt(job):
        return data.caption(job[0], job[1], 0) if forms is None else data.form_caption(job[0], job[1], job[3])

    images = []
    desc = "gate: generate" + ("" if forms is None else f" ({forms} caption forms)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MiniCanvas", category=UserWarning)
        for i in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress):
            chunk = jobs[i:i + batch_size]
            out = pipe([prompt(j) for j in chunk], num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt",
                       generator=[torch.Generator().manual_seed(j[2]) for j in chunk])
            images.append(out.images.float().cpu())
    images = torch.cat(images)
    oid = torch.tensor([j[0] for j in jobs])
    sid = torch.tensor([j[1] for j in jobs])
    pred = clf.classify(classifiers, images)
    ok = {"object": pred["object"] == oid, "style": pred["style"] == sid}
    res = {"object": ok["object"].float().mean().item(), "style": ok["style"].float().mean().item(), "n": len(jobs),
           "per_object": {name: {k: ok[k][oid == i].float().mean().item() for k in ok}
                          for i, name in enumerate(data.OBJECTS)},
           "per_style": {name: {k: ok[k][sid == i].float().mean().item() for k in ok}
                         for i, name in enumerate(data.STYLE_LABELS)}}
    if forms is not None:
        keys = [form_key(j[1], j[3]) for j in jobs]
        res["per_form"] = {}
        for key in dict.fromkeys(sorted(keys, key=lambda k: (k.startswith("unstyled"), int(k.split()[1])))):
            m = torch.tensor([k == key for k in keys])
            unstyled, f = key.startswith("unstyled"), int(key.split()[1])
            res["per_form"][key] = {
                "object": ok["object"][m].float().mean().item(), "style": ok["style"][m].float().mean().item(),
                "n": int(m.sum()),
                "caption": (data.UNSTYLED_CAPTION_FORMS if unstyled else data.CAPTION_FORMS)[f]}
    if return_images:
        res.update(images=images, jobs=jobs)
    return res


def trained_on_forms(pipe) -> bool:
    """Whether a MiniCanvas pipeline was trained on the caption forms (its tokenizer knows every form's words,
    which ``train_model(..., caption_forms=True)`` gives it and the form-0 vocabulary does not)."""
    return set(data.vocabulary(with_forms=True)) <= {w.lower() for w in pipe.tokenizer.get_vocab()}


def _gate(accuracy: float, gate: float) -> dict:
    return {"accuracy": accuracy, "gate": gate, "pass": accuracy >= gate}


def damage_check(classifiers: dict, images: torch.Tensor, jobs: list) -> dict:
    """The damage measure (:mod:`saeuron.evaluate.damage`) on this model: calibrated on its training-form images of
    the first seed (as an evaluation calibrates on its unedited images), then the share of its images of the other
    seeds that it flags (clean images: about 3 % expected). With one seed the check is in-sample."""
    from ..evaluate.common import judge
    from ..evaluate.damage import fit_damage_measure

    first = jobs[0][2]
    cal = [i for i, j in enumerate(jobs) if j[2] == first]
    rest = [i for i, j in enumerate(jobs) if j[2] != first] or cal
    judged = judge(classifiers, images)

    def part(idx):
        return {**{k: v[idx] for k, v in judged.items()}, "objects": [jobs[i][0] for i in idx],
                "styles": [jobs[i][1] for i in idx]}

    measure = fit_damage_measure(classifiers, {**part(cal), "source": f"unedited model, training form, seed {first}"})
    check = part(rest)
    flagged = measure.score(check, check["objects"], check["styles"])["damaged"].float().mean().item()
    return {"calibration": measure.calibration, "calibration_seeds": [first],
            "check_seeds": sorted({jobs[i][2] for i in rest}), "check_images": len(rest), "flagged_clean": flagged,
            "rule": "share of the unedited model's own training-form images flagged as damaged (not a gate)"}


def model_gates(pipe, classifiers: dict, *, caption_forms: Optional[bool] = None, seeds=GATE_SEEDS,
                form_seeds=None, heldout_forms: Optional[bool] = None, control=None, damage: bool = True,
                num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                batch_size: int = 64, progress: bool = True, return_images: bool = False) -> dict:
    """The unedited model's gates (the build's ``gates`` stage and ``saeuron minicanvas gates``).

    * ``generated``: object and style accuracy of the judges on the training form, every prompt x ``seeds``
      (gates ``FORM_GATES``, 98 % / 99 %, for a model trained on caption forms; else ``GENERATED_GATE``, 95 %);
    * ``heldout_forms`` (when ``heldout_forms``, default: ``caption_forms``): the same over every prompt in
      every held-out caption form (``data.caption_forms("heldout")`` and its unstyled forms) x ``form_seeds``
      (default ``seeds``), gate ``HELDOUT_FORM_GATE`` (90 %), with per-form figures in ``heldout_forms_detail``;
    * ``attack_control`` (when ``control`` is a dict of :func:`saeuron.evaluate.compare.attack_control`
      arguments, e.g. ``CONTROL_DEFAULTS["cpu"]``): the prefix attack on the unedited model; its UA may move by at
      most ``CONTROL_BAR`` (5) points. Its target images are the training-form images above when its seeds are
      among ``seeds``;
    * ``damage_check`` (when ``damage``; not a gate): :func:`damage_check` on the training-form images.

    ``caption_forms``: None reads it from the pipeline (:func:`trained_on_forms`). Returns ``{"generated",
    "generated_detail", ["heldout_forms", "heldout_forms_detail"], ["attack_control"], ["damage_check"],
    "caption_forms", "sampling", "counts", "pass"}`` (plus ``"images"``/``"jobs"`` of the training form when asked).
    """
    if caption_forms is None:
        caption_forms = trained_on_forms(pipe)
    heldout_forms = caption_forms if heldout_forms is None else heldout_forms
    seeds = [int(x) for x in ([seeds] if isinstance(seeds, int) else seeds)]
    form_seeds = seeds if form_seeds is None else [int(x) for x in ([form_seeds] if isinstance(form_seeds, int)
                                                                    else form_seeds)]
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                    progress=progress)
    gen = generated_accuracy(pipe, classifiers, seeds, return_images=True, **sampling)
    images, jobs = gen.pop("images"), gen.pop("jobs")
    gates = {"generated": {k: _gate(gen[k], FORM_GATES[k] if caption_forms else GENERATED_GATE) for k in clf.KINDS},
             "generated_detail": gen}
    counts = {"generated": gen["n"]}
    if heldout_forms:
        held = generated_accuracy(pipe, classifiers, form_seeds, forms="heldout", **sampling)
        held["forms"] = {"styled": list(data.caption_forms("heldout")),
                         "unstyled": list(data.caption_forms("heldout", unstyled=True))}
        gates["heldout_forms"] = {k: _gate(held[k], HELDOUT_FORM_GATE) for k in clf.KINDS}
        gates["heldout_forms_detail"] = held
        counts["heldout_forms"] = held["n"]
    if control:
        from ..evaluate.compare import attack_control

        kw = dict(control)
        cseeds = [int(x) for x in kw.pop("seeds", seeds[:1])]
        index = {j: i for i, j in enumerate(jobs)}
        base = None
        if set(cseeds) <= set(seeds):  # the same images (one generator per image): reuse them
            from ..evaluate.unlearn_eval import build_jobs

            base = images[[index[(j.object, data.style_id(j.style), j.seed)]
                           for j in build_jobs(None, None, cseeds, (0,))]]
        ctrl = attack_control(pipe, classifiers, seeds=cseeds, base_images=base,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              batch_size=min(batch_size, 16), progress=progress, **kw)
        gates["attack_control"] = ctrl
        counts["attack_control"] = ctrl["attacked_images"]
    if damage:
        gates["damage_check"] = damage_check(classifiers, images, jobs)
    gates.update(caption_forms=caption_forms,
                 sampling={"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                           "seeds": seeds, **({"form_seeds": form_seeds} if heldout_forms else {})},
                 counts=counts)
    gates["pass"] = all(gate_passes(gates).values())
    if return_images:
        gates.update(images=images, jobs=jobs)
    return gates


def gate_passes(gates: dict) -> dict:
    """``{"part kind": pass}`` of every gate measured in a gates record (e.g. "generated object", "attack_control")."""
    out = {f"{part} {k}": g["pass"] for part in ("heldout", "generated", "heldout_forms") for k, g in
           gates.get(part, {}).items()}
    if "attack_control" in gates:
        out["attack_control"] = gates["attack_control"]["pass"]
    return out


def gate_lines(gates: dict) -> list:
    """The gates as short lines of text, one per gate (what the build and ``saeuron minicanvas gates`` print)."""
    names = {"heldout": "classifier renders", "generated": "training form", "heldout_forms": "held-out forms"}
    lines = []
    for part in ("heldout", "generated", "heldout_forms"):
        for k, g in gates.get(part, {}).items():
            lines.append(f"{names[part]:<18} {k:<6} {100 * g['accuracy']:6.1f} %  (gate >= {100 * g['gate']:.0f} %)  "
                         f"{'PASS' if g['pass'] else 'FAIL'}")
    if "heldout_forms_detail" in gates:
        for key, f in gates["heldout_forms_detail"]["per_form"].items():
            lines.append(f"  form {key:<12} object {100 * f['object']:5.1f} %  style {100 * f['style']:5.1f} %  "
                         f"({f['n']} images: {f['caption']!r})")
    if "attack_control" in gates:
        c = gates["attack_control"]
        lines.append(f"{'attack control':<18} UA {100 * c['ua_before']:.1f} -> {100 * c['ua_after']:.1f} %: moves "
                     f"{c['move_points']:+.1f} points (bar: at most {c['bar_points']:g})  "
                     f"{'PASS' if c['pass'] else 'FAIL'}")
    if "damage_check" in gates:
        d = gates["damage_check"]
        lines.append(f"{'damage measure':<18} {100 * d['flagged_clean']:.1f} % of {d['check_images']} clean images of "
                     f"seeds {d['check_seeds']} flagged (calibrated on seed {d['calibration_seeds'][0]}; not a gate)")
    lines.append(f"all gates: {'PASS' if all(gate_passes(gates).values()) else 'FAIL'}")
    return lines


def _sample_grid(images: torch.Tensor, jobs: list, path: Path) -> Path:
    """A PNG grid of the first seed's images: rows = styles (+ unstyled), columns = objects."""
    from PIL import Image

    from ..images import image_grid, save_png

    first = jobs[0][2]
    cells = {(o, s): img for (o, s, seed), img in zip(jobs, images) if seed == first}
    scale = max(1, 64 // images.shape[-1])

    def pil(x):
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        im = Image.fromarray(arr)
        return im.resize((im.width * scale, im.height * scale), Image.NEAREST)

    rows = [[pil(cells[(o, s)]) for o in range(len(data.OBJECTS))] for s in range(len(data.STYLE_LABELS))]
    return save_png(image_grid(rows, row_labels=list(data.STYLE_LABELS), col_labels=list(data.OBJECTS),
                               label_width=80), path)


# ---------------------------------------------------------------- the build

def _versions() -> dict:
    import diffusers
    import transformers

    from .. import __version__ as saeuron_version

    return {"saeuron": saeuron_version, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def _files(out_dir: Path) -> dict:
    return {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@locks_folder("out_dir", "building the MiniCanvas defaults into")
def build_defaults(out_dir, config: str = "cpu", seed: int = 0, work_dir=None, device=None, progress: bool = True,
                   settings: Optional[dict] = None, command: Optional[str] = None, num_threads: Optional[int] = None,
                   stages=STAGES) -> dict:
    """Produce every shipped default into ``out_dir`` (see the module docstring); returns the BUILD.json record.

    ``work_dir`` (default ``<out_dir>.work`` beside it) holds what is not shipped: the model's training
    checkpoint, the activation store, the SAE trainer state and a sample grid; keep it to resume.
    ``settings`` overrides entries of ``BUILD_DEFAULTS[config]``; ``stages`` limits the run to some stages
    (the stages they are built from, :func:`ancestors`, must be done: e.g. the collection and the SAEs can be built
    before the gates, which nothing is built from). ``command`` is recorded as given (the CLI passes its command line).
    """
    from ..collection import collect
    from ..detectors import fit_detectors
    from ..selection import build_concept_file
    from ..sae import SparseAutoencoder, available_hookpoint_dirs
    from ..store import ActivationStore
    from ..trainer import TrainConfig, train
    from .train_model import train_model

    st = build_settings(config, settings)
    supervision_settings(st["supervise"])  # a bad value fails here, before any stage runs
    collect_forms(st)
    judges_from = classifiers_source(st)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown build stages {unknown}; valid: {', '.join(STAGES)}")
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = model_config(config)
    size, hookpoints = cfg["size"], list(st["hookpoints"])
    if command is None:
        command = f"python -c \"from saeuron.minicanvas.build import build_defaults; build_defaults(" \
                  f"{str(out_dir)!r}, config={config!r}, seed={seed}, settings={settings!r})\""
    record_path = out_dir / BUILD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record and (record.get("config") != config or record.get("seed") != seed):
        raise ValueError(f"{out_dir} was built with config={record.get('config')!r}, seed={record.get('seed')!r}; "
                         f"use another out_dir (or delete {record_path} to rebuild everything)")
    changed_keys = _changed_settings(record.get("settings"), st) if record else []
    changed = _changed_stages(record.get("settings"), st) if record else []
    record.update(format=FORMAT, config=config, seed=seed, settings=st, hookpoints=hookpoints,
                  command=record.get("command", command), versions=_versions(), device=str(device))
    record.setdefault("stages", {})
    record.setdefault("commands", [])
    if not record["commands"] or record["commands"][-1] != command:
        record["commands"].append(command)
    paths = dict(classifiers=out_dir / "classifiers", model=out_dir / "model", checkpoint=out_dir / "checkpoint",
                 model_work=work / "model", activations=work / "activations", sae_work=work / "sae")
    artefacts = {
        "classifiers": [paths["classifiers"] / k / clf.WEIGHTS_FILE for k in clf.KINDS],
        "model": [paths["model"] / "model_index.json"],
        "gates": [out_dir / GATES_FILE],
        "collect": [paths["activations"] / "store.json"],
        "sae": [paths["checkpoint"] / hp / "sae.safetensors" for hp in hookpoints],
        "concepts": [paths["checkpoint"] / "concepts.json", paths["checkpoint"] / "detectors.json"],
    }

    work_state = {"collect": paths["activations"], "sae": paths["sae_work"]}  # resumable state of dependent stages

    def done(name):
        return record["stages"].get(name, {}).get("done") and all(p.is_file() for p in artefacts[name])

    def forget(stage, why):
        """Mark ``stage`` not done and delete its resumable work state (made from what is now stale)."""
        if record["stages"].pop(stage, None) is not None:
            say(f"{stage}: {why}, will be redone")
        if stage in work_state and work_state[stage].exists():
            shutil.rmtree(work_state[stage])

    def invalidate_dependents(name):
        for s in dependents(name):
            forget(s, f"built from the old {name}")
        atomic_write_json(record, record_path)

    def finish(name, t0, **info):
        record["stages"][name] = {"done": True, "seconds": round(time.time() - t0, 1), **info}
        record["files"] = _files(out_dir)
        big = {f: n for f, n in record["files"].items() if n >= MAX_FILE_BYTES}
        record["oversize_files"] = big
        atomic_write_json(record, record_path)
        print(f"[build] {name} done in {record['stages'][name]['seconds']}s", flush=True)

    def say(msg):
        print(f"[build] {msg}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in changed:  # a stage whose settings changed is redone, and so is everything built from it
        forget(name, f"its settings changed ({', '.join(k for k in STAGE_SETTINGS[name] if k in changed_keys)})")
        invalidate_dependents(name)
    atomic_write_json(record, record_path)
    classifiers = pipe = None
    wanted = [s for s in STAGES if s in stages]
    for name in wanted:
        if done(name):
            say(f"{name}: already done, skipped")
            continue
        missing = [s for s in ancestors(name) if not done(s)]
        if missing:
            raise RuntimeError(f"build stage {name!r} needs stages {missing} first (run them, e.g. without --stages)")
        invalidate_dependents(name)
        t0 = time.time()
        say(f"{name} ...")
        if name == "classifiers" and judges_from is not None:
            judges = clf.load_classifiers(judges_from, "cpu")  # safetensors + config, checked on load
            for kind, m in judges.items():
                clf.save_classifier(m, paths["classifiers"] / kind)
            finish(name, t0, source=str(st["classifiers_from"]),
                   sha256={k: file_sha256(paths["classifiers"] / k / clf.WEIGHTS_FILE) for k in clf.KINDS})
        elif name == "classifiers":
            loss = {}
            for kind in clf.KINDS:
                m = clf.train_classifier(kind, steps=st["classifier_steps"], batch_size=st["classifier_batch"],
                                         size=size, seed=seed, device=device, progress=progress)
                clf.save_classifier(m.cpu(), paths["classifiers"] / kind)
                loss[kind] = round(m.history["loss"][-1], 5)
            finish(name, t0, final_loss=loss)
        elif name == "model":
            pipe = train_model(paths["model_work"], config, seed=seed, device=device, progress=progress,
                               **st["model"])
            info = json.loads((paths["model_work"] / "pipeline" / "minicanvas.json").read_text())
            save_pipeline(pipe, paths["model"], dtype=torch.float16, extra={**info, "seed": seed})
            pipe = None
            finish(name, t0, steps=info["steps"], final_loss=info["final_loss"],
                   train_seconds=info.get("train_seconds"))  # over every resumed run; ``seconds`` is this one
        elif name == "gates":
            classifiers = clf.load_classifiers(paths["classifiers"], device)
            pipe = load_pipeline(paths["model"], device)
            held = {k: clf.heldout_accuracy(classifiers[k], n=st["heldout_n"], seed=derive_seed(seed, "heldout"))
                    for k in clf.KINDS}
            forms = bool(st["model"].get("caption_forms"))
            control = None
            if forms and st["attack_control"] is not False:
                control = {**CONTROL_DEFAULTS[config], **(st["attack_control"] or {})}
            model = model_gates(pipe, classifiers, caption_forms=forms, seeds=st["gate_seeds"],
                                form_seeds=st["form_gate_seeds"], control=control,
                                num_inference_steps=st["sample_steps"], guidance_scale=st["guidance"],
                                batch_size=st["sample_batch"], progress=progress, return_images=True)
            grid = _sample_grid(model.pop("images"), model.pop("jobs"), work / "samples.png")
            gates = {"heldout": {k: _gate(v, HELDOUT_GATE) for k, v in held.items()}, **model, "samples": str(grid)}
            gates["counts"]["heldout"] = st["heldout_n"]
            gates["pass"] = all(gate_passes(gates).values())
            atomic_write_json(gates, out_dir / GATES_FILE)
            for line in gate_lines(gates):
                say(f"gate {line}")
            say(f"sample grid: {grid}")
            parts = [p for p in ("heldout", "generated", "heldout_forms") if p in gates]
            info = {p: {k: g["accuracy"] for k, g in gates[p].items()} for p in parts}
            if "attack_control" in gates:
                info["attack_control_move_points"] = gates["attack_control"]["move_points"]
            finish(name, t0, **info, all_pass=gates["pass"])
        elif name == "collect":
            pipe = pipe or load_pipeline(paths["model"], device)
            store = collect(pipe, training_prompts(st["collect_repeats"], collect_forms(st)), paths["activations"],
                            hookpoints,
                            batch_size=st["collect_batch"], num_inference_steps=st["sample_steps"],
                            guidance_scale=st["guidance"], halves="cond", seed=seed, dtype=st["collect_dtype"],
                            progress=progress)
            finish(name, t0, rows={hp: store.num_rows(hp) for hp in hookpoints})
        elif name == "sae":
            store = ActivationStore(paths["activations"])
            for old in available_hookpoint_dirs(paths["checkpoint"]):
                if old not in hookpoints:  # an SAE of a hookpoint this build no longer uses must not ship
                    shutil.rmtree(paths["checkpoint"] / old)
                    say(f"removed the SAE of {old} (not among the hookpoints {hookpoints})")
            fvu = {}
            sup = supervision_settings(st["supervise"])
            extra = {} if sup is None else {"concept_supervision": float(sup["weight"]),
                                            "latents_per_concept": int(sup["latents_per_concept"])}
            for hp in hookpoints:
                tc = TrainConfig(seed=seed, **st["sae"], **extra)
                sae = train(store, paths["sae_work"], hp, tc, device=device, progress=progress,
                            concepts=None if sup is None else supervised_concepts(sup["concepts"], st["collect_repeats"],
                                                                                 collect_forms(st)))
                sae.cpu().save(paths["checkpoint"] / hp)
                x = store.read_shard(hp, 0)["x"].float()
                fvu[hp] = round(SparseAutoencoder.load(paths["checkpoint"] / hp).fvu(x), 5)
                say(f"SAE {hp}: {sae.num_latents} latents, k={sae.cfg.k}, FVU on shard 0 {fvu[hp]:.4f}")
            finish(name, t0, fvu_shard0=fvu)
        elif name == "concepts":
            store = ActivationStore(paths["activations"])
            table = build_concept_file(store, paths["checkpoint"], hookpoints=hookpoints, concepts=concept_prompts(st["collect_repeats"], collect_forms(st)),
                                       multiplier=st["multiplier"], percentile=None, top_n=st["top_n"], device=device,
                                       progress=progress, reserved=supervision_settings(st["supervise"]) is not None)
            det = fit_detectors(store, paths["checkpoint"], hookpoints=hookpoints, progress=progress,
                                concepts=concept_prompts(st["collect_repeats"], collect_forms(st)))  # probe modes
            finish(name, t0, concepts=table.names, timesteps=len(table.timesteps),
                   detector_latents=det.metadata["fit"]["latents"],
                   detector_accuracy_min={h: min(a.values())
                                          for h, a in det.metadata["train_accuracy_min_over_timesteps"].items()})
    record = json.loads(record_path.read_text())
    if record.get("oversize_files"):
        say(f"WARNING: files of 16 MiB or more: {record['oversize_files']}")
    say(f"done: {out_dir} (record in {record_path})")
    return record


def _changed_settings(old: Optional[dict], new: dict) -> list:
    """The keys whose values differ between two ``build_settings`` (compared as JSON: a tuple equals a list)."""
    old, new = json.loads(json.dumps(old or {})), json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _changed_stages(old: Optional[dict], new: dict) -> list:
    """The stages (in build order) that read a setting whose value differs between two ``build_settings``."""
    keys = _changed_settings(old, new)
    return [s for s in STAGES if any(k in keys for k in STAGE_SETTINGS[s])]


def ancestors(name: str) -> list:
    """Every stage that stage ``name`` is built from, directly or not (in build order): what must be done first."""
    out, todo = set(), list(DEPENDS[name])
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(DEPENDS[s])
    return [s for s in STAGES if s in out]


def dependents(name: str) -> list:
    """Every stage built, directly or not, from stage ``name`` (in build order)."""
    out = set()
    for s in STAGES:  # DEPENDS only points backwards, so one pass in build order closes it
        if any(d == name or d in out for d in DEPENDS[s]):
            out.add(s)
    return [s for s in STAGES if s in out]


def cli_command(argv=None) -> str:
    """The command line of this process as one shell-quoted string (for BUILD.json)."""
    argv = list(sys.argv if argv is None else argv)
    prog = "saeuron" if argv and Path(argv[0]).name in ("saeuron", "__main__.py", "cli.py") else argv[0]
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


__all__ = ["build_defaults", "classifiers_source", "build_settings", "dependents", "BUILD_DEFAULTS", "DEPENDS", "STAGE_SETTINGS", "STAGES",
           "concept_prompts", "training_prompts", "collect_captions", "collect_forms", "generated_accuracy", "model_gates", "gate_jobs", "gate_lines",
           "gate_passes", "form_key", "trained_on_forms", "damage_check", "cli_command", "FORM_GATES", "HELDOUT_FORM_GATE",
           "CONTROL_DEFAULTS"]
