"""Training ops with sparse gradients: only the ``k`` chosen latents per token are touched.

- ``gather_encode``: ``ReLU((x - b_dec) . W_enc[i] + b_enc[i])`` at given latents ``i`` (``[N, k]``).
- ``gather_encode_bwd``: its gradients; ``W_enc``/``b_enc`` rows receive fp32 atomic adds at the
  chosen indices, ``b_dec`` the per-program column sums of ``-grad_x``.
- ``sparse_decode_bwd``: gradients of :func:`.sparse_decode` w.r.t. values, ``W_dec`` and ``b_dec``.

Each program handles ``R`` tokens and walks ``d`` in slices with ``[R, k, BD]`` gathers; nothing
dense of size ``[N, M]`` exists. Parameter gradients are accumulated in fp32 and cast at the end.
Atomic accumulation makes the summation order (not the math) nondeterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, next_pow2
from .sparse_decode import row_blocks


@triton.jit
def _codes(i_ptr, rows, rmask, K, M, R: tl.constexpr, KP: tl.constexpr):
    """Offsets ``[R, KP]`` of a block's codes, their indices, and masks of existing and in-range codes."""
    kc = tl.arange(0, KP)
    code = rows.to(tl.int64)[:, None] * K + kc[None, :]
    cmask = rmask[:, None] & (kc < K)[None, :]
    idx = tl.load(i_ptr + code, mask=cmask, other=0)
    return code, idx, cmask, cmask & (idx >= 0) & (idx < M)


@triton.jit
def _gather_encode_kernel(x_ptr, W_ptr, be_ptr, bd_ptr, i_ptr, out_ptr, N, K, M, D,
                          R: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < N
    code, idx, cmask, live = _codes(i_ptr, rows, rmask, K, M, R, KP)
    acc = tl.zeros((R, KP), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dc = d0 + tl.arange(0, BD)
        dmask = dc < D
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + dc[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        xc = x - tl.load(bd_ptr + dc, mask=dmask, other=0.0).to(tl.float32)[None, :]
        w = tl.load(W_ptr + idx[:, :, None] * D + dc[None, None, :], mask=live[:, :, None] & dmask[None, None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * xc[:, None, :], axis=2)
    pre = acc + tl.load(be_ptr + idx, mask=live, other=0.0).to(tl.float32)
    pre = tl.where(pre < 0, 0.0, pre)  # ReLU that keeps NaN, like torch.relu
    tl.store(out_ptr + code, pre.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gather_encode_bwd_kernel(gv_ptr, x_ptr, W_ptr, bd_ptr, i_ptr, v_ptr, gx_ptr, gW_ptr, gbe_ptr, gbd_ptr,
                              N, K, M, D, R: tl.constexpr, SUB: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    # d slices outside, SUB blocks of R tokens inside: one b_dec atomic per slice per program
    for d0 in range(0, D, BD):
        dc = d0 + tl.arange(0, BD)
        dmask = dc < D
        bd = tl.load(bd_ptr + dc, mask=dmask, other=0.0).to(tl.float32)
        bacc = tl.zeros((BD,), dtype=tl.float32)
        for s in range(SUB):
            rows = (tl.program_id(0) * SUB + s) * R + tl.arange(0, R)
            rmask = rows < N
            code, idx, cmask, live = _codes(i_ptr, rows, rmask, K, M, R, KP)
            gv = tl.load(gv_ptr + code, mask=live, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + code, mask=live, other=0.0).to(tl.float32)
            g = tl.where(v > 0, gv, 0.0)  # ReLU gate
            active = live & (g != 0)
            tl.atomic_add(gbe_ptr + idx, g, mask=active & (d0 == 0))
            xy = rows.to(tl.int64)[:, None] * D + dc[None, :]
            xmask = rmask[:, None] & dmask[None, :]
            wo = idx[:, :, None] * D + dc[None, None, :]
            wmask = active[:, :, None] & dmask[None, None, :]
            w = tl.load(W_ptr + wo, mask=wmask, other=0.0).to(tl.float32)
            gx = tl.sum(g[:, :, None] * w, axis=1)
            tl.store(gx_ptr + xy, gx.to(gx_ptr.dtype.element_ty), mask=xmask)
            bacc += tl.sum(gx, axis=0)
            xc = tl.load(x_ptr + xy, mask=xmask, other=0.0).to(tl.float32) - bd[None, :]
            tl.atomic_add(gW_ptr + wo, g[:, :, None] * xc[:, None, :], mask=wmask)
        tl.atomic_add(gbd_ptr + dc, -bacc, mask=dmask)


@triton.jit
def _sparse_decode_bwd_kernel(go_ptr, v_ptr, i_ptr, W_ptr, gv_ptr, gW_ptr, gb_ptr, N, K, M, D,
                              R: tl.constexpr, SUB: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    for s in range(SUB):  # values and W_dec: tokens outside (grad_values needs all of d), d slices inside
        rows = (tl.program_id(0) * SUB + s) * R + tl.arange(0, R)
        rmask = rows < N
        code, idx, cmask, live = _codes(i_ptr, rows, rmask, K, M, R, KP)
        v = tl.load(v_ptr + code, mask=live, other=0.0).to(tl.float32)
        gv = tl.zeros((R, KP), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dc = d0 + tl.arange(0, BD)
            dmask = dc < D
            g = tl.load(go_ptr + rows.to(tl.int64)[:, None] * D + dc[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            wo = idx[:, :, None] * D + dc[None, None, :]
            wmask = live[:, :, None] & dmask[None, None, :]
            w = tl.load(W_ptr + wo, mask=wmask, other=0.0).to(tl.float32)
            gv += tl.sum(w * g[:, None, :], axis=2)
            tl.atomic_add(gW_ptr + wo, v[:, :, None] * g[:, None, :], mask=wmask & (v != 0)[:, :, None])
        tl.store(gv_ptr + code, gv.to(gv_ptr.dtype.element_ty), mask=cmask)
    for d0 in range(0, D, BD):  # b_dec: column sums of this program's tokens, one atomic per slice
        dc = d0 + tl.arange(0, BD)
        dmask = dc < D
        bacc = tl.zeros((BD,), dtype=tl.float32)
        for s in range(SUB):
            rows = (tl.program_id(0) * SUB + s) * R + tl.arange(0, R)
            g = tl.load(go_ptr + rows.to(tl.int64)[:, None] * D + dc[None, :],
                        mask=(rows < N)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            bacc += tl.sum(g, axis=0)
        tl.atomic_add(gb_ptr + dc, bacc, mask=dmask)


def _sub_blocks(n: int, r: int) -> int:
    """Row blocks per program of the backward kernels: ~32 tokens per program on GPUs (fewer bias atomics)."""
    return 1 if INTERPRET else max(1, min(32 // r, triton.cdiv(n, r)))


def gather_encode(x, W_enc, b_enc, b_dec, indices):
    """Pre-activations at given latents ``ReLU((x - b_dec) . W_enc[i] + b_enc[i])``, ``[N, k]`` in x.dtype."""
    n, k = indices.shape
    m, d = W_enc.shape
    out = torch.empty(n, k, dtype=x.dtype, device=x.device)
    if n == 0 or k == 0:
        return out
    r, bd = row_blocks(n, k, d)
    _gather_encode_kernel[(triton.cdiv(n, r),)](
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(),
        indices.contiguous(), out, n, k, m, d, R=r, KP=next_pow2(k), BD=bd, num_warps=4)
    return out


def gather_encode_bwd(grad_values, x, W_enc, b_dec, indices, values):
    """Gradients of :func:`gather_encode` w.r.t. ``(x, W_enc, b_enc, b_dec)``; only indexed rows get any."""
    n, k = indices.shape
    m, d = W_enc.shape
    launch = bool(n and k and d)
    grad_x = (torch.empty if launch else torch.zeros)(n, d, dtype=x.dtype, device=x.device)
    grad_W = torch.zeros(m, d, dtype=torch.float32, device=x.device)
    grad_be = torch.zeros(m, dtype=torch.float32, device=x.device)
    grad_bd = torch.zeros(d, dtype=torch.float32, device=x.device)
    if launch:
        r, bd = row_blocks(n, k, d)
        sub = _sub_blocks(n, r)
        _gather_encode_bwd_kernel[(triton.cdiv(n, r * sub),)](
            grad_values.contiguous(), x.contiguous(), W_enc.contiguous(), b_dec.contiguous(),
            indices.contiguous(), values.contiguous(), grad_x, grad_W, grad_be, grad_bd,
            n, k, m, d, R=r, SUB=sub, KP=next_pow2(k), BD=bd, num_warps=4)
    return grad_x, grad_W.to(W_enc.dtype), grad_be.to(W_enc.dtype), grad_bd.to(b_dec.dtype)


def sparse_decode_bwd(grad_out, values, indices, W_dec):
    """Gradients of :func:`.sparse_decode` w.r.t. ``(values, W_dec, b_dec)``; only indexed W_dec rows get any."""
    n, k = indices.shape
    m, d = W_dec.shape
    grad_v = (torch.empty if d else torch.zeros)(n, k, dtype=values.dtype, device=values.device)
    grad_W = torch.zeros(m, d, dtype=torch.float32, device=W_dec.device)
    grad_b = torch.zeros(d, dtype=torch.float32, device=W_dec.device)
    if n and d:
        r, bd = row_blocks(n, k, d)
        sub = _sub_blocks(n, r)
        _sparse_decode_bwd_kernel[(triton.cdiv(n, r * sub),)](
            grad_out.contiguous(), values.contiguous(), indices.contiguous(), W_dec.contiguous(),
            grad_v, grad_W, grad_b, n, k, m, d, R=r, SUB=sub, KP=next_pow2(k), BD=bd, num_warps=4)
    return grad_v, grad_W.to(W_dec.dtype), grad_b.to(W_dec.dtype)
