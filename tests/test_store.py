"""ActivationStore: round trip, atomic writes, resume state, errors, lazy shuffled/sharded iteration."""
import re
import threading
from collections import Counter

import pytest
import torch

from saeuron.store import ActivationStore

HP = {"up_blocks.1.attentions.1": 8, "mid_block.attentions.0": 16}
PROMPTS = [f"prompt {i}" for i in range(6)]


def make_rows(batch_idx, n, start, dtype=torch.float32):
    """Random rows whose timestep encodes a global row id (and x[:, 0] repeats it) so rows can be traced."""
    out = {}
    for hp, d in HP.items():
        rid = torch.arange(start, start + n, dtype=torch.float32)
        x = torch.randn(n, d)
        x[:, 0] = rid
        out[hp] = {"x": x.to(dtype), "timestep": rid, "prompt_id": torch.randint(0, len(PROMPTS), (n,))}
    return out


def filled_store(root, sizes=(5, 7, 3, 9, 4, 6, 8), dtype=torch.float32):
    store = ActivationStore.create(root, HP, PROMPTS, labels=["a", "b", None, "a", "b", None], config={"k": [1, 2]})
    written, start = {}, 0
    for b, n in enumerate(sizes):
        written[b] = make_rows(b, n, start, dtype)
        store.write_batch(b, written[b])
        start += n
    return store, written


def row_keys(batches):
    return Counter((int(p), float(t)) for b in batches for p, t in zip(b["prompt_id"], b["timestep"]))


def test_round_trip_and_no_tmp_files(tmp_path):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        root = tmp_path / str(dtype)
        store, written = filled_store(root, dtype=dtype)
        again = ActivationStore(root)
        assert again.hookpoints == list(HP) and again.prompts == PROMPTS
        assert again.labels == ["a", "b", None, "a", "b", None] and again.meta["config"] == {"k": [1, 2]}
        assert again.done_batches() == set(range(7)) and len(again) == 7
        assert again.d_in("mid_block.attentions.0") == 16
        assert again.num_rows("up_blocks.1.attentions.1") == sum((5, 7, 3, 9, 4, 6, 8))
        names = [p.name for p in again.shard_paths("mid_block.attentions.0")]
        assert names == [f"shard_{b:06d}.safetensors" for b in range(7)]
        for hp in HP:
            for b in range(7):
                got = again.read_shard(hp, b)
                assert got["x"].dtype == dtype and got["timestep"].dtype == torch.float32
                assert got["prompt_id"].dtype == torch.int64
                for k in ("x", "timestep", "prompt_id"):
                    assert torch.equal(got[k], written[b][hp][k])
        assert "done_batches=7" in repr(again)
        assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_reopen_for_resume_and_mismatch(tmp_path):
    store, _ = filled_store(tmp_path, sizes=(3, 4))
    same = ActivationStore.create(tmp_path, HP, PROMPTS, labels=["a", "b", None, "a", "b", None], config={"k": (1, 2)})
    assert same.done_batches() == {0, 1}
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        ActivationStore.create(tmp_path, HP, PROMPTS[:2] + ["other"] + PROMPTS[3:],
                               labels=["a", "b", None, "a", "b", None], config={"k": [1, 2]})
    with pytest.raises(ValueError, match="config"):
        ActivationStore.create(tmp_path, HP, PROMPTS, labels=["a", "b", None, "a", "b", None], config={"k": [1]})
    with pytest.raises(ValueError, match="hookpoints"):
        ActivationStore.create(tmp_path, {"mid_block.attentions.0": 16}, PROMPTS,
                               labels=["a", "b", None, "a", "b", None], config={"k": [1, 2]})


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="store.json"):
        ActivationStore(tmp_path / "nowhere")
    store, _ = filled_store(tmp_path, sizes=(3, 4))
    with pytest.raises(ValueError, match="up_blocks.1.attentions.1"):
        store.d_in("down_blocks.9.attentions.0")
    with pytest.raises(ValueError, match="mid_block.attentions.0"):
        list(store.iter_batches("nope", 2))
    bad = make_rows(2, 3, 100)
    bad["mid_block.attentions.0"]["x"] = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"x \[n, 16\]"):
        store.write_batch(2, bad)
    with pytest.raises(ValueError, match="exactly the hookpoints"):
        store.write_batch(2, {"mid_block.attentions.0": make_rows(2, 3, 100)["mid_block.attentions.0"]})
    with pytest.raises(ValueError, match="rank"):
        list(store.iter_batches("mid_block.attentions.0", 2, rank=2, world_size=2))
    assert store.done_batches() == {0, 1}
    with pytest.raises(ValueError, match="labels"):
        ActivationStore.create(tmp_path / "x", HP, PROMPTS, labels=["a"])


def test_corrupt_and_missing_shards_are_named(tmp_path):
    store, _ = filled_store(tmp_path, sizes=(3, 4, 5))
    p = store.shard_paths("mid_block.attentions.0")[1]
    p.write_bytes(p.read_bytes()[:-10])  # truncated by a crash outside our atomic writer
    fresh = ActivationStore(tmp_path)
    for fn in (lambda: fresh.num_rows("mid_block.attentions.0"), lambda: fresh.read_shard("mid_block.attentions.0", 1),
               lambda: list(fresh.iter_batches("mid_block.attentions.0", 2, shuffle=False))):
        with pytest.raises(ValueError, match="corrupt activation shard .*shard_000001"):
            fn()
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="shard_000001"):
        ActivationStore(tmp_path).read_shard("mid_block.attentions.0", 1)
    store.shard_paths("up_blocks.1.attentions.1")[2].unlink()
    with pytest.raises(FileNotFoundError, match="shard_000002"):
        ActivationStore(tmp_path).num_rows("up_blocks.1.attentions.1")


def test_interrupted_write_is_invisible_and_cleaned(tmp_path, monkeypatch):
    store, written = filled_store(tmp_path, sizes=(3, 4))
    import saeuron.store as store_mod

    real, calls = store_mod.atomic_save_file, []

    def crash_on_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # first hookpoint's shard is on disk, the second never lands
            (path.parent / f".{path.name}.abc123.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        return real(tensors, path, metadata)

    monkeypatch.setattr(store_mod, "atomic_save_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        store.write_batch(2, make_rows(2, 5, 7))
    monkeypatch.setattr(store_mod, "atomic_save_file", real)
    reopened = ActivationStore(tmp_path)
    assert reopened.done_batches() == {0, 1}
    assert (tmp_path / "up_blocks.1.attentions.1" / "shard_000002.safetensors").exists()  # written but not listed
    assert all(len(reopened.shard_paths(hp)) == 2 for hp in HP)
    assert reopened.num_rows("up_blocks.1.attentions.1") == 7
    assert list(tmp_path.rglob(".*.tmp"))
    resumed = ActivationStore.create(tmp_path, HP, PROMPTS, labels=["a", "b", None, "a", "b", None], config={"k": [1, 2]})
    assert not list(tmp_path.rglob(".*.tmp"))
    redo = make_rows(2, 6, 7)
    resumed.write_batch(2, redo)  # same file names: the stale unlisted shard is replaced, not added
    assert resumed.num_rows("up_blocks.1.attentions.1") == 13
    got = ActivationStore(tmp_path).read_shard("up_blocks.1.attentions.1", 2)["x"]
    assert torch.equal(got, redo["up_blocks.1.attentions.1"]["x"])


def test_iter_batches_covers_every_row_once(tmp_path):
    store, written = filled_store(tmp_path)
    hp = "up_blocks.1.attentions.1"
    everything = row_keys(w[hp] for w in written.values())
    assert len(everything) == store.num_rows(hp) == 42
    for shuffle in (False, True):
        batches = list(store.iter_batches(hp, 5, shuffle=shuffle, drop_last=False, buffer_shards=2))
        assert [len(b["x"]) for b in batches] == [5] * 8 + [2]
        assert row_keys(batches) == everything
        for b in batches:  # x stays attached to its own timestep / prompt_id
            assert torch.equal(b["x"][:, 0], b["timestep"])
            assert b["x"].shape[1] == 8
    dropped = list(store.iter_batches(hp, 5, drop_last=True))
    assert len(dropped) == 8 == store.num_batches(hp, 5) and len(set(row_keys(dropped))) == 40
    unshuffled = torch.cat([b["timestep"] for b in store.iter_batches(hp, 5, shuffle=False, drop_last=False)])
    assert torch.equal(unshuffled, torch.arange(42.0))
    # two ranks: disjoint, and jointly everything
    kw = dict(world_size=2, epoch=3, drop_last=False, buffer_shards=2)
    parts = [list(store.iter_batches(hp, 4, rank=r, **kw)) for r in (0, 1)]
    keys = [row_keys(p) for p in parts]
    assert not set(keys[0]) & set(keys[1]) and keys[0] + keys[1] == everything
    assert [store.num_batches(hp, 4, rank=r, **kw) for r in (0, 1)] == [len(p) for p in parts]


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    store, _ = filled_store(tmp_path)
    hp = "mid_block.attentions.0"

    def order(**kw):
        return torch.cat([b["timestep"] for b in store.iter_batches(hp, 3, buffer_shards=3, **kw)])
    assert torch.equal(order(seed=1, epoch=0), order(seed=1, epoch=0))
    assert not torch.equal(order(seed=1, epoch=0), order(seed=1, epoch=1))
    assert not torch.equal(order(seed=1, epoch=0), order(seed=2, epoch=0))


def test_start_batch_is_the_tail_and_skips_loading(tmp_path, monkeypatch):
    store, _ = filled_store(tmp_path)
    hp = "up_blocks.1.attentions.1"
    kw = dict(seed=5, epoch=2, buffer_shards=2, drop_last=False)
    full = list(store.iter_batches(hp, 4, **kw))
    for start in (0, 1, 3, 6, 10, len(full), len(full) + 3):
        tail = list(store.iter_batches(hp, 4, start_batch=start, **kw))
        assert len(tail) == max(len(full) - start, 0)
        for a, b in zip(tail, full[start:]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    loads = []
    real = store._fill  # the one place iter_batches reads shard data
    monkeypatch.setattr(store, "_fill", lambda p, d, out: loads.append(p) or real(p, d, out))
    next(store.iter_batches(hp, 4, start_batch=8, **kw))  # 32 rows skipped: buffers wholly before them are never read
    groups, before, skipped = store._plan(hp, 5, 2, 0, 1, True, 2), 0, []
    for g in groups:
        n = sum(store._rows(p) for p in g)
        if before + n <= 32:
            skipped += g
        before += n
    assert skipped and loads and not set(skipped) & set(loads)
    loads.clear()
    next(store.iter_batches(hp, 4, **kw))  # lazy: the first batch needs only the first buffer of 2 shards
    assert len(loads) == 2


def test_dtype_and_device_on_read(tmp_path):
    store, written = filled_store(tmp_path, sizes=(3, 5), dtype=torch.float16)
    b = next(store.iter_batches("mid_block.attentions.0", 8, shuffle=False, dtype=torch.float32))
    assert b["x"].dtype == torch.float32 and b["x"].device.type == "cpu"
    ref = torch.cat([written[i]["mid_block.attentions.0"]["x"] for i in (0, 1)]).float()
    assert torch.equal(b["x"], ref)


def in_thread(fn) -> str:
    """Run ``fn`` in a new thread; the message of the FolderBusyError it raised ('' when it did not raise one)."""
    from saeuron.utils import FolderBusyError

    box = [""]

    def target():
        try:
            fn()
        except FolderBusyError as e:
            box[0] = str(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    return box[0]


def test_shared_run_lock_admits_its_ranks_and_refuses_other_runs(tmp_path):
    """The processes of one run (same run id) share the folder; an exclusive writer or another run is refused
    while any of them holds it, also after the first one was killed; the last one out removes the lock file."""
    import signal
    import subprocess
    import sys

    from saeuron.utils import LOCK_NAME, FolderBusyError

    root = tmp_path / "s"
    code = ("import time; from saeuron.store import ActivationStore; "
            f"s = ActivationStore.create({str(root)!r}, {HP!r}, {PROMPTS!r}, run_id='run-1'); "
            "print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        rank1 = ActivationStore.join(root, "run-1", timeout=0)  # another process of the same run: admitted
        # the refused attempts run in another thread (this one holds the folder for run-1 now)
        assert re.search(f"pid {p.pid}.*run-1", in_thread(lambda: ActivationStore.create(root, HP, PROMPTS)))
        assert "in use by another saeuron run" in in_thread(lambda: ActivationStore.join(root, "run-2", timeout=0))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # rank 0 is dead, but rank 1 still writes: still refused
    assert "in use" in in_thread(lambda: ActivationStore.create(root, HP, PROMPTS, run_id="run-2"))
    with pytest.raises(FolderBusyError, match="already held by this thread for run run-1"):
        ActivationStore.create(root, HP, PROMPTS)
    rank1.close()
    assert not (root / LOCK_NAME).exists()
    ActivationStore.create(root, HP, PROMPTS).close()


def test_shared_writers_record_markers_merged_once_and_on_resume(tmp_path):
    """Shared writers never rewrite store.json; merge_pending folds their markers in with one write; a killed run's
    markers are folded in by the next create, and a damaged marker is dropped so its batch is collected again."""
    rank0 = ActivationStore.create(tmp_path, HP, PROMPTS, run_id="r")
    rank1 = ActivationStore.join(tmp_path, "r")
    manifest = (tmp_path / "store.json").read_bytes()
    rank0.write_batch(0, make_rows(0, 3, 0))
    rank1.write_batch(1, make_rows(1, 4, 3))
    rank1.write_batch(2, make_rows(2, 5, 7))
    assert (tmp_path / "store.json").read_bytes() == manifest  # untouched while the ranks write
    assert ActivationStore(tmp_path).done_batches() == set() and rank0.pending_batches() == {0, 1, 2}
    assert rank0.merge_pending() == {0, 1, 2}
    assert rank1.reload().done_batches() == {0, 1, 2} and rank1.pending_batches() == set()
    assert not (tmp_path / ".done").exists()
    rank1.write_batch(3, make_rows(3, 2, 12))  # then "killed": never merged
    rank1.write_batch(4, make_rows(4, 2, 14))
    marker = tmp_path / ".done" / "batch_000004.json"
    marker.write_text(marker.read_text().replace('": 2', '": 9'))  # says 9 rows, the shards hold 2
    rank0.close(), rank1.close()
    with pytest.warns(UserWarning, match="batch_000004.json"):
        resumed = ActivationStore.create(tmp_path, HP, PROMPTS)  # a one-process rerun of the killed run
    assert resumed.done_batches() == {0, 1, 2, 3} and resumed.pending_batches() == set()
    assert resumed.num_rows("mid_block.attentions.0") == 3 + 4 + 5 + 2
    resumed.write_batch(4, make_rows(4, 2, 14))  # the dropped batch is collected again
    assert ActivationStore(tmp_path).done_batches() == set(range(5))
