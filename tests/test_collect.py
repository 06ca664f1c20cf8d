"""collect: rows per prompt x step x token, timesteps, halves, token subsets, labels, hooks removed, resume after a kill."""
import os
import select
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from saeuron.collection import _timesteps, collect
from saeuron.store import ActivationStore

UP, MID = "up_blocks.1.attentions.1", "mid_block.attentions.0"  # 8x8 x 32 ch and 4x4 x 64 ch at 64x64 images
PROMPTS = {"cat": ["a cat", "an image of a cat", "a cat in sketch style"], "dog": ["a dog", "a dog in oil painting style"]}
FLAT = [p for ps in PROMPTS.values() for p in ps]
RUN = dict(batch_size=2, num_inference_steps=2, height=64, width=64, progress=False)


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """One uninterrupted run: 5 prompts in batches of 2 (the last one partial), 2 steps, two hookpoints."""
    return collect(pipe, PROMPTS, tmp_path_factory.mktemp("ref"), [UP, MID], **RUN)


def scheduler_timesteps(pipe, n):
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(n)
    return sorted(float(t) for t in sched.timesteps)


def all_rows(store, hp):
    parts = [store.read_shard(hp, i) for i in range(len(store.shard_paths(hp)))]
    return {k: torch.cat([p[k] for p in parts]) for k in ("x", "timestep", "prompt_id")}


def nearest(a, b):
    """Distance from each row of ``a`` to its nearest row of ``b`` (exact, no matmul shortcut)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values


def keys(rows):
    return Counter(zip(rows["prompt_id"].tolist(), rows["timestep"].tolist()))


def assert_same_store(a, b, tol=0.0):
    """Same batches, same (prompt_id, timestep) multiset per hookpoint, and the same x (up to ``tol``)."""
    assert a.done_batches() == b.done_batches()
    for hp in a.hookpoints:
        ra, rb = all_rows(a, hp), all_rows(b, hp)
        assert keys(ra) == keys(rb)
        assert torch.equal(ra["timestep"], rb["timestep"]) and torch.equal(ra["prompt_id"], rb["prompt_id"])
        torch.testing.assert_close(ra["x"], rb["x"], rtol=tol, atol=tol)


def test_rows_timesteps_prompt_ids_labels(pipe, reference):
    steps = scheduler_timesteps(pipe, 2)
    assert reference.prompts == FLAT and reference.labels == ["cat"] * 3 + ["dog"] * 2
    assert reference.hookpoints == [UP, MID] and reference.d_in(UP) == 32 and reference.d_in(MID) == 64
    assert reference.done_batches() == {0, 1, 2}
    for hp, tokens in ((UP, 64), (MID, 16)):
        assert reference.num_rows(hp) == len(FLAT) * 2 * tokens
        rows = all_rows(reference, hp)
        assert rows["x"].dtype == torch.float32 and rows["x"].std() > 0
        assert sorted(set(rows["timestep"].tolist())) == steps
        assert keys(rows) == Counter({(p, t): tokens for p in range(len(FLAT)) for t in steps})
        assert reference.read_shard(hp, 2)["prompt_id"].unique().tolist() == [4]  # last, partial batch


def test_captured_rows_are_the_block_output_cond_half(pipe, reference):
    """Recompute prompt 0's first UNet call by hand and compare with the stored rows."""
    seen = []
    h = pipe.unet.get_submodule(UP).register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
    try:
        from saeuron.store import derive_seed
        pipe(prompt=FLAT[:2], num_inference_steps=2, guidance_scale=9.0, height=64, width=64, output_type="latent",
             generator=[torch.Generator().manual_seed(derive_seed(0, i)) for i in (0, 1)])
    finally:
        h.remove()
    first = seen[0]  # [4, 32, 8, 8]: uncond 0, uncond 1, cond 0, cond 1
    assert first.shape == (4, 32, 8, 8)
    shard = reference.read_shard(UP, 0)
    t0 = shard["timestep"].max()
    mine = shard["x"][(shard["prompt_id"] == 0) & (shard["timestep"] == t0)]
    torch.testing.assert_close(mine, first[2].permute(1, 2, 0).reshape(-1, 32))
    assert not torch.allclose(mine, first[0].permute(1, 2, 0).reshape(-1, 32))


def test_halves_tokens_every_dtype(pipe, reference, tmp_path):
    two = FLAT[:2]  # the reference's batch 0: same prompts, same seeds, hence the same latents
    ref = {hp: reference.read_shard(hp, 0) for hp in (UP, MID)}
    both = all_rows(collect(pipe, two, tmp_path / "both", [UP], halves="both", **RUN), UP)
    unc = all_rows(collect(pipe, two, tmp_path / "unc", [UP], halves="uncond", **RUN), UP)
    assert keys(both) == Counter({k: 2 * v for k, v in keys(ref[UP]).items()}) and keys(unc) == keys(ref[UP])
    assert nearest(ref[UP]["x"], both["x"]).max() < 1e-4 and nearest(unc["x"], both["x"]).max() < 1e-4
    assert nearest(unc["x"], ref[UP]["x"]).min() > 1e-3  # the unconditional half really is the other half

    sub = collect(pipe, two, tmp_path / "sub", [UP, MID], tokens_per_map=5, **RUN)
    sub16 = collect(pipe, two, tmp_path / "sub16", [UP, MID], tokens_per_map=5, dtype="fp16", **RUN)
    for hp in (UP, MID):
        rows = all_rows(sub, hp)
        assert keys(rows) == Counter({k: 5 for k in keys(ref[hp])})
        assert nearest(rows["x"], ref[hp]["x"]).max() < 1e-4  # a subset of the real tokens
        x16 = all_rows(sub16, hp)["x"]
        assert x16.dtype == torch.float16 and torch.equal(x16, rows["x"].half())  # same seeded subset, cast

    ev = collect(pipe, two, tmp_path / "every", [MID], every=2, **{**RUN, "num_inference_steps": 3})
    ts = scheduler_timesteps(pipe, 3)  # ascending; UNet calls 0 and 2 get the largest and the smallest
    assert sorted(set(all_rows(ev, MID)["timestep"].tolist())) == [ts[0], ts[2]]


def test_no_cfg_nonsquare_and_list_prompts(pipe, tmp_path):
    store = collect(pipe, FLAT[:3], tmp_path, [UP, MID], guidance_scale=1.0, halves="uncond",
                    **{**RUN, "height": 64, "width": 128})
    assert store.labels is None
    assert store.num_rows(UP) == 3 * 2 * 8 * 16 and store.num_rows(MID) == 3 * 2 * 4 * 8


def test_timestep_argument_forms():
    x = torch.randn(2, 4, 8, 8)
    assert _timesteps((x, 7), {}).tolist() == [7.0]
    assert _timesteps((x, torch.tensor(5)), {}).tolist() == [5.0]
    assert _timesteps((x,), {"timestep": torch.tensor([3, 4])}).tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="timestep"):
        _timesteps((x,), {})


def test_errors_and_hooks_removed(pipe, reference, tmp_path, monkeypatch):
    unet = pipe.unet
    n_pre, n_fwd = len(unet._forward_pre_hooks), len(unet.get_submodule(UP)._forward_hooks)
    with pytest.raises(ValueError, match="up_blocks.1.attentions.1"):
        collect(pipe, FLAT, tmp_path / "a", ["up_blocks.7.attentions.0"], **RUN)
    with pytest.raises(ValueError, match="halves"):
        collect(pipe, FLAT, tmp_path / "b", [UP], halves="second", **RUN)
    with pytest.raises(ValueError, match="config"):  # resuming into a store made with other options
        collect(pipe, PROMPTS, reference.root, [UP, MID], **{**RUN, "num_inference_steps": 3})
    import saeuron.store as store_mod

    monkeypatch.setattr(store_mod.ActivationStore, "write_batch", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        collect(pipe, FLAT, tmp_path / "c", [UP], **RUN)
    assert len(unet._forward_pre_hooks) == n_pre and len(unet.get_submodule(UP)._forward_hooks) == n_fwd
    assert pipe._progress_bar_config.get("disable") is True  # the fixture's setting is restored


def test_resume_after_max_batches(pipe, reference, tmp_path):
    part = collect(pipe, PROMPTS, tmp_path, [UP, MID], max_batches=1, **RUN)
    assert part.done_batches() == {0}
    part = collect(pipe, PROMPTS, tmp_path, [UP, MID], max_batches=1, **RUN)
    assert part.done_batches() == {0, 1}
    assert_same_store(collect(pipe, PROMPTS, tmp_path, [UP, MID], **RUN), reference)


def test_resume_after_sigkill_mid_write(pipe, reference, tmp_path):
    """SIGKILL a collecting child process inside write_batch, then rerun: the result equals an uninterrupted run.

    The child is forked (it inherits the built pipeline, so no second start-up) and stops at the point where
    batch 1's first hookpoint shard is on disk, a temporary file of the second is half written, and store.json
    still lists only batch 0.
    """
    import saeuron.store as store_mod

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(r)
            torch.set_num_threads(1)  # no OpenMP thread pool is inherited across fork
            real = store_mod.atomic_save_file

            def save(tensors, path, metadata=None):
                path = Path(path)
                if path.name == "shard_000001.safetensors" and path.parent.name == MID:
                    (path.parent / ".shard_000001.safetensors.x1y2z3.tmp").write_bytes(b"half a shard")
                    os.write(w, b"R")
                    time.sleep(120)
                return real(tensors, path, metadata)

            store_mod.atomic_save_file = save
            collect(pipe, PROMPTS, tmp_path, [UP, MID], **RUN)
            os.write(w, b"F")
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        msg = os.read(r, 1) if ready else b"(timeout)"
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
    assert msg == b"R", f"the collecting child did not reach the kill point: {msg!r}"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    killed = ActivationStore(tmp_path)
    assert killed.done_batches() == {0}
    assert (tmp_path / UP / "shard_000001.safetensors").exists()  # orphan shard of the unfinished batch
    assert list(Path(tmp_path).rglob(".*.tmp"))
    assert killed.num_rows(UP) == reference.read_shard(UP, 0)["x"].shape[0]

    resumed = collect(pipe, PROMPTS, tmp_path, [UP, MID], **RUN)
    assert not list(Path(tmp_path).rglob(".*.tmp"))
    assert_same_store(resumed, reference, tol=1e-4)  # the child ran on 1 thread: float sums in another order
    assert sorted(p.name for p in (tmp_path / UP).iterdir()) == [f"shard_{b:06d}.safetensors" for b in range(3)]
