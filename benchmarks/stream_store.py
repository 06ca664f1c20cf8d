"""Streaming throughput of an ActivationStore (issue 26): rows/s read with a bounded number of resident shards.

    python benchmarks/stream_store.py DIR [--shards 32] [--rows 16384] [--d 1280] [--resident 4 1]
                                          [--train-d 320]

Writes a store of ``--shards`` shards of ``--rows`` fp16 rows of width ``--d`` into ``DIR`` (in a child process,
once; SD1.5's up_blocks.1.attentions.1 is 1280 wide), then, in fresh child processes so that the peak resident
memory of each measurement is its own: the reader alone (``iter_batches``, shuffled, batches of 4096, cast to
fp32 as the trainer does) for each ``--resident`` bound, and ``train`` end to end on a ``--train-d`` wide store
(a small SAE, so that the step does not hide the reader), against the same tokens held in memory. Prints one
JSON line per measurement: rows/s, MB/s and the peak RSS growth over the imports.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(root: str, shards: int, rows: int, d: int) -> None:
    """A store of ``shards`` shards of ``rows`` random fp16 rows of width ``d``."""
    import torch

    from saeuron.store import ActivationStore

    if (Path(root) / "store.json").is_file() and len(ActivationStore(root)) == shards:
        return
    store = ActivationStore.create(root, {"hp": d}, ["p"])
    g = torch.Generator().manual_seed(0)
    for b in range(shards):
        store.write_batch(b, {"hp": {"x": torch.randn(rows, d, generator=g).half(), "timestep": torch.zeros(rows),
                                     "prompt_id": torch.zeros(rows, dtype=torch.long)}})
    store.close()


def read(root: str, resident: int) -> dict:
    """Rows/s of one shuffled pass with at most ``resident`` shards in memory."""
    import torch

    from saeuron.store import ActivationStore

    store = ActivationStore(root)
    base = rss_mb()
    t0, rows, nbytes = time.perf_counter(), 0, 0
    for batch in store.iter_batches("hp", 4096, buffer_shards=resident, dtype=torch.float32, drop_last=False):
        rows += len(batch["x"])
        nbytes += len(batch["x"]) * store.d_in("hp") * 2
    dt = time.perf_counter() - t0
    return {"what": "read", "d": store.d_in("hp"), "resident_shards": resident, "rows": rows,
            "seconds": round(dt, 2), "rows_per_s": round(rows / dt), "MB_per_s": round(nbytes / dt / 2 ** 20),
            "peak_rss_growth_MiB": round(rss_mb() - base)}


def train_rate(root: str, resident: int, source: str) -> dict:
    """Rows/s of ``train`` (one epoch, batch 4096, expansion 4, k 32) from the store or from the same rows in memory."""
    import torch

    from saeuron.store import ActivationStore
    from saeuron.trainer import TrainConfig, train

    store = ActivationStore(root)
    data = store
    if source == "memory":
        data = torch.cat([store.read_shard("hp", i)["x"] for i in range(len(store))]).float()
    cfg = TrainConfig(k=32, expansion_factor=4, batch_size=4096, epochs=1, save_every=10 ** 6, log_every=10 ** 6,
                      max_resident_shards=resident)
    base = rss_mb()
    t0 = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        train(data, out, "hp", cfg, progress=False, resume=False)
    dt = time.perf_counter() - t0
    rows = (store.num_rows("hp") // 4096) * 4096
    return {"what": f"train from {source}", "d": store.d_in("hp"), "resident_shards": resident if source == "store"
            else None, "rows": rows, "seconds": round(dt, 2), "rows_per_s": round(rows / dt),
            "peak_rss_growth_MiB": round(rss_mb() - base)}


def child(*args) -> None:
    """Run one measurement of this file in a fresh interpreter and print its JSON line."""
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    print(r.stdout.strip().splitlines()[-1], flush=True)


def main() -> None:
    """Parse the command line, make the stores, run each measurement in its own process."""
    if sys.argv[1:2] == ["--child"]:
        kind, *rest = sys.argv[2:]
        if kind == "make":
            make(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
            print("{}")
        elif kind == "read":
            print(json.dumps(read(rest[0], int(rest[1]))))
        else:
            print(json.dumps(train_rate(rest[0], int(rest[1]), rest[2])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--resident", type=int, nargs="+", default=[4, 1])
    p.add_argument("--train-d", type=int, default=320)
    a = p.parse_args()
    big, small = Path(a.dir) / f"d{a.d}", Path(a.dir) / f"d{a.train_d}"
    child("make", big, a.shards, a.rows, a.d)
    for r in a.resident:
        child("read", big, r)
    child("make", small, a.shards, a.rows, a.train_d)
    child("train", small, a.resident[0], "store")
    child("train", small, a.resident[0], "memory")


if __name__ == "__main__":
    main()
