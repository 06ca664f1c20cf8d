"""``saeuron <stage>``: one thin function per stage of the data path, no logic of its own.

    prompts --collect--> activation shards --train--> SAE checkpoint --select--> concept file
            --generate--> images with and without the edit

Run ``saeuron <stage> --help`` for each stage's options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .pipelines import load_pipeline

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _dtype(name):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def read_prompts(path: str):
    """Prompts from a .txt (one per line) or .json file (a list, or {concept: [prompts]})."""
    from .collect import read_prompt_file

    try:
        return read_prompt_file(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def _per_concept(values, what="multiplier"):
    """``--multiplier -1`` or ``--multiplier Cartoon=-5 Dog=-1`` -> float or dict."""
    from .concepts import parse_per_concept

    try:
        return parse_per_concept(values, what)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _patch_kwargs(a) -> dict:
    """The edit options a command was given (``--multiplier``, ``--percentile``, ``--top-n``, ``--threshold``)."""
    got = (("multiplier", _per_concept(getattr(a, "multiplier", None), "multiplier")),
           ("percentile", _per_concept(getattr(a, "percentile", None), "percentile")),
           ("top_n", getattr(a, "top_n", None)),
           ("threshold", _per_concept(getattr(a, "threshold", None), "threshold")))
    return {k: v for k, v in got if v is not None}


def _edit_args(s, top_n: bool = True):
    """``--multiplier``, ``--percentile``, ``--threshold`` (and ``--top-n``); unset: the concept file's defaults."""
    s.add_argument("--multiplier", nargs="*", default=None, help="-1 or NAME=-5 ... (default: concept file)")
    s.add_argument("--percentile", nargs="*", default=None, help="99.99 or NAME=99.999 ...")
    if top_n:
        s.add_argument("--top-n", type=int, default=None, help="select the top n features per timestep instead")
    s.add_argument("--threshold", nargs="*", default=None,
                   help="factor on the edit threshold tau: 1 (the method's) or NAME=10 ... (default: concept file)")


# --------------------------------------------------------------------------- stages

def cmd_hookpoints(a):
    from .hookpoints import list_hookpoints

    for name, ch in list_hookpoints(load_pipeline(a.model, "cpu")).items():
        print(f"{name}\t{ch}")


def cmd_collect(a):
    from .collect import collect

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    store = collect(pipe, read_prompts(a.prompts), a.out, a.hookpoints, batch_size=a.batch_size,
                    num_inference_steps=a.steps, guidance_scale=a.guidance, every=a.every, halves=a.halves,
                    tokens_per_map=a.tokens_per_map, seed=a.seed, height=a.height, width=a.width)
    print(f"activations in {store.root}: " + ", ".join(f"{h}: {store.num_rows(h)} rows" for h in store.hookpoints))


def cmd_train(a):
    from .store import ActivationStore
    from .train import TrainConfig, train

    cfg = TrainConfig(k=a.k, expansion_factor=a.expansion, num_latents=a.num_latents, batch_size=a.batch_size,
                      lr=a.lr, batch_topk=not a.topk, max_tokens=a.max_tokens, epochs=a.epochs, amp_dtype=a.amp,
                      save_every=a.save_every, seed=a.seed, dead_tokens_threshold=a.dead_tokens)
    store = ActivationStore(a.store)
    for hp in a.hookpoints or store.hookpoints:
        train(store, a.out, hp, cfg, device=_device(a.device))
        print(f"SAE for {hp} in {Path(a.out) / hp}")


def cmd_select(a):
    from .concepts import build_concept_file
    from .store import ActivationStore

    concepts = read_prompts(a.concepts) if a.concepts else None
    table = build_concept_file(ActivationStore(a.store), a.checkpoint, hookpoints=a.hookpoints, concepts=concepts,
                               multiplier=a.multiplier, percentile=a.percentile, top_n=a.top_n,
                               device=_device(a.device))
    print(f"concept file for {len(table.names)} concepts in {a.checkpoint}: {', '.join(table.names)}")


def cmd_generate(a):
    from .generate import generate

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    prompts = [a.prompt] if a.prompt else read_prompts(a.prompts)
    if isinstance(prompts, dict):
        prompts = [p for ps in prompts.values() for p in ps]
    res = generate(pipe, prompts, a.out, concepts=a.concept, checkpoint=_eval_checkpoint(a.checkpoint, a.model),
                   seeds=a.seeds,
                   num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.height, width=a.width,
                   halves=a.halves, **_patch_kwargs(a))
    print(f"grid: {res['grid']}")


def cmd_backend(a):
    from . import ops

    print(json.dumps(ops.status(), indent=2))


def cmd_demo(a):
    from .demo import run_demo

    run_demo(a.out, quick=a.quick)


# --------------------------------------------------------------------------- minicanvas: train, build

def cmd_minicanvas_train(a):
    from .minicanvas.train_model import train_model

    pipe = train_model(a.out, a.config, steps=a.steps, batch_size=a.batch_size, lr=a.lr, lr_decay=a.lr_decay,
                       seed=a.seed, device=a.device, resume=not a.no_resume, cfg_dropout=a.cfg_dropout,
                       ema=not a.no_ema, save_every=a.save_every, pool_size=a.pool_size, amp=a.amp,
                       compile=a.compile, num_threads=a.threads, save_dtype=_dtype("fp16") if a.fp16 else None,
                       compact_state=a.compact_state, time_limit=a.time_limit)
    if pipe is not None:  # None: stopped by --time-limit, which said so
        print(f"pipeline in {Path(a.out) / 'pipeline'}; training state in {a.out} (rerun to resume or extend --steps)")


def cmd_minicanvas_build(a):
    from .minicanvas.build import build_defaults, cli_command
    from .minicanvas.defaults import assets_dir

    build_defaults(a.out or assets_dir(), a.config, seed=a.seed, work_dir=a.work, device=a.device,
                   command=cli_command(), num_threads=a.threads, stages=a.stages, settings=_key_values(a.set))


def _key_values(items) -> dict:
    """``["guidance=2", 'sae={"k": 8}']`` -> ``{"guidance": 2, "sae": {"k": 8}}`` (values read as JSON, else text)."""
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--set takes KEY=VALUE (VALUE as JSON), got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def add_minicanvas_parser(sub):
    """``saeuron minicanvas train|build`` (and ``eval``): the offline MiniCanvas world."""
    mc = sub.add_parser("minicanvas", help="the offline MiniCanvas world: train its model, build the shipped defaults")
    mcs = mc.add_subparsers(dest="minicanvas_cmd", required=True)
    s = mcs.add_parser("train", help="train the MiniCanvas text-to-image model (resumes from --out)")
    s.add_argument("--out", required=True, help="training folder: state, metrics.jsonl, pipeline/")
    s.add_argument("--config", default="cpu", choices=["micro", "cpu", "gpu"], help="model size (default cpu)")
    s.add_argument("--steps", type=int, default=None, help="total optimiser steps (default: per config)")
    s.add_argument("--batch-size", type=int, default=None, help='images per optimiser step (default: per --config)')
    s.add_argument("--lr", type=float, default=None, help='peak learning rate (default: per --config)')
    s.add_argument("--lr-decay", type=float, default=None,
                   help="share of the final steps over which the learning rate falls linearly to 0 "
                        "(default: per config)")
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--cfg-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    s.add_argument("--no-ema", action="store_true",
                   help='save the raw weights instead of their exponential moving average')
    s.add_argument("--save-every", type=int, default=250, help="checkpoint every n steps")
    s.add_argument("--pool-size", type=int, default=None, help="pre-rendered images on the device (0: render per step)")
    s.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="autocast (default bf16 on CUDA)")
    s.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    s.add_argument("--fp16", action="store_true", help="save the final pipeline in fp16")
    s.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds of training, state saved (run again to go on)")
    s.add_argument("--compact-state", action="store_true",
                   help="save the training state in bf16 without AdamW moments (1/4 of the size, to carry between "
                        "machines; resumes approximately)")
    s.set_defaults(fn=cmd_minicanvas_train)

    s = mcs.add_parser("build", help="produce every shipped default (classifiers, model, gates, SAE, concept file)")
    s.add_argument("--out", default=None, help="default: the package's saeuron/minicanvas/assets")
    s.add_argument("--work", default="build/minicanvas_work", help="unshipped state (checkpoints, activations); resume")
    s.add_argument("--config", default="cpu", choices=["micro", "cpu", "gpu"],
                   help='model size: micro (tests), cpu or gpu (default %(default)s)')
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--stages", nargs="+", default=["classifiers", "model", "gates", "collect", "sae", "concepts"],
                   help="run only these stages (their predecessors must be done)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a build setting (VALUE as JSON; dicts merge), e.g. --set guidance=2 "
                        "--set 'sae={\"k\": 8}'; a changed setting redoes the stages that read it, and a later "
                        "build without it goes back to the config's default")
    s.set_defaults(fn=cmd_minicanvas_build)
    add_minicanvas_eval_parser(mcs)  # `saeuron minicanvas eval` (saeuron.evaluate)
    add_minicanvas_compare_parser(mcs)  # `saeuron minicanvas compare` (saeuron.evaluate.compare)
    return mc


# --------------------------------------------------------------------------- evaluation: explain, sweep, minicanvas eval

def _eval_checkpoint(checkpoint, model):
    """``--checkpoint``, or the shipped MiniCanvas checkpoint when evaluating the shipped model."""
    if checkpoint is not None:
        return checkpoint
    if model not in (None, "minicanvas"):
        raise SystemExit("--checkpoint is required with a --model other than the shipped MiniCanvas one")
    from .minicanvas import defaults

    return defaults.checkpoint_dir()


def _eval_classifiers(path, device=None):
    """``{"object", "style"}`` MiniCanvas classifiers from ``path`` (default: the shipped ones)."""
    from .minicanvas import defaults, load_classifiers

    return defaults.load_classifiers(_device(device)) if path is None else load_classifiers(path, _device(device))


def _prompt_list(path):
    """A prompt file as a flat list (a {concept: [prompts]} file is flattened); None when no file is given."""
    if not path:
        return None
    prompts = read_prompts(path)
    return [p for ps in prompts.values() for p in ps] if isinstance(prompts, dict) else prompts


def _styles(values):
    """``--styles`` values with "unstyled"/"none" meaning the unstyled prompt."""
    return None if values is None else [None if v.lower() in ("unstyled", "none") else v for v in values]


def cmd_explain(a):
    from .evaluate.explain import explain

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    res = explain(pipe, _eval_checkpoint(a.checkpoint, a.model), a.concept, a.out,
                  prompts=_prompt_list(a.prompts), other_prompts=_prompt_list(a.other_prompts), seeds=a.seeds,
                  hookpoint=a.hookpoint, top_features=a.top_features, top_images=a.top_images,
                  percentile=a.percentile, top_n=a.top_n, multiplier=a.multiplier, threshold=a.threshold,
                  num_inference_steps=a.steps,
                  guidance_scale=a.guidance, batch_size=a.batch_size)
    print(f"explanation: {res['png']} (and {res['html']})")


def cmd_sweep(a):
    from .evaluate.protocol import MULTIPLIERS, PERCENTILES, THRESHOLDS, TOP_NS
    from .evaluate.sweep import sweep

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    sweep(pipe, _eval_classifiers(a.classifiers, a.device), _eval_checkpoint(a.checkpoint, a.model),
          concepts=a.concepts, domain=a.domain, seeds=a.seeds, rule=a.rule, multipliers=a.multipliers or MULTIPLIERS,
          percentiles=a.percentiles or PERCENTILES, top_ns=a.top_ns or TOP_NS, hookpoints=a.hookpoints,
          thresholds=a.thresholds or THRESHOLDS,
          objects=a.objects, styles=_styles(a.styles), num_inference_steps=a.steps, guidance_scale=a.guidance,
          batch_size=a.batch_size, save_to=a.save_to, resume=not a.no_resume)


def cmd_minicanvas_eval(a):
    """``saeuron minicanvas eval``: the UnlearnCanvas protocol on a MiniCanvas pipeline (shipped defaults by default)."""
    from .evaluate.unlearn_eval import evaluate_unlearning

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    kw = _patch_kwargs(a)
    res = evaluate_unlearning(pipe, _eval_classifiers(a.classifiers, a.device), _eval_checkpoint(a.checkpoint, a.model),
                              targets=a.targets, domain=a.domain, seeds=a.seeds, templates=a.templates,
                              objects=a.objects, styles=_styles(a.styles), num_inference_steps=a.steps,
                              guidance_scale=a.guidance, batch_size=a.batch_size, multi=a.multi, out_dir=a.out,
                              resume=not a.no_resume, **kw)
    print(f"results: {res['files']['json']}")


def _eval_model_args(s):
    s.add_argument("--model", default="minicanvas", help="pipeline folder, or 'minicanvas' for the shipped model")
    s.add_argument("--checkpoint", default=None, help="SAEs + concept file (default: the shipped MiniCanvas one)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    s.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")


def _grid_args(s, seeds):
    s.add_argument("--classifiers", default=None, help="folder with object/ and style/ classifiers (default: shipped)")
    s.add_argument("--domain", default="style", choices=["style", "object"],
                   help='what is unlearned: style or object (default %(default)s)')
    s.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--objects", nargs="+", default=None, help="prompt objects (default: all)")
    s.add_argument("--styles", nargs="+", default=None, help="prompt styles, 'unstyled' included (default: all)")
    s.add_argument("--no-resume", action="store_true", help="recompute everything instead of reusing cached results")


def add_explain_parser(sub):
    """``saeuron explain``: selected features, where they fire and what editing each does, as a PNG."""
    s = sub.add_parser("explain", help="PNG + HTML: a concept's features per timestep, activation maps, edit effects")
    _eval_model_args(s)
    s.add_argument("--concept", required=True, help='the concept to explain (a name in the concept file)')
    s.add_argument("--out", required=True, help="folder for explain_<concept>.png and index.html")
    s.add_argument("--prompts", default=None, help="prompt file holding the concept (default: MiniCanvas captions)")
    s.add_argument("--other-prompts", default=None, help="prompt file without the concept")
    s.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--hookpoint", default=None, help="default: the concept's first own hookpoint with an SAE")
    s.add_argument("--top-features", type=int, default=8, help='features shown (default %(default)s)')
    s.add_argument("--top-images", type=int, default=4, help='images shown per feature (default %(default)s)')
    s.add_argument("--percentile", type=float, default=None, help="default: the concept file's")
    s.add_argument("--top-n", type=int, default=None,
                   help='select the top n features per timestep instead of by percentile')
    s.add_argument("--multiplier", type=float, default=None,
                   help="edit multiplier gamma < 0 (default: the concept file's)")
    s.add_argument("--threshold", type=float, default=None,
                   help="factor on the edit threshold tau (default: concept file)")
    s.set_defaults(fn=cmd_explain)
    return s


def add_sweep_parser(sub):
    """``saeuron sweep``: per-concept hookpoints x threshold x rule x multiplier search, stored as the defaults."""
    s = sub.add_parser("sweep", help="per-concept hookpoints x threshold x percentile/top_n x multiplier search "
                                     "maximising (UA+IRA)/2; points already scored the same way are reused")
    _eval_model_args(s)
    _grid_args(s, (1, 2))
    s.add_argument("--concepts", nargs="+", default=None, help="default: every concept of the domain")
    s.add_argument("--rule", default="auto", choices=["auto", "percentile", "top_n"],
                   help='feature selection rule: percentile, top_n or auto (by dictionary size) (default %(default)s)')
    s.add_argument("--multipliers", type=float, nargs="+", default=None, help="default -1 -5 -10 ... -30")
    s.add_argument("--percentiles", type=float, nargs="+", default=None, help="default 99.99 99.995 99.999")
    s.add_argument("--top-ns", type=int, nargs="+", default=None, help="default 1 2 4 8")
    s.add_argument("--hookpoints", nargs="+", default=None,
                   help="where to try editing: each a hookpoint or a comma-joined set, e.g. up_blocks.0.attentions.0 "
                        "up_blocks.0.attentions.0,up_blocks.1.attentions.1 (default: one choice, all hookpoints)")
    s.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="factors on the edit threshold tau to try, e.g. 1 10 (default: 1, the method's)")
    s.add_argument("--save-to", default=None, help="folder for the updated concept file (default: --checkpoint)")
    s.set_defaults(fn=cmd_sweep)
    return s


def add_minicanvas_eval_parser(subparsers):
    """``eval`` under ``saeuron minicanvas``: UA/IRA/CRA, Frechet distance, grids, resumable."""
    from .evaluate.protocol import EVAL_SEEDS

    s = subparsers.add_parser("eval", help="UnlearnCanvas protocol: UA/IRA/CRA per target, grids, JSON + markdown")
    _eval_model_args(s)
    _grid_args(s, EVAL_SEEDS)
    s.add_argument("--targets", nargs="+", default=None, help="default: every concept of the domain")
    s.add_argument("--templates", type=int, nargs="+", default=[0], help="0 = training caption, 1 2 = paraphrases")
    s.add_argument("--multi", type=int, default=None, help="also unlearn the first 1..n targets at once")
    s.add_argument("--out", default="minicanvas_eval", help='output folder')
    _edit_args(s)
    s.set_defaults(fn=cmd_minicanvas_eval)
    return s


def cmd_minicanvas_compare(a):
    """``saeuron minicanvas compare``: SAeUron, UCE and ESD on the same MiniCanvas protocol and attack, one table."""
    from .evaluate.compare import compare_methods

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    ckpt = _eval_checkpoint(a.checkpoint, a.model) if "saeuron" in a.methods else a.checkpoint
    res = compare_methods(pipe, _eval_classifiers(a.classifiers, a.device), ckpt, methods=a.methods,
                          style_targets=a.style_targets, object_targets=a.object_targets, seeds=a.seeds,
                          objects=a.objects, styles=_styles(a.styles), attack=not a.no_attack,
                          attack_iterations=a.attack_iterations, attack_prompts=a.attack_prompts,
                          attack_kwargs=None if a.attack_placement is None else {"placement": a.attack_placement},
                          esd_iterations=a.esd_iterations, esd_kwargs=None if a.esd_lr is None else {"lr": a.esd_lr},
                          num_inference_steps=a.steps, guidance_scale=a.guidance,
                          batch_size=a.batch_size, out_dir=a.out, resume=not a.no_resume)
    print(f"comparison: {res['files']['json']} and {res['files']['markdown']}")


def add_minicanvas_compare_parser(subparsers):
    """``compare`` under ``saeuron minicanvas``: methods x (style/object UA/IRA/CRA, UA under attack, time, memory)."""
    from .evaluate.protocol import METHODS

    s = subparsers.add_parser("compare", help="SAeUron vs UCE vs ESD: same targets, metrics and attack; one table")
    _eval_model_args(s)
    s.add_argument("--classifiers", default=None, help="folder with object/ and style/ classifiers (default: shipped)")
    s.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help='methods to compare (default: all)')
    s.add_argument("--style-targets", "--styles-targets", nargs="*", default=None,
                   help="styles to unlearn, one at a time (default: all of the grid; none given: no style target)")
    s.add_argument("--object-targets", nargs="*", default=None, help="objects to unlearn (default: all of the grid)")
    s.add_argument("--seeds", type=int, nargs="+", default=[188],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--objects", nargs="+", default=None, help="prompt objects (default: all)")
    s.add_argument("--styles", nargs="+", default=None, help="prompt styles, 'unstyled' included (default: all)")
    s.add_argument("--no-attack", action="store_true",
                   help="skip the UnlearnDiffAtk-style attack (run on every method and, as a control, on the unedited "
                        "model)")
    s.add_argument("--attack-iterations", type=int, default=40, help="Adam iterations of the attack (default: 40)")
    s.add_argument("--attack-placement", default=None, choices=["prefix", "suffix"],
                   help="where the 5 adversarial tokens go: after BOS (default, as published) or after the caption's "
                        "EOS, leaving the caption's positions as trained")
    s.add_argument("--attack-prompts", type=int, default=None,
                   help="attack the first n prompts per target (default: all)")
    s.add_argument("--esd-iterations", type=int, default=1000,
                   help="ESD fine-tuning iterations per target (default: 1000, as published)")
    s.add_argument("--esd-lr", type=float, default=None, help="ESD learning rate (default: 1e-5, as published)")
    s.add_argument("--out", default="minicanvas_compare",
                   help="output folder; finished runs are cached there and reused (default: minicanvas_compare)")
    s.add_argument("--no-resume", action="store_true", help="recompute everything instead of reusing cached runs")
    s.set_defaults(fn=cmd_minicanvas_compare)
    return s


# --------------------------------------------------------------------------- attack (UnlearnDiffAtk-style)

def cmd_attack(a):
    """Attack the patched pipeline; write adversarial PNGs, attack.json and the prefix (safetensors)."""
    from .evaluate.attack import attack, generate_adversarial, image_size, load_images
    from .images import save_png
    from .patch import patched
    from .utils import atomic_save_file, atomic_write_json

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    images = load_images(a.target_images, image_size(pipe))
    out = Path(a.out)
    with patched(pipe, a.concept, _eval_checkpoint(a.checkpoint, a.model), **_patch_kwargs(a)):
        res = attack(pipe, a.prompt, images, num_prefix_tokens=a.prefix_tokens, iterations=a.iterations, lr=a.lr,
                     weight_decay=a.weight_decay, seed=a.seed, timesteps=a.timesteps, project=a.project,
                     init_exclude=a.init_exclude, placement=a.placement)
        ims = generate_adversarial(pipe, res, a.seeds, num_inference_steps=a.steps, guidance_scale=a.guidance)
    paths = [str(save_png(im, out / f"adversarial_seed{s}.png")) for s, im in zip(a.seeds, ims)]
    atomic_save_file({"prefix_embeddings": res.prefix_embeddings.contiguous(),
                      "adversarial_prompt_embeds": res.adversarial_prompt_embeds.float().cpu().contiguous()},
                     out / "adversarial_prompt.safetensors")
    atomic_write_json(dict(res.to_json(), concept=a.concept, images=paths, placement=a.placement,
                           init_exclude=a.init_exclude), out / "attack.json")
    print(f"final loss {res.loss_history[-1]:.4f}; {len(paths)} images and attack.json in {out}")


def add_attack_parser(sub):
    """``saeuron attack``: optimise a 5-token prefix against the unlearned pipeline, sample with it."""
    s = sub.add_parser("attack", help="UnlearnDiffAtk-style prefix attack on the unlearned pipeline: images + JSON")
    s.add_argument("--model", required=True,
                   help="pipeline folder (SD or MiniCanvas), or 'minicanvas' for the shipped one")
    s.add_argument("--checkpoint", default=None, help="folder with SAEs and the concept file")
    s.add_argument("--concept", nargs="+", required=True, help="concept(s) unlearned by the patch")
    s.add_argument("--prompt", required=True, help="the prompt the prefix is prepended to")
    s.add_argument("--target-images", required=True, help="folder or glob of images of the erased concept")
    s.add_argument("--out", required=True, help='output folder')
    s.add_argument("--prefix-tokens", type=int, default=5,
                   help='adversarial prompt tokens optimised (default %(default)s)')
    s.add_argument("--iterations", type=int, default=40, help='Adam iterations (default %(default)s)')
    s.add_argument("--lr", type=float, default=0.01, help='learning rate (default %(default)s)')
    s.add_argument("--weight-decay", type=float, default=0.1, help='Adam weight decay (default %(default)s)')
    s.add_argument("--timesteps", default="train", choices=["train", "inference"], help="pool t is drawn from")
    s.add_argument("--project", action="store_true", help="hard prompt: evaluate at the nearest vocabulary tokens")
    s.add_argument("--placement", default="prefix", choices=["prefix", "suffix"],
                   help="adversarial tokens after BOS (default, UnlearnDiffAtk) or after the prompt's EOS")
    s.add_argument("--init-exclude", nargs="*", default=[], metavar="WORD",
                   help="words the random prefix must not start from (e.g. the benchmark's concept words; "
                        "'minicanvas compare' excludes all MiniCanvas objects and styles)")
    s.add_argument("--seeds", type=int, nargs="+", default=[188, 288, 588, 688, 888],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--steps", type=int, default=None,
                   help="denoising steps for the adversarial images (default: the pipeline's)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    _edit_args(s, top_n=False)
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--dtype", default=None, help='fp32, fp16 or bf16 (default: as saved)')
    s.set_defaults(fn=cmd_attack)
    return s


# --------------------------------------------------------------------------- unlearncanvas: the real benchmark, staged

def cmd_unlearncanvas_generate(a):
    """``saeuron unlearncanvas generate``: create/check the run config, then write every missing image."""
    from .evaluate.unlearncanvas import generate_images, init_run

    cfg = init_run(a.run, model=a.model, checkpoint=a.checkpoint, labels=a.labels, domain=a.domain,
                   targets=a.targets, seeds=a.seeds, steps=a.steps, guidance=a.guidance, height=a.height,
                   width=a.width, **_patch_kwargs(a))
    written = generate_images(a.run, lambda: load_pipeline(cfg["model"], a.device, _dtype(a.dtype)),
                              targets=a.targets, original=a.original, batch_size=a.batch_size, progress=not a.quiet)
    print(f"{sum(written.values())} images written in {Path(a.run) / 'images'} ({len(written)} folders; "
          "existing images kept)")


def cmd_unlearncanvas_classify(a):
    """``saeuron unlearncanvas classify``: predictions of the style and object classifiers, per target."""
    from .evaluate.unlearncanvas import classify_run

    status = classify_run(a.run, a.arch, classifier=a.classifier, style_classifier=a.style_classifier,
                          object_classifier=a.object_classifier, device=_device(a.device), batch_size=a.batch_size,
                          image_size=a.image_size, progress=not a.quiet)
    for folder, st in status.items():
        print(f"{folder}: {st}")


def cmd_unlearncanvas_report(a):
    """``saeuron unlearncanvas report``: the UA/IRA/CRA table (results.json, results.md)."""
    from .evaluate.unlearncanvas import report

    report(a.run, progress=not a.quiet)
    print(f"results: {Path(a.run) / 'results.json'} and results.md")


def add_unlearncanvas_parser(sub):
    """``saeuron unlearncanvas generate|classify|report``: UnlearnCanvas on local files, one command per stage."""
    uc = sub.add_parser("unlearncanvas", help="the UnlearnCanvas protocol on a local model and classifiers, by stage")
    ucs = uc.add_subparsers(dest="unlearncanvas_cmd", required=True)
    s = ucs.add_parser("generate", help="images of every prompt x seed with each target unlearned (resumes)")
    s.add_argument("--run", required=True, help="run folder (config.json, images/, predictions/, results)")
    s.add_argument("--model", default=None, help="UnlearnCanvas SD1.5 pipeline folder (new runs)")
    s.add_argument("--checkpoint", default=None, help="SAeUron checkpoint: SAEs + concept file (new runs)")
    s.add_argument("--labels", default=None, help='JSON {"styles": [...], "objects": [...], "template": "..."} '
                                                  "in classifier class order (default: built-in lists)")
    s.add_argument("--domain", default=None, choices=["style", "object"], help="what is unlearned (default style)")
    s.add_argument("--targets", nargs="+", default=None, help="targets to generate (default: all of the run)")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="default 188 288 588 688 888")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default 100)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default 9.0)")
    s.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    s.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    _edit_args(s)
    s.add_argument("--original", action="store_true", help="also the unedited model's images (images/_original)")
    s.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_unlearncanvas_generate)

    s = ucs.add_parser("classify", help="style and object predictions for every complete target (resumes)")
    s.add_argument("--run", required=True, help='run folder (config.json, images/, predictions/, results)')
    s.add_argument("--arch", default="vit_large_patch16_224", choices=["vit_large_patch16_224", "minicanvas"],
                   help="classifier architecture (vit_large_patch16_224 needs timm; minicanvas: SmallCNN stand-ins)")
    s.add_argument("--classifier", default=None, help="one file, shared body + style_head.* and object_head.*")
    s.add_argument("--style-classifier", default=None, help="style classifier file (.pth/.pt/.safetensors)")
    s.add_argument("--object-classifier", default=None, help="object classifier file (.pth/.pt/.safetensors)")
    s.add_argument("--image-size", type=int, default=None, help="classifier input size (default: per --arch)")
    s.add_argument("--batch-size", type=int, default=32, help='items per batch (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_unlearncanvas_classify)

    s = ucs.add_parser("report", help="UA / IRA / CRA per target and their mean: results.json + results.md")
    s.add_argument("--run", required=True, help='run folder (config.json, images/, predictions/, results)')
    s.add_argument("--quiet", action="store_true", help="do not print the table")
    s.set_defaults(fn=cmd_unlearncanvas_report)
    return uc


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saeuron", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    def model_args(s, dtype=True):
        s.add_argument("--model", default="minicanvas",
                       help="pipeline folder, 'minicanvas' (the shipped model; the default), or a hub id")
        s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        if dtype:
            s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")

    def sampling_args(s):
        s.add_argument("--steps", type=int, default=None,
                       help="denoising steps (default: the pipeline's own: MiniCanvas 25, Stable Diffusion 50)")
        s.add_argument("--guidance", type=float, default=None,
                       help="CFG scale (default: the pipeline's own: MiniCanvas 1.5, Stable Diffusion 7.5)")
        s.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
        s.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")

    s = sub.add_parser("hookpoints", help="list the UNet's Transformer2DModel blocks and their channels")
    s.add_argument("--model", required=True, help="pipeline folder, 'minicanvas' (the shipped model) or a hub id")
    s.set_defaults(fn=cmd_hookpoints)

    s = sub.add_parser("collect", help="run the pipeline over prompts and store hookpoint activations")
    model_args(s)
    s.add_argument("--prompts", required=True, help=".txt (one per line) or .json (list or {concept: [prompts]})")
    s.add_argument("--out", required=True, help="store folder (rerun to resume)")
    s.add_argument("--hookpoints", nargs="+", required=True, help="e.g. up_blocks.1.attentions.1")
    sampling_args(s)
    s.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    s.add_argument("--every", type=int, default=1, help="keep every n-th denoising step")
    s.add_argument("--halves", default="cond", choices=["cond", "uncond", "both"], help="CFG halves to keep")
    s.add_argument("--tokens-per-map", type=int, default=None, help="random subset of tokens per map (default all)")
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.set_defaults(fn=cmd_collect)

    s = sub.add_parser("train", help="train a TopK SAE per hookpoint on a store")
    s.add_argument("--store", required=True, help='activation store folder (made by saeuron collect)')
    s.add_argument("--out", required=True, help="checkpoint folder (one subfolder per hookpoint); resumes")
    s.add_argument("--hookpoints", nargs="*", default=None, help="default: all in the store")
    s.add_argument("--k", type=int, default=32, help="latents kept per token, TopK's k (default %(default)s)")
    s.add_argument("--expansion", type=int, default=16,
                   help='number of latents = expansion x input width (default %(default)s)')
    s.add_argument("--num-latents", type=int, default=0, help="overrides --expansion when > 0")
    s.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    s.add_argument("--lr", type=float, default=4e-4, help='learning rate (default %(default)s)')
    s.add_argument("--topk", action="store_true", help="per-token TopK instead of BatchTopK")
    s.add_argument("--max-tokens", type=int, default=None,
                   help='stop after this many training tokens (default: every token of every epoch)')
    s.add_argument("--epochs", type=int, default=1, help='passes over the store (default %(default)s)')
    s.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype (fp32 master weights)")
    s.add_argument("--save-every", type=int, default=1000,
                   help='save a resumable checkpoint every n steps (default %(default)s)')
    s.add_argument("--dead-tokens", type=int, default=10_000_000, help="tokens without firing before a latent is dead")
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("select", help="per-concept statistics and feature selection -> concept file")
    s.add_argument("--store", required=True, help="store collected with concept-labelled prompts")
    s.add_argument("--checkpoint", required=True, help="folder with the SAEs; the concept file is written here")
    s.add_argument("--concepts", default=None, help="JSON {concept: [prompts]} (default: the store's labels)")
    s.add_argument("--hookpoints", nargs="*", default=None, help='hookpoints to use (default: every one with an SAE)')
    s.add_argument("--multiplier", type=float, default=-1.0, help="default per-concept multiplier (gamma < 0)")
    s.add_argument("--percentile", type=float, default=99.99, help="default selection percentile")
    s.add_argument("--top-n", type=int, default=None, help="select the top n features per timestep instead")
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.set_defaults(fn=cmd_select)

    s = sub.add_parser("generate", help="images with and without the edit, plus a side-by-side grid PNG")
    model_args(s)
    s.add_argument("--checkpoint", default=None,
                   help="folder with SAEs and the concept file (default: the shipped one with --model minicanvas)")
    s.add_argument("--concept", nargs="+", required=True, help="concept(s) to unlearn")
    s.add_argument("--prompt", default=None, help='one prompt (or --prompts FILE)')
    s.add_argument("--prompts", default=None, help="prompt file instead of --prompt")
    s.add_argument("--seeds", type=int, nargs="+", default=[188, 288, 588, 688, 888],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--out", required=True, help='output folder')
    sampling_args(s)
    _edit_args(s, top_n=False)
    s.add_argument("--halves", default="both", choices=["both", "cond", "uncond"],
                   help='CFG halves the edit acts on: both, cond or uncond (default %(default)s)')
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("backend", help="show which kernel backend each op uses here")
    s.set_defaults(fn=cmd_backend)

    s = sub.add_parser("demo", help="the built-in default, end to end (no downloads)")
    s.add_argument("--out", default="demo_out", help='output folder')
    s.add_argument("--quick", action="store_true", help="smallest settings (used by the tests)")
    s.set_defaults(fn=cmd_demo)

    add_explain_parser(sub)
    add_sweep_parser(sub)
    add_minicanvas_parser(sub)
    add_attack_parser(sub)
    add_unlearncanvas_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "generate" and not (args.prompt or args.prompts):
        raise SystemExit("generate needs --prompt or --prompts")
    from .utils import FolderBusyError

    try:
        args.fn(args)
    except (FileNotFoundError, NotADirectoryError, ValueError, FolderBusyError) as e:  # one clear line, no traceback
        if os.environ.get("SAEURON_DEBUG"):
            raise
        raise SystemExit(f"saeuron {args.stage}: error: {e}\n(set SAEURON_DEBUG=1 to see the traceback)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
