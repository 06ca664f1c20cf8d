"""The Triton backend's interface for :mod:`saeuron.ops`: fused encoder top-k, sparse decode, the edit, training ops.

Runs compiled on GPUs, or on the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before import (slow; for tests). Same signatures and semantics as :mod:`saeuron.reference`; the functions
take arguments as :mod:`saeuron.ops` passes them (validated there, once: shapes, one dtype, int64 ids, one
device) and check none of it again. One file per op; this module only gathers them under the backend
interface (``supports`` + one function per op; the op list itself is ``saeuron.ops.OPS``).
``kernels/`` has no ``__init__.py`` on purpose: run from the repository root, Python must never find it
as a top-level ``kernels`` package (that name belongs to an installed PyPI package).
"""
from ._common import FLOATS, INTERPRET, runs_on
from .edit import edit_
from .sparse_decode import sparse_decode
from .topk_encode import topk_encode
from .training import gather_encode, gather_encode_bwd, sparse_decode_bwd


def supports(op: str, device, dtype) -> bool:
    """Whether this backend runs ``op`` (a name of ``saeuron.ops.OPS``: a function of this module) for tensors
    of ``dtype`` on ``device``: float32, float16 and bfloat16 (no float64 kernels), where :func:`runs_on`."""
    return callable(globals().get(op)) and dtype in FLOATS and runs_on(device)


__all__ = ["INTERPRET", "supports", "topk_encode", "sparse_decode", "edit_", "gather_encode", "gather_encode_bwd",
           "sparse_decode_bwd"]
