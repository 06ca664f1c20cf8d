"""The one seam for hot ops: validates their arguments once, then picks, per op, device type and dtype,
the compiled extension, Triton or PyTorch.

Every op is a ``torch.library`` custom op (``saeuron::<name>``) with a fake implementation, so
``torch.compile`` sees one opaque node and CUDA graph capture works. The body of each op calls
the implementation of the backend chosen for the op and the tensors' device type and dtype:

- ``cuda``: the extension built just in time from ``csrc/`` (CUDA kernels for GPU tensors, C++
  for CPU tensors);
- ``triton``: the kernels in ``saeuron.kernels`` (GPU, or CPU under ``TRITON_INTERPRET=1``);
- ``torch``: :mod:`saeuron.reference`, always available.

Backend choice. Each backend declares ``supports(op, device, dtype)``: ``torch`` everything, ``triton``
float32/float16/bfloat16 where its kernels run, ``cuda`` what the built module instantiates (its
``kernels()`` table, declared next to each binding in ``csrc/bindings.cpp``). For a call, the candidates
are :data:`AUTO_ORDER`'s entry for the device type and op (or, when a backend is forced with
``SAEURON_BACKEND=cuda|triton|torch`` or :func:`set_backend`, it and those after it in :data:`BACKENDS`);
the first that loads, supports ``(op, device type, dtype)`` and, on a GPU, passes a self-check against
the reference runs it. The choice is cached per ``(op, device type, dtype, forced backend)``. The order
is static, justified by the measured tables in ``benchmarks/RESULTS.md``: on the CPU the C++ fire-first
edit (about 0.01x, 0.1x and 1.1x the dense encoder GEMM with 0, 5 and 100 % of the tokens firing) beats
the reference (2-6x), while the reference's MKL GEMM + topk stays the CPU path of the training ops.
Whenever a faster backend than the one used cannot run, one warning says why.

Validation, once and here. The public ops (:func:`topk_encode`, :func:`sparse_decode`,
:func:`gather_encode`, :func:`edit_`) check every argument before any backend runs: tensors where
tensors are due, dims and shapes (``x [N, d]`` or, for ``edit_``, ``[B, C, H, W]``; ``W [M, d]``;
``b_enc [M]``, ``b_dec [d]``; codes ``[N, k]``; tables ``[G, F]``), one float dtype (float32, float16,
bfloat16 or float64) for all float inputs, integer latent ids, float thresholds and scales, one device,
``1 <= k <= M``, ``rows_per_group >= 1``. Errors name the argument and what is valid: ``ValueError``
for shapes, devices and ranges, ``TypeError`` for dtypes and non-integers. The backends then get
normalised tensors: contiguous (except the ``x`` that ``edit_`` updates in place, whose strides every
backend addresses), ids int64, ``edit_`` thresholds and scales float32. The ``*_bwd`` ops are internal,
fed the forward's saved tensors, and not validated again.

The backends (Triton wrappers, C++/CUDA bridges) check none of this again. They keep only guards of
memory safety for direct calls, and dispatch errors:

- latent ids are data, not shapes: checking them here would read every id (a host synchronisation on a
  GPU), so ops does not. Ids outside ``[0, M)`` are padding for ``edit_``: they never fire and no backend
  reads their rows. In the codes of :func:`sparse_decode` / :func:`gather_encode` they are a caller error
  that ops does not catch: the C++ CPU ops raise on one before any read (a pass over the ids, no
  measurable cost), the GPU kernels (Triton, CUDA) mask it (it contributes nothing), the reference raises
  (an IndexError on the CPU). Either way an out-of-range id never reads out of bounds;
- the errors that say a build has no kernel for a device or dtype (and ATen itself refuses a typed
  pointer of the wrong dtype). The ``.contiguous()`` calls left in backends are no-ops on what ops passes.
"""
from __future__ import annotations

import operator
import os
import warnings
from typing import Optional

import torch

from . import reference

BACKENDS = ("cuda", "triton", "torch")
#: The hot ops, declared once: each backend implements them as attributes of the same name.
OPS = ("topk_encode", "sparse_decode", "gather_encode", "gather_encode_bwd", "sparse_decode_bwd", "edit_")
#: The float dtypes the ops take (every backend declares which of them it runs).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Automatic backend order per device type and op (ops not named: the device's ``"*"`` entry); a backend
#: that does not support the call's dtype is skipped.
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
    def supports(op: str, device: torch.device, dtype: torch.dtype) -> bool:
        """The reference runs every op on every device and dtype."""
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _selfcheck(fn, op: str, device: torch.device, dtype: torch.dtype = torch.float16) -> Optional[str]:
    """Run ``fn`` once on small random inputs of ``dtype`` and compare with the reference; the reason if it differs.

    Run once per backend, op, GPU and dtype before a compiled kernel is trusted with real work, so a kernel
    that is wrong on this device (driver, architecture) falls back instead of silently corrupting images.
    """
    g = torch.Generator().manual_seed(1234)
    n, d, m, k, dt = 37, 64, 384, 8, dtype
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dt)  # noqa: E731
    x, W_enc, b_enc, b_dec, W_dec = r(n, d), r(m, d, sc=d ** -0.5), r(m, sc=0.1), r(d, sc=0.1), r(m, d, sc=0.2)
    _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    vals = reference.gather_encode(x, W_enc, b_enc, b_dec, idx)
    gv = r(n, k)
    feat = idx[:3, 0][None].contiguous()
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
    tol = 5e-2 if dtype == torch.bfloat16 else 2e-2
    try:
        got, want = cases[op](fn)
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6))
        return None if err < tol else f"self-check against the reference failed (relative error {err:.3g})"
    except Exception as e:  # noqa: BLE001  any failure means: do not use this kernel here
        return f"self-check raised {type(e).__name__}: {e}"


def _run_edit(fn, x, *args):
    y = x.clone()
    fn(y, *args, x.shape[0])
    return y


def backend_for(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Name of the backend that runs ``op`` for tensors of ``dtype`` on ``device``."""
    return _choose(op, torch.device(device), dtype)[0]


def _choose(op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """``(backend name, implementation)`` for ``op`` on ``device``'s type and ``dtype``, chosen once and cached."""
    key = (op, device.type, dtype, requested_backend())
    hit = _choice.get(key)
    if hit is not None:
        return hit
    cands = _candidates(op, device)
    for i, name in enumerate(cands):
        mod = _load(name)
        if mod is not None and hasattr(mod, op) and mod.supports(op, device, dtype):
            if device.type == "cuda" and name != "torch":
                why = _selfcheck(getattr(mod, op), op, device, dtype)
                if why is not None:
                    _load_errors[name] = f"{op} ({_dtype_name(dtype)}): {why}"
                    continue
            if i > 0:
                why = "; ".join(f"{c}: " + _load_errors.get(
                    c, f"does not implement {op} on {device.type} for {_dtype_name(dtype)}") for c in cands[:i])
                _warn_once(("fallback",) + cands[:i] + (device.type,),
                           f"saeuron: faster backend unavailable for {op} on {device.type} ({why}); using {name}. "
                           f"Set SAEURON_BACKEND to choose explicitly.")
            _choice[key] = (name, getattr(mod, op))
            return _choice[key]
    raise RuntimeError("no saeuron backend available")  # unreachable: torch always is


def _impl(op: str, device: torch.device, dtype: torch.dtype):
    return _choose(op, device, dtype)[1]


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("saeuron::topk_encode", mutates_args=())
def _topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl("topk_encode", x.device, x.dtype)(x, W_enc, b_enc, b_dec, k)


@_topk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("saeuron::sparse_decode", mutates_args=())
def _sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                   b_dec: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    return _impl("sparse_decode", W_dec.device, W_dec.dtype)(values, indices, W_dec, b_dec, residual)


@_sparse_decode.register_fake
def _(values, indices, W_dec, b_dec, residual):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("saeuron::sparse_decode_bwd", mutates_args=())
def _sparse_decode_bwd(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                       W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl("sparse_decode_bwd", W_dec.device, W_dec.dtype)(grad_out, values, indices, W_dec)


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
    return _impl("gather_encode", x.device, x.dtype)(x, W_enc, b_enc, b_dec, indices)


@_gather_encode.register_fake
def _(x, W_enc, b_enc, b_dec, indices):
    return x.new_empty(indices.shape)


@torch.library.custom_op("saeuron::gather_encode_bwd", mutates_args=())
def _gather_encode_bwd(grad_values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor,
                       indices: torch.Tensor, values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl("gather_encode_bwd", x.device, x.dtype)(grad_values, x, W_enc, b_dec, indices, values)


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
    _impl("edit_", x.device, x.dtype)(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group)


@_edit_.register_fake
def _(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group):
    return None


# --------------------------------------------------------------------------- validation (the only one)

_VALID_FLOATS = "float32, float16, bfloat16 or float64"


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float(name: str, t) -> torch.Tensor:
    _tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; valid: {_VALID_FLOATS}")
    return t


def _ids(name: str, t) -> torch.Tensor:
    _tensor(name, t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {t.dtype}; it must hold integer latent ids (int64, int32, ...)")
    return t


def _same_device(ref_name: str, ref: torch.Tensor, named: dict) -> None:
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: move all tensors to one "
                             f"device")


def _same_dtype(ref_name: str, ref: torch.Tensor, named: dict) -> None:
    for name, t in named.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: cast all float inputs to one "
                            f"dtype ({_VALID_FLOATS})")


def _shape(name: str, t: torch.Tensor, want: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be {what} = {list(want)}")


def _check_encoder(x_name: str, x: torch.Tensor, width: int, W_enc, b_enc, b_dec) -> None:
    """The encoder weights fit activations of ``width`` channels and share ``x``'s dtype and device."""
    _tensor("W_enc", W_enc)
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [M, d], got shape {tuple(W_enc.shape)}")
    if W_enc.shape[1] != width:
        raise ValueError(f"activation width {width} does not match the SAE input width d_in={W_enc.shape[1]} "
                         f"(W_enc {tuple(W_enc.shape)})")
    _shape("b_enc", _tensor("b_enc", b_enc), (W_enc.shape[0],), "[M]")
    _shape("b_dec", _tensor("b_dec", b_dec), (width,), "[d]")
    named = {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec}
    _same_dtype(x_name, x, named)
    _same_device(x_name, x, named)


def _check_k(k, m: int) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the number of latents {m}")
    return k


def _tokens(op: str, x) -> torch.Tensor:
    _float("x", x)
    if x.dim() != 2:
        raise ValueError(f"{op} takes tokens x [N, d], got shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------- public API

def topk_encode(x, W_enc, b_enc, b_dec, k: int):
    """Per-token top-k SAE codes ``(values [N, k], indices [N, k] int64)`` of ``x [N, d]``, no [N, M] buffer."""
    _tokens("topk_encode", x)
    _check_encoder("x", x, x.shape[1], W_enc, b_enc, b_dec)
    k = _check_k(k, W_enc.shape[0])
    return _topk_encode(x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(), k)


def sparse_decode(values, indices, W_dec, b_dec=None, residual=None):
    """``sum_j values[:, j] W_dec[indices[:, j]] (+ b_dec) (+ residual)``; differentiable, sparse backward.

    ``values [N, k]`` in ``W_dec``'s dtype, ``indices [N, k]`` integer ids, ``W_dec [M, d]``, ``b_dec [d]``,
    ``residual [N, d]``.
    """
    _float("W_dec", W_dec)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [M, d], got shape {tuple(W_dec.shape)}")
    _tensor("values", values)
    _ids("indices", indices)
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, k]")
    n, d = values.shape[0], W_dec.shape[1]
    if b_dec is not None:
        _shape("b_dec", _tensor("b_dec", b_dec), (d,), "[d]")
    if residual is not None:
        _shape("residual", _tensor("residual", residual), (n, d), "[N, d]")
    _same_dtype("W_dec", W_dec, {"values": values, "b_dec": b_dec, "residual": residual})
    _same_device("W_dec", W_dec, {"values": values, "indices": indices, "b_dec": b_dec, "residual": residual})
    return _sparse_decode(values.contiguous(), indices.long().contiguous(), W_dec.contiguous(),
                          None if b_dec is None else b_dec.contiguous(),
                          None if residual is None else residual.contiguous())


def gather_encode(x, W_enc, b_enc, b_dec, indices):
    """Differentiable pre-activations ``[N, k]`` of ``x [N, d]`` at the latents ``indices [N, k]``; gradients
    touch only those latents' rows."""
    _tokens("gather_encode", x)
    _check_encoder("x", x, x.shape[1], W_enc, b_enc, b_dec)
    _ids("indices", indices)
    if indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices has shape {tuple(indices.shape)}; it must be [N, k] with N = {x.shape[0]} "
                         f"(the tokens of x)")
    _same_device("x", x, {"indices": indices})
    return _gather_encode(x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(),
                          indices.long().contiguous())


def edit_(x, W_enc, b_enc, b_dec, W_dec, k: int, feat_idx, tau, scale, rows_per_group: Optional[int] = None):
    """In place: ``x += sum over fired selected features of (scale - 1) f_i W_dec[i]`` (see reference.edit_).

    ``x`` is ``[N, d]`` tokens or a ``[B, C, H, W]`` block output (any strides). ``feat_idx`` (integer ids),
    ``tau`` and ``scale`` (floats) are ``[F]`` or ``[G, F]`` tables; token row r uses table row
    ``min(r // rows_per_group, G-1)`` (default: the tokens split evenly over the G rows). Ids outside
    ``[0, M)`` are padding and never fire.
    """
    _float("x", x)
    if x.dim() not in (2, 4):
        raise ValueError(f"edit_ takes tokens [N, d] or a map [B, C, H, W], got shape {tuple(x.shape)}")
    width = x.shape[1]
    _check_encoder("x", x, width, W_enc, b_enc, b_dec)
    _tensor("W_dec", W_dec)
    if W_dec.shape != W_enc.shape:
        raise ValueError(f"W_dec {tuple(W_dec.shape)} must have the shape of W_enc {tuple(W_enc.shape)}")
    _same_dtype("x", x, {"W_dec": W_dec})
    k = _check_k(k, W_enc.shape[0])
    _ids("feat_idx", feat_idx)
    for name, t in (("tau", tau), ("scale", scale)):
        if not _tensor(name, t).is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; it must be a float table (float32 is used)")
    if feat_idx.dim() == 1 and tau.dim() == 1 and scale.dim() == 1:
        feat_idx, tau, scale = feat_idx[None], tau[None], scale[None]
    if feat_idx.dim() != 2 or not (feat_idx.shape == tau.shape == scale.shape):
        raise ValueError(f"feat_idx {tuple(feat_idx.shape)}, tau {tuple(tau.shape)}, scale {tuple(scale.shape)} "
                         f"must be equal [G, F] (or [F]) tables")
    _same_device("x", x, {"W_dec": W_dec, "feat_idx": feat_idx, "tau": tau, "scale": scale})
    if rows_per_group is None:
        n = x.numel() // width if width else 0
        rows_per_group = max(n // max(feat_idx.shape[0], 1), 1)
    else:
        try:
            rows_per_group = operator.index(rows_per_group)
        except TypeError:
            raise TypeError(f"rows_per_group must be an integer, got {type(rows_per_group).__name__}") from None
        if rows_per_group < 1:
            raise ValueError(f"rows_per_group={rows_per_group} must be >= 1")
    _edit_(x, W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(), W_dec.contiguous(), k,
           feat_idx.long().contiguous(), tau.float().contiguous(), scale.float().contiguous(), rows_per_group)
    return x


def edit(x, *args, **kwargs):
    """Out-of-place :func:`edit_`."""
    return edit_(x.clone(), *args, **kwargs)


def status() -> dict:
    """Which backend each op would use on CPU and (if present) CUDA, per dtype, plus load errors: for bug reports."""
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {"requested": requested_backend() or "auto",
            "ops": {f"{op}@{d.type}": {_dtype_name(dt): backend_for(op, d, dt) for dt in FLOAT_DTYPES}
                    for op in OPS for d in devs},
            "errors": dict(_load_errors)}
