"""Fused encoder GEMM + per-token top-k that never writes the ``[N, M]`` pre-activations.

``ReLU(W_enc (x - b_dec) + b_enc)`` is computed as ``ReLU(x W_enc^T + c)`` with the folded bias
``c = b_enc - W_enc b_dec`` (fp32, one GEMV launch, cached while the weights are unchanged). Then two
launches:

1. ``_tile_topk_kernel``: one program per ``[BN tokens, BM latents]`` tile runs the GEMM with fp32
   accumulation and keeps, per token, the tile's T largest values as packed int64 keys
   ``(fp32 bits << 32) | (IDX_MAX - latent)`` in a small ``[N, n_tiles, T]`` buffer. Non-negative
   floats order like their bits and the index part makes every key unique (ties go to the lower
   latent), so "larger key" is a strict total order. Programs are ordered weight-tile-major:
   neighbours share one ``W_enc`` tile (L2 reuse).
2. ``_merge_kernel``: per block of tokens, a k-way merge of the sorted per-tile lists. A tile whose
   T-th candidate made it into the top-k may have dropped one that belonged there; those rows are
   recomputed exactly in the same launch (``_exact_topk``: the whole row, a running top-k), so the
   result is always exactly the top-k of the fp32 pre-activations.

The GEMM tile helpers (``preact_tile``, ``token_offsets``) and ``folded_bias`` are shared with :mod:`.edit`.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_mode, next_pow2

IDX_MAX = tl.constexpr(2**31 - 1)  # (constexprs go right of tensors: the interpreter needs it)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
KEY_BIG = tl.constexpr(2**63 - 1)  # above every key (max key: fp32 max bits << 32): never the minimum


@triton.jit
def token_offsets(rows, HW, sxb, sxs):
    """Element offset of token ``rows`` (b, h, w order) in ``x``; tokens ``[N, d]`` use ``HW = N``."""
    r = rows.to(tl.int64)
    return (r // HW) * sxb + (r % HW) * sxs


@triton.jit
def preact_tile(x_ptr, W_ptr, c_ptr, xoff, rmask, cols, M, D, sxc,
             BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    """``ReLU(x W_enc^T + c)`` tile ``[BN, BM]`` in fp32 (``c = b_enc - W_enc b_dec``), NaN/inf -> 0, -1 off the matrix.

    The operands go to ``tl.dot`` untouched (no ``x - b_dec`` in registers), which keeps Hopper's
    wgmma pipelined for both token and NCHW layouts, and is at least as accurate for fp16/bf16.
    """
    cmask = cols < M
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        x = tl.load(x_ptr + xoff[:, None] + kk[None, :].to(tl.int64) * sxc,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W_ptr + cols[None, :].to(tl.int64) * D + kk[:, None],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)  # [BK, BM] = W_enc tile transposed
        if DOT_F32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        elif UPCAST:  # interpreter bf16: exact products of the bf16 values, summed in fp32 like the MMA
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    pre = acc + tl.load(c_ptr + cols, mask=cmask, other=0.0)[None, :]
    v = tl.where((pre > 0) & (pre <= FLT_MAX), pre, 0.0)  # ReLU; NaN and inf count as 0
    return tl.where(rmask[:, None] & cmask[None, :], v, -1.0)


@triton.jit
def _fold_bias_kernel(W_ptr, b_enc_ptr, b_dec_ptr, c_ptr, M, D, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        w = tl.load(W_ptr + rows.to(tl.int64)[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * tl.load(b_dec_ptr + kk, mask=kmask, other=0.0).to(tl.float32)[None, :], axis=1)
    tl.store(c_ptr + rows, tl.load(b_enc_ptr + rows, mask=rmask, other=0.0).to(tl.float32) - acc, mask=rmask)


@triton.jit
def _pack(v, col):
    """Packed key of a non-negative fp32 value and its latent index; -1 where ``v < 0`` (nothing)."""
    key = (v.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (-(col.to(tl.int64) - IDX_MAX))
    return tl.where(v >= 0, key, -1)


@triton.jit
def _tile_topk_kernel(x_ptr, W_ptr, c_ptr, cand_ptr, N, M, D, sxs, sxc, NT,
                      BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, T: tl.constexpr,
                      DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BN)
    pid_m = pid // n_row_blocks  # weight-tile-major order: consecutive programs share a W_enc tile
    pid_n = pid % n_row_blocks
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    cols = pid_m * BM + tl.arange(0, BM)
    xoff = rows.to(tl.int64) * sxs  # tokens [N, d]: contiguous offsets, vectorised loads
    v = preact_tile(x_ptr, W_ptr, c_ptr, xoff, rmask, cols, M, D, sxc, BN, BM, BK, DOT_F32, UPCAST)
    out = cand_ptr + rows.to(tl.int64) * NT * T + pid_m * T
    for t in tl.static_range(T):  # partial top-T, sorted descending; ties go to the lower latent
        m = tl.max(v, axis=1)
        c = tl.min(tl.where(v == m[:, None], cols[None, :], IDX_MAX), axis=1)
        tl.store(out + t, _pack(m, c), mask=rmask)
        v = tl.where(cols[None, :] == c[:, None], -1.0, v)


@triton.jit
def _merge_candidates(cand_ptr, rows, rmask, NT, k,
                      R: tl.constexpr, NTP: tl.constexpr, T: tl.constexpr, KP: tl.constexpr):
    """k-way merge of the sorted per-tile lists: ``(top [R, KP] keys sorted desc, overflow [R])``."""
    tiles = tl.arange(0, NTP)
    base = cand_ptr + rows.to(tl.int64)[:, None] * NT * T + tiles[None, :] * T
    heads = tl.load(base, mask=rmask[:, None] & (tiles < NT)[None, :], other=-1)
    pos = tl.zeros((R, NTP), dtype=tl.int32)
    kcols = tl.arange(0, KP)
    top = tl.full((R, KP), -1, tl.int64)
    for i in range(k):
        m = tl.max(heads, axis=1)
        top = tl.where(kcols[None, :] == i, m[:, None], top)
        hit = (heads == m[:, None]) & (m >= 0)[:, None]
        pos += hit.to(tl.int32)
        nxt = tl.load(base + pos, mask=hit & (pos < T), other=-1)
        heads = tl.where(hit, nxt, heads)
    # a tile whose T-th candidate is in the top-k may have dropped one that belongs there too
    return top, tl.max(pos, axis=1) >= T


@triton.jit
def _exact_topk(x_ptr, W_ptr, c_ptr, xoff, rmask, M, D, sxc, k,
                R: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    """Exact top-k keys ``[R, KP]`` (sorted desc) of whole rows: a running top-k over all latents."""
    kcols = tl.arange(0, KP)
    # slots < k start at distinct keys below every real key (-1 means "none"); slots >= k never change
    init = tl.where(kcols < k, -2 - kcols.to(tl.int64), KEY_BIG)
    best = tl.zeros((R, KP), dtype=tl.int64) + init[None, :]
    for m0 in range(0, M, BM):
        cols = m0 + tl.arange(0, BM)
        key = _pack(preact_tile(x_ptr, W_ptr, c_ptr, xoff, rmask, cols, M, D, sxc, R, BM, BK,
                             DOT_F32, UPCAST), cols[None, :])
        kth = tl.min(best, axis=1)
        cand = tl.where(key > kth[:, None], key, -1)
        while tl.max(cand) >= 0:  # insert this chunk's keys that beat the current k-th, largest first
            m = tl.max(cand, axis=1)
            ins = (m >= 0)[:, None] & (best == kth[:, None])
            best = tl.where(ins, m[:, None], best)
            kth = tl.min(best, axis=1)
            cand = tl.where((cand != m[:, None]) & (cand > kth[:, None]), cand, -1)
    rest = tl.where(kcols[None, :] < k, best, -1)
    top = tl.full((R, KP), -1, tl.int64)
    for i in range(k):
        m = tl.max(rest, axis=1)
        top = tl.where(kcols[None, :] == i, m[:, None], top)
        rest = tl.where(rest == m[:, None], -1, rest)
    return top


@triton.jit
def _row_topk(cand_ptr, x_ptr, W_ptr, c_ptr, rows, rmask, N, M, D, HW, sxb, sxs, sxc, NT, k,
              R: tl.constexpr, NTP: tl.constexpr, T: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
              BK: tl.constexpr, FULL: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    """Exact top-k keys ``[R, KP]`` of a block of tokens: merge the tiles, recompute overflowed rows."""
    top, overflow = _merge_candidates(cand_ptr, rows, rmask, NT, k, R, NTP, T, KP)
    if not FULL:  # with T == BM every tile kept everything: nothing can be lost
        if tl.max(overflow.to(tl.int32)) > 0:
            exact = _exact_topk(x_ptr, W_ptr, c_ptr, token_offsets(rows, HW, sxb, sxs),
                                rmask & overflow, M, D, sxc, k, R, KP, BM, BK, DOT_F32, UPCAST)
            top = tl.where(overflow[:, None], exact, top)
    return top


@triton.jit
def _key_value(key):
    """fp32 value packed in a key."""
    return (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    """Latent index packed in a key."""
    return -((key - ((key >> 32) << 32)) - IDX_MAX)


@triton.jit
def _merge_kernel(cand_ptr, x_ptr, W_ptr, c_ptr, val_ptr, idx_ptr,
                  N, M, D, HW, sxb, sxs, sxc, NT, k,
                  R: tl.constexpr, NTP: tl.constexpr, T: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
                  BK: tl.constexpr, FULL: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < N
    top = _row_topk(cand_ptr, x_ptr, W_ptr, c_ptr, rows, rmask, N, M, D, HW, sxb, sxs, sxc,
                    NT, k, R, NTP, T, KP, BM, BK, FULL, DOT_F32, UPCAST)
    kcols = tl.arange(0, KP)
    out = rows.to(tl.int64)[:, None] * k + kcols[None, :]
    omask = rmask[:, None] & (kcols < k)[None, :]
    tl.store(val_ptr + out, _key_value(top).to(val_ptr.dtype.element_ty), mask=omask)
    tl.store(idx_ptr + out, _key_index(top), mask=omask)


def plan(n: int, m: int, d: int, k: int, dtype: torch.dtype = torch.float16) -> dict:
    """Block sizes for the two encoder launches."""
    if INTERPRET:  # big blocks: the interpreter pays per operation and per program, hardly per element
        bm, bn, bk = min(512, max(16, next_pow2(m))), min(128, max(16, next_pow2(n))), min(128, max(16, next_pow2(d)))
        r, warps = bn, 4
    else:
        bm, bn = min(128, max(16, next_pow2(m))), (64 if n <= 2048 else 128)
        bk = 32 if dtype == torch.float32 else 64  # fp32 tiles: keep 3 pipeline stages in shared memory
        r, warps = 16, (4 if n <= 2048 else 8)
    nt = triton.cdiv(m, bm)
    # T well above the expected k * BM / M hits per tile, so overflow (and its exact recompute) stays rare
    t = min(bm, max(8, next_pow2(triton.cdiv(4 * k, nt))))
    return dict(BN=bn, BM=bm, BK=bk, T=t, NT=nt, NTP=next_pow2(nt), KP=next_pow2(k), R=r, FULL=t >= bm,
                warps=warps, merge_warps=8)


_FOLDED: OrderedDict = OrderedDict()  # (ptrs, versions, ...) -> (weakrefs to the tensors, c)


def folded_bias(W_enc, b_enc, b_dec):
    """``c = b_enc - W_enc b_dec`` in fp32 ``[M]`` (one GEMV launch), cached while the weights are unchanged.

    The cache is keyed by storage, shape, dtype and version counter, and checks the tensors are the same
    objects (weak references), so in-place updates (optimiser steps, ``copy_``) and reused memory recompute
    it. Inference tensors have no version counter and are never cached. A CUDA graph captured after a
    cache hit keeps that ``c``: re-capture after changing the weights in place.
    """
    ts = (W_enc, b_enc, b_dec)
    try:
        key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device)) for t in ts)
    except RuntimeError:
        key = None
    hit = _FOLDED.get(key) if key is not None else None
    if hit is not None and all(r() is t for r, t in zip(hit[0], ts)):
        _FOLDED.move_to_end(key)
        return hit[1]
    m, d = W_enc.shape
    c = torch.empty(m, dtype=torch.float32, device=W_enc.device)
    bm = min(256 if INTERPRET else 64, next_pow2(m))
    _fold_bias_kernel[(triton.cdiv(m, bm),)](W_enc, b_enc, b_dec, c, m, d, BM=bm, BK=min(128, max(16, next_pow2(d))),
                                             num_warps=4)
    if key is not None:
        _FOLDED[key] = (tuple(weakref.ref(t) for t in ts), c)
        while len(_FOLDED) > 64:  # one entry per SAE in use (e.g. 16 hooks), [M] fp32 each
            _FOLDED.popitem(last=False)
    return c


def launch_tiles(x, W_enc, c, p):
    """First launch: per-tile top-T candidate keys ``[N, NT, T]`` of the tokens ``x [N, d]``."""
    n = x.shape[0]
    m, d = W_enc.shape
    dot_f32, upcast = dot_mode(x.dtype)
    cand = torch.empty(n, p["NT"], p["T"], dtype=torch.int64, device=x.device)
    grid = (p["NT"] * triton.cdiv(n, p["BN"]),)
    _tile_topk_kernel[grid](x, W_enc, c, cand, n, m, d, x.stride(0), x.stride(1), p["NT"],
                            BN=p["BN"], BM=p["BM"], BK=p["BK"], T=p["T"], DOT_F32=dot_f32, UPCAST=upcast,
                            num_warps=p["warps"], num_stages=3)
    return cand


def topk_encode(x, W_enc, b_enc, b_dec, k: int):
    """Per-token top-k of ``ReLU(W_enc (x - b_dec) + b_enc)``: ``(values [N, k] x.dtype desc, indices int64)``.

    Arguments as :func:`saeuron.ops.topk_encode` validated them; ``x [N, d]`` may be strided.
    """
    n, d = x.shape
    m = W_enc.shape[0]
    vals = torch.empty(n, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if n == 0:
        return vals, idx
    W_enc = W_enc.contiguous()
    c = folded_bias(W_enc, b_enc.contiguous(), b_dec.contiguous())
    p = plan(n, m, d, k, x.dtype)
    geom = (n, max(n, 1), 0, x.stride(0), x.stride(1))
    cand = launch_tiles(x, W_enc, c, p)
    dot_f32, upcast = dot_mode(x.dtype)
    _merge_kernel[(triton.cdiv(n, p["R"]),)](
        cand, x, W_enc, c, vals, idx, n, m, d, *geom[1:], p["NT"], k,
        R=p["R"], NTP=p["NTP"], T=p["T"], KP=p["KP"], BM=p["BM"], BK=p["BK"], FULL=p["FULL"],
        DOT_F32=dot_f32, UPCAST=upcast, num_warps=p["merge_warps"])
    return vals, idx
