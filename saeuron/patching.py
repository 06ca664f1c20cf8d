"""Patch a diffusers pipeline so that every UNet call unlearns concepts at the hooked blocks.

The denoiser may also be a diffusion transformer (SD3, PixArt, Flux: ``pipe.transformer``); "UNet" below
stands for either. Its hooked blocks are transformer blocks whose image tokens ``[B, L, C]`` are edited as
``B*L`` rows (a joint block's text stream is left alone, see :mod:`saeuron.hookpoints`), and its timestep
is whatever float it receives (flow-matching sigmas * 1000 for SD3, sigmas for Flux), looked up the same way.

``patch(pipe, "Cartoon", checkpoint=DIR)`` installs, through diffusers' own hook system
(``diffusers.hooks.HookRegistry``, the mechanism of its first-block cache, group offloading and layer
skip), two kinds of ``ModelHook``:

- ``TimestepHook`` on the UNet, registered as ``"saeuron_timestep"`` (``TIMESTEP_HOOK``): its
  ``pre_forward`` reads the timestep the UNet receives (positional argument 1 or ``timestep=``; a
  number, a 0-d or a 1-d tensor) and picks, on the device and without a host sync, the nearest
  timestep recorded in the concept file, then gathers that row of every hooked block's edit tables.
  Features are looked up by timestep *value*, never by a call counter, so schedulers that repeat
  timesteps (PNDM), call the UNet twice per step (Heun) or a different step count all work;
- ``EditHook`` on each hooked ``Transformer2DModel``, registered as ``"saeuron_edit"`` (``EDIT_HOOK``):
  its ``post_forward`` applies the edit of method.md section 5 to the block's output (``ops.edit_``,
  in place): for every token and selected feature i with ``f_i > threshold_c * tau_t[i]``
  (``threshold`` 1 = the method), ``f_i <- multiplier_c * mu[c,t][i] * f_i``, and
  ``out = decode(f') + (x - decode(f)) = x + sum_i (f'_i - f_i) W_dec[i]``. For an SAE with
  ``input_unit_norm`` that change is computed on the standardised token ``x_n = (x - mean) / scale_x``
  and added as ``x + scale_x * delta``.

The rows picked for the current call live in a ``PatchState`` (a diffusers ``BaseState``) shared by
the hooks of one patch; it is a plain shared instance, not a ``StateManager``, because
``StableDiffusionPipeline`` sets no cache context (the timestep hook is stateful:
``reset_stateful_hooks`` clears it). The hooks are named, so the patch composes with diffusers' other
hooks and is removed alone (``registry.remove_hook(name)``, see :func:`remove_diffusers_hook`),
leaving theirs in place. Tested: ``apply_first_block_cache`` (applied to each ``Transformer2DModel``
with >= 2 transformer blocks: diffusers finds no ``transformer_blocks`` on a UNet itself, and its
cache needs a cache context the caller sets) and group offloading (which needs ``accelerate``). The
hooks run inside the module's ``forward``: ``torch`` forward hooks on a hooked block, and diffusers
hooks registered on it after the patch, see the edited output.

With ``mode="replace_uncond"`` or ``"replace_background"`` the edit hook uses the selected features only to
detect the tokens that hold the concepts and replaces those tokens' activations; with ``mode="gate_uncond"`` the
first hooked block of each call flags the images on which they fire on at least ``gate`` of the tokens (kept in
the ``PatchState``), and every hooked block replaces a flagged image's conditional map by its unconditional one
(:mod:`saeuron.replace`); ``mode="probe_uncond"`` does the same with the images its fitted detectors flag
(:mod:`saeuron.detectors`, read from the checkpoint's ``detectors.safetensors``), and ``mode="probe_anchor"``
recomputes a flagged image's hooked blocks with an anchor prompt's text (the block's inputs are kept by the edit
hook's ``pre_forward``, the block is re-run through the hook chain below the edit hook). The tables then carry zero
scales, and the multiplier plays no part.

Each concept is edited at the hookpoints its concept-file defaults name (a sweep may put objects and
styles at different blocks; default: every hookpoint with an SAE), or at the ``hookpoints`` given to
``patch``; a block no concept uses gets no hook.

Everything that can be done once (selection, stacking the tables per timestep) is done at patch
time; SAE weights and tables are copied to the activations' device and dtype on first use and cached,
so CPU offload works. The SAEs live on the handle, not on the UNet: they never appear in
``unet.state_dict()`` or ``save_pretrained``. Patching again replaces the previous patch and
``unpatch`` restores the UNet's outputs exactly.

With classifier-free guidance ``StableDiffusionPipeline`` concatenates ``[uncond, cond]`` along the
batch, so ``halves="cond"``/``"uncond"`` edit only the second/first half of the batch (default
``"both"``, as the method does). Without CFG the whole batch is conditional; a UNet call made while the pipeline
runs with CFG counts as a CFG batch only when its two halves of latents are identical (how pipelines build one), so
a direct call between pipeline calls (an attack's loss) is read as all conditional. For a bare UNet an even
batch is taken to be such a pair.
"""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState

from . import ops, reference, replace
from .concepts import ConceptTable, check_concepts, check_sae_for_edit, warn_shared_features
from .detectors import Detectors
from .hookpoints import (block_output, get_unet, hookpoint_spellings, image_stream, list_hookpoints,
                         normalize_hookpoint, replace_block_output, resolve_hookpoints)
from .sae import SparseAutoencoder, available_hookpoint_dirs, resolve_hookpoint_dir

HALVES = ("both", "cond", "uncond")
ERROR_TERMS = ("correct", "reference")
TIMESTEP_HOOK = "saeuron_timestep"  # name of the UNet's hook in its diffusers HookRegistry
EDIT_HOOK = "saeuron_edit"  # name of each hooked block's hook in its HookRegistry


class PatchState(BaseState):
    """Per-UNet-call state shared by the hooks of one patch (a diffusers ``BaseState``).

    ``rows``: ``{hookpoint: (feat_idx, tau, scale)}`` table rows for the current call (None: no edit);
    ``cfg``: whether the pipeline runs with CFG now (None when unknown); ``last_index``: the
    nearest-recorded-timestep index per sample chosen at the last UNet call (a device tensor); ``flag``: the
    images ``mode="gate_uncond"`` (or a detector mode) flagged at the first hooked block of this call (None before it
    runs); ``flag_concept``: for the detector modes, the index (into the patch's concepts) of each image's most
    probable concept.
    """

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        """Forget the last call."""
        self.rows = None
        self.cfg = None
        self.last_index = None
        self.flag = None
        self.flag_concept = None


class TimestepHook(ModelHook):
    """The UNet's hook: ``pre_forward`` picks the edit-table rows of the timestep this call receives."""

    _is_stateful = True

    def __init__(self, patch: "SaeuronPatch"):
        super().__init__()
        self.patch = patch
        self.state = patch.state
        self._per_device: dict = {}

    def _on(self, device):
        """Timesteps and the tables of all blocks packed side by side, on ``device`` (copied once per device).

        Packing picks every block's rows with two gathers instead of three per block.
        """
        hit = self._per_device.get(device)
        if hit is None:
            tables = self.patch.tables
            hps = list(tables)
            ints = torch.cat([tables[h][0] for h in hps], 1)  # [T, sum F]
            floats = torch.cat([tables[h][1] for h in hps] + [tables[h][2] for h in hps], 1)
            spans, a = [], 0
            for h in hps:
                f = tables[h][0].shape[1]
                spans.append((h, a, a + f))
                a += f
            hit = (self.patch.timesteps.to(device), ints.to(device), floats.to(device), tuple(spans), a)
            self._per_device[device] = hit
        return hit

    def pre_forward(self, module, *args, **kwargs):
        """Read the timestep, store the matching table rows of every hooked block in the shared state."""
        state = self.state
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet / DiT
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if sample is None or t is None:
            state.rows = None
            return args, kwargs
        ts, ints, floats, spans, total = self._on(sample.device)
        t = t.to(sample.device) if torch.is_tensor(t) else torch.tensor(t, device=sample.device)
        idx = (ts[None, :] - t.reshape(-1, 1).to(ts.dtype)).abs().argmin(-1)  # [1] or [B], stays on device
        state.last_index = idx
        fi, fl = ints[idx], floats[idx]  # [G, sum F], [G, 2 sum F]
        state.rows = {hp: (fi[:, a:b], fl[:, a:b], fl[:, total + a:total + b]) for hp, a, b in spans}
        state.flag = None  # gate_uncond: decided afresh at this call's first hooked block
        state.cfg = cfg = self.patch.pipeline_cfg()
        if cfg:  # a CFG batch repeats the latents: [x, x]; a direct call (e.g. an attack's loss) is all conditional
            h = sample.shape[0] // 2
            state.cfg = sample.shape[0] % 2 == 0 and bool(torch.equal(sample[:h], sample[h:]))
        return args, kwargs

    def reset_state(self, module):
        """Forget the last call (diffusers' ``reset_stateful_hooks``)."""
        self.state.reset()
        return module


class EditHook(ModelHook):
    """A hooked block's hook: ``post_forward`` applies the unlearning edit to the block's output."""

    def __init__(self, patch: "SaeuronPatch", hookpoint: str):
        super().__init__()
        self.state = patch.state
        self.hookpoint = hookpoint
        self.sae = patch.saes[hookpoint]
        self.stream = image_stream(patch.modules[hookpoint])  # a joint DiT block: edit its image stream only
        self.k = self.sae.cfg.k
        self.halves = patch.halves
        self.error_term = patch.error_term
        self.modes = patch.hook_modes(hookpoint)  # the modes edited here, in the order applied
        self.mode = patch.replace_mode  # the patch's detect-then-replace mode (None: scale only)
        self.gate = patch.gate
        self.detectors = patch.detectors
        self.anchor_embeds = patch.anchor_embeds
        self.concepts = patch.flag_concepts  # the concepts the detectors flag images for (mode's concepts)
        self._inputs = None  # probe_anchor: the block's (args, kwargs) of the current call
        self.unit_norm = bool(self.sae.cfg.input_unit_norm)

    def _span(self, b: int) -> tuple:
        """Batch rows ``[lo, hi)`` to edit under ``halves``."""
        if self.halves == "both":
            return 0, b
        cfg = self.state.cfg
        pair = (b % 2 == 0) if cfg is None else (cfg and b % 2 == 0)
        if not pair:  # no CFG: the whole batch is conditional
            return (0, b) if self.halves == "cond" else (0, 0)
        return (b // 2, b) if self.halves == "cond" else (0, b // 2)

    def _unit_norm_edit(self, x, weights, fi, ta, sc, rpg, grad):
        """The edit for an ``input_unit_norm`` SAE: ``x + scale_x * delta``, ``delta`` computed on the
        standardised tokens ``x_n = (x - mean) / scale_x`` (``SparseAutoencoder.preprocess``); tokens
        where nothing fires are returned unchanged, bit for bit."""
        xt = reference.as_tokens(x)
        xn, _, scale = self.sae.preprocess(xt)
        if grad:
            delta = reference.edit_delta(xn, *weights, self.k, fi, ta, sc, rpg)
        else:
            edited = xn.clone()
            ops.edit_(edited, *weights, self.k, fi, ta, sc, rpg)
            delta = edited.float() - xn.float()
        out = (xt.float() + scale * delta).to(x.dtype)
        out = torch.where((delta != 0).any(-1, keepdim=True), out, xt)
        return reference.from_tokens(out, x)

    def pre_forward(self, module, *args, **kwargs):
        """Keep the block's inputs for ``mode="probe_anchor"`` (which re-runs the block); pass them on unchanged."""
        if "probe_anchor" in self.modes:
            self._inputs = (args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        """Edit the block's output (in place when no gradient is needed) and return it: the patch's
        detect-then-replace mode first (where its concepts are edited here), then the scale edit."""
        rows = self.state.rows
        if rows is None:
            return output
        for mode in self.modes:
            output = self._apply(mode, output, rows[(self.hookpoint, mode)])
        return output

    def _apply(self, mode, output, rows):
        """One mode's edit of the block's output with this call's table rows ``(feat_idx, tau, scale)``."""
        hp = self.hookpoint
        fi, ta, sc = rows
        if fi.shape[-1] == 0 and (self.error_term == "correct" if mode == "scale" else
                                  self.state.flag is None and mode not in replace.PROBE_MODES):
            return output  # nothing selected at this timestep (and no image flagged earlier in this call)
        x = block_output(output, self.stream)
        b = x.shape[0]
        lo, hi = self._replace_span(b) if mode in replace.UNCOND_MODES else self._span(b)
        if lo >= hi:
            return output
        if fi.shape[0] > 1:  # per-sample timesteps
            if fi.shape[0] != b:
                raise ValueError(f"saeuron: {fi.shape[0]} per-sample timesteps for a batch of {b} at {hp}")
            fi, ta, sc = (t[lo:hi].contiguous() for t in (fi, ta, sc))
        per_image = x[0, 0].numel() if x.dim() == 4 else x.shape[1] if x.dim() == 3 else 1
        rpg = per_image if fi.shape[0] > 1 else (hi - lo) * per_image
        if mode != "scale":
            y = self._replace(x, lo, hi, fi, ta, sc, rpg)
            return output if y is x else replace_block_output(output, y, self.stream)
        if x.dim() == 3:  # DiT tokens [B, L, C]: rows [lo*L, hi*L) of the [B*L, C] view, L rows per sample
            xc = x if x.is_contiguous() else x.contiguous()
            flat = xc.view(-1, x.shape[2])
            y = self._edit(flat, lo * per_image, hi * per_image, fi, ta, sc, rpg)
            y = xc if y is flat else y.view(x.shape)
        else:
            y = self._edit(x, lo, hi, fi, ta, sc, rpg)
        return output if y is x else replace_block_output(output, y, self.stream)

    def _replace_span(self, b: int) -> tuple:
        """Batch rows ``[lo, hi)`` that ``replace_uncond`` edits: the conditional half of a CFG batch (``probe_anchor``,
        which takes nothing from the unconditional half, edits the whole of a batch that is not one)."""
        if self.mode == "probe_anchor" and self.state.cfg is False:
            return 0, b
        if b % 2 or self.state.cfg is False:
            raise ValueError(f"saeuron: mode={self.mode!r} at {self.hookpoint} needs a classifier-free guidance "
                             f"batch [uncond, cond], got a batch of {b}"
                             + (" without CFG" if self.state.cfg is False else "") +
                             "; sample with guidance_scale > 1, or use mode='replace_background' or 'scale'")
        return b // 2, b

    def _replace(self, x, lo, hi, fi, ta, sc, rpg):
        """Detect-then-replace (:mod:`saeuron.replace`) on rows ``[lo, hi)`` of ``x`` (a map ``[B, C, H, W]`` or DiT
        tokens ``[B, L, C]``); ``sc`` is the detection table (0 where a feature is selected). Returns ``x`` itself
        when edited in place."""
        part = x[lo:hi]
        if self.mode in replace.FLAG_MODES:
            if self.state.flag is None:  # the first hooked block of this call decides for the whole call
                if self.mode == "gate_uncond":
                    self.state.flag = replace.flagged(self._detect(x, lo, hi, fi, ta, sc, rpg), self.gate)
                else:
                    self.flag_by_detectors(part, lo, hi)
            if self.state.flag.shape[0] != hi - lo:
                raise ValueError(f"saeuron: {hi - lo} conditional images at {self.hookpoint}, but "
                                 f"{self.state.flag.shape[0]} were flagged at the first hooked block of this call")
            if self.mode == "probe_anchor":
                return self._rerun_anchor(x, lo, hi)
            new = torch.where(self.state.flag.view(-1, *([1] * (part.dim() - 1))), x[lo - (hi - lo):lo], part)
        elif self.mode == "replace_uncond":
            new = replace.uncond_fill(part, x[lo - (hi - lo):lo], self._detect(x, lo, hi, fi, ta, sc, rpg))
        else:
            new = replace.background_fill(part, self._detect(x, lo, hi, fi, ta, sc, rpg))
        if x.requires_grad and torch.is_grad_enabled():
            return torch.cat([x[:lo], new, x[hi:]])
        y = x if x.is_contiguous() else x.contiguous()
        y[lo:hi] = new
        return y

    def flag_by_detectors(self, part, lo, hi):
        """Set ``state.flag`` (``[hi - lo]`` bools: the images of ``part``, rows ``[lo, hi)``, that a concept's detector
        at this block gives a probability >= ``gate``, at this call's timestep(s)) and ``state.flag_concept`` (each
        image's most probable concept)."""
        t = self.state.last_index.reshape(-1)
        t = t[lo:hi] if t.numel() > 1 else t
        codes = self.detectors.image_features(self.hookpoint, self.sae, part.detach())
        p = self.detectors.probability(self.hookpoint, codes, t, self.concepts)
        best, which = p.max(1)
        self.state.flag, self.state.flag_concept = best >= self.gate, which

    def _rerun_anchor(self, x, lo, hi):
        """``probe_anchor``: the flagged images' rows of ``x`` replaced by this block's output for the same inputs with
        the anchor prompt's text of the concept that flagged them. Returns ``x`` itself when edited in place."""
        flag, which = self.state.flag, self.state.flag_concept
        if not bool(flag.any()):
            return x
        if self._inputs is None:
            raise RuntimeError(f"saeuron: mode='probe_anchor' at {self.hookpoint}: the block's inputs were not kept")
        (args, kwargs), self._inputs = self._inputs, None  # used once; not kept past this call
        b = x.shape[0]
        grad = x.requires_grad and torch.is_grad_enabled()
        y = x.clone() if grad else (x if x.is_contiguous() else x.contiguous())
        for ci in torch.unique(which[flag]).tolist():
            rows = lo + (flag & (which == ci)).nonzero().flatten()
            pick = lambda v: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v  # noqa: E731
            emb = self.anchor_embeds[self.concepts[ci]].to(x.device, x.dtype).expand(len(rows), -1, -1)
            a = [pick(v) for v in args]
            kw = {k: pick(v) for k, v in kwargs.items()}
            if "encoder_hidden_states" in kw or len(a) < 2:
                kw["encoder_hidden_states"] = emb
            else:
                a[1] = emb
            with torch.set_grad_enabled(grad):
                out = block_output(self.fn_ref.forward(*a, **kw), self.stream)
            y[rows] = out.to(y.dtype)
        return y

    def _detect(self, x, lo, hi, fi, ta, sc, rpg):
        """Detected tokens of rows ``[lo, hi)``: ``[n, H, W]`` for maps, ``[n, L]`` for DiT tokens."""
        weights = self.sae.weights_for(x.device, x.dtype)
        pre = self.sae.preprocess if self.unit_norm else None
        part = x[lo:hi]
        if x.dim() == 3:
            hit = replace.detect(part.reshape(-1, x.shape[2]), weights, self.k, fi, ta, sc, rpg, pre)
            return hit.view(hi - lo, x.shape[1])
        return replace.detect(part, weights, self.k, fi, ta, sc, rpg, pre)

    def _edit(self, x, lo, hi, fi, ta, sc, rpg):
        """Edit rows ``[lo, hi)`` of ``x`` (a map ``[B, C, H, W]`` or tokens ``[N, C]``) with table rows ``fi/ta/sc``,
        ``rpg`` rows of ``x[lo:hi]`` per table row; returns ``x`` itself when edited in place."""
        W_enc, b_enc, b_dec, W_dec = self.sae.weights_for(x.device, x.dtype)
        grad = x.requires_grad and torch.is_grad_enabled()
        if self.unit_norm:  # the SAE edits standardised tokens: x + scale_x * delta(x_n)
            part = self._unit_norm_edit(x[lo:hi], (W_enc, b_enc, b_dec, W_dec), fi, ta, sc, rpg, grad)
        elif self.error_term == "reference":
            part = reference.reference_compat_edit(x[lo:hi], W_enc, b_enc, b_dec, W_dec, self.k, fi, ta, sc, rpg,
                                                   grad=grad)
        elif grad:  # differentiable, out of place (e.g. attacks optimising through the patched model)
            xt = reference.as_tokens(x[lo:hi])
            delta = reference.edit_delta(xt, W_enc, b_enc, b_dec, W_dec, self.k, fi, ta, sc, rpg)
            part = reference.from_tokens((xt.float() + delta).to(x.dtype), x[lo:hi])
        else:
            y = x if x.is_contiguous() else x.contiguous()
            ops.edit_(y[lo:hi], W_enc, b_enc, b_dec, W_dec, self.k, fi, ta, sc, rpg)
            return y
        if not grad:
            y = x if x.is_contiguous() else x.contiguous()
            y[lo:hi] = part
            return y
        return torch.cat([x[:lo], part, x[hi:]])


def remove_diffusers_hook(module, name: str, hook: ModelHook) -> None:
    """Remove ``hook`` registered as ``name`` on ``module`` (nothing if another hook holds the name).

    diffusers' ``HookRegistry.remove_hook`` rewires the next hook's ``forward`` to the one below the removed
    hook; for a next hook with its own ``new_forward`` (layer skip, PEFT autocast) that unwires it, so
    it is wired back around that forward here. For the last hook it sets ``module.forward``, which would
    drop an accelerate hook (``enable_model_cpu_offload``) added after it; that wrapper is kept.
    """
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not hook:
        return
    names = list(registry.hooks)  # registration order
    i = names.index(name)
    after = registry.hooks[names[i + 1]] if i + 1 < len(names) else None
    outer = module.__dict__.get("forward")
    # accelerate (model CPU offload) wrapped forward after this hook: its _old_forward is the registry's wrapper
    accelerate_above = (after is None and getattr(module, "_hf_hook", None) is not None and hook.fn_ref is not None
                        and getattr(module.__dict__.get("_old_forward"), "__wrapped__", None) is hook.fn_ref.forward)
    registry.remove_hook(name, recurse=False)
    if accelerate_above:  # diffusers just set forward to the one below this hook, dropping accelerate's wrapper
        below = module.__dict__.get("forward")
        module.forward = outer
        module._old_forward = below
    ref = getattr(after, "fn_ref", None)
    if ref is not None and hasattr(after, "new_forward") and ref.original_forward is not None:
        ref.original_forward = ref.forward  # diffusers put the forward below the removed hook here
        ref.forward = functools.update_wrapper(functools.partial(after.new_forward, module), after.new_forward)


class SaeuronPatch:
    """The hooks, SAEs and per-timestep edit tables of one patch; ``remove()`` or use it as a context manager.

    ``state`` is the ``PatchState`` its hooks share; ``last_index`` is the nearest-recorded-timestep index
    per sample chosen at the last UNet call (a device tensor; for inspection and tests).
    """

    def __init__(self, unet, pipe, saes: dict, modules: dict, timesteps, tables: dict, concepts: list,
                 halves: str, error_term: str, modes: Optional[dict] = None, gate: Optional[float] = None,
                 detectors: Optional[Detectors] = None, anchor_embeds: Optional[dict] = None):
        self.unet = unet
        self._pipe = weakref.ref(pipe) if pipe is not None and pipe is not unet else None
        self.saes = saes  # {hookpoint: SparseAutoencoder}, kept here, never registered on the UNet
        self.modules = modules
        self.timesteps = timesteps  # [T] float32
        self.tables = tables  # {(hookpoint, mode): (feat_idx [T, F], tau [T, F], scale [T, F])}
        self.concepts = concepts
        self.halves = halves
        self.error_term = error_term
        self.modes = dict(modes or {c: "scale" for c in concepts})  # {concept: edit mode}
        others = {m for m in self.modes.values() if m != "scale"}
        self.replace_mode = others.pop() if others else None  # the one detect-then-replace mode, if any
        # the concepts it unlearns, in patch order (detector columns and anchor prompts are indexed by them)
        self.flag_concepts = [c for c in concepts if self.modes[c] == self.replace_mode]
        self.gate = gate
        self.detectors = detectors  # detector modes: the fitted detectors that flag images
        self.anchor_embeds = anchor_embeds or {}  # probe_anchor: {concept: anchor text embeddings [1, L, D]}
        self.state = PatchState()
        self.timestep_hook = TimestepHook(self)
        self.edit_hooks = {hp: EditHook(self, hp) for hp in modules}
        self._installed: list = []  # (module, hook name, hook) registered by this patch

    @property
    def mode(self):
        """The edit mode of every concept of the patch, or ``{concept: mode}`` when they differ."""
        got = set(self.modes.values())
        return got.pop() if len(got) == 1 else dict(self.modes)

    @property
    def hookpoints(self) -> list:
        """The hooked blocks, in the concept file's order."""
        return list(dict.fromkeys(h for h, _ in self.tables))

    def table(self, hp: str, mode: Optional[str] = None) -> tuple:
        """``(feat_idx [T, F], tau [T, F], scale [T, F])`` of block ``hp`` for ``mode`` (None: the one mode edited
        there)."""
        hp = normalize_hookpoint(hp)
        here = self.hook_modes(hp)
        if mode is None and len(here) == 1:
            mode = here[0]
        if (hp, mode) not in self.tables:
            raise ValueError(f"no {mode or 'single-mode'} edit table at {hp!r}; this patch edits "
                             f"{ {h: self.hook_modes(h) for h in self.hookpoints} }")
        return self.tables[(hp, mode)]

    def hook_modes(self, hp: str) -> tuple:
        """The modes edited at block ``hp``, in the order applied (detect-then-replace first, then scale)."""
        return tuple(m for m in (self.replace_mode, "scale") if m is not None and (hp, m) in self.tables)

    def __repr__(self):
        feats = {f"{h}:{m}" if m != "scale" else h: tuple(t[0].shape) for (h, m), t in self.tables.items()}
        return (f"SaeuronPatch(concepts={self.concepts}, hookpoints={self.hookpoints}, tables={feats}, "
                f"halves={self.halves!r}, error_term={self.error_term!r}, mode={self.mode!r}"
                + (f", gate={self.gate!r}" if self.gate is not None else "") + f", active={self.active})")

    @property
    def last_index(self):
        """Nearest-recorded-timestep index per sample of the last UNet call (None before the first)."""
        return self.state.last_index

    def pipeline_cfg(self) -> Optional[bool]:
        """Whether the pipeline runs with CFG now (None when unknown, e.g. a bare UNet)."""
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is None or (self.halves == "both" and self.replace_mode not in replace.UNCOND_MODES):
            return None
        try:
            return bool(pipe.do_classifier_free_guidance)
        except Exception:
            return None

    # -- life cycle
    @property
    def active(self) -> bool:
        """Whether this patch's hooks are installed."""
        return bool(self._installed)

    def install(self) -> "SaeuronPatch":
        """(Re)install the hooks, replacing any other patch on the UNet."""
        if self.active:
            return self
        unpatch(self.unet)
        todo = [(m, EDIT_HOOK, self.edit_hooks[hp]) for hp, m in self.modules.items()]
        todo.append((self.unet, TIMESTEP_HOOK, self.timestep_hook))
        try:
            for module, name, hook in todo:
                registry = HookRegistry.check_if_exists_or_initialize(module)
                if registry.get_hook(name) is not None:  # left by a patch whose UNet hook is gone
                    remove_diffusers_hook(module, name, registry.get_hook(name))
                registry.register_hook(hook, name)
                self._installed.append((module, name, hook))
        except BaseException:
            self.remove()
            raise
        HookRegistry.check_if_exists_or_initialize(self.unet).invalidate_child_registries_cache()
        return self

    def remove(self) -> None:
        """Remove this patch's hooks (others' hooks stay); the UNet computes exactly as before the patch."""
        for module, name, hook in reversed(self._installed):
            remove_diffusers_hook(module, name, hook)
        if self._installed:
            HookRegistry.check_if_exists_or_initialize(self.unet).invalidate_child_registries_cache()
        self._installed.clear()
        self.state.rows = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def get_patch(pipe) -> Optional[SaeuronPatch]:
    """The patch installed on ``pipe``'s UNet, or None."""
    hook = HookRegistry.check_if_exists_or_initialize(get_unet(pipe)).get_hook(TIMESTEP_HOOK)
    return hook.patch if isinstance(hook, TimestepHook) else None

def unpatch(pipe) -> bool:
    """Remove the saeuron patch from ``pipe`` (or a UNet); True if there was one."""
    handle = get_patch(pipe)
    if handle is None:
        return False
    handle.remove()
    return True


def _load_sae(hp, saes, checkpoint):
    if saes is not None:
        for key in hookpoint_spellings(hp):
            if key in saes:
                return saes[key]
    if checkpoint is not None:
        return SparseAutoencoder.load(resolve_hookpoint_dir(Path(checkpoint), hp))
    raise ValueError(f"no SAE for hookpoint {hp!r}; SAEs were given for: {', '.join(saes or []) or '(none)'}")


def patch(pipe, concepts, checkpoint=None, *, saes: Optional[dict] = None, table: Optional[ConceptTable] = None,
          hookpoints=None, multiplier=None, percentile=None, top_n=None, threshold=None, halves: str = "both",
          error_term: str = "correct", mode=None, gate: Optional[float] = None,
          detectors: Optional[Detectors] = None, anchor=None) -> SaeuronPatch:
    """Unlearn ``concepts`` in ``pipe`` (a diffusers pipeline, a bare UNet or a bare DiT) until ``unpatch``.

    ``checkpoint=DIR`` holds one SAE folder per hookpoint and the concept file; alternatively pass
    ``saes={hookpoint: SparseAutoencoder}`` and ``table=ConceptTable`` (given objects win over the
    folder). ``hookpoints``: where every concept is edited; by default each concept is edited at its own
    ``defaults["hookpoints"]`` in the concept file (all hookpoints with statistics unless a sweep chose),
    and a hookpoint that no concept uses gets no hook at all.
    ``multiplier``/``percentile``/``top_n``/``threshold`` (a factor > 0 on the edit threshold tau, 1 = the
    method's): a number for all concepts or a dict per concept; unset -> the concept file's defaults.
    ``halves``: "both", "cond" or "uncond" (see the module docstring).
    ``error_term``: "correct" (``out = x + decode(f') - decode(f)``) or "reference" (the published
    code's ``decode(f') + decode(f) - x``, a compatibility option that shifts every token by twice its
    reconstruction error). ``mode``: None (the default: each concept's mode from its concept-file defaults, "scale"
    unless they say; see :func:`resolve_modes`), a ``{concept: mode}`` dict, or one for all concepts: "scale" (the
    method's edit, above), or "replace_uncond" /
    "replace_background": the selected features only detect the tokens that hold the concepts, whose
    activations are then replaced by the unconditional branch's at the same position or by the mean of the
    image's undetected tokens, or "gate_uncond": an image on which a selected feature fires on at least ``gate`` of
    its tokens at the first hooked block of a call gets its whole conditional map replaced by the unconditional one
    at every hooked block of that call (:mod:`saeuron.replace`; the multiplier plays no part), or "probe_uncond":
    the same, with images flagged when a concept's fitted detector (:mod:`saeuron.detectors`; ``detectors=`` or the
    checkpoint's ``detectors.safetensors``, fitted at every hooked block) gives a probability >= ``gate`` (default
    0.5), or "probe_anchor": flagged so, a flagged image's hooked blocks are recomputed with an anchor prompt's
    text instead of its own (``anchor``: one prompt, ``{concept: prompt}``, or None: per concept, the representative
    prompt of the most different concept of its detector group, :func:`saeuron.detectors.pick_anchor`; needs a
    pipeline with a text encoder and UNet blocks). Patching again replaces the previous patch.
    """
    unet = get_unet(pipe)
    if halves not in HALVES:
        raise ValueError(f"halves={halves!r}; valid: {', '.join(HALVES)}")
    if halves != "both" and type(unet).__name__.startswith("Flux"):
        raise ValueError(f"halves={halves!r}: Flux never batches CFG halves together (its true CFG is a separate "
                         "transformer call), so only halves='both' is defined")
    if error_term not in ERROR_TERMS:
        raise ValueError(f"error_term={error_term!r}; valid: {', '.join(ERROR_TERMS)}")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    if table is None:
        if checkpoint is None:
            raise ValueError("pass checkpoint=DIR (SAE folders + concept file) or saes={hookpoint: SAE} and table=")
        table = ConceptTable.load(checkpoint)
    concepts = check_concepts(concepts, table.names)
    if not concepts:
        raise ValueError(f"no concepts to unlearn; known: {', '.join(table.names)}")
    for c in concepts:
        table.index(c)
    modes, rmode, gate = resolve_modes(table, concepts, mode, gate, halves)
    flagged = [c for c in concepts if modes[c] == rmode]  # the concepts of the detect-then-replace mode
    defaults = set() if mode is not None else {table.edit_mode(c)[0] for c in table.names}
    if rmode in replace.PROBE_MODES:
        gate = 0.5 if gate is None else gate
        if detectors is None:
            if checkpoint is None:
                raise ValueError(f"mode={rmode!r} (of {flagged}) needs fitted detectors: pass detectors= or a "
                                 "checkpoint= that holds them (`saeuron detectors`)")
            detectors = Detectors.load(checkpoint)
    else:  # detectors= / anchor= for a mode none of these concepts has: an error, unless mode= was left to the
        # concept file and another concept of it has that mode (one evaluation patches each target in turn)
        if detectors is not None and not defaults & set(replace.PROBE_MODES):
            raise ValueError(f"detectors= belongs to mode='probe_uncond' or 'probe_anchor' (the modes are {modes})")
        detectors = None
    if anchor is not None and rmode != "probe_anchor" and (mode is not None or "probe_anchor" not in defaults):
        raise ValueError(f"anchor= belongs to mode='probe_anchor' (the modes are {modes})")
    if rmode == "probe_anchor" and (pipe is unet or not hasattr(pipe, "encode_prompt")):
        raise ValueError("mode='probe_anchor' re-runs the hooked blocks with an anchor prompt's text, so it needs the "
                         "pipeline (with its text encoder), not a bare denoiser")
    if rmode is not None and error_term != "correct":
        raise ValueError(f"error_term={error_term!r} belongs to the scale edit; mode={rmode!r} (of {flagged}) decodes "
                         "nothing, so leave error_term='correct'")
    if hookpoints is None:  # each concept where its defaults say, among the hookpoints with an SAE
        have = {normalize_hookpoint(h) for h in (saes or {})}
        if checkpoint is not None:
            have |= {normalize_hookpoint(h) for h in available_hookpoint_dirs(Path(checkpoint))}
        where = {c: [h for h in table.concept_hookpoints(c) if h in have] for c in concepts}
        lost = [c for c, hs in where.items() if not hs]
        if lost:
            raise ValueError(f"no SAE for the hookpoints of {lost} ({[table.concept_hookpoints(c) for c in lost]}); "
                             f"SAEs: {sorted(have) or 'none'}, statistics: {table.hookpoints}")
        hps = [h for h in table.hookpoints if any(h in hs for hs in where.values())]
    else:
        hps = [normalize_hookpoint(h) for h in ([hookpoints] if isinstance(hookpoints, str) else hookpoints)]
        if not hps:
            raise ValueError(f"hookpoints is empty; hookpoints with statistics: {', '.join(table.hookpoints)}")
        where = {c: hps for c in concepts}
    modules = resolve_hookpoints(unet, hps)
    widths = list_hookpoints(unet)
    loaded, tables = {}, {}
    for hp in hps:
        table.stored_hookpoint(hp)  # statistics present, else an error listing those that are
        sae = _load_sae(hp, saes, checkpoint)
        check_sae_for_edit(table, hp, sae, error_term)  # meta device, NaN/Inf, another SAE than the concept file's
        if sae.d_in != widths[hp]:
            raise ValueError(f"SAE width d_in={sae.d_in} does not match hookpoint {hp!r}, which has {widths[hp]} channels")
        if sae.num_latents != table.num_latents(hp):
            raise ValueError(f"the SAE at {hp!r} has {sae.num_latents} latents but the concept file's statistics "
                             f"have {table.num_latents(hp)}: they come from different SAEs")
        loaded[hp] = sae
        for m in ([rmode] if rmode is not None else []) + ["scale"]:  # at each block: detect-then-replace first
            here = [c for c in concepts if hp in where[c] and modes[c] == m]
            if not here:
                continue
            ts, fi, ta, sc = table.edit_tables(hp, here, multiplier, percentile, top_n, threshold)
            if m == "scale" and error_term == "reference":  # shared features: the result depends on the order
                warn_shared_features(table, hp, here, percentile, top_n)
            tables[(hp, m)] = (fi, ta, sc if m == "scale" else replace.detection_scale(ta))
            if m in replace.PROBE_MODES:  # the block that runs first decides: each such block needs a detector
                detectors.check(hp, sae, ts)
                for c in here:
                    detectors.index(c)
    embeds = None
    if rmode == "probe_anchor":
        first = next(h for h in hps if (h, rmode) in tables)
        embeds = _anchor_embeds(pipe, anchor, flagged, table, detectors, first,
                                {h: m for h, m in modules.items() if (h, rmode) in tables}, exclude=concepts)
    handle = SaeuronPatch(unet, pipe, loaded, dict(modules), ts, tables, concepts, halves, error_term, modes, gate,
                          detectors, embeds)
    return handle.install()


def resolve_modes(table, concepts, mode, gate, halves) -> tuple:
    """``({concept: mode}, rmode, gate)``: each concept's edit mode (``mode``: one for all, ``{concept: mode}``, or
    None for each concept's concept-file default, :meth:`ConceptTable.edit_mode`), the one detect-then-replace mode
    among them (None when all scale) and its gate (``gate``, else the concepts' default gate). A patch may mix the
    scale edit with one other mode, not two other modes: their per-image decisions would share one state."""
    if mode is not None and not isinstance(mode, (str, dict)):
        raise ValueError(f"mode={mode!r}: give a mode name ({', '.join(replace.MODES)}), a {{concept: mode}} dict, "
                         "or None (each concept's default from the concept file)")
    if isinstance(mode, dict):
        unknown = [c for c in mode if c not in concepts]
        if unknown:
            raise ValueError(f"mode= names concepts {unknown} that are not unlearned here ({concepts})")
    modes, gates = {}, {}
    for c in concepts:
        m = mode.get(c) if isinstance(mode, dict) else mode
        own, own_gate = table.edit_mode(c)
        modes[c] = own if m is None else m
        gates[c] = gate if gate is not None else own_gate if modes[c] == own else None  # own gate for its own mode
    others = sorted({m for m in modes.values() if m != "scale"})
    if len(others) > 1:
        raise ValueError(f"one patch mixes the scale edit with at most one other mode; the concepts' modes are "
                         f"{modes}: unlearn them in separate patches, or pass mode= to choose one")
    rmode = others[0] if others else None
    for c in concepts:
        replace.check_mode(modes[c], halves, gates[c] if modes[c] != "scale" else None)
    if gate is not None and rmode is None:
        replace.check_mode("scale", halves, gate)  # gate= without a mode that takes it: a clear error
    if rmode is not None and gate is None:
        own = {gates[c] for c in concepts if modes[c] == rmode}
        if len(own) > 1:
            raise ValueError(f"the concepts of mode {rmode!r} have different default gates "
                             f"{ {c: gates[c] for c in concepts if modes[c] == rmode} }: pass gate= to choose one")
        gate = own.pop()
    return modes, rmode, gate


def _anchor_embeds(pipe, anchor, concepts, table, detectors, hp, modules, exclude=()) -> dict:
    """``{concept: [1, L, D]}`` text embeddings of each concept's anchor prompt (``anchor``: a prompt, a dict, or None
    for :func:`saeuron.detectors.pick_anchor`'s concept and its representative prompt, never one of ``concepts`` or
    ``exclude``: the other concepts being unlearned)."""
    from .detectors import pick_anchor
    from .pipelines import encode_text

    joint = [h for h, m in modules.items() if type(m).__name__ != "Transformer2DModel"]
    if joint:
        raise ValueError(f"mode='probe_anchor' re-runs UNet Transformer2DModel blocks with another text; {joint} are "
                         f"{sorted({type(modules[h]).__name__ for h in joint})}: use mode='probe_uncond' there")
    if isinstance(anchor, dict):
        unknown = [c for c in anchor if c not in concepts]
        missing = [c for c in concepts if c not in anchor]
        if unknown or missing:
            raise ValueError(f"anchor= gives prompts for {sorted(anchor)}; the concepts unlearned are {concepts} "
                             f"(unknown: {unknown}, missing: {missing})")
        prompts = dict(anchor)
    elif anchor is None:
        known = (detectors.metadata or {}).get("prompts") or {}
        prompts = {}
        for c in concepts:
            if table.default_anchor(c) is not None:  # the concept file's anchor (a sweep run with --anchor chose it)
                prompts[c] = table.default_anchor(c)
                continue
            a = pick_anchor(detectors, table, c, hp, exclude=list(dict.fromkeys([*concepts, *exclude])))
            if a not in known:
                raise ValueError(f"the detectors record no prompt for {c!r}'s anchor {a!r} (fitted by an older saeuron); "
                                 "refit them with `saeuron detectors`, or pass anchor= with a prompt")
            prompts[c] = known[a]
    elif isinstance(anchor, str):
        prompts = {c: anchor for c in concepts}
    else:
        raise ValueError(f"anchor={anchor!r}: give a prompt, a {{concept: prompt}} dict, or None (automatic)")
    for c, text in prompts.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the anchor prompt of {c!r} must be a non-empty string, got {text!r}")
    return {c: encode_text(pipe, [text]).detach() for c, text in prompts.items()}


@contextmanager
def patched(pipe, concepts, checkpoint=None, **kw):
    """``with patched(pipe, "Cartoon", checkpoint=DIR): ...``; restores the previous state on exit."""
    prev = get_patch(pipe)
    handle = patch(pipe, concepts, checkpoint, **kw)
    try:
        yield handle
    finally:
        handle.remove()
        if prev is not None:
            prev.install()
