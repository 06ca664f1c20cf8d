"""Small shared helpers: atomic file writes (a kill never leaves a half-written file), one writer per
output folder (:class:`FolderLock`), and checks of values where they enter."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(obj, path) -> Path:
    """Write ``obj`` as indented JSON to ``path`` via a temporary file and ``os.replace``."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
    return atomic_write(path, write)


def atomic_save_file(tensors: dict, path, metadata=None) -> Path:
    """safetensors ``save_file`` via a temporary file and ``os.replace``."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# --------------------------------------------------------------------------- one writer per folder

LOCK_NAME = ".saeuron.lock"
_HELD: dict = {}  # resolved lock path -> [fd, count, thread id, shared run id or None]
_HELD_GUARD = threading.Lock()


class FolderBusyError(RuntimeError):
    """Another process (or thread) holds the write lock of an output folder."""


def _owner(path: Path) -> str:
    """The owner recorded in a lock file, as words."""
    try:
        info = json.loads(path.read_text() or "{}")
        run = f" (run {info['run']}, shared by its processes)" if info.get("run") else ""
        return (f"pid {info.get('pid')} on {info.get('host')}, {info.get('what', 'writing')} since "
                f"{info.get('since')}{run}")
    except (OSError, ValueError):
        return "owner unknown"


class FolderLock:
    """A re-entrant (per thread) write lock on ``folder`` (``folder/.saeuron.lock``, ``fcntl.flock``).

    Exclusive by default. With ``shared=RUN_ID`` (a string the processes of one run agree on, e.g. the ranks
    of one ``torchrun`` job) every process presenting the same ``RUN_ID`` holds the folder together, while an
    exclusive request or a different ``RUN_ID`` is refused as long as any of them holds it. The kernel drops
    the lock when its process dies (a killed run never leaves a stale lock: the file it leaves is simply
    locked anew); the file records the first owner's pid, host, task and run id for the error the second
    writer gets, and the last holder removes it on release. ``timeout``: seconds to wait for the lock (0:
    fail at once with :class:`FolderBusyError`).
    """

    def __init__(self, folder, what: str = "writing to", timeout: float = 0.0, shared: Optional[str] = None):
        self._released = True  # nothing held until acquired (a failed acquisition releases nothing)
        if shared is not None and (not isinstance(shared, str) or not shared):
            raise ValueError(f"FolderLock(shared=...) must be None (exclusive) or a non-empty run id string, "
                             f"got {shared!r}")
        self.folder = Path(folder)
        self.what = what
        self.shared = shared
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder.resolve() / LOCK_NAME
        key = str(self.path)
        me = threading.get_ident()
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None and (held[2] == me or (shared is not None and held[3] == shared)):
                if held[3] != shared:
                    raise FolderBusyError(
                        f"{self.folder} is already held by this thread "
                        f"{'exclusively' if held[3] is None else f'for run {held[3]}'}; it cannot also be "
                        f"{'shared with run ' + shared if shared else 'taken exclusively'} ({what} it)")
                held[1] += 1
                self._released = False
                return
        deadline = time.monotonic() + max(float(timeout), 0.0)
        while True:
            with _HELD_GUARD:
                held = _HELD.get(key)
                if held is None:
                    fd = self._try_lock()
                    if fd is not None:
                        _HELD[key] = [fd, 1, me, shared]
                        self._released = False
                        return
            if time.monotonic() >= deadline:
                raise FolderBusyError(
                    f"{self.folder} is in use by another saeuron run ({_owner(self.path)}); two runs writing one "
                    f"folder would mix their outputs, so this one ({what} it) stops: wait for the other to finish "
                    f"or use another folder")
            time.sleep(0.05)

    def _try_lock(self):
        """Open and flock the lock file; the fd on success, None when another run holds it."""
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OSError(e.errno, f"cannot create the lock file {self.path} to write into {self.folder} "
                                       f"({e.strerror}; a read-only folder?)") from None
            try:
                first = self._flock(fd)
            except OSError as e:
                os.close(fd)
                raise OSError(e.errno, f"cannot lock {self.path} ({e.strerror}): the file system does not support "
                                       "flock, so saeuron cannot keep two runs from writing this folder at once") from None
            if first is None:  # held by another run
                os.close(fd)
                return None
            try:  # the holder unlinks the file on release: make sure we locked the file that is there now
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if first:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": self.shared}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            if self.shared is not None:  # written while exclusive; now let the run's other processes in
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # another run slipped in while the lock was converted: it has the folder
                    os.close(fd)
                    return None
        return fd

    def _flock(self, fd):
        """flock ``fd``: True when this process is the first holder (exclusive so far), False when it joined its
        run's shared hold, None when another run (or an exclusive writer) holds the folder."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if self.shared is None:
                return None
        try:  # somebody holds it: join if they are this run
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # an exclusive holder (another run, or this run's first process still setting up)
            return None
        try:
            run = json.loads(os.pread(fd, 4096, 0).decode() or "{}").get("run")
        except (ValueError, AttributeError):
            run = None
        if run == self.shared:
            return False
        try:  # the file may be a dead run's leftover: if nobody else holds it now, it is ours
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return None

    def release(self) -> None:
        """Release this hold (the lock itself goes when the last hold of the thread is released)."""
        if self._released:
            return
        self._released = True
        with _HELD_GUARD:
            held = _HELD.get(str(self.path))
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del _HELD[str(self.path)]
                last = True
                if held[3] is not None:  # shared: only the run's last holder may remove the file
                    import fcntl

                    try:
                        fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        last = False
                if last:
                    try:
                        os.unlink(self.path)  # still locked here, so no other process holds this file
                    except OSError:
                        pass
                os.close(held[0])  # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()  # a forgotten hold goes with its object (e.g. a store that was never closed)
        except Exception:
            pass


def locks_folder(arg: str, what: str, create: bool = True):
    """Decorator: hold :class:`FolderLock` on the folder given as argument ``arg`` for the call (skipped when
    None, or when the folder does not exist and ``create`` is False: the call then reports that itself)."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = bound.arguments.get(arg)
            if folder is None or (not create and not Path(folder).is_dir()):
                return fn(*args, **kwargs)
            with FolderLock(folder, what):
                return fn(*args, **kwargs)
        return inner
    return wrap


def holds_lock(folder) -> bool:
    """Whether this thread holds the write lock of ``folder``."""
    held = _HELD.get(str(Path(folder).resolve() / LOCK_NAME))
    return held is not None and held[2] == threading.get_ident()


# --------------------------------------------------------------------------- checks where values enter

def check_finite_number(value, what: str, allow=None) -> float:
    """``value`` as a float when it is a finite real number (not a bool), else a ValueError naming ``what``."""
    try:
        v = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or (allow is not None and not allow(v)):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return v


def read_json(path, what: str = "JSON file"):
    """Parse the JSON file ``path``; a missing, unreadable or malformed file raises a clear error naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} cannot be read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def looks_like_path(name) -> bool:
    """Whether ``name`` can only be a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``), never a hub id ``org/name``."""
    s = str(name)
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith("/") or "\\" in s


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
