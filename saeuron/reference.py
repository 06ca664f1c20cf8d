"""Pure PyTorch ground truth for every hot op.

These functions define what each op computes. Every faster backend (Triton in
``saeuron.kernels``, the compiled extension from ``csrc/``) is tested against them, and they
are the CPU path when nothing faster is available. They favour clarity over speed, but
accumulate in fp32 exactly as the kernels must.

Shapes: ``x [N, d]`` tokens (or ``[B, C, H, W]`` for :func:`edit_`), ``W_enc [M, d]``,
``b_enc [M]``, ``b_dec [d]``, ``W_dec [M, d]``; sparse codes are ``values [N, k]`` with
``indices [N, k]`` (int64).
"""
from __future__ import annotations

import torch


def _f(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32 for half types, unchanged for fp32/fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scatter_rows(index: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """``out[index[n, j]] += weight[n, j] * rows[n]`` as ``[m, d]``: a sparse [m, N] x dense [N, d] product.

    Far faster than ``index_add_`` on the CPU, and it never forms a dense [N, m] matrix.
    """
    n, k = index.shape
    cols = torch.arange(n, device=index.device).repeat_interleave(k)
    s = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), cols]), weight.reshape(-1).to(rows.dtype), (m, n),
                                check_invariants=False)
    return torch.sparse.mm(s, rows)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B*H*W, C]`` (row order b, h, w); ``[N, d]`` is returned as is."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x


def from_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_tokens` for a tensor shaped like ``like``."""
    if like.dim() == 4:
        b, c, h, w = like.shape
        return t.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return t


def preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Dense ``ReLU(W_enc (x - b_dec) + b_enc)`` in fp32, ``[N, M]``."""
    xf = _f(x) - _f(b_dec)
    return torch.relu(xf @ _f(W_enc).t() + _f(b_enc))


def topk_encode(x, W_enc, b_enc, b_dec, k: int):
    """Per-token top-k of the ReLU pre-activations: ``(values [N, k] in x.dtype, indices [N, k])``.

    Values are sorted in descending order. Non-finite inputs do not raise: NaN is treated as
    0 so a corrupt token yields an all-zero code rather than a crash.
    """
    pre = preacts(x, W_enc, b_enc, b_dec)
    pre = torch.nan_to_num(pre, nan=0.0, posinf=0.0, neginf=0.0)
    vals, idx = pre.topk(k, dim=-1, sorted=True)
    return vals.to(x.dtype), idx


def gather_encode(x, W_enc, b_enc, b_dec, indices):
    """Pre-activations at given latents: ``ReLU((x - b_dec) . W_enc[i] + b_enc[i])``, ``[N, k]``.

    Training selects latents without gradients (top-k or batch top-k) and then recomputes
    their values with this differentiable op, so no dense ``[N, M]`` gradient ever exists.
    """
    xf = (_f(x) - _f(b_dec)).unsqueeze(1)  # [N, 1, d]
    w = _f(W_enc)[indices]  # [N, k, d]
    pre = (xf * w).sum(-1) + _f(b_enc)[indices]
    return torch.relu(pre).to(x.dtype)


def gather_encode_backward(grad_values, x, W_enc, b_dec, indices, values):
    """Gradients of :func:`gather_encode` w.r.t. ``(x, W_enc, b_enc, b_dec)``.

    Only the rows of ``W_enc``/``b_enc`` named in ``indices`` receive gradient (via index_add).
    """
    g = _f(grad_values) * (values > 0)  # ReLU gate, [N, k]
    xc = _f(x) - _f(b_dec)  # [N, d]
    w = _f(W_enc)[indices]  # [N, k, d]
    grad_x = (g.unsqueeze(-1) * w).sum(1)  # [N, d]
    m = W_enc.shape[0]
    grad_W = _scatter_rows(indices, g, xc, m)
    grad_b_enc = torch.zeros(m, dtype=g.dtype, device=W_enc.device).index_add_(0, indices.reshape(-1), g.reshape(-1))
    grad_b_dec = -grad_x.sum(0)
    return grad_x.to(x.dtype), grad_W.to(W_enc.dtype), grad_b_enc.to(W_enc.dtype), grad_b_dec.to(b_dec.dtype)


def sparse_decode(values, indices, W_dec, b_dec=None, residual=None):
    """``sum_j values[:, j] * W_dec[indices[:, j]] (+ b_dec) (+ residual)``, ``[N, d]`` in W_dec.dtype."""
    out = (_f(values).unsqueeze(-1) * _f(W_dec)[indices]).sum(1)
    if b_dec is not None:
        out = out + _f(b_dec)
    if residual is not None:
        out = out + _f(residual)
    return out.to(W_dec.dtype)


def sparse_decode_backward(grad_out, values, indices, W_dec):
    """Gradients of :func:`sparse_decode` w.r.t. ``(values, W_dec, b_dec)``; only used rows of W_dec."""
    g = _f(grad_out)  # [N, d]
    w = _f(W_dec)[indices]  # [N, k, d]
    grad_values = (w * g.unsqueeze(1)).sum(-1)
    grad_W = _scatter_rows(indices, _f(values), g, W_dec.shape[0])
    grad_b_dec = g.sum(0)
    return grad_values.to(values.dtype), grad_W.to(W_dec.dtype), grad_b_dec.to(W_dec.dtype)


def topk_member(pre: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Whether latent ``ids[n, j]`` is among the top ``k`` of row ``n`` of ``pre [N, M]``, as ``[N, F]`` bools.

    The tie rule is explicit: larger value first, then lower latent index (a stable descending sort).
    Decided by counting, exactly and without sorting: a value above the row's k-th largest value is in,
    one below is out, and one equal to it is in iff fewer than k latents beat it (all those above the
    k-th value, plus the equal ones at a lower index). No host synchronisation (graph-capturable).
    """
    n, m = pre.shape
    kth = pre.topk(k, dim=-1).values[:, -1:]  # the k-th largest value, whatever the order of ties
    v = pre.gather(1, ids)
    above = (pre > kth).sum(-1, keepdim=True)
    before = torch.empty_like(ids)
    rows = max(1, (1 << 22) // max(m, 1))  # equal-to-kth counts below each id, a few rows at a time
    for r0 in range(0, n, rows):
        eq = (pre[r0:r0 + rows] == kth[r0:r0 + rows]).to(torch.int32).cumsum(-1)  # [rows, M]
        before[r0:r0 + rows] = eq.gather(1, ids[r0:r0 + rows]) - 1  # ties at lower indices (v == kth)
    return (v > kth) | ((v == kth) & (above + before < k))


def edit_delta(x_tok, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group):
    """The fp32 change ``sum_i (f'_i - f_i) W_dec[i]`` that the unlearning edit adds to each token.

    ``feat_idx/tau/scale`` are ``[G, F]`` tables: row ``r`` of ``x_tok`` uses table row
    ``min(r // rows_per_group, G - 1)``. Feature ``feat_idx[g, j]`` is edited on a token when it is
    among the token's top-k latents (of the fp32 ReLU pre-activations, NaN/inf as 0, ties: larger value
    first, then lower index, see :func:`topk_member`) and its value, rounded to ``x.dtype``, exceeds
    ``tau[g, j]``; its value becomes ``scale[g, j] * f``. Padding entries (``tau = inf``, ``scale = 1``
    or an id outside ``[0, M)``) never change anything. Rows holding a non-finite value get a zero
    delta (they pass through unchanged). This ground truth computes every token's dense pre-activations;
    the backends compute them only for tokens where a selected feature passes its threshold.
    """
    n = x_tok.shape[0]
    if n == 0 or feat_idx.numel() == 0:
        return torch.zeros(x_tok.shape, dtype=_f(x_tok).dtype, device=x_tok.device)
    pre = torch.nan_to_num(preacts(x_tok, W_enc, b_enc, b_dec), nan=0.0, posinf=0.0, neginf=0.0)
    g = feat_idx.shape[0]
    rows = torch.arange(n, device=x_tok.device)
    grp = torch.clamp(rows // max(int(rows_per_group), 1), max=g - 1)
    fi, ta, sc = feat_idx[grp], _f(tau)[grp], _f(scale)[grp]  # [N, F]
    valid = (fi >= 0) & (fi < W_enc.shape[0])
    fi = torch.where(valid, fi, torch.zeros_like(fi))
    f = _f(pre.gather(1, fi).to(x_tok.dtype))  # [N, F] codes are rounded to x.dtype
    fire = valid & topk_member(pre, fi, k) & (f > ta)
    coef = torch.where(fire, (sc - 1.0) * f, torch.zeros_like(f))  # [N, F]
    delta = (coef.unsqueeze(-1) * _f(W_dec)[fi]).sum(1)  # [N, d]
    finite = torch.isfinite(x_tok).all(-1, keepdim=True)
    return torch.where(finite, delta, torch.zeros_like(delta))


def edit_(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group):
    """In-place unlearning edit of ``x`` (``[N, d]`` tokens or ``[B, C, H, W]``): ``x += delta``.

    ``out = decode(f') + (x - decode(f)) = x + sum_i (f'_i - f_i) W_dec[i]``: the reconstruction
    error is kept, so a token none of whose selected features fire is left bit-for-bit unchanged.
    """
    xt = as_tokens(x)
    delta = edit_delta(xt, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group)
    upd = (_f(xt) + delta).to(x.dtype)
    changed = (delta != 0).any(-1, keepdim=True)
    upd = torch.where(changed, upd, xt)
    x.copy_(from_tokens(upd, x))


def reference_compat_edit(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group, grad=False):
    """The published reference code's edit, sign slip included: ``decode(f') + decode(f) - x``.

    Compatibility option only (``patch(..., error_term="reference")``). The method adds the
    reconstruction error back, ``decode(f') + (x - decode(f))``; the reference code adds
    ``decode(f) - x`` instead, which shifts every token, edited or not, by twice its reconstruction
    error ``2 (decode(f) - x)``. ``grad=True`` encodes with the differentiable :func:`topk_encode`;
    otherwise the fast ops of :mod:`saeuron.ops` are used (imported here: ``ops`` imports this module).
    """
    from . import ops

    xt = as_tokens(x)
    enc = topk_encode if grad else ops.topk_encode
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
    return from_tokens(out.to(x.dtype), x)
