"""Sparse decode: ``out = sum_j values[:, j] W_dec[indices[:, j]] (+ b_dec) (+ residual)`` in one launch.

Each program gathers the ``k`` decoder rows of a few tokens for one slice of ``d`` and sums them in
fp32; bias and residual are fused into the same pass. Zero codes and indices outside ``[0, M)``
load nothing (they contribute 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, next_pow2


@triton.jit
def _sparse_decode_kernel(v_ptr, i_ptr, W_ptr, b_ptr, r_ptr, out_ptr, N, K, M, D,
                          HAS_B: tl.constexpr, HAS_R: tl.constexpr,
                          R: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    dc = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask, dmask = rows < N, dc < D
    kc = tl.arange(0, KP)
    code = rows.to(tl.int64)[:, None] * K + kc[None, :]
    cmask = rmask[:, None] & (kc < K)[None, :]
    idx = tl.load(i_ptr + code, mask=cmask, other=0)
    v = tl.load(v_ptr + code, mask=cmask, other=0.0).to(tl.float32)
    live = cmask & (v != 0) & (idx >= 0) & (idx < M)
    w = tl.load(W_ptr + idx[:, :, None] * D + dc[None, None, :], mask=live[:, :, None] & dmask[None, None, :],
                other=0.0).to(tl.float32)
    acc = tl.sum(v[:, :, None] * w, axis=1)
    if HAS_B:
        acc += tl.load(b_ptr + dc, mask=dmask, other=0.0).to(tl.float32)[None, :]
    out = rows.to(tl.int64)[:, None] * D + dc[None, :]
    omask = rmask[:, None] & dmask[None, :]
    if HAS_R:
        acc += tl.load(r_ptr + out, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=omask)


def row_blocks(n: int, k: int, d: int) -> tuple[int, int]:
    """``(rows per program, d slice)`` for the gather kernels: ``[R, k, BD]`` tiles of modest size."""
    kp = next_pow2(k)
    if INTERPRET:  # few big programs: the interpreter pays per operation
        return min(64, max(2, next_pow2(n))), min(256, max(16, next_pow2(d)))
    return max(1, min(16, 4096 // (kp * 32))), 32  # [R, k, 32] tiles of <= 4096 elements: no spills


def sparse_decode(values, indices, W_dec, b_dec=None, residual=None):
    """``sum_j values[:, j] W_dec[indices[:, j]] (+ b_dec) (+ residual)`` as ``[N, d]`` in W_dec.dtype.

    Arguments as :func:`saeuron.ops.sparse_decode` validated them; ids outside ``[0, M)`` are masked.
    """
    n, k = values.shape
    m, d = W_dec.shape
    out = torch.empty(n, d, dtype=W_dec.dtype, device=W_dec.device)
    if n == 0 or d == 0:
        return out
    r, bd = row_blocks(n, k, d)
    W = W_dec.contiguous()
    _sparse_decode_kernel[(triton.cdiv(n, r), triton.cdiv(d, bd))](
        values.contiguous(), indices.contiguous(), W,
        W if b_dec is None else b_dec.contiguous(), W if residual is None else residual.contiguous(), out,
        n, k, m, d, HAS_B=b_dec is not None, HAS_R=residual is not None, R=r, KP=next_pow2(k), BD=bd,
        num_warps=4)
    return out
