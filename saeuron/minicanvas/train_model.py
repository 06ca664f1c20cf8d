"""Train the MiniCanvas text-to-image model from scratch (``saeuron minicanvas train``).

Every step draws a fresh batch of train-split renders (or samples a pre-rendered pool held on the
device, re-rendered every ``pool_refresh`` steps: the GPU path), captions them with the training
template only ("An image of {object} in {style} style." / "An image of {object}."; or, with
``caption_forms=True``, each image in a caption form drawn uniformly from ``data.caption_forms("train")``
of its family, with a tokenizer over ``data.vocabulary(with_forms=True)``), replaces a
``cfg_dropout`` share of the captions with the empty prompt (for classifier-free guidance), and
trains the UNet and the text encoder jointly on the v-prediction objective of the pipeline's DDIM
schedule (uniform timesteps, MSE) with AdamW, gradient clipping, linear warmup, a constant learning
rate, a linear decay to zero over the last ``lr_decay`` share of the steps, and an EMA of the weights
(the EMA weights are what gets saved). The decay only touches the final steps, so a run resumed with a
larger ``steps`` continues exactly like an uninterrupted run of that length as long as the decay had not
begun when it stopped.

All randomness of step ``s`` comes from generators seeded by ``(seed, s)``, so a run resumed from a
checkpoint continues exactly like an uninterrupted one. ``out_dir`` holds::

    train_state-*.safetensors weights, EMA weights and AdamW moments (tensors) + step and settings (metadata),
                              in shards of at most ``shard_mib`` MiB each (a GPU machine returns files of 16 MiB)
    train_state.json          the step and settings, and which shard files make up the state
    metrics.jsonl             loss, learning rate and speed every ``log_every`` steps
    pipeline/                 the final MiniCanvasPipeline (save_pretrained; EMA weights)

``caption_forms`` is off by default, so the default run reproduces the shipped model exactly; turn it on with
``train_model(..., caption_forms=True)`` or, in a build, ``saeuron minicanvas build --set
'model={"caption_forms": true}'`` (the build passes its ``model`` setting to this function).

A ``compact`` state stores the weights and EMA weights in bf16 without the AdamW moments (a quarter of the
size): small enough to carry between machines, and resumed approximately (rounded weights, fresh moments).
``time_limit`` stops a run cleanly (state saved, nothing lost) after that many seconds of training, so a
run split over time-limited calls goes on where each one stopped.
"""
from __future__ import annotations

import copy
import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..store import derive_seed
from ..utils import atomic_save_file, atomic_write_json, locks_folder
from . import data, dataset, rendering
from .model import build_pipeline, model_config, save_pipeline

STATE_FILE = "train_state.safetensors"  # the single state file of runs saved before shards (still read)
STATE_JSON = "train_state.json"
SHARD_MIB = 15.0
METRICS_FILE = "metrics.jsonl"
PIPELINE_DIR = "pipeline"
FORMAT = "saeuron-minicanvas-train-state"

# per model config: the settings `saeuron minicanvas train --config NAME` uses unless told otherwise
TRAIN_DEFAULTS = {
    "micro": dict(steps=40, batch_size=16, lr=2e-3, warmup=5, lr_decay=0.0, ema_decay=0.9, pool_size=0,
                  pool_refresh=0),
    "cpu": dict(steps=12000, batch_size=48, lr=1e-3, warmup=100, lr_decay=0.25, ema_decay=0.999, pool_size=0,
                pool_refresh=0),
    "gpu": dict(steps=40000, batch_size=512, lr=5e-4, warmup=1000, lr_decay=0.2, ema_decay=0.9995,
                pool_size=1 << 17, pool_refresh=4000),
}
# a resumed run must agree with the saved one on these, or it is a different run
RESUME_KEYS = ("model", "batch_size", "seed", "cfg_dropout", "pool_size", "pool_refresh", "ema", "ema_decay",
               "caption_forms")
# the value of a resume key in a state saved before that key existed
RESUME_KEY_DEFAULTS = {"caption_forms": False}


# ---------------------------------------------------------------- data

def caption_table(tokenizer, caption_forms: bool = False) -> torch.Tensor:
    """Token ids of every training caption, row ``o * (len(STYLES) + 1) + s`` (s = len(STYLES): unstyled),
    and the empty prompt as the last row; with ``caption_forms``, the rows of :func:`form_rows` instead."""
    n_s = len(data.STYLES) + 1
    if caption_forms:
        caps = form_rows()[0] + [""]
    else:
        caps = [data.caption(o, s, 0) for o in range(len(data.OBJECTS)) for s in range(n_s)] + [""]
    return tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def form_rows() -> tuple:
    """``(captions, lookup)``: every (object, style, training form) caption, and the int64 tensor
    ``lookup[object_id, style_id, form]`` of its row (-1 where the form is no training form of that family)."""
    n_o, n_s = len(data.OBJECTS), len(data.STYLES) + 1
    n_f = max(len(data.CAPTION_FORMS), len(data.UNSTYLED_CAPTION_FORMS))
    lookup = torch.full((n_o, n_s, n_f), -1, dtype=torch.int64)
    caps = []
    for o in range(n_o):
        for s in range(n_s):
            for f in data.caption_forms("train", unstyled=s == len(data.STYLES)):
                lookup[o, s, f] = len(caps)
                caps.append(data.form_caption(o, s, f))
    return caps, lookup


def use_caption_forms(pipe, seed: int) -> None:
    """Give a freshly built pipeline the tokenizer over every caption form's words
    (``data.vocabulary(with_forms=True)``) and a text encoder of that vocabulary size, initialised from ``seed``."""
    from transformers import CLIPTextModel

    from ..toy import word_tokenizer

    old = pipe.tokenizer
    tok = word_tokenizer(data.vocabulary(with_forms=True), max_length=old.model_max_length)
    if (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (old.bos_token_id, old.eos_token_id, old.pad_token_id):
        raise RuntimeError("the caption-forms tokenizer's special tokens differ from the model's")
    conf = copy.deepcopy(pipe.text_encoder.config)
    conf.vocab_size = len(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "caption_forms_text_encoder"))
        text = CLIPTextModel(conf)
    pipe.register_modules(text_encoder=text.to(pipe.device, pipe.text_encoder.dtype), tokenizer=tok)


class _Pool:
    """Pre-rendered train-split images (uint8, on the device) and their caption rows; generation ``g``
    is a pure function of ``(seed, g)``."""

    def __init__(self, size: int, n: int, seed: int, device, progress: bool):
        self.size, self.n, self.seed, self.device, self.progress = size, n, seed, device, progress
        self.gen, self.images, self.caps = None, None, None

    def get(self, generation: int):
        if generation != self.gen:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "pool", generation))
            imgs, caps = [], []
            for i in tqdm(range(0, self.n, 1024), desc=f"render pool {generation}", disable=not self.progress,
                          leave=False):
                x, o, s, _ = dataset.sample_batch(min(1024, self.n - i), g, "train", self.size)
                imgs.append(rendering.to_uint8(x).to(self.device))
                caps.append((o * (len(data.STYLES) + 1) + s).to(self.device))
            self.images, self.caps, self.gen = None, None, None  # free the old pool first
            self.images, self.caps, self.gen = torch.cat(imgs), torch.cat(caps), generation
        return self.images, self.caps


# ---------------------------------------------------------------- state

def _save_state(out_dir: Path, named: dict, ema: Optional[list], opt, meta: dict, *, compact: bool = False,
                shard_mib: float = SHARD_MIB) -> None:
    """Write the state as new shard files, then ``train_state.json`` naming them, then delete the old files:
    a crash at any point leaves one complete state."""
    low = (lambda t: t.to(torch.bfloat16)) if compact else (lambda t: t)  # noqa: E731
    tensors = {f"model.{n}": low(p.detach().cpu()) for n, p in named.items()}
    if ema is not None:
        tensors.update({f"ema.{n}": low(e.detach().cpu()) for n, e in zip(named, ema)})
    if not compact:
        for n, p in named.items():
            for key, v in opt.state.get(p, {}).items():
                tensors[f"adam.{n}.{key}"] = torch.as_tensor(v).detach().cpu()
    shards, size = [{}], 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_mib * 2 ** 20:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {**meta, "compact": compact, "write_id": uuid.uuid4().hex[:12]}
    files = [f"train_state-{meta['write_id']}-{i + 1:03d}-of-{len(shards):03d}.safetensors"
             for i in range(len(shards))]
    for name, part in zip(files, shards):
        atomic_save_file(part, out_dir / name, metadata={"format": FORMAT, "state": json.dumps(meta)})
    atomic_write_json({**meta, "files": files}, out_dir / STATE_JSON)
    for old in out_dir.glob("train_state*.safetensors"):
        if old.name not in files:
            old.unlink()


def _state_files(out_dir: Path) -> list:
    """The files of the saved state (``train_state.json``'s list, or the lone ``train_state.safetensors`` of a
    run saved before shards); [] when there is none."""
    try:
        files = json.loads((out_dir / STATE_JSON).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if files:
        return [out_dir / f for f in files]
    return [out_dir / STATE_FILE] if (out_dir / STATE_FILE).is_file() else []


def _load_state(out_dir: Path, named: dict, ema: Optional[list], opt) -> dict:
    from safetensors import safe_open

    tensors, metas = {}, []
    try:
        for path in _state_files(out_dir):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise ValueError(f"{path.name}: format {md.get('format')!r}, expected {FORMAT!r}")
                metas.append(json.loads(md["state"]))
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        if len({m.get("write_id") for m in metas}) != 1:
            raise ValueError("no state file, or shards of different saves")
    except Exception as e:
        raise ValueError(f"corrupt training state in {out_dir} ({type(e).__name__}: {e}); delete its train_state "
                         f"files or pass resume=False") from None
    meta = metas[0]
    missing = [n for n in named if f"model.{n}" not in tensors] + \
              ([n for n in named if f"ema.{n}" not in tensors] if ema is not None else [])
    if missing:
        raise ValueError(f"training state in {out_dir} lacks {len(missing)} tensors (e.g. {missing[:3]}): it was "
                         f"written for another model; delete it or pass resume=False")
    with torch.no_grad():
        for i, (n, p) in enumerate(named.items()):
            p.copy_(tensors[f"model.{n}"])  # a compact state's bf16 is cast back up
            if ema is not None:
                ema[i].copy_(tensors[f"ema.{n}"])
    state = {}
    for i, n in enumerate(named):
        st = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{n}.")}
        if st:
            state[i] = st
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be written again)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)


def _check_resume(saved: dict, hparams: dict, out_dir) -> None:
    """ValueError naming every ``RESUME_KEYS`` setting on which a saved run differs from this one."""
    old = json.loads(json.dumps(saved or {}))
    if isinstance(old.get("model"), dict):  # states saved while model configs still named SAE hookpoints
        old["model"].pop("hookpoints", None)
    now = json.loads(json.dumps(hparams))
    for k, v in RESUME_KEY_DEFAULTS.items():
        old.setdefault(k, v)
    bad = [f"{k}: saved {old.get(k)!r}, now {now[k]!r}" for k in RESUME_KEYS if old.get(k) != now[k]]
    if bad:
        raise ValueError(f"cannot resume from the state in {out_dir}: the run differs ({'; '.join(bad)}); use "
                         f"the same settings, another out_dir, or resume=False")


# ---------------------------------------------------------------- the loop

def _check_int(name, v, lo):
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


@locks_folder("out_dir", "training the MiniCanvas model in")
def train_model(out_dir, config="cpu", steps: Optional[int] = None, batch_size: Optional[int] = None,
                lr: Optional[float] = None, lr_decay: Optional[float] = None, size: Optional[int] = None,
                seed: int = 0, device=None, resume: bool = True, progress: bool = True, cfg_dropout: float = 0.1,
                ema: bool = True, ema_decay: Optional[float] = None, warmup: Optional[int] = None,
                weight_decay: float = 0.01, grad_clip: float = 1.0, save_every: int = 250, log_every: int = 10,
                pool_size: Optional[int] = None, pool_refresh: Optional[int] = None, amp: Optional[str] = None,
                compile: bool = False, save_dtype: Optional[torch.dtype] = None, num_threads: Optional[int] = None,
                compact_state: bool = False, shard_mib: float = SHARD_MIB, time_limit: Optional[float] = None,
                caption_forms: bool = False):
    """Train (or resume) a MiniCanvas model in ``out_dir``; returns the trained pipeline (EMA weights, eval mode),
    or None when ``time_limit`` (seconds of training) stopped it first: its state is saved, call again to go on.

    ``config``: a name in ``MODEL_CONFIGS`` (its ``TRAIN_DEFAULTS`` fill every ``None`` setting) or a
    config dict. ``pool_size`` > 0 samples batches from a device-resident pool of that many renders,
    re-rendered every ``pool_refresh`` steps (the GPU path); 0 renders every batch on the fly. ``amp``:
    "bf16"/"fp16" autocast (CUDA; default bf16 there). ``compile``: ``torch.compile`` the UNet (CUDA).
    ``save_dtype``: dtype of the saved pipeline's weights (e.g. ``torch.float16`` for shipping).
    ``lr_decay``: the share of final steps over which the learning rate falls linearly to zero.
    ``compact_state``: save the state compact (bf16 weights, no AdamW moments; see the module docstring);
    ``shard_mib``: the largest state file. ``caption_forms``: caption each image in a caption form drawn
    from the training forms (``data.caption_forms("train")``), with the tokenizer over every form's words;
    off (the default), every image gets form 0, as the shipped model was trained.
    """
    name = config if isinstance(config, str) else "custom"
    cfg = model_config(config)
    dflt = TRAIN_DEFAULTS.get(name, TRAIN_DEFAULTS["cpu"])
    steps = dflt["steps"] if steps is None else steps
    batch_size = dflt["batch_size"] if batch_size is None else batch_size
    lr = dflt["lr"] if lr is None else float(lr)
    warmup = dflt["warmup"] if warmup is None else warmup
    lr_decay = dflt["lr_decay"] if lr_decay is None else float(lr_decay)
    ema_decay = dflt["ema_decay"] if ema_decay is None else float(ema_decay)
    pool_size = dflt["pool_size"] if pool_size is None else pool_size
    pool_refresh = dflt["pool_refresh"] if pool_refresh is None else pool_refresh
    if size is not None:
        cfg["size"] = size
    for n, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 2), ("warmup", warmup, 0),
                     ("save_every", save_every, 1), ("log_every", log_every, 1), ("pool_size", pool_size, 0),
                     ("pool_refresh", pool_refresh, 0), ("seed", seed, 0)):
        _check_int(n, v, lo)
    if not (shard_mib > 0 and (time_limit is None or time_limit > 0)):
        raise ValueError(f"need shard_mib > 0 and time_limit None or > 0; got shard_mib={shard_mib}, "
                         f"time_limit={time_limit}")
    if not isinstance(caption_forms, bool):
        raise ValueError(f"caption_forms must be True or False, got {caption_forms!r}")
    if pool_size and not pool_refresh:
        pool_refresh = steps  # one pool for the whole run
    if not (lr > 0 and 0 <= lr_decay <= 1 and 0 <= cfg_dropout < 1 and 0 <= ema_decay < 1 and grad_clip > 0
            and weight_decay >= 0):
        raise ValueError(f"need lr > 0, 0 <= lr_decay <= 1, 0 <= cfg_dropout < 1, 0 <= ema_decay < 1, grad_clip > 0, "
                         f"weight_decay >= 0; got lr={lr}, lr_decay={lr_decay}, cfg_dropout={cfg_dropout}, "
                         f"ema_decay={ema_decay}, grad_clip={grad_clip}, weight_decay={weight_decay}")
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    amp = ("bf16" if cuda else None) if amp is None else (None if amp in ("none", "fp32") else amp)
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp={amp!r}; valid: 'bf16', 'fp16', 'none'")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(cfg, seed=seed)
    if caption_forms:
        use_caption_forms(pipe, seed)
    pipe = pipe.to(device)
    unet, text = pipe.unet, pipe.text_encoder
    unet.train()
    text.train()
    named = {f"unet.{n}": p for n, p in unet.named_parameters()}
    named.update({f"text_encoder.{n}": p for n, p in text.named_parameters()})
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True if cuda else None)
    ema_params = [p.detach().clone().float() for p in params] if ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    hparams = dict(model=cfg, config_name=name, batch_size=batch_size, seed=seed, cfg_dropout=cfg_dropout,
                   pool_size=pool_size, pool_refresh=pool_refresh, ema=ema, ema_decay=ema_decay, lr=lr,
                   warmup=warmup, lr_decay=lr_decay, weight_decay=weight_decay, grad_clip=grad_clip,
                   prediction="v_prediction", amp=amp, caption_forms=caption_forms)
    step = 0
    if resume and _state_files(out_dir):
        try:  # the settings first (train_state.json), so another run's state fails on them, not on a shape
            _check_resume(json.loads((out_dir / STATE_JSON).read_text()).get("hparams", {}), hparams, out_dir)
        except (OSError, ValueError, AttributeError) as e:
            if "cannot resume" in str(e):
                raise
        meta = _load_state(out_dir, named, ema_params, opt)
        if meta.get("compact"):
            warnings.warn(f"resuming from the compact state in {out_dir} at step {meta['step']}: bf16 weights, "
                          "AdamW moments start afresh (not an exact resume)", stacklevel=2)
        _check_resume(meta.get("hparams", {}), hparams, out_dir)
        step = int(meta["step"])
        _trim_metrics(out_dir / METRICS_FILE, step)
    elif (out_dir / METRICS_FILE).exists():
        (out_dir / METRICS_FILE).unlink()

    sched = pipe.scheduler
    T = sched.config.num_train_timesteps
    ac = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    caps = caption_table(pipe.tokenizer, caption_forms).to(device)
    lookup = form_rows()[1] if caption_forms else None
    empty = caps.shape[0] - 1
    n_s = len(data.STYLES) + 1
    S = cfg["size"]
    pool = _Pool(S, pool_size, seed, device, progress) if pool_size else None
    fwd_unet = unet
    if compile:
        fwd_unet = torch.compile(unet)  # the wrapper shares the parameters; state_dict keys stay those of `unet`

    def batch(s):
        g = torch.Generator().manual_seed(derive_seed(seed, "batch", s))
        if pool is not None:
            images, rows = pool.get(s // pool_refresh)
            idx = torch.randint(len(images), (batch_size,), generator=g).to(device)
            x0 = images[idx].float() / 127.5 - 1
            rows = rows[idx]
            if caption_forms:  # the pool holds object x style rows; each draw gets its own training form
                pair = rows.cpu()
                o, st = pair // n_s, pair % n_s
                rows = lookup[o, st, dataset.sample_forms(st, g, "train")].to(device)
        else:
            if caption_forms:
                images, o, st, _, f = dataset.sample_batch(batch_size, g, "train", S, forms="train")
                rows = lookup[o, st, f].to(device)
            else:
                images, o, st, _ = dataset.sample_batch(batch_size, g, "train", S)
                rows = (o * n_s + st).to(device)
            x0 = images.to(device) * 2 - 1
        drop = (torch.rand(batch_size, generator=g) < cfg_dropout).to(device)
        rows = torch.where(drop, torch.full_like(rows, empty), rows)
        gd = torch.Generator(device).manual_seed(derive_seed(seed, "noise", s))
        t = torch.randint(0, T, (batch_size,), generator=gd, device=device)
        noise = torch.randn(x0.shape, generator=gd, device=device)
        return x0, caps[rows], t, noise

    decay_start = steps - round(lr_decay * steps)

    def lr_at(s):
        f = min(1.0, (s + 1) / warmup) if warmup else 1.0
        if s >= decay_start:
            f = min(f, (steps - s) / (steps - decay_start))
        return lr * f

    def save():
        _save_state(out_dir, named, ema_params, opt, {"format": FORMAT, "step": step, "steps": steps,
                                                      "hparams": hparams}, compact=compact_state, shard_mib=shard_mib)

    bar = tqdm(total=steps, initial=min(step, steps), desc=f"train minicanvas ({name})", disable=not progress,
               dynamic_ncols=True)
    loss_sum, n_sum, t_log = torch.zeros((), device=device), 0, time.time()
    t_start = t_log
    while step < steps:
        x0, ids, t, noise = batch(step)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            emb = text(ids)[0]
            pred = fwd_unet(xt, t, encoder_hidden_states=emb, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower lr (now {lr}) or check the data")
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
        if ema_params is not None:
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1 - d)
        step += 1
        loss_sum += loss.detach()
        n_sum += 1
        stop = time_limit is not None and step < steps and time.time() - t_start >= time_limit
        if step % log_every == 0 or step == steps or stop:
            now = time.time()
            rec = {"step": step, "loss": loss_sum.item() / n_sum, "lr": lr_at(step - 1),
                   "steps_per_s": n_sum / max(now - t_log, 1e-9)}
            with open(out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", it_s=f"{rec['steps_per_s']:.2f}")
            loss_sum.zero_()
            n_sum, t_log = 0, now
        bar.update(1)
        if (step % save_every == 0 and step < steps) or stop:
            save()
        if stop:
            bar.close()
            print(f"stopped at step {step} of {steps}: time limit of {time_limit:g} s reached; the state is saved "
                  f"in {out_dir}, run again to go on")
            return None
    bar.close()
    save()

    if ema_params is not None:
        with torch.no_grad():
            for p, e in zip(params, ema_params):
                p.copy_(e)
    unet.eval()
    text.eval()
    pipe.set_progress_bar_config(disable=True)
    log = read_metrics(out_dir)
    info = {"config": name, "model": cfg, "steps": step, "hparams": hparams, "weights": "ema" if ema else "raw",
            "final_loss": log[-1]["loss"] if log else None, "train_seconds": train_seconds(log)}
    save_pipeline(pipe, out_dir / PIPELINE_DIR, dtype=save_dtype, extra=info)
    return pipe


def train_seconds(records) -> float:
    """Seconds spent on optimiser steps over every run (resumes included), from a folder's :func:`read_metrics`."""
    total, prev = 0.0, 0
    for rec in records:
        total += (rec["step"] - prev) / rec["steps_per_s"]
        prev = rec["step"]
    return round(total, 1)


def read_metrics(out_dir) -> list:
    """The ``metrics.jsonl`` records of a training folder (step, loss, lr, steps_per_s)."""
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


__all__ = ["train_model", "TRAIN_DEFAULTS", "caption_table", "form_rows", "use_caption_forms", "read_metrics",
           "train_seconds"]
