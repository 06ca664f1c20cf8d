"""Detect, then replace: the edit modes in which the SAE only decides *where* the target is.

The method's edit (``mode="scale"``, :mod:`saeuron.patching`) rescales the selected features where they fire
with a negative multiplier, which can push a token out of the distribution the next layers saw in training
(method.md section 8, "Look But Don't Touch"). The modes here keep the SAE's detection and drop the steering:

- a token is *detected* when any selected feature of the concepts being unlearned fires on it, by exactly the
  rule of the method's edit (the feature is among the token's top-k latents and its value exceeds
  ``threshold_c * tau_t[i]``, see :func:`saeuron.reference.edit_delta`); it is found by running the fast edit
  (:func:`saeuron.ops.edit_`, any backend) with every selected feature's scale set to 0 on a scratch copy and
  seeing which tokens changed, so its cost is the fire-first edit's plus one copy and one compare of the block
  output;
- every detected token's activation is replaced by an in-distribution one that does not hold the target:

  ``replace_uncond``: the same position of the same image in the unconditional branch of the CFG batch (the
  model's own prediction for that patch without the prompt). Only the conditional half is edited; it needs a
  CFG batch ``[uncond, cond]``;
  ``replace_background``: the mean of the same image's undetected tokens (what the rest of the picture holds,
  e.g. its background and style). An image whose every token is detected is left unchanged;
  ``gate_uncond``: the decision is per image: at the first hooked block of each denoiser call, an image is
  flagged when a selected feature fires on at least ``gate`` of its conditional tokens, and at every hooked block
  of that call a flagged image's whole conditional map is replaced by its unconditional one (the prompt's
  contribution at those blocks is dropped; on MiniCanvas the object enters only at the 8x8 up blocks, so this
  removes it and keeps the style). Needs a CFG batch, like ``replace_uncond``;
  ``probe_uncond``: as ``gate_uncond``, but the image is flagged by the concepts' fitted detectors
  (:mod:`saeuron.detectors`: a logistic regression per concept and timestep on the image's mean SAE code) when one
  gives a probability >= ``gate`` (default 0.5); the selected features play no part;
  ``probe_anchor``: flagged as ``probe_uncond``; a flagged image's conditional map at each hooked block is that
  block's own output for the image's current input recomputed with an anchor prompt's text instead of the image's
  prompt (the map the model makes there for another concept, in the image's own layout: "the same position in a
  pass without the concept"). Costs one more pass of each hooked block over the flagged images.

Tokens where nothing is detected are returned bit for bit unchanged. The multiplier plays no part.
"""
from __future__ import annotations

import torch

from . import ops, reference

MODES = ("scale", "replace_uncond", "replace_background", "gate_uncond", "probe_uncond", "probe_anchor")
PROBE_MODES = ("probe_uncond", "probe_anchor")  # images flagged by the fitted detectors (saeuron.detectors)
FLAG_MODES = ("gate_uncond",) + PROBE_MODES  # a decision per image at the first hooked block of each call
UNCOND_MODES = ("replace_uncond", "gate_uncond", "probe_uncond", "probe_anchor")  # edit the cond half of [uncond, cond]  # take tokens from the CFG batch's unconditional half


def check_mode(mode: str, halves: str, gate=None) -> str:
    """``mode`` if it is valid with ``halves`` and ``gate``, else a clear error."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(MODES)}")
    if mode in UNCOND_MODES and halves == "uncond":
        raise ValueError(f"mode={mode!r} edits the conditional half with the unconditional one, so "
                         "halves='uncond' is not possible; use halves='both' or 'cond' (the same here)")
    bad = isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate <= 1
    if mode == "gate_uncond":
        if bad:
            raise ValueError(f"gate={gate!r}: mode='gate_uncond' needs the share of an image's tokens that flags it, "
                             "a number in (0, 1]")
    elif mode in PROBE_MODES:
        if gate is not None and (bad or gate == 1):
            raise ValueError(f"gate={gate!r}: mode={mode!r} takes the detector probability that flags an image, "
                             "a number in (0, 1) (default 0.5)")
    elif gate is not None:
        raise ValueError(f"gate={gate!r} belongs to mode='gate_uncond', 'probe_uncond' or 'probe_anchor' (mode is "
                         f"{mode!r})")
    return mode


def detection_scale(tau: torch.Tensor) -> torch.Tensor:
    """The scale table that makes the edit zero every selected feature that fires (padding, ``tau = inf``, keeps
    scale 1 and so never changes anything)."""
    return torch.where(torch.isfinite(tau), torch.zeros_like(tau), torch.ones_like(tau))


def detect(x: torch.Tensor, weights: tuple, k: int, feat_idx, tau, zero_scale, rows_per_group: int,
           preprocess=None) -> torch.Tensor:
    """Which tokens hold a selected feature that fires: ``[B, H, W]`` bools for a map ``x [B, C, H, W]``, ``[N]`` for
    tokens ``x [N, d]``. ``weights`` = ``(W_enc, b_enc, b_dec, W_dec)``; ``zero_scale``: :func:`detection_scale` of
    ``tau``; ``preprocess``: the SAE's input transform for tokens (``SparseAutoencoder.preprocess``) or None."""
    with torch.no_grad():
        x = x.detach()
        src = x if preprocess is None else preprocess(reference.as_tokens(x))[0]  # the SAE's own input space
        scratch = src.clone()
        ops.edit_(scratch, *weights, k, feat_idx, tau, zero_scale, rows_per_group)
        hit = (scratch != src).any(1)  # map: over channels -> [B, H, W]; tokens: over d -> [N]
        return hit.view(x.shape[0], x.shape[2], x.shape[3]) if x.dim() == 4 and src.dim() == 2 else hit


def per_token(hit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``hit`` (``[B, H, W]`` or ``[B, L]``) broadcastable against ``x`` (``[B, C, H, W]`` or ``[B, L, C]``)."""
    return hit.unsqueeze(1 if x.dim() == 4 else -1)


def background_fill(x: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """Each image's detected tokens set to the mean of its undetected ones; ``x`` is ``[B, C, H, W]`` with ``hit``
    ``[B, H, W]``, or ``[B, L, C]`` tokens with ``hit [B, L]``. Images with no undetected token stay as they are."""
    keep = per_token(~hit, x)
    dims = (2, 3) if x.dim() == 4 else (1,)  # the token axes
    n = keep.sum(dims, keepdim=True)
    mean = (x.float() * keep).sum(dims, keepdim=True) / n.clamp(min=1)
    return torch.where(per_token(hit, x) & (n > 0), mean.to(x.dtype), x)


def flagged(hit: torch.Tensor, gate: float) -> torch.Tensor:
    """``[B]`` bools: the images (``hit`` ``[B, H, W]`` or ``[B, L]``) whose detected share of tokens is >= ``gate``."""
    return hit.flatten(1).float().mean(1) >= gate


def uncond_fill(cond: torch.Tensor, uncond: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """``cond`` with its detected tokens taken from ``uncond`` (same shape: the other CFG half, same images)."""
    return torch.where(per_token(hit, cond), uncond, cond)
