"""UnlearnDiffAtk-style adversarial prompts against an unlearned pipeline (method.md section 6).

``attack`` optimises ``num_prefix_tokens`` token embeddings spliced into the prompt's text-encoder
*input* sequence right after BOS (``[BOS] p_1 .. p_n prompt tokens [EOS] pad``). The text encoder runs
on the spliced sequence (a forward hook on its token-embedding layer: ``CLIPTextModel`` in
transformers 5 takes ``input_ids`` only), and the loss is the denoising loss of the pipeline's UNet on
images of the erased concept: each iteration draws one timestep ``t`` (uniform over the training
schedule, or over the inference timesteps), noises the images' latents with ``scheduler.add_noise``
and minimises ``MSE(eps_theta(x_t, t, c_adv), eps)`` (the velocity for v-prediction) with Adam
(lr 0.01, weight decay 0.1, 40 iterations, as published).

The UNet gets the real timestep *value*, so a saeuron patch picks the features of the nearest recorded
timestep (the reference attack code indexes them by a counter instead). Gradients flow through the
patch: when the block output requires grad, the patch applies the edit out of place with the
differentiable ``reference.edit_delta``. The pipeline's own weights are frozen during the attack.

The noised latents go to the UNet as they are, which is right for DDPM/DDIM/PNDM-style schedulers
(``add_noise`` gives the UNet's input); sigma-scaled schedulers (Euler, Heun) are refused.
"""
from __future__ import annotations

import glob
import inspect
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hookpoints import get_unet
from ..patching import get_patch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TIMESTEP_POOLS = ("train", "inference")
PLACEMENTS = ("prefix", "suffix")
DEFAULT_SEEDS = (188, 288, 588, 688, 888)


# --------------------------------------------------------------------------- images and latents

def image_size(pipe) -> int:
    """The pipeline's native image side: UNet sample size times the VAE's downsampling (1 without a VAE)."""
    unet = get_unet(pipe)
    vae = getattr(pipe, "vae", None)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return int(unet.config.sample_size) * factor


def to_latents(pipe, images: Tensor) -> Tensor:
    """Diffusion samples of ``images`` ([B, 3, H, W] in [-1, 1]): VAE latents (mean * scale), else the pixels."""
    if not torch.is_tensor(images) or images.dim() not in (3, 4):
        raise ValueError(f"images must be a [B, 3, H, W] (or [3, H, W]) tensor in [-1, 1], got "
                         f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    images = images[None] if images.dim() == 3 else images
    unet = get_unet(pipe)
    p = next(unet.parameters())
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return images.to(p.device, p.dtype)
    vp = next(vae.parameters())
    with torch.no_grad():
        lat = vae.encode(images.to(vp.device, vp.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((lat - shift) * vae.config.scaling_factor).to(p.device, p.dtype)


def load_images(spec, size: Optional[int] = None) -> Tensor:
    """Images from a folder, a glob or a list of paths as a [B, 3, size, size] tensor in [-1, 1]."""
    from PIL import Image

    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
    elif Path(spec).is_dir():
        paths = sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        paths = [Path(p) for p in sorted(glob.glob(str(spec)))]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found at {spec}")
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
        out.append(x.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


# --------------------------------------------------------------------------- text encoding with a prefix

def _embedding_layer(text_encoder) -> nn.Embedding:
    """The text encoder's token-embedding layer (``get_input_embeddings`` or its first ``nn.Embedding``)."""
    get = getattr(text_encoder, "get_input_embeddings", None)
    layer = get() if callable(get) else None
    if isinstance(layer, nn.Embedding):
        return layer
    for m in text_encoder.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise TypeError(f"{type(text_encoder).__name__} has no token-embedding layer (nn.Embedding) for the prefix")


def _hidden(out) -> Tensor:
    """The per-token hidden states of a text encoder's output (``last_hidden_state``, ``[0]`` or a tensor)."""
    if torch.is_tensor(out):
        return out
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    return out[0]


def check_text_parts(pipe):
    """Raise ``TypeError`` unless ``pipe`` has the tokenizer, text encoder, UNet and scheduler the attack needs."""
    for attr in ("tokenizer", "text_encoder", "unet", "scheduler"):
        if getattr(pipe, attr, None) is None:
            raise TypeError(f"the pipeline ({type(pipe).__name__}) has no {attr}; the attack needs tokenizer, "
                            "text_encoder, unet and scheduler")


def prefixed_ids(tokenizer, prompt: str, num_prefix_tokens: int, placement: str = "prefix") -> tuple:
    """``(input_ids [1, L], start)``: the padded prompt with ``num_prefix_tokens`` placeholder slots at ``start``.

    ``placement``: "prefix" puts the slots right after BOS (UnlearnDiffAtk); "suffix" right after the
    prompt's EOS, where padding was, so every prompt token keeps its position. A prompt too long for the
    slots is truncated, keeping its final (EOS) token, as the pipelines truncate.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; valid: {', '.join(PLACEMENTS)}")
    L = int(tokenizer.model_max_length)
    if num_prefix_tokens >= L - 1:
        raise ValueError(f"{num_prefix_tokens} adversarial tokens do not fit a {L}-token prompt with BOS and EOS")
    ids = list(tokenizer(prompt, truncation=False).input_ids)
    if len(ids) + num_prefix_tokens > L:
        ids = ids[:L - num_prefix_tokens - 1] + ids[-1:]
    specials = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    placeholder = next(i for i in range(len(tokenizer)) if i not in specials)  # any ordinary id; replaced
    if placement == "prefix":
        start = 1 if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0
    else:
        start = len(ids)
    ids = ids[:start] + [placeholder] * num_prefix_tokens + ids[start:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = ids + [pad] * (L - len(ids))
    return torch.tensor([ids]), start


@contextmanager
def spliced_prefix(text_encoder, prefix: Tensor, start: int, rows: Optional[Tensor] = None):
    """Within the block, the text encoder's token embeddings at ``[start, start + n)`` are ``prefix`` [n, d]."""
    def hook(module, args, out):
        p = prefix.to(out.dtype)[None].expand(out.shape[0], -1, -1)
        new = torch.cat([out[:, :start], p, out[:, start + p.shape[1]:]], 1)
        if rows is None:
            return new
        keep = rows.to(out.device).view(-1, 1, 1)
        return torch.where(keep, new, out)

    handle = _embedding_layer(text_encoder).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(pipe, ids: Tensor, prefix: Optional[Tensor] = None, start: int = 1) -> Tensor:
    """Text-encoder hidden states [B, L, d] of ``ids``, with ``prefix`` spliced in at ``start`` when given."""
    te = pipe.text_encoder
    dev = next(te.parameters()).device
    ctx = spliced_prefix(te, prefix, start) if prefix is not None else nullcontext()
    with ctx:
        return _hidden(te(ids.to(dev)))


def encode_prompts(pipe, prompts) -> Tensor:
    """Text-encoder hidden states [B, L, d] of ``prompts`` padded to the tokenizer's max length, as SD encodes them."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return encode(pipe, ids)


# --------------------------------------------------------------------------- the attack

@dataclass
class AttackResult:
    """What ``attack`` found: the prefix, the loss per iteration and the prompt embeddings to sample with."""
    prefix_embeddings: Tensor  # [n, d] fp32, token-embedding space (before position embeddings)
    loss_history: list
    adversarial_prompt_embeds: Tensor  # [1, L, d] text-encoder output for the prefixed prompt
    prompt: str = ""
    input_ids: Optional[Tensor] = None  # [1, L] with placeholder slots
    start: int = 1
    timesteps: list = field(default_factory=list)  # the timestep value drawn at each iteration
    tokens: Optional[list] = None  # nearest vocabulary tokens of the prefix (set when project=True)
    seconds: float = 0.0

    def to_json(self) -> dict:
        """A JSON-able summary (no tensors but the prefix norms)."""
        return dict(prompt=self.prompt, num_prefix_tokens=int(self.prefix_embeddings.shape[0]),
                    loss_history=[float(x) for x in self.loss_history], timesteps=[int(t) for t in self.timesteps],
                    prefix_norms=[float(x) for x in self.prefix_embeddings.norm(dim=-1)], tokens=self.tokens,
                    seconds=self.seconds)


@contextmanager
def frozen(*modules):
    """Within the block, every parameter of ``modules`` has ``requires_grad=False``; the flags are restored after."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def check_scheduler(scheduler):
    """The prediction type of a DDPM-style ``scheduler``; TypeError/ValueError for one the attack cannot use."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise TypeError(f"{type(scheduler).__name__} scales the model input by sigma; the attack noises with add_noise "
                        "and needs a DDPM-style scheduler (DDIM, DDPM, PNDM, DPM-Solver)")
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={pred!r} is not supported; valid: epsilon, v_prediction")
    return pred


def timestep_pool(scheduler, pool: str = "train", num_inference_steps: int = 50) -> Tensor:
    """The timestep values an iteration draws from: all training timesteps, or the scheduler's inference timesteps."""
    if pool not in TIMESTEP_POOLS:
        raise ValueError(f"timesteps={pool!r}; valid: {', '.join(TIMESTEP_POOLS)}")
    if pool == "train":
        return torch.arange(int(scheduler.config.num_train_timesteps))
    copy = type(scheduler).from_config(scheduler.config)  # never touch the pipeline's scheduler state
    copy.set_timesteps(num_inference_steps)
    return copy.timesteps.clone().long()


def denoising_loss(pipe, prompt_embeds: Tensor, latents: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``MSE(unet(add_noise(latents, noise, t), t, prompt_embeds), target)`` in fp32: the attack's loss."""
    unet, sched = get_unet(pipe), pipe.scheduler
    pred_type = check_scheduler(sched)
    t = t.reshape(-1).to(latents.device)
    tb = t.expand(latents.shape[0]) if t.numel() == 1 else t
    handle = get_patch(pipe)
    if handle is not None and handle.halves != "both" and latents.shape[0] > 1:
        # an even batch could be read as a CFG [uncond, cond] pair by the patch: one image at a time is all "cond"
        return torch.stack([denoising_loss(pipe, prompt_embeds, latents[i:i + 1], tb[i:i + 1], noise[i:i + 1])
                            for i in range(latents.shape[0])]).mean()
    noisy = sched.add_noise(latents, noise, tb)
    target = sched.get_velocity(latents, noise, tb) if pred_type == "v_prediction" else noise
    emb = prompt_embeds.to(latents.dtype).expand(latents.shape[0], -1, -1)
    pred = unet(noisy, t, encoder_hidden_states=emb).sample  # the value of t: a patch looks features up by it
    return F.mse_loss(pred.float(), target.float())


def _start_tokens(tok, vocab_size: int, exclude: Sequence[str]) -> Tensor:
    """Mask [vocab_size] of the token ids a random prefix may start from: no special token, no token of ``exclude``.

    ``exclude``: words or phrases, tokenised as the tokenizer does (every token of each is excluded).
    """
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    ids = {w: list(tok(w, add_special_tokens=False).input_ids) for w in exclude}
    unknown = [w for w, i in ids.items() if not i or (tok.unk_token_id is not None and tok.unk_token_id in i)]
    if unknown:
        raise ValueError(f"init_exclude holds words the tokenizer does not know: {unknown}")
    specials = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None]
    ok = torch.ones(vocab_size, dtype=torch.bool)
    ok[torch.tensor(specials + [i for v in ids.values() for i in v], dtype=torch.long)] = False
    if not ok.any():
        raise ValueError("init_exclude leaves no token to start the prefix from")
    return ok


def attack(pipe, prompt: str, target_images: Tensor, *, num_prefix_tokens: int = 5, iterations: int = 40,
           lr: float = 0.01, weight_decay: float = 0.1, seed: int = 0, timesteps: str = "train",
           num_inference_steps: int = 50, project: bool = False, init: Optional[Tensor] = None,
           init_exclude: Sequence[str] = (), placement: str = "prefix", fixed_noise: bool = False,
           callback: Optional[Callable] = None, progress: bool = True) -> AttackResult:
    """Optimise a prefix of token embeddings so the (patched) pipeline denoises ``target_images`` under ``prompt``.

    ``target_images``: [B, 3, H, W] in [-1, 1], images of the erased concept.

    Every iteration uses all target images, one timestep drawn from ``timesteps`` ("train": uniform over
    ``num_train_timesteps``; "inference": the scheduler's timesteps at ``num_inference_steps``) and fresh
    noise. The prefix starts from the embeddings of random vocabulary tokens (or ``init`` [n, d]), never
    the special tokens nor those named in ``init_exclude``: on a small vocabulary such as MiniCanvas's,
    where most words are concepts, a random start would otherwise put other concepts into the prompt.
    ``placement="suffix"`` puts the tokens after the prompt's EOS instead of after BOS, leaving every prompt
    token at its position: for text encoders that only ever saw their captions at fixed positions.
    ``project=True`` evaluates the loss at the nearest vocabulary embeddings (straight-through, as hard
    prompt attacks do) and reports those tokens. ``fixed_noise=True`` draws the noise once (with a
    one-timestep pool, a fixed batch: for tests and ablations). ``callback(iteration, t, loss)`` runs
    after each step.
    """
    from tqdm.auto import tqdm

    check_text_parts(pipe)
    if num_prefix_tokens < 1 or iterations < 1:
        raise ValueError(f"num_prefix_tokens ({num_prefix_tokens}) and iterations ({iterations}) must be >= 1")
    t0 = time.perf_counter()
    unet, te, tok = get_unet(pipe), pipe.text_encoder, pipe.tokenizer
    check_scheduler(pipe.scheduler)
    latents = to_latents(pipe, target_images)
    ids, start = prefixed_ids(tok, prompt, num_prefix_tokens, placement)
    table = _embedding_layer(te).weight
    g = torch.Generator().manual_seed(seed)
    if init is None:
        ok = _start_tokens(tok, table.shape[0], init_exclude)
        choice = ok.nonzero().flatten()[torch.randint(int(ok.sum()), (num_prefix_tokens,), generator=g)]
        init = table.detach()[choice.to(table.device)]
    elif tuple(init.shape) != (num_prefix_tokens, table.shape[1]):
        raise ValueError(f"init has shape {tuple(init.shape)}; expected ({num_prefix_tokens}, {table.shape[1]})")
    prefix = nn.Parameter(init.detach().float().clone().to(table.device))
    opt = torch.optim.Adam([prefix], lr=lr, weight_decay=weight_decay)
    pool = timestep_pool(pipe.scheduler, timesteps, num_inference_steps)

    def used(p):
        if not project:
            return p
        near = table.detach().float()[torch.cdist(p.detach(), table.detach().float()).argmin(-1)]
        return p + (near - p).detach()  # straight-through: loss at the projection, gradient to p

    losses, drawn = [], []
    vae = getattr(pipe, "vae", None)
    with frozen(unet, te, vae):
        for it in tqdm(range(iterations), desc="attack", disable=not progress):
            t = pool[torch.randint(len(pool), (1,), generator=g)]
            if it == 0 or not fixed_noise:
                noise = torch.randn(latents.shape, generator=g).to(latents.device, latents.dtype)
            emb = encode(pipe, ids, used(prefix), start)
            loss = denoising_loss(pipe, emb, latents, t.to(latents.device), noise)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"attack loss became {loss.item()} at iteration {it} (t={int(t)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            drawn.append(int(t))
            if callback is not None:
                callback(it, int(t), losses[-1])
        with torch.no_grad():
            final = used(prefix.detach())
            emb = encode(pipe, ids, final, start).detach()
    tokens = None
    if project:
        near = torch.cdist(prefix.detach(), table.detach().float()).argmin(-1)
        tokens = tok.convert_ids_to_tokens(near.tolist())
    return AttackResult(prefix.detach().cpu(), losses, emb, prompt, ids, start, drawn, tokens,
                        time.perf_counter() - t0)


# --------------------------------------------------------------------------- sampling with the adversarial prompt

def _accepts_prompt_embeds(pipe) -> bool:
    return "prompt_embeds" in inspect.signature(pipe.__call__).parameters


@contextmanager
def _replace_prompt_output(pipe, result: AttackResult):
    """Within the block, text-encoder calls on the plain prompt's ids return the adversarial embeddings instead.

    For pipelines whose ``__call__`` has no ``prompt_embeds``: rows of ``input_ids`` equal to the
    tokenised prompt followed by padding only get their hidden states replaced.
    """
    tok = pipe.tokenizer
    plain = torch.tensor(tok(result.prompt, truncation=True).input_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    adv = result.adversarial_prompt_embeds

    def hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        n = plain.numel()
        ids = ids.cpu()
        rows = (ids[:, :n] == plain).all(-1) & (ids[:, n:] == pad).all(-1)
        if not rows.any():
            return None
        h = _hidden(out)
        if h.shape[1] != adv.shape[1]:
            raise ValueError(f"the pipeline encodes prompts to {h.shape[1]} tokens but the attack used {adv.shape[1]}; "
                             "give the pipeline a prompt_embeds argument")
        new = torch.where(rows.to(h.device).view(-1, 1, 1), adv.to(h.device, h.dtype).expand_as(h), h)
        if torch.is_tensor(out):
            return new
        if hasattr(out, "last_hidden_state"):
            out.last_hidden_state = new
            return out
        return (new, *out[1:])

    handle = pipe.text_encoder.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def generate_adversarial(pipe, result: AttackResult, seeds: Sequence[int] = DEFAULT_SEEDS, *,
                         num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                         negative_prompt: str = "",
                         batch_size: int = 4, output_type: str = "pil", use_prompt_embeds: Optional[bool] = None,
                         progress: bool = False, **kw) -> list:
    """One image per seed from ``result``'s adversarial prompt embeddings (per-image CPU generators, as ``generate``).

    Passes ``prompt_embeds``/``negative_prompt_embeds`` when the pipeline accepts them, else swaps the
    text encoder's output for the prompt's ids (``use_prompt_embeds`` forces either way). Steps and
    guidance default to the pipeline's own defaults.
    """
    from tqdm.auto import tqdm

    check_text_parts(pipe)
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds:
        raise ValueError("generate_adversarial needs at least one seed")
    embeds = use_prompt_embeds if use_prompt_embeds is not None else _accepts_prompt_embeds(pipe)
    adv = result.adversarial_prompt_embeds
    neg = encode_prompts(pipe, negative_prompt).to(adv.device, adv.dtype)
    images = []
    for i in tqdm(range(0, len(seeds), batch_size), desc="adversarial", disable=not progress):
        chunk = seeds[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
        common = dict(generator=gens, output_type=output_type, **kw)
        common.update({k: v for k, v in (("num_inference_steps", num_inference_steps),
                                          ("guidance_scale", guidance_scale)) if v is not None})
        with torch.no_grad():
            if embeds:
                n = len(chunk)
                out = pipe(prompt_embeds=adv.expand(n, -1, -1), negative_prompt_embeds=neg.expand(n, -1, -1), **common)
            else:
                with _replace_prompt_output(pipe, result):
                    out = pipe(prompt=[result.prompt] * len(chunk), negative_prompt=[negative_prompt] * len(chunk),
                               **common)
        ims = out.images
        images += list(ims) if not torch.is_tensor(ims) else list(ims.unbind(0))
    return images


# --------------------------------------------------------------------------- UA before / after

@dataclass
class AttackTarget:
    """One concept to attack: its prompt, images of it ([B, 3, H, W] in [-1, 1]) and its class id."""
    name: str
    prompt: str
    images: Tensor
    target: int


def _as_batch(images):
    """A list of image tensors as one stacked tensor; anything else (PIL images) as a list."""
    images = list(images)
    return torch.stack(images) if images and all(torch.is_tensor(x) for x in images) else images


def unlearning_accuracy(pred, target: int) -> float:
    """UA = 1 - mean(pred == target): the share of images the concept's classifier does *not* recognise."""
    pred = torch.as_tensor(pred).reshape(-1)
    if pred.numel() == 0:
        raise ValueError("no predictions to score")
    return 1.0 - (pred == int(target)).float().mean().item()


def attack_eval(pipe, targets, classify: Callable, *, seeds: Sequence[int] = DEFAULT_SEEDS,
                unlearn: Optional[Callable] = None, attack_kwargs: Optional[dict] = None,
                generate_kwargs: Optional[dict] = None, progress: bool = True) -> dict:
    """UA before and after the attack for each target, and their means.

    ``targets``: ``AttackTarget``s (or dicts with name, prompt, images, target). ``classify(images)``
    returns predicted class ids for what the pipeline outputs (``generate_kwargs["output_type"]``, PIL by
    default; steps and guidance default to the pipeline's). ``unlearn(name)`` returns a context manager in
    which ``pipe`` has the target unlearned (e.g.
    ``lambda n: patched(pipe, n, checkpoint=DIR)``); without it ``pipe`` is used as it is. "Before" samples
    the plain prompt, "after" the attacked one, from the same seeds.
    """
    targets = [t if isinstance(t, AttackTarget) else AttackTarget(**t) for t in targets]
    if not targets:
        raise ValueError("attack_eval needs at least one target")
    gkw = dict(output_type="pil")
    gkw.update(generate_kwargs or {})
    rows = []
    for tgt in targets:
        with (unlearn(tgt.name) if unlearn is not None else nullcontext()):
            plain = []
            for s in seeds:
                with torch.no_grad():
                    out = pipe(prompt=tgt.prompt, generator=torch.Generator("cpu").manual_seed(int(s)), **gkw)
                plain += list(out.images)
            res = attack(pipe, tgt.prompt, tgt.images, progress=progress, **(attack_kwargs or {}))
            adv = generate_adversarial(pipe, res, seeds, **gkw)
        before = unlearning_accuracy(classify(_as_batch(plain)), tgt.target)
        after = unlearning_accuracy(classify(_as_batch(adv)), tgt.target)
        rows.append(dict(name=tgt.name, prompt=tgt.prompt, target=tgt.target, ua_before=before, ua_after=after,
                         loss_history=res.loss_history, seconds=res.seconds))
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return dict(per_target=rows, ua_before=mean("ua_before"), ua_after=mean("ua_after"))
