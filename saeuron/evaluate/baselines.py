"""Two baseline unlearning methods to compare SAeUron with: UCE (closed form) and ESD (fine-tuning).

Both edit the pipeline's UNet in place and return an ``EditResult`` that holds the original values of
every parameter they touched (``restore()`` puts them back exactly), the wall time and the peak memory.

UCE (Gandikota et al. 2023, "Unified Concept Editing in Diffusion Models"). Every cross-attention key
and value projection W (``attn2.to_k``, ``attn2.to_v``: ``d_out x d_text``) is replaced by the
minimiser of

    sum_e ||W c_e - v*_e||^2 + p sum_q ||W c_q - W0 c_q||^2 + lam ||W - W0||_F^2

where c_e are text-encoder embeddings of the erased concept's tokens, v*_e = W0 g_e the original
projections of the guide concept's tokens at the same positions, c_q the embeddings of every token of
the preserved concepts, p the preserve scale and lam a ridge that keeps W near W0. Setting the gradient
to zero gives the closed form

    W (sum_e c_e c_e^T + p sum_q c_q c_q^T + lam I) = sum_e v*_e c_e^T + p sum_q W0 c_q c_q^T + lam W0.

(The ridge needs ``lam W0`` on the right as well; ``... + eps I`` on the left alone would shrink W to 0.)
An erase scale s multiplies the erase sums. Published defaults (the authors' ``train_erase.py``):
s = 1, p = 0.1, lam = 0.1, keys and values both edited, guide "" for unconditional erasure. Token
pairing, as published (``positions="tail"``): from the concept's last token to the end of the padded
sequence, aligned with the guide's tail from its own last token (BOS for ""), so that the EOS and
padding tokens, which in a causal text encoder carry the whole phrase, map to the guide's.
``positions="all"`` pairs every position of the two padded sequences instead. Bias terms are untouched
(SD's projections have none).

ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models"). Fine-tune a subset of the UNet
so that its prediction for the concept follows negative guidance of the frozen model:

    eps_theta(x_t, c, t) <- eps_0(x_t, "", t) - eta (eps_0(x_t, c, t) - eps_0(x_t, "", t)),  eta = 1,

with Adam, lr 1e-5, 1000 iterations, on a prompt c (published: one phrase; here also a list of prompts
taken in turn, one per iteration). ``method``: "xattn" (ESD-x, cross-attention parameters only: the
published choice for styles), "noxattn" (ESD-u: everything but cross-attention, the time embedding and
the output layers: for objects), "selfattn", "full". As published, x_t comes from sampling the model
being trained (no grad, CFG ``start_guidance`` 3, DDIM with ``ddim_steps`` 50) from noise, conditioned
on the concept, down to a random step i; the losses use t = that step's timestep value (the published
code draws a DDPM timestep in the step's interval instead). ``xt="noise"`` instead noises given images
of the concept (``scheduler.add_noise`` at a uniform training timestep): cheaper, not the published
recipe. The frozen model is the same UNet run with the original values of the trained parameters
(``torch.func.functional_call``), so no second UNet is held in memory.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hookpoints import get_unet
from .attack import check_scheduler, check_text_parts, encode_prompts, frozen, to_latents

ESD_METHODS = {"xattn": "xattn", "esd-x": "xattn", "noxattn": "noxattn", "esd-u": "noxattn", "selfattn": "selfattn",
               "full": "full"}
ESD_NAMES = {"xattn": "esd-x", "noxattn": "esd-u", "selfattn": "esd-selfattn", "full": "esd-full"}
UCE_POSITIONS = ("tail", "all")
XT_SOURCES = ("sample", "noise")


# --------------------------------------------------------------------------- bookkeeping

def process_rss() -> int:
    """This process's resident set size in bytes (psutil, else /proc, else the lifetime peak from ``resource``)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory during a block: CUDA ``max_memory_allocated`` on a GPU, else the process RSS sampled every 10 ms."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak, self.kind = 0, ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        self._stop, self.kind, self.peak = threading.Event(), "cpu_peak_rss", process_rss()

        def poll():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, process_rss())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, process_rss())


def _put_back(unet, original: dict) -> None:
    """Copy ``original`` ({parameter name: tensor}) into ``unet``'s parameters."""
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in original.items():
            params[name].copy_(value)


@dataclass
class EditResult:
    """An in-place edit of ``pipe``'s UNet: the original values of the edited parameters, time, memory, losses."""
    pipe: object
    method: str
    original: dict  # {parameter name: original tensor (a copy, same device)}
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    loss_history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def restore(self):
        """Put the original values back (bit-exact); the pipeline is as before the edit."""
        _put_back(get_unet(self.pipe), self.original)
        return self.pipe

    def changed(self) -> list:
        """Names of the parameters whose values now differ from the originals."""
        params = dict(get_unet(self.pipe).named_parameters())
        return [n for n, v in self.original.items() if not torch.equal(params[n].detach(), v)]

    def to_json(self) -> dict:
        """A JSON-able summary."""
        return dict(method=self.method, seconds=self.seconds, peak_memory_bytes=self.peak_memory_bytes,
                    memory_kind=self.memory_kind, num_parameters_edited=len(self.original),
                    loss_history=[float(x) for x in self.loss_history], config=self.config)


def unet_device(pipe):
    """The device of ``pipe``'s UNet weights."""
    return next(get_unet(pipe).parameters()).device


# --------------------------------------------------------------------------- UCE

def cross_attention_projections(unet, with_to_k: bool = True) -> dict:
    """``{name: nn.Linear}`` of every cross-attention value (and key) projection: ``attn2.to_v`` / ``attn2.to_k``."""
    keep = ("attn2.to_v", "attn2.to_k") if with_to_k else ("attn2.to_v",)
    out = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(keep)}
    if not out:
        raise ValueError(f"{type(unet).__name__} has no cross-attention projections (modules named *.attn2.to_k/to_v)")
    return out


def _last_token(tokenizer, text: str) -> int:
    """Index of the last token before EOS in the tokenised ``text`` (0, the BOS, for "")."""
    return len(tokenizer(text, truncation=True).input_ids) - 2


def _uce_pairs(pipe, erase, guides, positions):
    """Stacked (erased-token embeddings [N, d], guide-token embeddings [N, d]) paired by position."""
    tok = pipe.tokenizer
    cs, gs = [], []
    for e, g in zip(erase, guides):
        emb = encode_prompts(pipe, [e, g]).float()
        if positions == "all":
            cs.append(emb[0])
            gs.append(emb[1])
            continue
        fe, fg = _last_token(tok, e), _last_token(tok, g)
        n = emb.shape[1] - max(fe, fg)
        cs.append(emb[0, fe:fe + n])
        gs.append(emb[1, fg:fg + n])
    return torch.cat(cs), torch.cat(gs)


def uce_edit(pipe, erase: Sequence[str], guide="", preserve: Sequence[str] = (), *, erase_scale: float = 1.0,
             preserve_scale: float = 0.1, lamb: float = 0.1, with_to_k: bool = True, positions: str = "tail",
             templates: Sequence[str] = ("{}",)) -> EditResult:
    """UCE: map ``erase`` onto ``guide`` in every cross-attention key/value projection, keeping ``preserve`` (in place).

    The closed form and the token pairing are in the module docstring.

    ``guide``: one string for all, or one per erased concept. ``templates`` (e.g. ``("{} style",
    "art by {}")``) expand every erased/guide/preserved concept into several prompts.
    """
    check_text_parts(pipe)
    erase = [erase] if isinstance(erase, str) else list(erase)
    guides = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    preserve = [preserve] if isinstance(preserve, str) else list(preserve)
    if not erase:
        raise ValueError("uce_edit needs at least one concept to erase")
    if len(guides) != len(erase):
        raise ValueError(f"{len(guides)} guides for {len(erase)} erased concepts; give one guide or one per concept")
    if positions not in UCE_POSITIONS:
        raise ValueError(f"positions={positions!r}; valid: {', '.join(UCE_POSITIONS)}")
    if lamb <= 0 or erase_scale < 0 or preserve_scale < 0:
        raise ValueError(f"need lamb > 0 (the ridge keeps the system solvable) and scales >= 0; got lamb={lamb}, "
                         f"erase_scale={erase_scale}, preserve_scale={preserve_scale}")
    t0 = time.perf_counter()
    dev = unet_device(pipe)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' for the concept; got {list(templates)}")
    e_txt = [t.format(e) for e in erase for t in templates]
    g_txt = [t.format(g) if g else "" for g in guides for t in templates]
    p_txt = [t.format(p) for p in preserve for t in templates]
    with PeakMemory(dev) as mem, torch.no_grad():
        c_e, c_g = _uce_pairs(pipe, e_txt, g_txt, positions)
        c_p = encode_prompts(pipe, p_txt).float().flatten(0, 1) if p_txt else c_e.new_zeros(0, c_e.shape[1])
        c_e, c_g, c_p = (x.double() for x in (c_e, c_g, c_p))
        eye = torch.eye(c_e.shape[1], dtype=torch.float64, device=c_e.device)
        gram = erase_scale * c_e.T @ c_e + preserve_scale * c_p.T @ c_p + lamb * eye  # [d, d]
        layers = cross_attention_projections(get_unet(pipe), with_to_k)
        original = {f"{n}.weight": lin.weight.detach().clone() for n, lin in layers.items()}
        try:
            for lin in layers.values():
                W0 = lin.weight.detach().double().to(c_e.device)  # [d_out, d]
                rhs = erase_scale * (c_g @ W0.T).T @ c_e + preserve_scale * (W0 @ c_p.T) @ c_p + lamb * W0
                W = torch.linalg.solve(gram, rhs.T).T  # rhs @ gram^-1 (gram is symmetric)
                lin.weight.copy_(W.to(lin.weight.device, lin.weight.dtype))
        except BaseException:
            _put_back(get_unet(pipe), original)
            raise
    cfg = dict(erase=erase, guide=guides, preserve=preserve, erase_scale=erase_scale, preserve_scale=preserve_scale,
               lamb=lamb, with_to_k=with_to_k, positions=positions, templates=list(templates))
    return EditResult(pipe, "uce", original, time.perf_counter() - t0, mem.peak, mem.kind, [], cfg)


# --------------------------------------------------------------------------- ESD

def esd_parameters(unet, method: str = "xattn") -> dict:
    """``{name: parameter}`` that ESD trains under ``method`` (xattn/esd-x, noxattn/esd-u, selfattn, full)."""
    if method not in ESD_METHODS:
        raise ValueError(f"method={method!r}; valid: {', '.join(ESD_METHODS)}")
    m = ESD_METHODS[method]

    def keep(n):
        if m == "xattn":
            return "attn2." in n
        if m == "selfattn":
            return "attn1." in n
        if m == "noxattn":
            return not ("attn2." in n or n.startswith(("conv_out.", "conv_norm_out.")) or "time_embedding" in n)
        return True

    out = {n: p for n, p in unet.named_parameters() if keep(n)}
    if not out:
        raise ValueError(f"ESD method {method!r} selects no parameter of {type(unet).__name__}")
    return out


def _sample_xt(pipe, sched, emb_c, emb_0, shape, start_guidance, g, dev, dtype):
    """Partial DDIM sampling (no grad, CFG) from noise to a random step; returns (x_t, t)."""
    unet = get_unet(pipe)
    i = int(torch.randint(len(sched.timesteps), (1,), generator=g))
    x = torch.randn(shape, generator=g).to(dev, dtype) * sched.init_noise_sigma
    cond = torch.cat([emb_0, emb_c])
    for t in sched.timesteps[:i]:
        e0, ec = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
        x = sched.step(e0 + start_guidance * (ec - e0), t, x).prev_sample
    return x, sched.timesteps[i]


def esd_train(pipe, concept, *, method: str = "xattn", iterations: int = 1000, lr: float = 1e-5,
              negative_guidance: float = 1.0, start_guidance: float = 3.0, ddim_steps: int = 50, xt: str = "sample",
              images: Optional[Tensor] = None, seed: int = 0, progress: bool = True) -> EditResult:
    """ESD: fine-tune ``pipe``'s UNet in place so ``concept`` is erased by negative guidance (see the module docstring).

    ``concept``: the prompt c (published: one phrase), or a list of prompts used in turn, iteration i on
    prompt i mod n (for a model that only understands full captions). ``xt="sample"`` (published) draws
    x_t by partial DDIM sampling; ``xt="noise"`` noises ``images`` ([B, 3, H, W] in [-1, 1], images of
    the concept) instead. ``EditResult.restore()`` undoes it.
    """
    from torch.func import functional_call
    from tqdm.auto import tqdm

    check_text_parts(pipe)
    if xt not in XT_SOURCES:
        raise ValueError(f"xt={xt!r}; valid: {', '.join(XT_SOURCES)}")
    if xt == "noise" and images is None:
        raise ValueError('xt="noise" needs images= of the concept ([B, 3, H, W] in [-1, 1])')
    if iterations < 1 or ddim_steps < 1:
        raise ValueError(f"iterations ({iterations}) and ddim_steps ({ddim_steps}) must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    prompts = [concept] if isinstance(concept, str) else list(concept)
    if not prompts or not all(isinstance(c, str) and c.strip() for c in prompts):
        raise ValueError(f"concept must be a non-empty prompt or a non-empty list of them, got {concept!r}")
    unet = get_unet(pipe)
    pred_type = check_scheduler(pipe.scheduler)
    p0 = next(unet.parameters())
    dev, dtype = p0.device, p0.dtype
    train = esd_parameters(unet, method)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(ddim_steps)
    emb_cs, emb_0 = (encode_prompts(pipe, p).to(dev, dtype) for p in (prompts, ""))
    cfg = unet.config
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    latents = to_latents(pipe, images) if xt == "noise" else None
    original = {n: p.detach().clone() for n, p in train.items()}
    losses = []
    with PeakMemory(dev) as mem, frozen(unet, pipe.text_encoder, getattr(pipe, "vae", None)):
        for p in train.values():
            p.requires_grad_(True)
        try:
            opt = torch.optim.Adam(list(train.values()), lr=lr)
            for it in tqdm(range(iterations), desc=ESD_NAMES[ESD_METHODS[method]], disable=not progress,
                           leave=False):
                emb_c = emb_cs[it % len(prompts)].unsqueeze(0)
                with torch.no_grad():
                    if xt == "sample":
                        x, t = _sample_xt(pipe, sched, emb_c, emb_0, shape, start_guidance, g, dev, dtype)
                    else:
                        t = torch.randint(int(sched.config.num_train_timesteps), (1,), generator=g)
                        noise = torch.randn(latents.shape, generator=g).to(dev, dtype)
                        x = sched.add_noise(latents, noise, t.expand(latents.shape[0]).to(dev))
                    t = t.reshape(-1).to(dev)
                    b = x.shape[0]
                    ctx = torch.cat([emb_0.expand(b, -1, -1), emb_c.expand(b, -1, -1)])
                    frozen_out = functional_call(unet, original, (torch.cat([x, x]), t), {"encoder_hidden_states": ctx})
                    e0, ec = frozen_out.sample.chunk(2)  # the original model: unconditional, concept
                    target = e0 - negative_guidance * (ec - e0)
                pred = unet(x, t, encoder_hidden_states=emb_c.expand(b, -1, -1)).sample
                loss = F.mse_loss(pred.float(), target.float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"ESD loss became {loss.item()} at iteration {it}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        except BaseException:
            _put_back(unet, original)  # never leave a half-trained UNet behind
            raise
        for p in train.values():
            p.grad = None
    cfg_out = dict(concept=concept if isinstance(concept, str) else prompts, method=ESD_METHODS[method],
                   iterations=iterations, lr=lr, negative_guidance=negative_guidance, start_guidance=start_guidance,
                   ddim_steps=ddim_steps, xt=xt, seed=seed, prediction_type=pred_type)
    return EditResult(pipe, ESD_NAMES[ESD_METHODS[method]], original, time.perf_counter() - t0, mem.peak, mem.kind,
                      losses, cfg_out)
