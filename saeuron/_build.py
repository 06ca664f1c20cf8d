"""Just-in-time build and load of the compiled ops in ``csrc/`` (C++ for CPU, CUDA kernels for GPUs).

:func:`load_backend` compiles the sources once with ``torch.utils.cpp_extension.load`` (ninja) into a
cache folder keyed by a hash of the sources, the torch version and the compiler flags, so later
processes just load the built module. CPU-only torch (or no ``nvcc``) builds the C++ CPU ops only.
Any failure raises; :mod:`saeuron.ops` turns that into one warning and falls back to Triton/PyTorch.

Environment:

- ``SAEURON_NO_BUILD=1``: never build or load the extension (ops fall back).
- ``SAEURON_CACHE_DIR``: cache root (default ``~/.cache/saeuron``); builds go to ``<root>/ext/<hash>``.
- ``SAEURON_CSRC_DIR``: compile the sources in this folder instead of the shipped ``saeuron.csrc``
  (for developing the kernels, and for testing the fallback with broken sources).
- ``TORCH_CUDA_ARCH_LIST``: as in torch; default: the architectures of the visible GPUs.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

OPS = ("topk_encode", "sparse_decode", "gather_encode", "gather_encode_bwd", "sparse_decode_bwd", "edit_")
CPU_OPS = ("sparse_decode", "gather_encode", "gather_encode_bwd", "sparse_decode_bwd", "edit_")
CUDA_SOURCES = ("cuda_ops.cpp",)  # .cpp files compiled only in CUDA builds (all .cu files are too)
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def source_dir() -> Path:
    """Folder of the C++/CUDA sources: ``SAEURON_CSRC_DIR`` or the installed ``saeuron.csrc`` package."""
    env = os.environ.get("SAEURON_CSRC_DIR")
    if env:
        return Path(env)
    return Path(__file__).parent / "csrc"


def sources(with_cuda: bool, folder: Optional[Path] = None) -> list[Path]:
    """The files to compile: every ``.cpp`` (minus CUDA-only ones on CPU builds), plus ``.cu`` with CUDA."""
    folder = Path(folder) if folder is not None else source_dir()
    cpp = [p for p in sorted(folder.glob("*.cpp")) if with_cuda or p.name not in CUDA_SOURCES]
    cu = sorted(folder.glob("*.cu")) if with_cuda else []
    if not cpp:
        raise FileNotFoundError(f"no C++ sources (*.cpp) in {folder}; set SAEURON_CSRC_DIR to the csrc folder")
    return cpp + cu


def nvcc_path() -> Optional[str]:
    """Path of nvcc: in torch's CUDA_HOME, else on PATH; None if there is none."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def cuda_buildable() -> bool:
    """Whether to build the CUDA kernels: torch with CUDA, a visible GPU and a toolkit torch can use."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return (torch.version.cuda is not None and torch.cuda.is_available() and home is not None
            and Path(home, "bin", "nvcc").exists())


def arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the compute capabilities of the visible GPUs (e.g. ``9.0``)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def build_key(files: list[Path], with_cuda: bool, arch: str) -> str:
    """Hash of everything that changes the binary: source contents, torch/CUDA/Python versions, flags."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for s in (torch.__version__, str(torch.version.cuda), sys.version, str(with_cuda), arch,
              " ".join(CXX_FLAGS), " ".join(NVCC_FLAGS)):
        h.update(s.encode() + b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """Root of saeuron's caches: ``SAEURON_CACHE_DIR`` or ``~/.cache/saeuron``."""
    return Path(os.environ.get("SAEURON_CACHE_DIR") or Path.home() / ".cache" / "saeuron").expanduser()


class CompiledBackend:
    """The built module under the interface of :mod:`saeuron.ops` (reference signatures, fresh outputs)."""

    name = "cuda"

    def __init__(self, module, with_cuda: bool, path: Path):
        self.module, self.with_cuda, self.path = module, with_cuda, path

    def supports(self, op: str, device) -> bool:
        """Whether this build has a kernel for ``op`` on tensors of ``device``'s type."""
        kind = torch.device(device).type
        if kind == "cpu":
            return op in CPU_OPS
        return kind == "cuda" and self.with_cuda and op in OPS

    def topk_encode(self, x, W_enc, b_enc, b_dec, k):
        """See :func:`saeuron.reference.topk_encode` (CUDA only)."""
        return tuple(self.module.topk_encode(x, W_enc, b_enc, b_dec, int(k)))

    def sparse_decode(self, values, indices, W_dec, b_dec=None, residual=None):
        """See :func:`saeuron.reference.sparse_decode`."""
        return self.module.sparse_decode(values, indices, W_dec, b_dec, residual)

    def sparse_decode_bwd(self, grad_out, values, indices, W_dec):
        """See :func:`saeuron.reference.sparse_decode_backward`."""
        return tuple(self.module.sparse_decode_bwd(grad_out, values, indices, W_dec))

    def gather_encode(self, x, W_enc, b_enc, b_dec, indices):
        """See :func:`saeuron.reference.gather_encode`."""
        return self.module.gather_encode(x, W_enc, b_enc, b_dec, indices)

    def gather_encode_bwd(self, grad_values, x, W_enc, b_dec, indices, values):
        """See :func:`saeuron.reference.gather_encode_backward`."""
        return tuple(self.module.gather_encode_bwd(grad_values, x, W_enc, b_dec, indices, values))

    def edit_(self, x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group):
        """See :func:`saeuron.reference.edit_` (in place on ``x``)."""
        self.module.edit_(x, W_enc, b_enc, b_dec, W_dec, int(k), feat_idx, tau, scale, int(rows_per_group))


def _so_path(build_dir: Path, name: str) -> Path:
    import sysconfig

    for suffix in (".so", ".pyd", sysconfig.get_config_var("EXT_SUFFIX") or ".so"):
        if (build_dir / (name + suffix)).exists():
            return build_dir / (name + suffix)
    return build_dir / f"{name}.so"


@functools.lru_cache(maxsize=None)
def _load(folder: str, cache: str, with_cuda: bool, arch: str) -> CompiledBackend:
    from torch.utils import cpp_extension

    files = sources(with_cuda, Path(folder))
    key = build_key(files, with_cuda, arch)
    name = f"saeuron_C_{key}"
    build_dir = Path(cache) / "ext" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    if not _so_path(build_dir, name).exists():
        print("saeuron: building the C++ extension (first use only)...", file=sys.stderr, flush=True)
    defines = ["-DSAEURON_WITH_CUDA"] if with_cuda else []
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        module = cpp_extension.load(
            name=name, sources=[str(p) for p in files], extra_cflags=CXX_FLAGS + defines,
            extra_cuda_cflags=NVCC_FLAGS + defines, extra_include_paths=[folder], build_directory=str(build_dir),
            with_cuda=with_cuda, verbose=os.environ.get("SAEURON_BUILD_VERBOSE") == "1")
    finally:
        if with_cuda:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    if bool(module.cuda_enabled()) != with_cuda:
        raise RuntimeError(f"the extension in {build_dir} was built with cuda={module.cuda_enabled()}, "
                           f"expected {with_cuda}")
    return CompiledBackend(module, with_cuda, build_dir)


def load_backend() -> CompiledBackend:
    """Build (first use only) and load the extension; raises with the reason when it cannot."""
    if os.environ.get("SAEURON_NO_BUILD", "").strip() not in ("", "0"):
        raise RuntimeError("SAEURON_NO_BUILD is set: the compiled saeuron extension is disabled")
    with_cuda = cuda_buildable()
    return _load(str(source_dir().resolve()), str(cache_root()), with_cuda, arch_list() if with_cuda else "")
