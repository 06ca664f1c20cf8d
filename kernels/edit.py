"""The unlearning edit in place, in two launches: ``x += sum over fired features (scale - 1) f_i W_dec[i]``.

(Plus the folded-bias GEMV of :mod:`.topk_encode` on the first call after the weights change.)
Launch 1 is the encoder tile kernel of :mod:`.topk_encode` (per-tile top-T candidates, no ``[N, M]``
buffer). Launch 2 merges each token's candidates into its exact top-k (with the same overflow
recompute), decides for every selected feature whether it is among the token's top-k latents and
fires (``f > tau``), and only for tokens where something fired gathers the few ``W_dec`` rows and
adds the delta. Tokens with nothing fired are never written, so they stay bit-for-bit unchanged.
Rows holding NaN/inf have all pre-activations non-finite, hence all codes 0, hence every
coefficient ``(scale - 1) * 0`` is 0 and the row is left alone, as in the reference.

``x`` is tokens ``[N, d]`` or a ``[B, C, H, W]`` map read and written in place through its strides
(token order b, h, w), so no permute/copy is needed for contiguous or channels-last maps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_float, dot_mode, next_pow2
from .topk_encode import (_key_index, _key_value, _row_topk, _token_offsets, check_encoder, folded_bias,
                          launch_tiles, plan)


@triton.jit
def _edit_kernel(cand_ptr, x_ptr, W_ptr, c_ptr, W_dec_ptr, feat_ptr, tau_ptr, scale_ptr,
                 N, M, D, HW, sxb, sxs, sxc, NT, k, F, G, rows_per_group,
                 R: tl.constexpr, NTP: tl.constexpr, T: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr, FULL: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr,
                 FP: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < N
    top = _row_topk(cand_ptr, x_ptr, W_ptr, c_ptr, rows, rmask, N, M, D, HW, sxb, sxs, sxc,
                    NT, k, R, NTP, T, KP, BM, BK, FULL, DOT_F32, UPCAST)
    # this token's concept table row
    grp = tl.minimum(rows // rows_per_group, G - 1)
    fcols = tl.arange(0, FP)
    tmask = rmask[:, None] & (fcols < F)[None, :]
    tab = grp.to(tl.int64)[:, None] * F + fcols[None, :]
    feat = tl.load(feat_ptr + tab, mask=tmask, other=-1)
    tau = tl.load(tau_ptr + tab, mask=tmask, other=0.0)
    scale = tl.load(scale_ptr + tab, mask=tmask, other=1.0)
    # value of each selected feature if it is one of the token's top-k latents (in x.dtype, like the codes)
    kcols = tl.arange(0, KP)
    f = tl.zeros((R, FP), dtype=tl.float32)
    member = tl.zeros((R, FP), dtype=tl.int1)
    for i in range(k):
        key = tl.sum(tl.where(kcols[None, :] == i, top, 0), axis=1)
        hit = (feat == _key_index(key)[:, None]) & (key >= 0)[:, None]
        val = _key_value(key).to(x_ptr.dtype.element_ty).to(tl.float32)
        f = tl.where(hit, val[:, None], f)
        member = member | hit
    coef = tl.where(member & tmask & (f > tau), (scale - 1.0) * f, 0.0)
    edited = tl.max((coef != 0).to(tl.int32), axis=1) > 0
    if tl.max(edited.to(tl.int32)) > 0:  # gather-decode only the fired features, only for edited tokens
        xoff = _token_offsets(rows, HW, sxb, sxs)
        for d0 in range(0, D, BD):
            dc = d0 + tl.arange(0, BD)
            dmask = dc < D
            delta = tl.zeros((R, BD), dtype=tl.float32)
            for j in range(F):
                sel = fcols[None, :] == j
                cj = tl.sum(tl.where(sel, coef, 0.0), axis=1)
                fj = tl.sum(tl.where(sel, feat, 0), axis=1)
                w = tl.load(W_dec_ptr + fj[:, None] * D + dc[None, :], mask=(cj != 0)[:, None] & dmask[None, :],
                            other=0.0).to(tl.float32)
                delta += cj[:, None] * w
            ptr = x_ptr + xoff[:, None] + dc[None, :].to(tl.int64) * sxc
            wmask = edited[:, None] & dmask[None, :]
            xv = tl.load(ptr, mask=wmask, other=0.0).to(tl.float32)
            tl.store(ptr, (xv + delta).to(x_ptr.dtype.element_ty), mask=wmask)


def _geometry(x):
    """``(n, HW, stride_b, stride_token, stride_channel)`` addressing x's tokens, or None if not expressible."""
    if x.dim() == 2:
        return x.shape[0], max(x.shape[0], 1), 0, x.stride(0), x.stride(1)
    b, c, h, w = x.shape
    if w == 1:
        sxs = x.stride(2)
    elif h == 1 or x.stride(2) == w * x.stride(3):
        sxs = x.stride(3)
    else:
        return None
    return b * h * w, h * w, x.stride(0), sxs, x.stride(1)


def edit_(x, W_enc, b_enc, b_dec, W_dec, k: int, feat_idx, tau, scale, rows_per_group: int):
    """In place: for each token, ``x += sum_j (scale_j - 1) f_j W_dec[feat_j]`` over fired selected features.

    Same semantics as :func:`saeuron.reference.edit_`: ``feat_idx/tau/scale`` are ``[G, F]`` (or
    ``[F]``); token row r uses table row ``min(r // rows_per_group, G - 1)``. Feature indices outside
    ``[0, M)`` (e.g. -1 padding) never match and are never read.
    """
    if x.dim() not in (2, 4):
        raise ValueError(f"edit_ takes tokens [N, d] or a map [B, C, H, W], got shape {tuple(x.shape)}")
    d = x.shape[1]
    check_encoder(x.new_empty(0, d), W_enc, b_enc, b_dec, k)
    check_float("x", x)
    check_float("W_dec", W_dec)
    if W_dec.shape != W_enc.shape:
        raise ValueError(f"W_dec {tuple(W_dec.shape)} must have the shape of W_enc {tuple(W_enc.shape)}")
    if feat_idx.dim() == 1:
        feat_idx, tau, scale = feat_idx[None], tau[None], scale[None]
    if feat_idx.dim() != 2 or not (feat_idx.shape == tau.shape == scale.shape):
        raise ValueError(f"feat_idx {tuple(feat_idx.shape)}, tau {tuple(tau.shape)} and scale {tuple(scale.shape)} "
                         f"must be equal [G, F] (or [F]) tables")
    geom = _geometry(x)
    if geom is None:  # strides that do not flatten (h, w) into one token stride: edit a contiguous copy
        y = x.contiguous()
        edit_(y, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group)
        return x.copy_(y)
    n = geom[0]
    g, nf = feat_idx.shape
    if n == 0 or nf == 0 or g == 0:
        return x
    m = W_enc.shape[0]
    W_enc, W_dec = W_enc.contiguous(), W_dec.contiguous()
    c = folded_bias(W_enc, b_enc.contiguous(), b_dec.contiguous())
    feat_idx = feat_idx.to(device=x.device, dtype=torch.int64).contiguous()
    tau = tau.to(device=x.device, dtype=torch.float32).contiguous()
    scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
    p = plan(n, m, d, k, x.dtype)
    cand = launch_tiles(x, W_enc, c, geom, p)
    dot_f32, upcast = dot_mode(x.dtype)
    bd = min(256 if INTERPRET else 64, next_pow2(d))
    _edit_kernel[(triton.cdiv(n, p["R"]),)](
        cand, x, W_enc, c, W_dec, feat_idx, tau, scale, n, m, d, *geom[1:], p["NT"], k, nf, g,
        max(int(rows_per_group), 1),
        R=p["R"], NTP=p["NTP"], T=p["T"], KP=p["KP"], BM=p["BM"], BK=p["BK"], FULL=p["FULL"],
        DOT_F32=dot_f32, UPCAST=upcast, FP=next_pow2(nf), BD=max(16, bd), num_warps=p["merge_warps"])
    return x
