"""Sharded safetensors activations: atomic writes, resume, lazy reads, several writer processes.

Layout of a store folder::

    root/store.json                                  manifest: hookpoints, prompts, labels, config, done batches
    root/<hookpoint>/shard_<batch:06d>.safetensors   x [n, d], timestep [n] float32, prompt_id [n] int64
    root/.done/batch_<batch:06d>.json                (shared writers only) batch written, not yet in store.json

A shard is one prompt batch of one hookpoint. ``write_batch`` writes every hookpoint's shard atomically
and only then records the batch as done, so a killed writer leaves at worst shards that are not yet
listed (ignored by readers, overwritten under the same names on resume) and stale ``.tmp`` files
(removed when the store is reopened for writing). Readers never see a partial shard.

Several processes (the ranks of one ``torchrun`` job) write one store together: one of them opens it with
``create(..., run_id=RUN)``, the others with ``join(root, RUN)``, and they share the folder's lock (another
run is still refused). Each process writes only its own batches, so no two write the same shard file, and
records a finished batch by an atomically written marker ``.done/batch_<b>.json`` instead of touching
``store.json``; one process then folds the markers into ``store.json`` with ``merge_pending`` (one atomic
write). Markers a killed run leaves are folded in by the next ``create``, so a rerun redoes only the
batches that have none.

Canonical row order: a reader sees the shards of a hookpoint in ascending batch index, and the rows of a
shard in the order they were captured (denoiser call, then prompt within the batch, then token). The rows
of a batch depend only on its prompts and the collection settings, never on which process wrote it, so a
store written by N processes reads back row for row like the one a single process writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from pathlib import Path
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from .utils import FolderLock, atomic_save_file, atomic_write_json, holds_lock, read_json

VERSION = 1
FIELDS = ("x", "timestep", "prompt_id")
PENDING_DIR = ".done"  # markers of shared writers' finished batches (hookpoint names cannot start with ".")
# safetensors dtype names of the tensors a shard holds (others are read through safetensors itself)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32}


def _canon(obj):
    """JSON round trip, so tuples/lists and int/float keys compare the way they will after a reload."""
    return json.loads(json.dumps(obj))


def derive_seed(*parts) -> int:
    """A deterministic 63-bit seed from ints/strings (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _describe(key, stored, requested) -> str:
    """One line saying how a stored manifest entry differs from the requested one."""
    if isinstance(stored, list) and isinstance(requested, list):
        if len(stored) != len(requested):
            return f"{key}: {len(stored)} stored vs {len(requested)} requested"
        i = next(i for i, (a, b) in enumerate(zip(stored, requested)) if a != b)
        return f"{key}[{i}]: stored {stored[i]!r} vs requested {requested[i]!r}"
    return f"{key}: stored {stored!r} vs requested {requested!r}"


def _read_header(path: Path) -> dict:
    """The safetensors JSON header of ``path``, checked against the file size (catches truncation)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size} bytes")
        missing = [k for k in FIELDS if k not in header]
        if missing:
            raise ValueError(f"missing tensors {missing}")
        header["__start__"] = 8 + n  # byte offset of the data block (data_offsets count from here)
        return header
    except FileNotFoundError:
        raise FileNotFoundError(f"activation shard {path} is listed as done in store.json but is missing") from None
    except Exception as e:
        raise ValueError(f"corrupt activation shard {path}: {e}") from e


def _read_manifest(manifest: Path) -> dict:
    """``store.json`` parsed and checked field by field (a clear error names the first bad field)."""
    meta = read_json(manifest, "activation store manifest")
    if not isinstance(meta, dict):
        raise ValueError(f"activation store manifest {manifest} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{manifest} has version {meta.get('version')!r}; this saeuron reads version {VERSION}")
    hps, prompts, labels, done = meta.get("hookpoints"), meta.get("prompts"), meta.get("labels"), meta.get("done")
    bad = None
    if not isinstance(hps, dict) or not hps or not all(isinstance(v, int) and v > 0 for v in hps.values()):
        bad = "'hookpoints' must be a non-empty object {name: width > 0}"
    elif not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        bad = "'prompts' must be a non-empty list of strings"
    elif labels is not None and (not isinstance(labels, list) or len(labels) != len(prompts)):
        bad = "'labels' must be null or a list with one entry per prompt"
    elif not isinstance(done, list) or not all(isinstance(b, int) and b >= 0 for b in done):
        bad = "'done' must be a list of batch indices >= 0"
    elif not isinstance(meta.get("config", {}), dict):
        bad = "'config' must be an object"
    if bad:
        raise ValueError(f"corrupt activation store manifest {manifest}: {bad}")
    return meta


class ActivationStore:
    """A folder of per-hookpoint activation shards plus a ``store.json`` manifest (see module docstring)."""

    def __init__(self, root):
        """Open an existing store; raises if ``root/store.json`` is missing."""
        self.root = Path(root)
        manifest = self.root / "store.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"no activation store at {self.root}: {manifest} is missing "
                                    "(create one with ActivationStore.create or saeuron.collect)")
        self.meta = _read_manifest(manifest)
        self._headers: dict = {}
        self._lock = None
        self._shared = False  # True for a writer of a shared run: finished batches go to .done/ markers

    @classmethod
    def create(cls, root, hookpoints: dict, prompts: list, labels=None, config=None, *,
               run_id: Optional[str] = None) -> "ActivationStore":
        """Create a new store, or reopen an existing one for resuming if it was made with the same arguments.

        Reopening folds in the ``.done`` markers a killed shared run left. With ``run_id`` the folder's lock is
        shared with the processes that ``join`` the store under the same id, and finished batches are recorded
        as markers until ``merge_pending``.
        """
        root = Path(root)
        hookpoints = {str(k): int(v) for k, v in dict(hookpoints).items()}
        if not hookpoints:
            raise ValueError("at least one hookpoint is needed")
        for name, d in hookpoints.items():
            if not name or "/" in name or os.sep in name or name.startswith("."):
                raise ValueError(f"hookpoint name {name!r} cannot be used as a folder name")
            if d <= 0:
                raise ValueError(f"hookpoint {name!r} has width {d}; widths must be positive")
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if labels is not None and len(labels) != len(prompts):
            raise ValueError(f"{len(labels)} labels for {len(prompts)} prompts; give one label (or None) per prompt")
        meta = _canon(dict(hookpoints=hookpoints, prompts=prompts, labels=None if labels is None else list(labels),
                           config=config or {}, done=[], version=VERSION))
        # one run: a second one fails here, clearly (the processes of one shared run pass together)
        lock = FolderLock(root, "collecting activations into", shared=run_id)
        try:
            if (root / "store.json").is_file():
                store = cls(root)
                diff = [_describe(k, store.meta.get(k), meta[k]) for k in ("hookpoints", "prompts", "labels", "config")
                        if store.meta.get(k) != meta[k]]
                if diff:
                    raise ValueError(f"{root} already holds an activation store made with other arguments ("
                                     + "; ".join(diff) + "); use a new folder to collect something else")
                store._clean_tmp()
                store._lock = lock
                store.merge_pending()  # batches a killed shared run finished count as done
            else:
                atomic_write_json(meta, root / "store.json")
                store = cls(root)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        store._shared = run_id is not None
        return store

    @classmethod
    def join(cls, root, run_id: str, timeout: float = 60.0) -> "ActivationStore":
        """Open the store another process of run ``run_id`` created, to write batches alongside it (shared lock;
        finished batches are recorded as ``.done`` markers until that process calls ``merge_pending``)."""
        lock = FolderLock(root, "collecting activations into", timeout=timeout, shared=run_id)
        try:
            store = cls(root)
        except BaseException:
            lock.release()
            raise
        store._lock, store._shared = lock, True
        return store

    def reload(self) -> "ActivationStore":
        """Re-read ``store.json`` (e.g. after another process merged batches into it); returns ``self``."""
        self.meta = _read_manifest(self.root / "store.json")
        return self

    def close(self) -> None:
        """Release this store's write lock (taken by ``create`` or the first ``write_batch``); reading goes on."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _clean_tmp(self):
        """Remove temporary files a killed writer left behind (only call while no other writer is active)."""
        for folder in [self.root, self.root / PENDING_DIR] + [self.root / h for h in self.hookpoints]:
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)

    # --- manifest -------------------------------------------------------------------------------
    @property
    def hookpoints(self) -> list:
        """Hookpoint names in collection order."""
        return list(self.meta["hookpoints"])

    @property
    def prompts(self) -> list:
        """All prompts; ``prompt_id`` rows index this list."""
        return list(self.meta["prompts"])

    @property
    def labels(self):
        """Concept name (or None) per prompt, or None if the prompts were not labelled."""
        return self.meta.get("labels")

    def d_in(self, hookpoint) -> int:
        """Activation width of ``hookpoint``."""
        return self.meta["hookpoints"][self._check(hookpoint)]

    def _check(self, hookpoint) -> str:
        if hookpoint not in self.meta["hookpoints"]:
            raise ValueError(f"unknown hookpoint {hookpoint!r}; this store holds: {', '.join(self.hookpoints)}")
        return hookpoint

    def done_batches(self) -> set:
        """Indices of the prompt batches whose shards are all written."""
        return set(self.meta["done"])

    def pending_batches(self) -> set:
        """Batches shared writers finished (``.done`` markers) that ``store.json`` does not list yet."""
        folder = self.root / PENDING_DIR
        found = set()
        for p in folder.glob("batch_*.json") if folder.is_dir() else ():
            try:
                found.add(int(p.stem.split("_", 1)[1]))
            except ValueError:
                pass
        return found - set(self.meta["done"])

    def __len__(self) -> int:
        """Number of completed prompt batches."""
        return len(self.meta["done"])

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.root)!r}, hookpoints={self.meta['hookpoints']}, "
                f"prompts={len(self.meta['prompts'])}, done_batches={len(self)})")

    # --- writing --------------------------------------------------------------------------------
    def _path(self, hookpoint, batch_idx) -> Path:
        return self.root / hookpoint / f"shard_{batch_idx:06d}.safetensors"

    def _marker(self, batch_idx) -> Path:
        return self.root / PENDING_DIR / f"batch_{batch_idx:06d}.json"

    def _take_lock(self):
        """The exclusive write lock, unless this store (or this thread) already holds the folder."""
        if self._lock is None and not holds_lock(self.root):
            self._lock = FolderLock(self.root, "collecting activations into")

    def _check_not_replaced(self, doing: str) -> dict:
        """``store.json`` as on disk, after checking it is still the manifest this store was opened with."""
        on_disk = _read_manifest(self.root / "store.json")
        changed = [k for k in ("hookpoints", "prompts", "labels", "config", "version") if on_disk.get(k) != self.meta.get(k)]
        if changed:
            raise ValueError(f"{self.root / 'store.json'} was replaced by another run since this store was opened "
                             f"({', '.join(changed)} differ); not {doing}")
        return on_disk

    def write_batch(self, batch_idx: int, rows: dict):
        """Write one prompt batch (``rows[hookpoint] = {"x", "timestep", "prompt_id"}``), then mark it done."""
        if not isinstance(batch_idx, int) or batch_idx < 0:
            raise ValueError(f"batch_idx must be a non-negative int, got {batch_idx!r}")
        if set(rows) != set(self.meta["hookpoints"]):
            raise ValueError(f"write_batch needs rows for exactly the hookpoints {self.hookpoints}, got {sorted(rows)}")
        clean = {}
        for hp, r in rows.items():
            if set(r) != set(FIELDS):
                raise ValueError(f"rows[{hp!r}] must have keys {FIELDS}, got {sorted(r)}")
            x, t, pid = r["x"], r["timestep"], r["prompt_id"]
            n, d = x.shape[0], self.d_in(hp)
            if not x.is_floating_point():
                raise ValueError(f"rows[{hp!r}]['x'] must be a floating point tensor, got {x.dtype}")
            if x.ndim != 2 or x.shape[1] != d or t.shape != (n,) or pid.shape != (n,):
                raise ValueError(f"rows[{hp!r}]: expected x [n, {d}], timestep [n], prompt_id [n]; got "
                                 f"{tuple(x.shape)}, {tuple(t.shape)}, {tuple(pid.shape)}")
            if n and not bool(torch.isfinite(t.float()).all()):
                raise ValueError(f"rows[{hp!r}]['timestep'] holds NaN or Inf; every row needs the finite timestep "
                                 "the UNet received")
            if n and (int(pid.min()) < 0 or int(pid.max()) >= len(self.meta["prompts"])):
                raise ValueError(f"rows[{hp!r}]: prompt_id out of range [0, {len(self.meta['prompts'])})")
            clean[hp] = {"x": x.detach().cpu(), "timestep": t.detach().cpu().float(),
                         "prompt_id": pid.detach().cpu().long()}
        self._take_lock()
        # merge with the file, never overwrite it from memory
        on_disk = self._check_not_replaced(f"writing batch {batch_idx} into it")
        for hp, r in clean.items():
            atomic_save_file(r, self._path(hp, batch_idx), metadata={"hookpoint": hp, "batch": str(batch_idx)})
        if self._shared:  # other processes write too: a marker of our own, store.json is merged once, later
            atomic_write_json({"batch": batch_idx, "rows": {hp: len(r["x"]) for hp, r in clean.items()}},
                              self._marker(batch_idx))
            return
        self.meta["done"] = sorted(set(on_disk["done"]) | set(self.meta["done"]) | {batch_idx})
        atomic_write_json(self.meta, self.root / "store.json")

    def merge_pending(self) -> set:
        """Fold the ``.done`` markers of shared writers into ``store.json`` (one atomic write) and remove them.

        Call it from one process while no other process writes ``store.json`` (in a shared run: after every
        process has finished writing). A marker whose shards are missing or do not match it is dropped with a
        warning, so that batch is collected again. Returns the batch indices that were merged.
        """
        folder = self.root / PENDING_DIR
        markers = sorted(folder.glob("batch_*.json")) if folder.is_dir() else []
        if not markers:
            return set()
        self._take_lock()
        on_disk = self._check_not_replaced("merging finished batches into it")
        merged, bad = set(), []
        for m in markers:
            try:
                info = read_json(m, "batch marker")
                b, rows = info["batch"], info["rows"]
                if not isinstance(b, int) or m.name != f"batch_{b:06d}.json" or set(rows) != set(self.hookpoints):
                    raise ValueError("its batch index or hookpoints do not match the store")
                for hp in self.hookpoints:
                    n = _read_header(self._path(hp, b))["x"]["shape"][0]
                    if n != rows[hp]:
                        raise ValueError(f"{self._path(hp, b)} holds {n} rows, the marker says {rows[hp]}")
            except Exception as e:  # noqa: BLE001 - any damage means: collect this batch again
                bad.append(f"{m.name} ({e})")
                continue
            merged.add(b)
        if bad:
            warnings.warn(f"{self.root}: ignored {len(bad)} damaged batch marker(s), those batches will be collected "
                          f"again: {'; '.join(bad[:3])}")
        self.meta["done"] = sorted(set(on_disk["done"]) | set(self.meta["done"]) | merged)
        atomic_write_json(self.meta, self.root / "store.json")
        for m in markers:
            m.unlink(missing_ok=True)
        try:
            folder.rmdir()  # only when empty (no writer is active while merging, so nothing new lands here)
        except OSError:
            pass
        return merged

    # --- reading --------------------------------------------------------------------------------
    def shard_paths(self, hookpoint) -> list:
        """Shards of completed batches of ``hookpoint``, sorted by batch index."""
        self._check(hookpoint)
        return [self._path(hookpoint, b) for b in sorted(self.meta["done"])]

    def _header(self, path: Path) -> dict:
        st = path.stat() if path.exists() else None
        key = (str(path), st and st.st_mtime_ns, st and st.st_size)
        if key not in self._headers:
            self._headers[key] = _read_header(path)
        return self._headers[key]

    def _rows(self, path: Path) -> int:
        return self._header(path)["x"]["shape"][0]

    def num_rows(self, hookpoint) -> int:
        """Total rows of ``hookpoint``, read from the shard headers only."""
        return sum(self._rows(p) for p in self.shard_paths(hookpoint))

    def read_shard(self, hookpoint, i) -> dict:
        """Load shard ``i`` (index into ``shard_paths``) as ``{"x", "timestep", "prompt_id"}``."""
        paths = self.shard_paths(hookpoint)
        if not -len(paths) <= i < len(paths):
            raise IndexError(f"shard index {i} out of range: {hookpoint!r} has {len(paths)} shards")
        return self._load(paths[i], self.d_in(hookpoint))

    def _load(self, path: Path, d: int) -> dict:
        from safetensors.torch import load_file

        self._header(path)  # size / truncation / key checks with a clear message
        try:
            out = load_file(str(path))
        except Exception as e:
            raise ValueError(f"corrupt activation shard {path}: {e}") from e
        n = out["x"].shape[0]
        if out["x"].shape != (n, d) or out["timestep"].shape != (n,) or out["prompt_id"].shape != (n,):
            raise ValueError(f"corrupt activation shard {path}: shapes {[tuple(out[k].shape) for k in FIELDS]} "
                             f"do not match x [n, {d}], timestep [n], prompt_id [n]")
        return {k: out[k] for k in FIELDS}

    def _plan(self, hookpoint, seed, epoch, rank, world_size, shuffle, buffer_shards):
        """This rank's shards in reading order, grouped into shuffle buffers."""
        paths = self.shard_paths(hookpoint)
        order = list(range(len(paths)))
        if shuffle:
            g = torch.Generator().manual_seed(derive_seed(seed, epoch))
            order = torch.randperm(len(paths), generator=g).tolist()
        mine = [paths[i] for i in order[rank::world_size]]
        return [mine[i:i + buffer_shards] for i in range(0, len(mine), buffer_shards)]

    def num_batches(self, hookpoint, batch_size: int, *, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                    drop_last=True, buffer_shards=4) -> int:
        """How many batches ``iter_batches`` yields with these arguments (from headers; for schedules and DDP)."""
        self._check_iter_args(batch_size, rank, world_size, 0, buffer_shards)
        n = sum(self._rows(p) for grp in self._plan(hookpoint, seed, epoch, rank, world_size, shuffle, buffer_shards)
                for p in grp)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    @staticmethod
    def _check_iter_args(batch_size, rank, world_size, start_batch, buffer_shards):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if buffer_shards <= 0:
            raise ValueError(f"buffer_shards must be positive, got {buffer_shards}")

    def iter_batches(self, hookpoint, batch_size: int, *, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                     start_batch=0, drop_last=True, dtype=None, device="cpu", buffer_shards=4) -> Iterator[dict]:
        """Lazily yield ``{"x": [B, d], "timestep": [B], "prompt_id": [B]}`` batches of ``hookpoint``.

        Streams stores larger than memory: at most ``buffer_shards`` shards are resident at any moment. The
        shards of a buffer are read from disk straight into one tensor (no second copy), every batch is a copy
        (a consumer holding it pins no buffer), and a buffer is freed before the next one is read; memory is
        ``buffer_shards`` shards plus the batches in flight. With ``shuffle`` the shard order is a
        permutation seeded by (seed, epoch) and the rows of each buffer are permuted too; shards are dealt
        round-robin to ``world_size`` ranks (every row goes to exactly one rank per epoch). ``start_batch``
        skips that many batches, without loading the buffers that lie entirely before it, so a resumed run
        sees exactly the tail of the uninterrupted iteration.
        """
        self._check_iter_args(batch_size, rank, world_size, start_batch, buffer_shards)
        d = self.d_in(hookpoint)
        groups = self._plan(hookpoint, seed, epoch, rank, world_size, shuffle, buffer_shards)

        def out(parts):
            b = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in FIELDS}
            return {"x": b["x"].to(device=device, dtype=dtype or b["x"].dtype), "timestep": b["timestep"].to(device),
                    "prompt_id": b["prompt_id"].to(device)}

        skip = start_batch * batch_size  # rows of the stream still to skip
        carry, carried = [], 0  # the unfinished batch's pieces (copies), spanning buffers
        for gi, group in enumerate(groups):
            n = sum(self._rows(p) for p in group)
            if skip >= n:  # whole buffer lies before start_batch: never load it
                skip -= n
                continue
            buf = self._read_group(group, d)
            perm = None
            if shuffle:
                g = torch.Generator().manual_seed(derive_seed(seed, epoch, rank, gi))
                perm = torch.randperm(n, generator=g)
            pos, skip = skip, 0
            while pos < n:
                take = min(batch_size - carried, n - pos)
                if perm is None:
                    carry.append({k: v[pos:pos + take].clone() for k, v in buf.items()})
                else:
                    rows = perm[pos:pos + take]
                    carry.append({k: v.index_select(0, rows) for k, v in buf.items()})
                carried += take
                pos += take
                if carried == batch_size:
                    yield out(carry)
                    carry, carried = [], 0
            buf = None  # freed before the next buffer is read: never two buffers at once
        if carried and not drop_last:
            yield out(carry)

    def _read_group(self, group, d: int) -> dict:
        """One shuffle buffer: the shards ``group`` read into one tensor per field, in order (x in the widest
        dtype of the group)."""
        headers = [self._header(p) for p in group]
        sizes = [h["x"]["shape"][0] for h in headers]
        x_dtype = None
        for h, p in zip(headers, group):
            dt = ST_DTYPES.get(h["x"]["dtype"])
            if dt is None or not dt.is_floating_point:
                raise ValueError(f"corrupt activation shard {p}: x has dtype {h['x']['dtype']}; expected a float type")
            x_dtype = dt if x_dtype is None else torch.promote_types(x_dtype, dt)
        n = sum(sizes)
        buf = {"x": torch.empty(n, d, dtype=x_dtype), "timestep": torch.empty(n, dtype=torch.float32),
               "prompt_id": torch.empty(n, dtype=torch.long)}
        at = 0
        for p, m in zip(group, sizes):
            self._fill(p, d, {k: v[at:at + m] for k, v in buf.items()})
            at += m
        return buf

    def _fill(self, path: Path, d: int, out: dict) -> None:
        """Read shard ``path``'s tensors into the (contiguous) tensors ``out`` without an intermediate copy."""
        header = self._header(path)
        n = header["x"]["shape"][0]
        shapes = [list(header[k]["shape"]) for k in FIELDS]
        if shapes != [[n, d], [n], [n]] or any(out[k].shape[0] != n for k in FIELDS):
            raise ValueError(f"corrupt activation shard {path}: shapes {shapes} do not match x [n, {d}], "
                             "timestep [n], prompt_id [n]")
        try:
            with open(path, "rb") as f:
                for k in FIELDS:
                    info, dst = header[k], out[k]
                    lo, hi = info["data_offsets"]
                    if ST_DTYPES.get(info["dtype"]) == dst.dtype and dst.is_contiguous() and sys.byteorder == "little":
                        f.seek(header["__start__"] + lo)
                        view = memoryview(dst.view(-1).view(torch.uint8).numpy())
                        if hi - lo != len(view):
                            raise ValueError(f"{k} holds {hi - lo} bytes, expected {len(view)}")
                        got = 0
                        while got < len(view):
                            r = f.readinto(view[got:])
                            if not r:
                                raise ValueError(f"the file ends inside {k}")
                            got += r
                    else:  # another dtype than the buffer's (a mixed store): read through safetensors, cast
                        from safetensors import safe_open

                        with safe_open(str(path), framework="pt") as st:
                            dst.copy_(st.get_tensor(k))
        except OSError as e:
            raise ValueError(f"cannot read activation shard {path}: {e}") from e
        except ValueError as e:
            raise ValueError(f"corrupt activation shard {path}: {e}") from e
