"""Concept supervision (the SAEmnesia idea, arXiv 2509.21379): reserve latents for named concepts while training.

Off by default (``TrainConfig.concept_supervision = 0``); the unsupervised SAeUron trainer is then untouched. With
a weight ``w > 0`` and ``n = TrainConfig.latents_per_concept``, the C concepts of the store (its labels, or a
``{concept: [prompts]}`` dict as for ``saeuron select``; a prompt may belong to several concepts) get latents
``c*n .. c*n+n-1`` in the order the concepts are listed, and the training loss gains ``w * L_sup``.

For a batch, let ``L`` be its *labelled* rows (rows whose prompt belongs to at least one concept; the others add
nothing), ``Y_r`` the concepts of row r, ``R_c`` the reserved latents of c, and for every reserved latent j
``z_rj = W_enc[j] . (x_r - b_dec) + b_enc[j]`` its pre-activation *before* the ReLU (so a latent that is off still
gets a gradient; ``b_dec`` is detached, the term moves only the reserved encoder rows and biases). ``theta_r``
(detached) is the value a latent must beat to be kept for row r: the row's k-th largest ReLU pre-activation, and
under BatchTopK the larger of that and the batch's selection threshold (so the latent is kept by both BatchTopK
and the per-token top-k used at inference). ``s`` = mean of ``theta_r`` over L (detached, >= 1e-6) makes the
term scale-free, and ``delta = SUPERVISION_MARGIN`` (0.1)::

    u_rc   = mean_{j in R_c} z_rj / s                                   (concept logits)
    CE_r   = - sum_{c in Y_r} (1/|Y_r|) log softmax_c(u_r)              (0 when C = 1)
    POS_r  = mean_{c in Y_r, j in R_c}     relu(theta_r + delta*s - z_rj) / s   (own latents inside the top k)
    NEG_r  = mean_{c not in Y_r, j in R_c} relu(z_rj) / s                        (others' latents off; 0 if none)
    L_sup  = mean_{r in L} (CE_r + POS_r + NEG_r)                       (0 when the batch has no labelled row)

Under DDP each rank computes L_sup on its own rows (its gradients are averaged with the others' as usual). The
reservation is recorded in the SAE's ``cfg.json`` as ``"concept_latents": {concept: [latent ids]}``, which
``saeuron select --reserved`` turns into a selection of exactly those latents.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SUPERVISION_MARGIN = 0.1  # delta: how far (in units of the batch's mean threshold s) a concept's latent must clear theta
SCALE_FLOOR = 1e-6


def check_supervision(weight, latents_per_concept) -> None:
    """Raise ValueError unless ``weight`` is a finite number >= 0 and ``latents_per_concept`` an integer >= 1."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"concept_supervision (the weight of the concept-supervised term) must be a finite number "
                         f">= 0 (0 = off, the unsupervised trainer), got {weight!r}")
    if isinstance(latents_per_concept, bool) or not isinstance(latents_per_concept, int) or latents_per_concept < 1:
        raise ValueError(f"latents_per_concept must be an integer >= 1, got {latents_per_concept!r}")


def reserve_latents(names: list, latents_per_concept: int, num_latents: int, k: int) -> dict:
    """``{concept: [latent ids]}``: concept c (in the order of ``names``) gets ``c*n .. c*n+n-1``; a clear error when
    the reservation does not fit the dictionary or ``k``."""
    n, need = latents_per_concept, len(names) * latents_per_concept
    if need > num_latents:
        raise ValueError(f"concept supervision reserves {n} latent(s) for each of {len(names)} concepts = {need} latents, "
                         f"more than the SAE's {num_latents}; raise num_latents/expansion_factor or lower "
                         "latents_per_concept")
    if n > k:
        raise ValueError(f"latents_per_concept={n} exceeds k={k}: a token could never hold all of its concept's "
                         "reserved latents in its top k")
    return {str(c): list(range(i * n, (i + 1) * n)) for i, c in enumerate(names)}


def membership(store, concepts=None) -> tuple:
    """``(names, member [P, C] bool)``: which of the store's P prompts belong to which of its C concepts (the store's
    labels, or ``concepts={concept: [prompt ids or prompts]}``); a store without labels needs ``concepts``."""
    from .selection import concept_members

    if concepts is None and getattr(store, "labels", None) is None:
        raise ValueError(f"concept supervision needs concept labels, but the store at {getattr(store, 'root', '?')} has "
                         "none (it was collected from a plain prompt list); collect from a {concept: [prompts]} file, "
                         "or pass concepts={concept: [prompts]} to train (the same form as for `saeuron select`)")
    names, members = concept_members(store, concepts)
    member = torch.zeros(len(store.prompts), len(names), dtype=torch.bool)
    for c, ids in enumerate(members):
        member[ids, c] = True
    return names, member


def row_thresholds(pre_relu_topk: torch.Tensor, batch_threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``theta_r`` ``[N]``: the smallest of each row's top-k ReLU pre-activations ``[N, k]``, raised to the BatchTopK
    threshold when one is given."""
    theta = pre_relu_topk.float().amin(1)
    if batch_threshold is not None:
        theta = torch.maximum(theta, batch_threshold.float())
    return theta


def supervision_loss(z: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, latents_per_concept: int,
                     margin: float = SUPERVISION_MARGIN) -> torch.Tensor:
    """``L_sup`` (module docstring) of ``z [N, C*n]`` (reserved pre-activations before the ReLU, concept-major),
    ``targets [N, C]`` (bool membership of each row) and ``theta [N]`` (detached thresholds)."""
    n_rows, width = z.shape
    C, n = targets.shape[1], latents_per_concept
    if width != C * n:
        raise ValueError(f"z has {width} columns; expected {C} concepts x {n} latents")
    lab = targets.any(1)
    if not bool(lab.any()):
        return z.sum() * 0.0  # no labelled row: no term, but the graph stays connected
    z, y, th = z[lab].float(), targets[lab], theta[lab].detach().float()
    s = th.mean().clamp_min(SCALE_FLOOR)
    zz = z.reshape(-1, C, n)
    yf = y.float()
    loss = zz.new_zeros(())
    if C > 1:
        logp = torch.log_softmax(zz.mean(2) / s, dim=1)
        loss = loss - ((yf / yf.sum(1, keepdim=True)) * logp).sum(1).mean()
    pos = torch.relu(th[:, None, None] + margin * s - zz) / s  # [L, C, n]
    loss = loss + ((pos * yf[:, :, None]).sum((1, 2)) / (yf.sum(1) * n)).mean()
    no = 1.0 - yf
    n_no = no.sum(1) * n
    neg = (torch.relu(zz) / s * no[:, :, None]).sum((1, 2)) / n_no.clamp_min(1)
    return loss + neg.mean()


__all__ = ["check_supervision", "reserve_latents", "membership", "row_thresholds", "supervision_loss",
           "SUPERVISION_MARGIN"]
