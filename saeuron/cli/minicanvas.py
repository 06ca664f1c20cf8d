"""``saeuron minicanvas train|build|gates`` (and, from :mod:`.evaluate`, ``eval`` and ``compare``): the offline
MiniCanvas world."""
from __future__ import annotations

import json
from pathlib import Path

from .common import torch_dtype
from .evaluate import add_minicanvas_compare_parser, add_minicanvas_eval_parser


def cmd_minicanvas_train(a):
    """``saeuron minicanvas train``: train (or resume) the MiniCanvas text-to-image model."""
    from ..minicanvas.train_model import train_model

    pipe = train_model(a.out, a.config, steps=a.steps, batch_size=a.batch_size, lr=a.lr, lr_decay=a.lr_decay,
                       seed=a.seed, device=a.device, resume=not a.no_resume, cfg_dropout=a.cfg_dropout,
                       ema=not a.no_ema, save_every=a.save_every, pool_size=a.pool_size, amp=a.amp,
                       compile=a.compile, num_threads=a.threads, save_dtype=torch_dtype("fp16") if a.fp16 else None,
                       compact_state=a.compact_state, time_limit=a.time_limit)
    if pipe is not None:  # None: stopped by --time-limit, which said so
        print(f"pipeline in {Path(a.out) / 'pipeline'}; training state in {a.out} (rerun to resume or extend --steps)")


def cmd_minicanvas_build(a):
    """``saeuron minicanvas build``: produce the shipped defaults."""
    from ..minicanvas.build import build_defaults, cli_command
    from ..minicanvas.defaults import assets_dir

    build_defaults(a.out or assets_dir(), a.config, seed=a.seed, work_dir=a.work, device=a.device,
                   command=cli_command(), num_threads=a.threads, stages=a.stages, settings=_key_values(a.set))


def cmd_minicanvas_gates(a):
    """``saeuron minicanvas gates``: the build's model gates (``build.model_gates``) on any saved pipeline folder."""
    import torch

    from ..minicanvas import classifiers as clf
    from ..minicanvas.build import CONTROL_DEFAULTS, cli_command, gate_lines, model_gates
    from ..minicanvas.defaults import load_classifiers
    from ..minicanvas.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline
    from ..utils import atomic_write_json

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(a.pipeline, device)
    judges = clf.load_classifiers(a.classifiers, device) if a.classifiers else load_classifiers(device)
    forms = {"auto": None, "yes": True, "no": False}[a.caption_forms]
    control = None
    if not a.no_control:
        given = {"prompts": a.control_prompts, "iterations": a.control_iterations, "seeds": a.control_seeds}
        control = {**CONTROL_DEFAULTS["cpu"], **{k: v for k, v in given.items() if v is not None}}
    gates = model_gates(pipe, judges, caption_forms=forms, seeds=a.seeds, form_seeds=a.form_seeds,
                        heldout_forms=not a.no_heldout_forms, control=control, damage=not a.no_damage_check,
                        num_inference_steps=DEFAULT_STEPS if a.steps is None else a.steps,
                        guidance_scale=DEFAULT_GUIDANCE if a.guidance is None else a.guidance,
                        batch_size=a.batch_size, progress=not a.no_progress)
    info = Path(a.pipeline) / "minicanvas.json"
    trained = json.loads(info.read_text()) if info.is_file() else {}
    gates.update(pipeline=str(a.pipeline), classifiers=a.classifiers or "shipped", command=cli_command(),
                 model_steps=trained.get("steps"))
    print(f"gates of {a.pipeline} (trained {trained.get('steps', '?')} steps; caption forms: "
          f"{'yes' if gates['caption_forms'] else 'no'})")
    for line in gate_lines(gates):
        print(f"  {line}")
    if a.out:
        atomic_write_json(gates, a.out)
        print(f"written to {a.out}")


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


def add_minicanvas_gates_parser(mcs):
    """``gates`` under ``saeuron minicanvas``: the unedited model's gates on a saved pipeline folder."""
    from ..evaluate.protocol import EVAL_SEEDS  # the build's GATE_SEEDS (importing the build would import torch)

    s = mcs.add_parser("gates", help="measure the unedited model's gates (training form, held-out caption forms, "
                                     "attack control) on a saved pipeline folder, without a build",
                       description="The build's gates stage on any saved MiniCanvas pipeline (e.g. a mid-training "
                                   "checkpoint): judge accuracy on the training form over every prompt x --seeds "
                                   "(gates 98 % objects / 99 % styles for a model trained on caption forms, else "
                                   "95 %), over every prompt of every held-out caption form x --form-seeds (gate "
                                   "90 %), and the prefix attack's control (the unedited model's UA may move by at "
                                   "most 5 points). The held-out forms and the control are measured for any model "
                                   "unless skipped. Prints a short table with progress bars; --out writes the JSON "
                                   "(atomically).")
    s.add_argument("--pipeline", required=True, help="saved MiniCanvas pipeline folder (with model_index.json)")
    s.add_argument("--classifiers", default=None,
                   help="folder with object/ and style/ judges (default: the shipped ones)")
    s.add_argument("--seeds", type=int, nargs="+", default=list(EVAL_SEEDS),
                   help="seeds of the training-form gate (default: the protocol seeds %(default)s)")
    s.add_argument("--form-seeds", type=int, nargs="+", default=None,
                   help="seeds of the held-out-form gate (default: --seeds)")
    s.add_argument("--caption-forms", default="auto", choices=["auto", "yes", "no"],
                   help="which training-form gates apply: the caption-forms model's (98/99 %%) or the old model's "
                        "(95 %%); auto reads it from the tokenizer (default %(default)s)")
    s.add_argument("--no-heldout-forms", action="store_true", help="skip the held-out caption forms")
    s.add_argument("--no-control", action="store_true", help="skip the attack control")
    s.add_argument("--no-damage-check", action="store_true",
                   help="skip the damage measure's check (calibrated on the first seed's training-form images, the "
                        "share of the other seeds' images it flags; not a gate)")
    s.add_argument("--control-prompts", type=int, default=None,
                   help="attacked prompts per target in the control, every style and object a target (default: the "
                        "build's, build.CONTROL_DEFAULTS['cpu']: 5)")
    s.add_argument("--control-iterations", type=int, default=None,
                   help="attack iterations in the control (default: the build's: 40)")
    s.add_argument("--control-seeds", type=int, nargs="+", default=None,
                   help="seeds of the control (default: the build's: 188)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 25)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 1.5)")
    s.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (default %(default)s)")
    s.add_argument("--out", default=None, metavar="FILE.json", help="write the gates as JSON (atomically)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_minicanvas_gates)
    return s


def add_minicanvas_parser(sub):
    """``saeuron minicanvas train|build|gates`` (and ``eval``, ``compare``): the offline MiniCanvas world."""
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
                   help="run only these stages (the stages they are built from must be done; the gates can come last)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a build setting (VALUE as JSON; dicts merge), e.g. --set guidance=2 "
                        "--set 'sae={\"k\": 8}'; a changed setting redoes the stages that read it, and a later "
                        "build without it goes back to the config's default")
    s.set_defaults(fn=cmd_minicanvas_build)
    add_minicanvas_gates_parser(mcs)
    add_minicanvas_eval_parser(mcs)  # `saeuron minicanvas eval` (saeuron.evaluate)
    add_minicanvas_compare_parser(mcs)  # `saeuron minicanvas compare` (saeuron.evaluate.compare)
    return mc
