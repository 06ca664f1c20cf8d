"""The one seam for hot ops: validates their arguments once, then picks, per op, device, dtype and shape
class, the compiled extension, Triton or PyTorch (by measured speed, see "Measured choice").

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
a candidate is usable when it loads, supports ``(op, device type, dtype)`` and, on a GPU, passes a
self-check against the reference. The static choice (:func:`backend_for`) is the first usable candidate,
cached per ``(op, device type, dtype, forced backend)``; with a forced backend it always runs. Whenever a
backend earlier in the order cannot run, one warning says why.

Measured choice. Unless a backend is forced or ``SAEURON_AUTOTUNE=0``, when two or more candidates are
usable the first real call of each key times them all on that call's own arguments (``edit_`` on a copy of
``x``, refreshed before each call, so the caller's tensor only sees the one real call afterwards): one untimed
warm-up call (it absorbs Triton's compilation; on the CPU a warm-up longer than
:data:`AUTOTUNE_BUDGET_S` is the sample), then up to :data:`AUTOTUNE_REPS` timed calls until
:data:`AUTOTUNE_BUDGET_S` seconds are spent (CUDA events on GPUs, ``time.perf_counter`` on the CPU); the
lowest time wins (ties: the static order), and a candidate that raises is dropped. The key is ``(op,
device type, device name, dtype, shape class)``: the device name is ``torch.cuda.get_device_name`` on
GPUs and the CPU model with torch's thread count on the CPU; the shape class (:func:`shape_class`) is the
SAE's widths ``d`` and ``M`` and ``k`` exactly, the token count ``N`` rounded up to a power of two, and
for ``edit_`` also the number of selected features ``F`` rounded up to a power of two and ``x``'s layout
(tokens ``[N, d]`` or a map, contiguous or strided). The fire-first edit's cost depends on how many
tokens fire, which is data, so the first call's data stands for its key. Choices are kept in memory
and in ``<SAEURON_CACHE_DIR or ~/.cache/saeuron>/autotune.json`` (written atomically; entries keyed also
by the torch version, the usable candidates and the extension's build key), so later processes reuse
them without timing; a corrupt or foreign file is ignored with one warning and rewritten. Nothing is
timed while a CUDA graph is being captured or under ``torch.compile`` tracing: then the cached choice,
else the static one, runs. :func:`status` lists the measured choices, with their timings, next to the
static ones.

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

import functools
import operator
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import reference

BACKENDS = ("cuda", "triton", "torch")
#: The hot ops, declared once: each backend implements them as attributes of the same name.
OPS = ("topk_encode", "sparse_decode", "gather_encode", "gather_encode_bwd", "sparse_decode_bwd", "edit_")
#: The float dtypes the ops take (every backend declares which of them it runs).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Candidate backends per device type and op (ops not named: the device's ``"*"`` entry), in the static
#: order: the first usable one runs when nothing is measured (``SAEURON_AUTOTUNE=0``, one usable candidate,
#: CUDA graph capture or ``torch.compile`` tracing before a measurement exists); otherwise the measured
#: fastest of the usable ones runs (see the module docstring). A backend that does not support the call's
#: dtype is skipped.
#: CPU (measured, benchmarks/RESULTS.md): the compiled fire-first edit beats the reference 3-400x; for the
#: other ops the reference (MKL GEMM + topk) comes first and the C++ ops second (no C++ top-k encode).
#: GPU (no kernel has been timed on a GPU yet; benchmarks/gpu_session.sh times them all): the Triton edit
#: skips the dense GEMM for row blocks with no candidate, the CUDA edit always runs it (cuBLAS, no host
#: sync), so Triton comes first; top-k encode keeps cuBLAS + torch.topk, the only GPU timing on record
#: (performance.md), ahead of the unmeasured fused kernels.
AUTO_ORDER = {
    "cpu": {"edit_": ("cuda", "torch"), "topk_encode": ("torch",), "*": ("torch", "cuda")},
    "cuda": {"edit_": ("triton", "cuda", "torch"), "topk_encode": ("torch", "triton", "cuda"), "*": BACKENDS},
}
#: Measuring: seconds of timed calls per candidate at most (at least one timed call each), and timed calls at most.
AUTOTUNE_BUDGET_S = 0.5
AUTOTUNE_REPS = 5
#: The ``format`` field of the autotune cache file; a file without it is foreign and ignored.
AUTOTUNE_FORMAT = "saeuron-autotune/1"

_forced: Optional[str] = None
_modules: dict = {}
_load_errors: dict = {}
_choice: dict = {}
_warned: set = set()
_usable_cache: dict = {}  # (op, device type, dtype, forced) -> ((name, fn), ...) usable, in the static order
_tuned: dict = {}  # (op, device type, device index, dtype, shape class) -> the entry that decides (see _decide)
_disk: dict = {}  # cache file path -> {key string: entry} as read once from disk (empty when unreadable)


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
    _usable_cache.clear()


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
    """Name of the backend that runs ``op`` for tensors of ``dtype`` on ``device`` when nothing is measured: the
    first usable candidate (a forced backend, or the static order). Measured choices: :func:`status`."""
    return _choose(op, torch.device(device), dtype)[0]


def _usable_impl(name: str, op: str, device: torch.device, dtype: torch.dtype):
    """``name``'s implementation of ``op`` if it loads, supports the call and (GPU) passes the self-check, else None."""
    mod = _load(name)
    if mod is None or not hasattr(mod, op) or not mod.supports(op, device, dtype):
        return None
    if device.type == "cuda" and name != "torch":
        why = _selfcheck(getattr(mod, op), op, device, dtype)
        if why is not None:
            _load_errors[name] = f"{op} ({_dtype_name(dtype)}): {why}"
            return None
    return getattr(mod, op)


def _choose(op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """``(backend name, implementation)``: the first usable candidate for ``op`` on ``device``'s type and ``dtype``,
    chosen once and cached; one warning when candidates before it cannot run."""
    key = (op, device.type, dtype, requested_backend())
    hit = _choice.get(key)
    if hit is not None:
        return hit
    cands = _candidates(op, device)
    for i, name in enumerate(cands):
        fn = _usable_impl(name, op, device, dtype)
        if fn is None:
            continue
        if i > 0:
            why = "; ".join(f"{c}: " + _load_errors.get(
                c, f"does not implement {op} on {device.type} for {_dtype_name(dtype)}") for c in cands[:i])
            _warn_once(("fallback",) + cands[:i] + (device.type,),
                       f"saeuron: faster backend unavailable for {op} on {device.type} ({why}); using {name}. "
                       f"Set SAEURON_BACKEND to choose explicitly.")
        _choice[key] = (name, fn)
        return _choice[key]
    raise RuntimeError("no saeuron backend available")  # unreachable: torch always is


def _usable(op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """Every usable candidate ``(name, implementation)`` in the static order (all are loaded), cached."""
    key = (op, device.type, dtype, requested_backend())
    hit = _usable_cache.get(key)
    if hit is None:
        first, first_fn = _choose(op, device, dtype)  # those before it are not usable: checked there
        cands = _candidates(op, device)
        later = ((name, _usable_impl(name, op, device, dtype)) for name in cands[cands.index(first) + 1:])
        hit = _usable_cache[key] = ((first, first_fn),) + tuple((name, fn) for name, fn in later if fn is not None)
    return hit


# --------------------------------------------------------------------------- measured choice

def autotune_enabled() -> bool:
    """Whether automatic choice measures the usable backends (``SAEURON_AUTOTUNE``, default on; ``0`` turns it off)."""
    return os.environ.get("SAEURON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_CODES_AND_WEIGHTS = {"sparse_decode": (0, 2), "gather_encode": (4, 1), "gather_encode_bwd": (0, 2),
                      "sparse_decode_bwd": (1, 3)}


def shape_class(op: str, args) -> tuple:
    """The regime of a call of ``op`` with the (validated) ``args`` of its backend signature, as ``(name, value)``
    pairs: the SAE's widths ``d`` and ``M`` exactly, the token count ``N`` rounded up to a power of two and,
    for ``edit_``, the SAE's ``k`` exactly, the selected features ``F`` (rounded up to a power of two) and ``x``'s
    layout; for the other ops the codes' width ``k`` rounded up to a power of two (BatchTopK training hands the
    sparse ops codes ``[N, k']`` whose width changes every step: an exact ``k'`` would time the backends again at
    every step)."""
    if op == "edit_":
        x, W, k, feat = args[0], args[1], args[5], args[6]
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        layout = ("tokens" if x.dim() == 2 else "map") + ("" if x.is_contiguous() else "-strided")
        return (("d", W.shape[1]), ("M", W.shape[0]), ("k", int(k)), ("F", _pow2(feat.shape[-1])), ("N", _pow2(n)),
                ("x", layout))
    if op == "topk_encode":  # x, W_enc, b_enc, b_dec, k
        W, n, k = args[1], args[0].shape[0], int(args[4])
    else:  # the positions of the codes [N, k] and of the weight matrix [M, d]
        codes, weights = _CODES_AND_WEIGHTS[op]
        W, (n, k) = args[weights], args[codes].shape
    return (("d", W.shape[1]), ("M", W.shape[0]), ("k", _pow2(int(k))), ("N", _pow2(n)))


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """What the measured choice is keyed by besides the device type: the GPU's name, or the CPU model and torch's
    thread count (which decides between the multi-threaded GEMM and the C++ ops)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{_cpu_model()} x{torch.get_num_threads()} threads"
    return device.type


def autotune_cache_file() -> Path:
    """The file that keeps measured choices across processes: ``autotune.json`` in the extension's cache root
    (``SAEURON_CACHE_DIR`` or ``~/.cache/saeuron``)."""
    from .extension import cache_root

    return cache_root() / "autotune.json"


def _build_id() -> str:
    path = getattr(_modules.get("cuda"), "path", None)
    return Path(path).name if path is not None else "none"


def _entry_key(op, device, dtype, names, shape) -> str:
    build = _build_id() if "cuda" in names else "-"
    return "|".join([op, device.type, device_name(device), _dtype_name(dtype), ",".join(f"{k}={v}" for k, v in shape),
                     "+".join(names), f"torch={torch.__version__}", f"build={build}"])


def _parse_cache(path: Path) -> tuple:
    """``(choices, None)`` from the cache file (``{}`` when it is missing), or ``({}, why)`` when it is corrupt or
    foreign."""
    from .utils import read_json

    if not path.exists():
        return {}, None
    try:
        data = read_json(path, "the autotune cache")
    except (OSError, ValueError) as e:
        return {}, str(e)
    if not isinstance(data, dict) or data.get("format") != AUTOTUNE_FORMAT or not isinstance(data.get("choices"), dict):
        return {}, f"{path} is not a saeuron autotune cache (its format is not {AUTOTUNE_FORMAT!r})"
    return dict(data["choices"]), None


def _cached(path: Path) -> dict:
    """The choices in ``path``, read once per process; a corrupt or foreign file: one warning, then none."""
    if path not in _disk:
        choices, why = _parse_cache(path)
        if why is not None:
            _warn_once(("autotune-cache", str(path)), f"saeuron: ignoring {why}; backends are measured again and the "
                                                      f"file rewritten")
        _disk[path] = choices
    return _disk[path]


def _save(path: Path, key: str, entry: dict) -> None:
    """Merge ``entry`` into the cache file: re-read it (another process may have added choices since), add this
    process's choices, write a temporary file and ``os.replace`` it into place (readers never see half a file)."""
    from .extension import private_dir
    from .utils import atomic_write_json

    mine = _cached(path)
    mine[key] = entry
    try:
        private_dir(path.parent, follow=True)
        merged = _parse_cache(path)[0]
        merged.update(mine)
        atomic_write_json({"format": AUTOTUNE_FORMAT, "choices": merged}, path)
    except (OSError, RuntimeError) as e:
        _warn_once(("autotune-write", str(path)), f"saeuron: cannot write the autotune cache {path} ({e}); measured "
                                                  f"choices are kept for this process only")


def _time_one(fn, op: str, device: torch.device, args) -> float:
    """Seconds of one call of ``fn`` on ``args``: the lowest of up to :data:`AUTOTUNE_REPS` timed calls after one
    warm-up, stopping once :data:`AUTOTUNE_BUDGET_S` seconds are timed. ``edit_`` runs on a copy of ``x`` with its
    strides, refreshed outside the timed span before each call, never on the caller's tensor."""
    gpu = device.type == "cuda"
    x = args[0]
    work = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) if op == "edit_" else None
    call_args = tuple(args) if work is None else (work,) + tuple(args[1:])
    if gpu:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples, spent = [], 0.0
    for i in range(1 + AUTOTUNE_REPS):
        if work is not None:
            work.copy_(x)
        if gpu:
            with torch.cuda.device(device):
                start.record()
                fn(*call_args)
                end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn(*call_args)
            dt = time.perf_counter() - t0
        if i > 0 or (not gpu and dt >= AUTOTUNE_BUDGET_S):  # the warm-up is a sample only when a CPU call is slow
            samples.append(dt)
            spent += dt
        if spent >= AUTOTUNE_BUDGET_S:
            break
    return min(samples)


def _measure(op: str, device: torch.device, usable: tuple, args) -> dict:
    """Time every usable candidate on ``args``; the entry ``{"backend", "ms"}`` (a candidate that raises is dropped)."""
    ms, failed = {}, {}
    for name, fn in usable:
        try:
            ms[name] = round(_time_one(fn, op, device, args) * 1e3, 4)
        except Exception as e:  # noqa: BLE001  a candidate that cannot run this call is not chosen
            failed[name] = f"{type(e).__name__}: {e}"
    if not ms:
        return {}
    best = min(ms, key=lambda n: (ms[n], [u for u, _ in usable].index(n)))
    return {"backend": best, "ms": ms, **({"failed": failed} if failed else {})}


def _no_measuring(device: torch.device) -> bool:
    """True under ``torch.compile`` tracing or while a CUDA graph is being captured: timing must not run there."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _pick(op: str, device: torch.device, dtype: torch.dtype, args):
    """The implementation that runs this call: the static choice, or the measured fastest (see the module docstring)."""
    name, fn = _choose(op, device, dtype)
    if requested_backend() is not None or not autotune_enabled():
        return fn
    fast = (op, device.type, device.index, torch.get_num_threads(), dtype, shape_class(op, args))
    hit = _tuned.get(fast)
    if hit is not None:
        return hit["fn"]
    usable = _usable(op, device, dtype)
    if len(usable) < 2:
        return fn
    names = tuple(n for n, _ in usable)
    key = _entry_key(op, device, dtype, names, fast[-1])
    path = autotune_cache_file()
    entry = _cached(path).get(key)
    source = "cache"
    if not (isinstance(entry, dict) and entry.get("backend") in names and isinstance(entry.get("ms"), dict)):
        if _no_measuring(device):
            return fn
        entry, source = _measure(op, device, usable, args), "measured"
        if not entry:
            return fn
        _save(path, key, entry)
    chosen = dict(usable)[entry["backend"]]
    _tuned[fast] = {"fn": chosen, "key": key, "op": op, "device": device.type, "device_name": device_name(device),
                    "dtype": _dtype_name(dtype), "shape": dict(fast[-1]), "static": name, "backend": entry["backend"],
                    "ms": dict(entry["ms"]), "source": source}
    return chosen


def _run(op: str, device: torch.device, dtype: torch.dtype, *args):
    return _pick(op, device, dtype, args)(*args)


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("saeuron::topk_encode", mutates_args=())
def _topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("topk_encode", x.device, x.dtype, x, W_enc, b_enc, b_dec, k)


@_topk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("saeuron::sparse_decode", mutates_args=())
def _sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                   b_dec: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    return _run("sparse_decode", W_dec.device, W_dec.dtype, values, indices, W_dec, b_dec, residual)


@_sparse_decode.register_fake
def _(values, indices, W_dec, b_dec, residual):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("saeuron::sparse_decode_bwd", mutates_args=())
def _sparse_decode_bwd(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                       W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run("sparse_decode_bwd", W_dec.device, W_dec.dtype, grad_out, values, indices, W_dec)


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
    return _run("gather_encode", x.device, x.dtype, x, W_enc, b_enc, b_dec, indices)


@_gather_encode.register_fake
def _(x, W_enc, b_enc, b_dec, indices):
    return x.new_empty(indices.shape)


@torch.library.custom_op("saeuron::gather_encode_bwd", mutates_args=())
def _gather_encode_bwd(grad_values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor,
                       indices: torch.Tensor, values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run("gather_encode_bwd", x.device, x.dtype, grad_values, x, W_enc, b_dec, indices, values)


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
    _run("edit_", x.device, x.dtype, x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group)


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
    """For bug reports: the forced backend, whether measuring is on, the static choice of each op on CPU and (if
    present) CUDA per dtype, the static order, the choices this process measured or read from the cache (with their
    timings in milliseconds and the static choice they replace), every choice in the cache file, and load errors."""
    path = autotune_cache_file()
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {"requested": requested_backend() or "auto",
            "autotune": autotune_enabled(),
            "ops": {f"{op}@{d.type}": {_dtype_name(dt): backend_for(op, d, dt) for dt in FLOAT_DTYPES}
                    for op in OPS for d in devs},
            "static_order": {f"{op}@{d.type}": list(_candidates(op, d)) for op in OPS for d in devs},
            "measured": [{k: v for k, v in e.items() if k != "fn"} for e in _tuned.values()],
            "autotune_cache": {"file": str(path), "choices": dict(_cached(path))},
            "errors": dict(_load_errors)}
