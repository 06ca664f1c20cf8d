"""The one seam for hot ops: picks, per op and device, the compiled extension, Triton or PyTorch.

Every op is a ``torch.library`` custom op (``saeuron::<name>``) with a fake implementation, so
``torch.compile`` sees one opaque node and CUDA graph capture works. The body of each op calls
the implementation of the backend chosen for the op and the tensors' device:

- ``cuda``: the extension built just in time from ``csrc/`` (CUDA kernels for GPU tensors, C++
  for CPU tensors; ops it lacks for a device fall through to the next backend);
- ``triton``: the kernels in ``saeuron.kernels`` (GPU, or CPU under ``TRITON_INTERPRET=1``);
- ``torch``: :mod:`saeuron.reference`, always available.

Automatic choice follows :data:`AUTO_ORDER`, a static order per device type and op justified by
the measured tables in ``benchmarks/RESULTS.md``: on the CPU the C++ fire-first edit (about 0.01x,
0.1x and 1.1x the dense encoder GEMM with 0, 5 and 100 % of the tokens firing) beats the reference
(2-6x), while the reference's MKL GEMM + topk stays the CPU path of the training ops. ``SAEURON_BACKEND=cuda|triton|torch`` (or :func:`set_backend`) forces
a backend; when it cannot serve an op the next one in :data:`BACKENDS` is used. Whenever a faster
backend than the one used cannot run, one warning says why.

Arguments are validated here, once; the backends trust them (no second check on the hot path).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from . import reference

BACKENDS = ("cuda", "triton", "torch")
#: The hot ops, declared once: each backend implements them as attributes of the same name.
OPS = ("topk_encode", "sparse_decode", "gather_encode", "gather_encode_bwd", "sparse_decode_bwd", "edit_")
#: Automatic backend order per device type and op (ops not named: the device's ``"*"`` entry).
#: CPU (measured, benchmarks/RESULTS.md): the compiled fire-first edit beats the reference 3-400x;
#: the other ops stay on the reference (MKL GEMM + topk). GPU (no kernel has been timed on a GPU yet;
#: benchmarks/gpu_session.sh times them all): the Triton edit skips the dense GEMM for row blocks with
#: no candidate, the CUDA edit always runs it (cuBLAS, no host sync), so Triton comes first; top-k
#: encode keeps cuBLAS + torch.topk, the only GPU timing on record (performance.md), ahead of the
#: unmeasured fused kernels.
AUTO_ORDER = {
    "cpu": {"edit_": ("cuda", "torch"), "*": ("torch",)},
    "cuda": {"edit_": ("triton", "cuda", "torch"), "topk_encode": ("torch", "triton", "cuda"), "*": BACKENDS},
}

_forced: Optional[str] = None
_modules: dict = {}
_load_errors: dict = {}
_choice: dict = {}
_warned: set = set()


class _TorchBackend:
    """Adapter exposing :mod:`saeuron.reference` under the backend interface."""

    name = "torch"
    topk_encode = staticmethod(reference.topk_encode)
    sparse_decode = staticmethod(reference.sparse_decode)
    gather_encode = staticmethod(reference.gather_encode)
    gather_encode_bwd = staticmethod(reference.gather_encode_backward)
    sparse_decode_bwd = staticmethod(reference.sparse_decode_backward)
    edit_ = staticmethod(reference.edit_)

    @staticmethod
    def supports(op: str, device: torch.device) -> bool:
        return True


def _load(name: str):
    """Import (and for ``cuda`` build) a backend once; ``None`` with the reason kept if it fails."""
    if name in _modules:
        return _modules[name]
    mod = None
    try:
        if name == "torch":
            mod = _TorchBackend
        elif name == "triton":
            from .kernels import backend as mod  # noqa: F811  (saeuron.kernels: the kernels/ folder)
        elif name == "cuda":
            from . import extension

            mod = extension.load_backend()
    except Exception as e:  # a missing compiler, triton or a failed build must never be fatal
        _load_errors[name] = f"{type(e).__name__}: {e}"
        mod = None
    _modules[name] = mod
    return mod


def requested_backend() -> Optional[str]:
    """The forced backend (``set_backend`` or ``SAEURON_BACKEND``), or None for automatic."""
    name = _forced or os.environ.get("SAEURON_BACKEND", "").strip().lower() or None
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"SAEURON_BACKEND={name!r} is not a backend; valid: {', '.join(BACKENDS)} or auto")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for this process (``None`` or ``"auto"`` restores automatic choice)."""
    global _forced
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)} or auto")
    _forced = None if name == "auto" else name
    _choice.clear()


def _candidates(op: str, device: torch.device) -> tuple:
    forced = requested_backend()
    if forced is not None:
        return BACKENDS[BACKENDS.index(forced):]
    order = AUTO_ORDER.get(device.type, {})
    return order.get(op, order.get("*", ("torch",)))


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _selfcheck(fn, op: str, device: torch.device) -> Optional[str]:
    """Run ``fn`` once on small random fp16 inputs and compare with the reference; the reason if it differs.

    Run once per backend, op and GPU before a compiled kernel is trusted with real work, so a kernel that
    is wrong on this device (driver, architecture) falls back instead of silently corrupting images.
    """
    g = torch.Generator().manual_seed(1234)
    n, d, m, k, dt = 37, 64, 384, 8, torch.float16
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dt)  # noqa: E731
    x, W_enc, b_enc, b_dec, W_dec = r(n, d), r(m, d, sc=d ** -0.5), r(m, sc=0.1), r(d, sc=0.1), r(m, d, sc=0.2)
    _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    vals = reference.gather_encode(x, W_enc, b_enc, b_dec, idx)
    gv = r(n, k)
    feat = idx[:3, 0][None]
    tau, scale = torch.zeros(1, 3, device=device), torch.full((1, 3), -2.0, device=device)
    cases = {
        "topk_encode": lambda f: (f(x, W_enc, b_enc, b_dec, k)[0], reference.topk_encode(x, W_enc, b_enc, b_dec, k)[0]),
        "sparse_decode": lambda f: (f(vals, idx, W_dec, b_dec, x), reference.sparse_decode(vals, idx, W_dec, b_dec, x)),
        "gather_encode": lambda f: (f(x, W_enc, b_enc, b_dec, idx), vals),
        "gather_encode_bwd": lambda f: (torch.cat([t.float().flatten() for t in f(gv, x, W_enc, b_dec, idx, vals)]),
                                        torch.cat([t.float().flatten() for t in reference.gather_encode_backward(
                                            gv, x, W_enc, b_dec, idx, vals)])),
        "sparse_decode_bwd": lambda f: (torch.cat([t.float().flatten() for t in f(x, vals, idx, W_dec)]),
                                        torch.cat([t.float().flatten() for t in reference.sparse_decode_backward(
                                            x, vals, idx, W_dec)])),
        "edit_": lambda f: (_run_edit(f, x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale),
                            _run_edit(reference.edit_, x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale)),
    }
    try:
        got, want = cases[op](fn)
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6))
        return None if err < 2e-2 else f"self-check against the reference failed (relative error {err:.3g})"
    except Exception as e:  # noqa: BLE001  any failure means: do not use this kernel here
        return f"self-check raised {type(e).__name__}: {e}"


def _run_edit(fn, x, *args):
    y = x.clone()
    fn(y, *args, x.shape[0])
    return y


def backend_for(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``."""
    key = (op, device.type, requested_backend())
    if key in _choice:
        return _choice[key][0]
    cands = _candidates(op, device)
    for i, name in enumerate(cands):
        mod = _load(name)
        if mod is not None and hasattr(mod, op) and mod.supports(op, device):
            if device.type == "cuda" and name != "torch":
                why = _selfcheck(getattr(mod, op), op, device)
                if why is not None:
                    _load_errors[name] = f"{op}: {why}"
                    continue
            if i > 0:
                why = "; ".join(f"{c}: {_load_errors.get(c, 'does not implement ' + op + ' on ' + device.type)}" for c in cands[:i])
                _warn_once(("fallback",) + cands[:i] + (device.type,),
                           f"saeuron: faster backend unavailable for {op} on {device.type} ({why}); using {name}. "
                           f"Set SAEURON_BACKEND to choose explicitly.")
            _choice[key] = (name, getattr(mod, op))
            return name
    raise RuntimeError("no saeuron backend available")  # unreachable: torch always is


def _impl(op: str, device: torch.device):
    backend_for(op, device)
    return _choice[(op, device.type, requested_backend())][1]


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("saeuron::topk_encode", mutates_args=())
def _topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl("topk_encode", x.device)(x, W_enc, b_enc, b_dec, k)


@_topk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("saeuron::sparse_decode", mutates_args=())
def _sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                   b_dec: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    return _impl("sparse_decode", values.device)(values, indices, W_dec, b_dec, residual)


@_sparse_decode.register_fake
def _(values, indices, W_dec, b_dec, residual):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("saeuron::sparse_decode_bwd", mutates_args=())
def _sparse_decode_bwd(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                       W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl("sparse_decode_bwd", grad_out.device)(grad_out, values, indices, W_dec)


@_sparse_decode_bwd.register_fake
def _(grad_out, values, indices, W_dec):
    return torch.empty_like(values), torch.empty_like(W_dec), W_dec.new_empty(W_dec.shape[1])


def _sd_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, residual = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_b, ctx.has_r = b_dec is not None, residual is not None


def _sd_backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    gv, gw, gb = _sparse_decode_bwd(grad.contiguous(), values, indices, W_dec)
    return gv, None, gw, (gb if ctx.has_b else None), (grad if ctx.has_r else None)


_sparse_decode.register_autograd(_sd_backward, setup_context=_sd_setup)


@torch.library.custom_op("saeuron::gather_encode", mutates_args=())
def _gather_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                   indices: torch.Tensor) -> torch.Tensor:
    return _impl("gather_encode", x.device)(x, W_enc, b_enc, b_dec, indices)


@_gather_encode.register_fake
def _(x, W_enc, b_enc, b_dec, indices):
    return x.new_empty(indices.shape)


@torch.library.custom_op("saeuron::gather_encode_bwd", mutates_args=())
def _gather_encode_bwd(grad_values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor,
                       indices: torch.Tensor, values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl("gather_encode_bwd", x.device)(grad_values, x, W_enc, b_dec, indices, values)


@_gather_encode_bwd.register_fake
def _(grad_values, x, W_enc, b_dec, indices, values):
    return torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]), torch.empty_like(b_dec)


def _ge_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, indices = inputs
    ctx.save_for_backward(x, W_enc, b_dec, indices, output)


def _ge_backward(ctx, grad):
    x, W_enc, b_dec, indices, values = ctx.saved_tensors
    gx, gw, gbe, gbd = _gather_encode_bwd(grad.contiguous(), x, W_enc, b_dec, indices, values)
    return gx, gw, gbe, gbd, None


_gather_encode.register_autograd(_ge_backward, setup_context=_ge_setup)


@torch.library.custom_op("saeuron::edit_", mutates_args=("x",))
def _edit_(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, W_dec: torch.Tensor,
           k: int, feat_idx: torch.Tensor, tau: torch.Tensor, scale: torch.Tensor, rows_per_group: int) -> None:
    # float64 asks for reference precision: the GPU kernels rank fp32 pre-activations, so it runs the reference
    # there (the C++ CPU op computes in float64)
    fn = reference.edit_ if x.dtype == torch.float64 and x.device.type != "cpu" else _impl("edit_", x.device)
    fn(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group)


@_edit_.register_fake
def _(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group):
    return None


# --------------------------------------------------------------------------- public API

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(name_tensors: dict, dtype: torch.dtype):
    for name, t in name_tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the op runs in {dtype}: cast all float inputs to one "
                            f"dtype (float32, float16 or bfloat16)")


def _check_sae(x_width: int, W_enc, b_enc, b_dec, k: int):
    if W_enc.dim() != 2 or W_enc.shape[1] != x_width:
        raise ValueError(f"activation width {x_width} does not match the SAE input width d_in={W_enc.shape[-1]}")
    if b_enc.shape != (W_enc.shape[0],) or b_dec.shape != (x_width,):
        raise ValueError(f"bias shapes {tuple(b_enc.shape)}, {tuple(b_dec.shape)} do not fit W_enc {tuple(W_enc.shape)}")
    if not 1 <= k <= W_enc.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of latents {W_enc.shape[0]}")


def topk_encode(x, W_enc, b_enc, b_dec, k: int):
    """Per-token top-k SAE codes ``(values [N, k], indices [N, k] int64)`` of ``x [N, d]``, no [N, M] buffer."""
    if x.dim() != 2:
        raise ValueError(f"topk_encode takes tokens [N, d], got shape {tuple(x.shape)}")
    _check_sae(x.shape[1], W_enc, b_enc, b_dec, k)
    _check_float({"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec}, x.dtype)
    return _topk_encode(x.contiguous(), W_enc, b_enc, b_dec, int(k))


def sparse_decode(values, indices, W_dec, b_dec=None, residual=None):
    """``sum_j values[:, j] W_dec[indices[:, j]] (+ b_dec) (+ residual)``; differentiable, sparse backward."""
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, k]")
    _check_float({"values": values, "b_dec": b_dec, "residual": residual}, W_dec.dtype)
    return _sparse_decode(values, indices.long(), W_dec, b_dec, residual)


def gather_encode(x, W_enc, b_enc, b_dec, indices):
    """Differentiable pre-activations at chosen latents; gradients touch only those latents' rows."""
    _check_float({"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec}, x.dtype)
    return _gather_encode(x, W_enc, b_enc, b_dec, indices.long())


def edit_(x, W_enc, b_enc, b_dec, W_dec, k: int, feat_idx, tau, scale, rows_per_group: Optional[int] = None):
    """In place: ``x += sum over fired selected features of (scale - 1) f_i W_dec[i]`` (see reference.edit_).

    ``x`` is ``[N, d]`` tokens or a ``[B, C, H, W]`` block output. ``feat_idx/tau/scale`` are
    ``[F]`` or ``[G, F]`` tables; token row r uses table row ``min(r // rows_per_group, G-1)``.
    Ids outside ``[0, M)`` are padding and never fire. Validated here once; backends trust it.
    """
    if x.dim() not in (2, 4):
        raise ValueError(f"edit_ takes tokens [N, d] or a map [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x has dtype {x.dtype}; valid: float32, float16, bfloat16, float64")
    width = x.shape[1]
    _check_sae(width, W_enc, b_enc, b_dec, k)
    _check_float({"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "W_dec": W_dec}, x.dtype)
    if W_dec.shape != W_enc.shape:
        raise ValueError(f"W_dec {tuple(W_dec.shape)} must have the shape of W_enc {tuple(W_enc.shape)}")
    if feat_idx.dim() == 1:
        feat_idx, tau, scale = feat_idx[None], tau[None], scale[None]
    if feat_idx.dim() != 2 or not (feat_idx.shape == tau.shape == scale.shape):
        raise ValueError(f"feat_idx {tuple(feat_idx.shape)}, tau {tuple(tau.shape)}, scale {tuple(scale.shape)} "
                         f"must be equal [G, F] (or [F]) tables")
    if feat_idx.is_floating_point() or feat_idx.is_complex():
        raise TypeError(f"feat_idx has dtype {feat_idx.dtype}; it must hold integer latent ids")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec), ("W_dec", W_dec), ("feat_idx", feat_idx),
                    ("tau", tau), ("scale", scale)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move all tensors to one device")
    n = x.numel() // width if width else 0
    if rows_per_group is None:
        rows_per_group = max(n // max(feat_idx.shape[0], 1), 1)
    _edit_(x, W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(), W_dec.contiguous(), int(k),
           feat_idx.long().contiguous(), tau.float().contiguous(), scale.float().contiguous(),
           max(int(rows_per_group), 1))
    return x


def edit(x, *args, **kwargs):
    """Out-of-place :func:`edit_`."""
    return edit_(x.clone(), *args, **kwargs)


def status() -> dict:
    """Which backend each op would use on CPU and (if present) CUDA, plus load errors: for bug reports."""
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {"requested": requested_backend() or "auto",
            "ops": {f"{op}@{d.type}": backend_for(op, d) for op in OPS for d in devs},
            "errors": dict(_load_errors)}
