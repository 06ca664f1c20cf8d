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
- ``SAEURON_BUILD_TIMEOUT``: seconds to wait for another process's build of the same sources (default 1800).

Trust: every cache folder must belong to this user and not be writable by group or others (new ones are
made 0700), else nothing is built or loaded. After a build, ``build.json`` records the build key and the
SHA-256 of the built module; a module whose record is missing or does not match (placed there, or left
half-written) is never loaded: the build folder is emptied and rebuilt. One build per folder at a time
(a lock that the kernel drops when its owner dies); torch's own ``lock`` file left by a killed build
is removed with a warning instead of making every later load wait forever.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from .utils import LOCK_NAME, FolderBusyError, FolderLock, atomic_write_json, file_sha256

CUDA_SOURCES = ("cuda_ops.cpp",)  # .cpp files compiled only in CUDA builds (all .cu files are too)
CXX_FLAGS = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for is inline OpenMP, serial without it
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
    """Hash of everything that changes the binary: source contents, torch/CUDA/Python versions, flags, and the
    source folder (ninja rebuilds when the sources' paths change, so two checkouts sharing one folder would
    keep rebuilding each other's module)."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for folder in sorted({str(Path(p).resolve().parent) for p in files}):
        h.update(folder.encode() + b"\0")
    for s in (torch.__version__, str(torch.version.cuda), sys.version, str(with_cuda), arch,
              " ".join(CXX_FLAGS), " ".join(NVCC_FLAGS)):
        h.update(s.encode() + b"\0")
    return h.hexdigest()[:16]


MANIFEST = "build.json"


def private_dir(path: Path, follow: bool = False) -> Path:
    """Create ``path`` (mode 0700) if needed and refuse it unless it is a folder of this user that group and
    others cannot write (a shared cache would let another user replace the code this process runs); a
    symlink is refused unless ``follow`` (the cache root may be a link to a private folder)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"the build cache {path} is a symlink or not a folder: refusing to build or load code "
                           "there; set SAEURON_CACHE_DIR to a private folder")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise RuntimeError(f"the build cache {path} belongs to another user (uid {st.st_uid}): refusing to build or "
                           "load code there; set SAEURON_CACHE_DIR to a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f"the build cache {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                           f"anyone who can write there could replace the compiled code; run `chmod go-w {path}` or "
                           "set SAEURON_CACHE_DIR to a private folder")
    return path


def build_timeout() -> float:
    """Seconds to wait for another process's build: ``SAEURON_BUILD_TIMEOUT`` (default 1800), checked."""
    text = os.environ.get("SAEURON_BUILD_TIMEOUT", "").strip() or "1800"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"SAEURON_BUILD_TIMEOUT={text!r} must be a number of seconds >= 0")
    return value


def check_sources_private(files: list) -> None:
    """Refuse to compile sources that group or others can write (they could change the code this process runs)."""
    folders = {Path(f).resolve().parent for f in files}
    for p in sorted(folders | {q for d in folders for q in d.iterdir() if q.is_file()}):  # headers included
        mode = p.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(f"the extension sources {p} are writable by group or others (mode "
                               f"{stat.S_IMODE(mode):o}): refusing to compile and load them; run `chmod go-w {p}`")



def verified_build(build_dir: Path, so: Path, key: str) -> bool:
    """Whether ``build_dir/build.json`` records build ``key`` and exactly the bytes of ``so``."""
    try:
        rec = json.loads((Path(build_dir) / MANIFEST).read_text())
        return isinstance(rec, dict) and rec.get("key") == key and rec.get("file") == so.name \
            and rec.get("sha256") == file_sha256(so)
    except (OSError, ValueError):
        return False


def _empty_build_dir(build_dir: Path, keep=()) -> None:
    """Remove everything in ``build_dir`` but the names in ``keep``."""
    for p in Path(build_dir).iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def cache_root() -> Path:
    """Root of saeuron's caches: ``SAEURON_CACHE_DIR`` or ``~/.cache/saeuron``."""
    return Path(os.environ.get("SAEURON_CACHE_DIR") or Path.home() / ".cache" / "saeuron").expanduser()


class CompiledBackend:
    """The built module under the interface of :mod:`saeuron.ops` (reference signatures, fresh outputs)."""

    name = "cuda"

    def __init__(self, module, with_cuda: bool, path: Path):
        self.module, self.with_cuda, self.path = module, with_cuda, path

    @functools.cached_property
    def kernels(self) -> dict:
        """``{op: {device type: dtype names}}``: what this build instantiates, as csrc/bindings.cpp declares it."""
        return {op: {dev: frozenset(names) for dev, names in per.items()} for op, per in self.module.kernels().items()}

    def supports(self, op: str, device, dtype: torch.dtype) -> bool:
        """Whether this build has a kernel for ``op`` on tensors of ``device``'s type and ``dtype``."""
        name = str(dtype).removeprefix("torch.")
        return name in self.kernels.get(op, {}).get(torch.device(device).type, ())

    def topk_encode(self, x, W_enc, b_enc, b_dec, k):
        """See :func:`saeuron.reference.topk_encode` (CUDA tensors only)."""
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
    files = sources(with_cuda, Path(folder))
    check_sources_private(files)
    key = build_key(files, with_cuda, arch)
    name = f"saeuron_C_{key}"
    private_dir(Path(cache), follow=True)
    private_dir(Path(cache) / "ext")
    build_dir = private_dir(Path(cache) / "ext" / key)
    timeout = build_timeout()
    try:
        lock = FolderLock(build_dir, "building the saeuron C++ extension in", timeout=timeout)
    except FolderBusyError as e:
        raise RuntimeError(f"gave up waiting {timeout:g} s for another process's build of the extension ({e}); "
                           "raise SAEURON_BUILD_TIMEOUT or stop that process") from None
    with lock:
        return _build_and_load(folder, files, key, name, build_dir, with_cuda, arch)


def _build_and_load(folder, files, key, name, build_dir, with_cuda, arch):
    """Verify or (re)build, then load, the module in ``build_dir``; called with the build lock held."""
    from torch.utils import cpp_extension

    stale = build_dir / "lock"  # torch's FileBaton; we hold the only builder lock, so its owner is gone
    if stale.exists():
        warnings.warn(f"removed {stale}, a build lock left by a build that was killed; rebuilding")
        stale.unlink()
    so = _so_path(build_dir, name)
    if so.exists() and not verified_build(build_dir, so, key):
        warnings.warn(f"{so} has no matching build record ({MANIFEST}): it was not built here or is incomplete, so it "
                      "is not loaded; rebuilding in an emptied folder")
        _empty_build_dir(build_dir, keep=(LOCK_NAME,))
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
    so = _so_path(build_dir, name)
    if not verified_build(build_dir, so, key):  # built just now (by this process, under the lock): record it
        atomic_write_json({"key": key, "file": so.name, "sha256": file_sha256(so), "with_cuda": with_cuda, "arch": arch,
                           "torch": torch.__version__, "sources": [p.name for p in files], "cxx_flags": CXX_FLAGS,
                           "nvcc_flags": NVCC_FLAGS}, build_dir / MANIFEST)
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
