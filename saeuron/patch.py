"""Patch a diffusers pipeline so that every UNet call unlearns concepts at the hooked blocks.

``patch(pipe, "Cartoon", checkpoint=DIR)`` installs

- one forward pre-hook on the UNet, which reads the timestep the UNet receives (positional argument 1
  or ``timestep=``; a number, a 0-d or a 1-d tensor) and picks, on the device and without a host
  sync, the nearest timestep recorded in the concept file, then gathers that row of every hooked
  block's edit tables. Features are looked up by timestep *value*, never by a call counter, so
  schedulers that repeat timesteps (PNDM), call the UNet twice per step (Heun) or a different step
  count all work;
- one forward hook per hooked ``Transformer2DModel``, which applies the edit of method.md section 5
  to the block's output (``ops.edit_``, in place): for every token and selected feature i with
  ``f_i > threshold_c * tau_t[i]`` (``threshold`` 1 = the method), ``f_i <- multiplier_c * mu[c,t][i] * f_i``, and
  ``out = decode(f') + (x - decode(f)) = x + sum_i (f'_i - f_i) W_dec[i]``.

Each concept is edited at the hookpoints its concept-file defaults name (a sweep may put objects and
styles at different blocks; default: every hookpoint with an SAE), or at the ``hookpoints`` given to
``patch``; a block no concept uses gets no hook.

Everything that can be done once (selection, stacking the tables per timestep) is done at patch
time; SAE weights and tables are copied to the activations' device and dtype on first use and cached,
so CPU offload works. The SAEs live on the handle, not on the UNet: they never appear in
``unet.state_dict()`` or ``save_pretrained``. Patching again replaces the previous patch and
``unpatch`` restores the UNet exactly.

With classifier-free guidance ``StableDiffusionPipeline`` concatenates ``[uncond, cond]`` along the
batch, so ``halves="cond"``/``"uncond"`` edit only the second/first half of the batch (default
``"both"``, as the method does). Without CFG the whole batch is conditional. For a bare UNet an even
batch is taken to be such a pair.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from . import ops, reference
from .concepts import ConceptTable, check_concepts, check_sae_for_edit, warn_shared_features
from .hookpoints import get_unet, list_hookpoints, normalize_hookpoint, resolve_hookpoints
from .sae import SparseAutoencoder, available_hookpoint_dirs, resolve_hookpoint_dir

HALVES = ("both", "cond", "uncond")
ERROR_TERMS = ("correct", "reference")
ATTR = "_saeuron_patch"


def _block_output(output):
    """The activation tensor of a ``Transformer2DModel`` output (``.sample``, a tuple, or a tensor)."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _with_output(output, x):
    """``output`` with its activation tensor replaced by ``x``."""
    if hasattr(output, "sample"):
        output.sample = x
        return output
    if isinstance(output, (tuple, list)):
        return type(output)([x, *output[1:]])
    return x


def reference_compat_edit(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group, grad=False):
    """The published reference code's edit, sign slip included: ``decode(f') + decode(f) - x``.

    Compatibility option only (``error_term="reference"``). The method adds the reconstruction error
    back, ``decode(f') + (x - decode(f))``; the reference code adds ``decode(f) - x`` instead, which
    shifts every token, edited or not, by twice its reconstruction error ``2 (decode(f) - x)``.
    """
    xt = reference.as_tokens(x)
    enc = reference.topk_encode if grad else ops.topk_encode
    vals, idx = enc(xt, W_enc, b_enc, b_dec, k)
    n, g = xt.shape[0], feat_idx.shape[0]
    grp = torch.clamp(torch.arange(n, device=x.device) // max(int(rows_per_group), 1), max=max(g - 1, 0))
    factor = torch.ones(vals.shape, dtype=torch.float32, device=x.device)
    if feat_idx.numel():
        hit = idx[:, :, None] == feat_idx[grp][:, None, :]  # [N, k, F]
        fire = hit & (vals.float()[:, :, None] > tau[grp][:, None, :].float())
        factor = torch.where(fire, scale[grp][:, None, :].float(), torch.ones((), device=x.device)).prod(-1)
    edited = ops.sparse_decode((vals.float() * factor).to(W_dec.dtype), idx, W_dec, b_dec)
    plain = ops.sparse_decode(vals.to(W_dec.dtype), idx, W_dec, b_dec)
    out = edited.float() + plain.float() - xt.float()
    return reference.from_tokens(out.to(x.dtype), x)


class SaeuronPatch:
    """The hooks, SAEs and per-timestep edit tables of one patch; ``remove()`` or use it as a context manager.

    ``last_index`` is the nearest-recorded-timestep index per sample chosen at the last UNet call (a
    device tensor; for inspection and tests).
    """

    def __init__(self, unet, pipe, saes: dict, modules: dict, timesteps, tables: dict, concepts: list,
                 halves: str, error_term: str):
        self.unet = unet
        self._pipe = weakref.ref(pipe) if pipe is not None and pipe is not unet else None
        self.saes = saes  # {hookpoint: SparseAutoencoder}, kept here, never registered on the UNet
        self.modules = modules
        self.timesteps = timesteps  # [T] float32
        self.tables = tables  # {hookpoint: (feat_idx [T, F], tau [T, F], scale [T, F])}
        self.concepts = concepts
        self.halves = halves
        self.error_term = error_term
        self.last_index = None
        self._rows = None
        self._cfg = None
        self._per_device: dict = {}
        self._handles: list = []

    def __repr__(self):
        feats = {h: tuple(t[0].shape) for h, t in self.tables.items()}
        return (f"SaeuronPatch(concepts={self.concepts}, hookpoints={list(self.tables)}, tables={feats}, "
                f"halves={self.halves!r}, error_term={self.error_term!r}, active={self.active})")

    # -- life cycle
    @property
    def active(self) -> bool:
        """Whether this patch's hooks are installed."""
        return bool(self._handles)

    def install(self) -> "SaeuronPatch":
        """(Re)install the hooks, replacing any other patch on the UNet."""
        if self.active:
            return self
        unpatch(self.unet)
        self._handles.append(self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for hp, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._make_block_hook(hp)))
        object.__setattr__(self.unet, ATTR, self)
        return self

    def remove(self) -> None:
        """Remove the hooks; the UNet is exactly as before the patch."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rows = None
        if self.unet.__dict__.get(ATTR) is self:
            object.__delattr__(self.unet, ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- hooks
    def _on(self, device):
        """Timesteps and the tables of all blocks packed side by side, on ``device`` (copied once per device).

        Packing lets the pre-hook pick every block's rows with two gathers instead of three per block.
        """
        hit = self._per_device.get(device)
        if hit is None:
            hps = list(self.tables)
            ints = torch.cat([self.tables[h][0] for h in hps], 1)  # [T, sum F]
            floats = torch.cat([self.tables[h][1] for h in hps] + [self.tables[h][2] for h in hps], 1)
            spans, a = {}, 0
            for h in hps:
                f = self.tables[h][0].shape[1]
                spans[h] = (a, a + f)
                a += f
            hit = (self.timesteps.to(device), ints.to(device), floats.to(device), spans, a)
            self._per_device[device] = hit
        return hit

    def _pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if sample is None or t is None:
            self._rows = None
            return None
        ts, ints, floats, spans, total = self._on(sample.device)
        t = t.to(sample.device) if torch.is_tensor(t) else torch.tensor(t, device=sample.device)
        idx = (ts[None, :] - t.reshape(-1, 1).to(ts.dtype)).abs().argmin(-1)  # [1] or [B], stays on device
        self.last_index = idx
        fi, fl = ints[idx], floats[idx]  # [G, sum F], [G, 2 sum F]
        self._rows = {hp: (fi[:, a:b], fl[:, a:b], fl[:, total + a:total + b]) for hp, (a, b) in spans.items()}
        self._cfg = self._pipeline_cfg()
        return None

    def _pipeline_cfg(self) -> Optional[bool]:
        """Whether the pipeline runs with CFG now (None when unknown, e.g. a bare UNet)."""
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is None or self.halves == "both":
            return None
        try:
            return bool(pipe.do_classifier_free_guidance)
        except Exception:
            return None

    def _span(self, b: int) -> tuple:
        """Batch rows ``[lo, hi)`` to edit under ``halves``."""
        if self.halves == "both":
            return 0, b
        pair = (b % 2 == 0) if self._cfg is None else (self._cfg and b % 2 == 0)
        if not pair:  # no CFG: the whole batch is conditional
            return (0, b) if self.halves == "cond" else (0, 0)
        return (b // 2, b) if self.halves == "cond" else (0, b // 2)

    def _make_block_hook(self, hp):
        sae = self.saes[hp]
        k = sae.cfg.k

        def hook(module, args, output):
            rows = self._rows
            if rows is None:
                return None
            fi, ta, sc = rows[hp]
            if fi.shape[-1] == 0 and self.error_term == "correct":
                return None  # nothing selected at this timestep
            x = _block_output(output)
            b = x.shape[0]
            lo, hi = self._span(b)
            if lo >= hi:
                return None
            if fi.shape[0] > 1:  # per-sample timesteps
                if fi.shape[0] != b:
                    raise ValueError(f"saeuron: {fi.shape[0]} per-sample timesteps for a batch of {b} at {hp}")
                fi, ta, sc = (t[lo:hi].contiguous() for t in (fi, ta, sc))
            per_image = x[0, 0].numel() if x.dim() == 4 else 1
            rpg = per_image if fi.shape[0] > 1 else (hi - lo) * per_image
            W_enc, b_enc, b_dec, W_dec = sae.weights_for(x.device, x.dtype)
            grad = x.requires_grad and torch.is_grad_enabled()
            if self.error_term == "reference":
                part = reference_compat_edit(x[lo:hi], W_enc, b_enc, b_dec, W_dec, k, fi, ta, sc, rpg, grad=grad)
            elif grad:  # differentiable, out of place (e.g. attacks optimising through the patched model)
                xt = reference.as_tokens(x[lo:hi])
                delta = reference.edit_delta(xt, W_enc, b_enc, b_dec, W_dec, k, fi, ta, sc, rpg)
                part = reference.from_tokens((xt.float() + delta).to(x.dtype), x[lo:hi])
            else:
                y = x if x.is_contiguous() else x.contiguous()
                ops.edit_(y[lo:hi], W_enc, b_enc, b_dec, W_dec, k, fi, ta, sc, rpg)
                return None if y is x else _with_output(output, y)
            if not grad:
                y = x if x.is_contiguous() else x.contiguous()
                y[lo:hi] = part
                return None if y is x else _with_output(output, y)
            return _with_output(output, torch.cat([x[:lo], part, x[hi:]]))

        return hook


def get_patch(pipe) -> Optional[SaeuronPatch]:
    """The patch installed on ``pipe``'s UNet, or None."""
    return get_unet(pipe).__dict__.get(ATTR)


def unpatch(pipe) -> bool:
    """Remove the saeuron patch from ``pipe`` (or a UNet); True if there was one."""
    handle = get_patch(pipe)
    if handle is None:
        return False
    handle.remove()
    return True


def _load_sae(hp, saes, checkpoint):
    if saes is not None:
        for key in (hp, f"unet.{hp}"):
            if key in saes:
                return saes[key]
    if checkpoint is not None:
        return SparseAutoencoder.load(resolve_hookpoint_dir(Path(checkpoint), hp))
    raise ValueError(f"no SAE for hookpoint {hp!r}; SAEs were given for: {', '.join(saes or []) or '(none)'}")


def patch(pipe, concepts, checkpoint=None, *, saes: Optional[dict] = None, table: Optional[ConceptTable] = None,
          hookpoints=None, multiplier=None, percentile=None, top_n=None, threshold=None, halves: str = "both",
          error_term: str = "correct") -> SaeuronPatch:
    """Unlearn ``concepts`` in ``pipe`` (a diffusers pipeline or a bare UNet) until ``unpatch``.

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
    reconstruction error). Patching again replaces the previous patch.
    """
    unet = get_unet(pipe)
    if halves not in HALVES:
        raise ValueError(f"halves={halves!r}; valid: {', '.join(HALVES)}")
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
        table._hp(hp)  # statistics present, else an error listing those that are
        sae = _load_sae(hp, saes, checkpoint)
        check_sae_for_edit(table, hp, sae, error_term)  # meta device, NaN/Inf, another SAE than the concept file's
        if sae.d_in != widths[hp]:
            raise ValueError(f"SAE width d_in={sae.d_in} does not match hookpoint {hp!r}, which has {widths[hp]} channels")
        if sae.num_latents != table.num_latents(hp):
            raise ValueError(f"the SAE at {hp!r} has {sae.num_latents} latents but the concept file's statistics "
                             f"have {table.num_latents(hp)}: they come from different SAEs")
        loaded[hp] = sae
        ts, fi, ta, sc = table.edit_tables(hp, [c for c in concepts if hp in where[c]], multiplier, percentile, top_n,
                                           threshold)
        if error_term == "reference":  # shared features: the reference's result depends on the concepts' order
            warn_shared_features(table, hp, [c for c in concepts if hp in where[c]], percentile, top_n)
        tables[hp] = (fi, ta, sc)
    handle = SaeuronPatch(unet, pipe, loaded, dict(modules), ts, tables, concepts, halves, error_term)
    return handle.install()


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
