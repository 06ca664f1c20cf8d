"""Fire-first unlearning edit in place: ``x += sum over edited i of (scale_i - 1) f_i W_dec[i]``.

Three launches, no host synchronisation (CUDA-graph capturable), no ``[N, M]`` buffer:

1. ``_select_kernel``: per table row g and block of its tokens, the gathered GEMM ``[R, F]`` over the
   g's selected latents (``tl.dot``), ``f = ReLU(x W^T + c)`` with the folded bias. An entry *passes*
   when its value rounded to ``x.dtype`` exceeds ``tau`` with a non-zero ``(scale - 1) f``; passing
   values are kept in a ``[N, FP]`` buffer (-1 elsewhere) and the token is flagged as a candidate.
   On the device the candidates are then compacted (cumsum + scatter: no ``nonzero``, no sync).
2. ``_count_kernel``: grid (candidate row block, latent range). A program whose rows hold no
   candidate exits at once; the others compute dense pre-activation tiles and, in the epilogue,
   count per passing value the latents that beat it (larger value, or equal value at a lower index;
   the feature itself is never counted), added atomically into ``[N, FP]`` counts.
3. ``_apply_kernel``: per candidate row block, the entries that pass with fewer than k latents beating
   them are edited: the few ``W_dec`` rows are gathered and the delta added in place.

A token with nothing passing is never written, so it stays bit for bit unchanged; NaN/inf tokens give
all values 0, so nothing passes on them. ``x`` is tokens ``[N, d]`` or a ``[B, C, H, W]`` map addressed
through its strides (token order b, h, w). Arguments were validated once by :mod:`saeuron.ops`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_mode, next_pow2
from .topk_encode import folded_bias, preact_tile, token_offsets

FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _select_kernel(x_ptr, W_ptr, c_ptr, feat_ptr, tau_ptr, scale_ptr, pv_ptr, flag_ptr,
                   N, M, D, HW, sxb, sxs, sxc, F, G, rpg,
                   R: tl.constexpr, FP: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    g = tl.program_id(1)
    start = g * rpg
    end = tl.where(g == G - 1, N, tl.minimum(start + rpg, N))
    rows = start + tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < end
    if tl.max(rmask.to(tl.int32)) > 0:
        fcols = tl.arange(0, FP)
        fmask = fcols < F
        feat = tl.load(feat_ptr + g * F + fcols, mask=fmask, other=-1)
        live = fmask & (feat >= 0) & (feat < M)
        fsafe = tl.where(live, feat, 0).to(tl.int64)
        xoff = token_offsets(rows, HW, sxb, sxs)
        acc = tl.zeros((R, FP), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < D
            x = tl.load(x_ptr + xoff[:, None] + kk[None, :].to(tl.int64) * sxc,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(W_ptr + fsafe[None, :] * D + kk[:, None], mask=kmask[:, None] & live[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            elif UPCAST:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        pre = acc + tl.load(c_ptr + fsafe, mask=live, other=0.0)[None, :]
        v = tl.where((pre > 0) & (pre <= FLT_MAX), pre, 0.0)  # ReLU; NaN and inf count as 0
        vr = v.to(x_ptr.dtype.element_ty).to(tl.float32)  # codes are rounded to x.dtype, as the reference
        tau = tl.load(tau_ptr + g * F + fcols, mask=fmask, other=float("inf"))
        scale = tl.load(scale_ptr + g * F + fcols, mask=fmask, other=1.0)
        ok = live[None, :] & rmask[:, None] & (vr > tau[None, :]) & ((scale - 1.0)[None, :] * vr != 0)
        tl.store(pv_ptr + rows.to(tl.int64)[:, None] * FP + fcols[None, :], tl.where(ok, v, -1.0),
                 mask=rmask[:, None])
        tl.store(flag_ptr + rows, tl.max(ok.to(tl.int32), axis=1), mask=rmask)


@triton.jit
def _count_kernel(order_ptr, x_ptr, W_ptr, c_ptr, feat_ptr, pv_ptr, cnt_ptr,
                  N, M, D, HW, sxb, sxs, sxc, F, G, rpg, MSPAN,
                  R: tl.constexpr, FP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                  DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    slots = tl.program_id(0) * R + tl.arange(0, R)
    rows = tl.load(order_ptr + slots, mask=slots < N, other=-1)
    rmask = rows >= 0
    if tl.max(rmask.to(tl.int32)) > 0:  # blocks past the last candidate exit at once
        rows = tl.where(rmask, rows, 0)
        grp = tl.minimum(rows // rpg, G - 1)
        fcols = tl.arange(0, FP)
        fmask = fcols < F
        feat = tl.load(feat_ptr + grp.to(tl.int64)[:, None] * F + fcols[None, :],
                       mask=rmask[:, None] & fmask[None, :], other=-1)
        val = tl.load(pv_ptr + rows.to(tl.int64)[:, None] * FP + fcols[None, :], mask=rmask[:, None], other=-1.0)
        xoff = token_offsets(rows, HW, sxb, sxs)
        cnt = tl.zeros((R, FP), dtype=tl.int32)
        m_lo = tl.program_id(1) * MSPAN
        for m0 in range(m_lo, tl.minimum(m_lo + MSPAN, M), BM):
            cols = m0 + tl.arange(0, BM)
            p = preact_tile(x_ptr, W_ptr, c_ptr, xoff, rmask, cols, M, D, sxc, R, BM, BK, DOT_F32, UPCAST)
            for j in range(F):  # epilogue: count the latents of this tile beating each passing value
                sel = fcols[None, :] == j
                vj = tl.sum(tl.where(sel, val, 0.0), axis=1)
                mj = tl.sum(tl.where(sel, feat, 0), axis=1)
                beat = (p > vj[:, None]) | ((p == vj[:, None]) & (cols[None, :] < mj[:, None]))
                beat = beat & (cols[None, :] != mj[:, None]) & (cols < M)[None, :]
                cj = tl.sum(beat.to(tl.int32), axis=1)
                cnt += tl.where(sel, cj[:, None], 0)
        keep = rmask[:, None] & (val >= 0)
        tl.atomic_add(cnt_ptr + rows.to(tl.int64)[:, None] * FP + fcols[None, :], cnt, mask=keep)


@triton.jit
def _apply_kernel(order_ptr, x_ptr, W_dec_ptr, feat_ptr, scale_ptr, pv_ptr, cnt_ptr,
                  N, D, HW, sxb, sxs, sxc, k, F, G, rpg,
                  R: tl.constexpr, FP: tl.constexpr, BD: tl.constexpr):
    slots = tl.program_id(0) * R + tl.arange(0, R)
    rows = tl.load(order_ptr + slots, mask=slots < N, other=-1)
    rmask = rows >= 0
    if tl.max(rmask.to(tl.int32)) > 0:
        rows = tl.where(rmask, rows, 0)
        grp = tl.minimum(rows // rpg, G - 1)
        fcols = tl.arange(0, FP)
        tmask = rmask[:, None] & (fcols < F)[None, :]
        tab = grp.to(tl.int64)[:, None] * F + fcols[None, :]
        feat = tl.load(feat_ptr + tab, mask=tmask, other=0)
        scale = tl.load(scale_ptr + tab, mask=tmask, other=1.0)
        off = rows.to(tl.int64)[:, None] * FP + fcols[None, :]
        val = tl.load(pv_ptr + off, mask=tmask, other=-1.0)
        cnt = tl.load(cnt_ptr + off, mask=tmask, other=0)
        vr = val.to(x_ptr.dtype.element_ty).to(tl.float32)
        coef = tl.where(tmask & (val >= 0) & (cnt < k), (scale - 1.0) * vr, 0.0)
        edited = tl.max((coef != 0).to(tl.int32), axis=1) > 0
        xoff = token_offsets(rows, HW, sxb, sxs)
        for d0 in range(0, D, BD):
            dc = d0 + tl.arange(0, BD)
            dmask = dc < D
            delta = tl.zeros((R, BD), dtype=tl.float32)
            for j in range(F):  # table order, as the reference sums
                sel = fcols[None, :] == j
                cj = tl.sum(tl.where(sel, coef, 0.0), axis=1)
                fj = tl.sum(tl.where(sel, feat, 0), axis=1).to(tl.int64)
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


def blocks(n: int, m: int, d: int, nf: int, dtype: torch.dtype = torch.float16) -> dict:
    """Block sizes of the three launches: rows ``R``, table width ``FP``, GEMM ``BK``/``BM``, latent range, ``BD``."""
    fp = max(16, next_pow2(nf))
    if INTERPRET:  # big blocks: the interpreter pays per operation and per program, hardly per element
        bm = min(256, max(16, next_pow2(m)))
        return dict(R=32, FP=fp, BK=min(128, max(16, next_pow2(d))), BM=bm, MSPAN=bm * triton.cdiv(m, bm),
                    BD=min(256, max(16, next_pow2(d))))
    bm = min(128, max(16, next_pow2(m)))
    bk = 32 if dtype == torch.float32 else 64
    ranges = 16  # latent ranges per row block: enough programs to fill the GPU when few tokens fire
    # 64-row blocks: the count GEMM tiles are [64, 128] (a full wgmma M), and W_enc is re-read once per block
    return dict(R=64, FP=fp, BK=bk, BM=bm, MSPAN=bm * max(1, triton.cdiv(triton.cdiv(m, bm), ranges)), BD=64)


def edit_(x, W_enc, b_enc, b_dec, W_dec, k: int, feat_idx, tau, scale, rows_per_group: int):
    """In place, fire first: ``x += sum_j (scale_j - 1) f_j W_dec[feat_j]`` over edited selected features.

    Same semantics as :func:`saeuron.reference.edit_`; ``feat_idx`` int64 / ``tau``, ``scale`` float32
    ``[G, F]`` tables as :func:`saeuron.ops.edit_` passes them. Ids outside ``[0, M)`` never fire.
    """
    geom = _geometry(x)
    if geom is None:  # strides that do not flatten (h, w) into one token stride: edit a contiguous copy
        y = x.contiguous()
        edit_(y, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group)
        return x.copy_(y)
    n = geom[0]
    g, nf = feat_idx.shape
    if n == 0 or nf == 0 or g == 0:
        return x
    m, d = W_enc.shape
    rpg = max(int(rows_per_group), 1)
    c = folded_bias(W_enc, b_enc, b_dec)
    dot_f32, upcast = dot_mode(x.dtype)
    b = blocks(n, m, d, nf, x.dtype)
    r, fp, bk = b["R"], b["FP"], b["BK"]
    dev = x.device
    val = torch.empty(n, fp, dtype=torch.float32, device=dev)
    flag = torch.empty(n, dtype=torch.int32, device=dev)
    last = max(n - (g - 1) * rpg, min(rpg, n))  # the last table row takes every remaining token
    _select_kernel[(triton.cdiv(last, r), g)](x, W_enc, c, feat_idx, tau, scale, val, flag, n, m, d, *geom[1:],
                                              nf, g, rpg, R=r, FP=fp, BK=bk, DOT_F32=dot_f32, UPCAST=upcast)
    # compact candidate rows on the device: order[:count] = candidate rows, -1 after (no host sync)
    hit = flag.bool()
    pos = torch.where(hit, torch.cumsum(flag, 0) - 1, n)
    order = torch.full((n + 1,), -1, dtype=torch.int64, device=dev)
    order.scatter_(0, pos.long(), torch.arange(n, device=dev))
    cnt = torch.zeros(n, fp, dtype=torch.int32, device=dev)
    bm, mspan = b["BM"], b["MSPAN"]
    _count_kernel[(triton.cdiv(n, r), triton.cdiv(m, mspan))](
        order, x, W_enc, c, feat_idx, val, cnt, n, m, d, *geom[1:], nf, g, rpg, mspan,
        R=r, FP=fp, BM=bm, BK=bk, DOT_F32=dot_f32, UPCAST=upcast)
    bd = b["BD"]
    _apply_kernel[(triton.cdiv(n, r),)](order, x, W_dec, feat_idx, scale, val, cnt, n, d, *geom[1:], k, nf, g, rpg,
                                        R=r, FP=fp, BD=bd)
    return x
