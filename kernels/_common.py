"""Shared runtime facts for the Triton backend: interpreter mode, dtypes, devices, block sizes.

Triton decides at decoration time whether ``@triton.jit`` kernels are compiled for a GPU or run by
its NumPy interpreter (``TRITON_INTERPRET=1``), so :data:`INTERPRET` is read once at import. The
interpreter is slow per operation but vectorised per block, so it gets larger row blocks than the GPU.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = bool(triton.knobs.runtime.interpret)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes the kernels take (no float64)


def _gpu_driver() -> bool:
    try:
        return triton.runtime.driver.active.get_current_target().backend in ("cuda", "hip")
    except Exception:  # no driver, no device
        return False


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: GPUs with a Triton driver, CPU only when interpreting."""
    device = torch.device(device)
    if device.type == "cpu":
        return INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        return torch.cuda.is_available() and (INTERPRET or _gpu_driver())
    return False


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (Triton block shapes must be powers of two)."""
    return triton.next_power_of_2(max(int(n), 1))


def dot_mode(dtype: torch.dtype) -> tuple[bool, bool]:
    """``(DOT_F32, UPCAST)`` for the encoder GEMM of a given input dtype.

    fp32 inputs multiply in exact fp32 (``ieee``, no TF32: matches the reference, but runs on CUDA
    cores, not tensor cores). fp16/bf16 inputs feed the tensor cores in their own dtype with fp32
    accumulation. The interpreter's ``tl.dot`` multiplies bf16 as raw uint16 bits, so under it bf16
    operands are widened to fp32 first (``UPCAST``): exact products, fp32 sums, like the bf16 MMA.
    """
    return dtype == torch.float32, INTERPRET and dtype == torch.bfloat16

