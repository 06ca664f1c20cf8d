"""Sharded safetensors activations: atomic writes, resume, lazy reads.

Layout of a store folder::

    root/store.json                                  manifest: hookpoints, prompts, labels, config, done batches
    root/<hookpoint>/shard_<batch:06d>.safetensors   x [n, d], timestep [n] float32, prompt_id [n] int64

A shard is one prompt batch of one hookpoint. ``write_batch`` writes every hookpoint's shard atomically
and only then records the batch as done, so a killed writer leaves at worst shards that are not yet
listed (ignored by readers, overwritten under the same names on resume) and stale ``.tmp`` files
(removed when the store is reopened for writing). Readers never see a partial shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from .utils import FolderLock, atomic_save_file, atomic_write_json, holds_lock, read_json

VERSION = 1
FIELDS = ("x", "timestep", "prompt_id")


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

    @classmethod
    def create(cls, root, hookpoints: dict, prompts: list, labels=None, config=None) -> "ActivationStore":
        """Create a new store, or reopen an existing one for resuming if it was made with the same arguments."""
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
        lock = FolderLock(root, "collecting activations into")  # one writer: a second one fails here, clearly
        try:
            if (root / "store.json").is_file():
                store = cls(root)
                diff = [_describe(k, store.meta.get(k), meta[k]) for k in ("hookpoints", "prompts", "labels", "config")
                        if store.meta.get(k) != meta[k]]
                if diff:
                    raise ValueError(f"{root} already holds an activation store made with other arguments ("
                                     + "; ".join(diff) + "); use a new folder to collect something else")
                store._clean_tmp()
            else:
                atomic_write_json(meta, root / "store.json")
                store = cls(root)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

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
        for folder in [self.root] + [self.root / h for h in self.hookpoints]:
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

    def __len__(self) -> int:
        """Number of completed prompt batches."""
        return len(self.meta["done"])

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.root)!r}, hookpoints={self.meta['hookpoints']}, "
                f"prompts={len(self.meta['prompts'])}, done_batches={len(self)})")

    # --- writing --------------------------------------------------------------------------------
    def _path(self, hookpoint, batch_idx) -> Path:
        return self.root / hookpoint / f"shard_{batch_idx:06d}.safetensors"

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
        if self._lock is None and not holds_lock(self.root):
            self._lock = FolderLock(self.root, "collecting activations into")
        on_disk = _read_manifest(self.root / "store.json")  # merge with the file, never overwrite it from memory
        changed = [k for k in ("hookpoints", "prompts", "labels", "config", "version") if on_disk.get(k) != self.meta.get(k)]
        if changed:
            raise ValueError(f"{self.root / 'store.json'} was replaced by another run since this store was opened "
                             f"({', '.join(changed)} differ); not writing batch {batch_idx} into it")
        for hp, r in clean.items():
            atomic_save_file(r, self._path(hp, batch_idx), metadata={"hookpoint": hp, "batch": str(batch_idx)})
        self.meta["done"] = sorted(set(on_disk["done"]) | set(self.meta["done"]) | {batch_idx})
        atomic_write_json(self.meta, self.root / "store.json")

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

        At most ``buffer_shards`` shards are in memory at once. With ``shuffle`` the shard order is a
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
        carry, carried = [], 0  # the unfinished batch's pieces, spanning buffers
        for gi, group in enumerate(groups):
            n = sum(self._rows(p) for p in group)
            if skip >= n:  # whole buffer lies before start_batch: never load it
                skip -= n
                continue
            shards = [self._load(p, d) for p in group]
            buf = {k: torch.cat([s[k] for s in shards]) for k in FIELDS}
            del shards
            if shuffle:
                g = torch.Generator().manual_seed(derive_seed(seed, epoch, rank, gi))
                perm = torch.randperm(n, generator=g)
                buf = {k: v[perm] for k, v in buf.items()}
            pos, skip = skip, 0
            while pos < n:
                take = min(batch_size - carried, n - pos)
                carry.append({k: v[pos:pos + take] for k, v in buf.items()})
                carried += take
                pos += take
                if carried == batch_size:
                    yield out(carry)
                    carry, carried = [], 0
        if carried and not drop_last:
            yield out(carry)
