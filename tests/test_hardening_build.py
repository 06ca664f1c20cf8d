"""Issue 23, class 5: the just-in-time build cache records and verifies what it built, refuses shared
folders, and recovers from a killed build's lock. ``cpp_extension.load`` is replaced by a fake that
writes a module file, so nothing is compiled here (tests/test_ext.py builds the real one)."""
import json
import os
import threading
import types
import warnings

import pytest

from saeuron import extension
from saeuron.utils import FolderLock, file_sha256


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A source folder, a private cache root and a fake ``cpp_extension.load`` that records its calls."""
    from torch.utils import cpp_extension

    src = tmp_path / "src"
    src.mkdir()
    (src / "ops.cpp").write_text("int f() { return 1; }\n")
    cache = tmp_path / "cache"
    calls = []

    def load(name, sources, build_directory, **kw):
        so = extension.Path(build_directory) / f"{name}.so"
        loaded = so.read_bytes() if so.exists() else None
        if loaded is None:  # "compile"
            so.write_bytes(b"built by saeuron " + name.encode())
        calls.append({"built": loaded is None, "loaded": so.read_bytes(), "files": sorted(os.listdir(build_directory))})
        return types.SimpleNamespace(cuda_enabled=lambda: False)

    monkeypatch.setattr(cpp_extension, "load", load)
    key = extension.build_key(extension.sources(False, src), False, "")
    return types.SimpleNamespace(src=src, cache=cache, calls=calls, dir=cache / "ext" / key, so_name=f"saeuron_C_{key}.so")


def _load(f):
    return extension._load.__wrapped__(str(f.src), str(f.cache), False, "")


def test_build_is_recorded_and_reused(fake):
    _load(fake)
    rec = json.loads((fake.dir / extension.MANIFEST).read_text())
    assert rec["file"] == fake.so_name and rec["sha256"] == file_sha256(fake.dir / fake.so_name)
    assert [c["built"] for c in fake.calls] == [True]
    _load(fake)  # verified: loaded as is
    assert [c["built"] for c in fake.calls] == [True, False]
    assert oct(fake.dir.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("when", ["before the first build", "after a build (tampered)"])
def test_a_planted_module_is_never_loaded(fake, when):
    if when.startswith("after"):
        _load(fake)
        fake.calls.clear()
    else:
        fake.dir.mkdir(parents=True, mode=0o700)
    (fake.dir / fake.so_name).write_bytes(b"evil")
    (fake.dir / "helper.o").write_bytes(b"evil object")
    with pytest.warns(UserWarning, match="no matching build record"):
        _load(fake)
    assert fake.calls[-1]["built"] and b"evil" not in fake.calls[-1]["loaded"]
    assert "helper.o" not in fake.calls[-1]["files"]  # nothing planted is linked in either


@pytest.mark.parametrize("which", ["root", "ext", "build"])
def test_cache_folders_writable_by_others_are_refused(fake, which):
    _load(fake)
    target = {"root": fake.cache, "ext": fake.cache / "ext", "build": fake.dir}[which]
    target.chmod(0o777)
    try:
        with pytest.raises(RuntimeError, match=r"writable by group or others \(mode 777\).*chmod go-w"):
            _load(fake)
    finally:
        target.chmod(0o700)


def test_a_symlinked_cache_is_refused(fake, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    fake.cache.mkdir(mode=0o700)
    (fake.cache / "ext").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="symlink"):
        _load(fake)


def test_a_killed_builds_lock_is_removed_with_a_warning(fake):
    fake.dir.mkdir(parents=True, mode=0o700)
    (fake.dir / "lock").write_text("")  # torch's FileBaton, left by a build that was killed
    with pytest.warns(UserWarning, match="killed"):
        _load(fake)
    assert not (fake.dir / "lock").exists() and fake.calls[-1]["built"]


def test_a_live_build_elsewhere_is_waited_for_then_given_up(fake, monkeypatch):
    fake.dir.mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("SAEURON_BUILD_TIMEOUT", "0.3")
    ready, stop = threading.Event(), threading.Event()

    def hold():
        with FolderLock(fake.dir, "building"):
            ready.set()
            stop.wait(10)
    t = threading.Thread(target=hold, daemon=True)
    t.start()
    ready.wait(5)
    try:
        with pytest.raises(RuntimeError, match=r"gave up waiting 0.3 s .*pid"):
            _load(fake)
    finally:
        stop.set()
        t.join(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(fake)
