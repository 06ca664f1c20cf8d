"""Distributed collection (issue 26): two gloo processes on the CPU write one store equal to a one-process
run's, never the same shard twice, and a rank killed mid-run is finished by a rerun with nothing lost or doubled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeuron.collection import collect
from saeuron.store import ActivationStore
from saeuron.toy import tiny_pipeline
from saeuron.utils import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("an image of a cat dog car tree house in style photo cartoon sketch watercolor oil painting",)
UP, MID = "up_blocks.1.attentions.1", "mid_block.attentions.0"
PROMPTS = {"cat": ["a cat", "an image of a cat", "a cat in sketch style"], "dog": ["a dog", "a dog in oil painting style"]}
# 5 batches of one prompt: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3; 24 of UP's 64 tokens per map (seeded subset)
RUN = dict(batch_size=1, num_inference_steps=2, height=64, width=64, tokens_per_map=24, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process store (this process runs torch on one thread, as the workers do)."""
    return collect(tiny_pipeline(words=WORDS), PROMPTS, tmp_path_factory.mktemp("ref"), [UP, MID], **RUN)


def launch(out: Path, mode: str, run=None):
    """Run the two-rank worker in ``mode`` (``collect`` arguments ``run``, default RUN); returns the finished process."""
    spec = out / f"spec_{mode}.json"
    spec.write_text(json.dumps({"out": str(out), "words": list(WORDS), "prompts": PROMPTS, "hookpoints": [UP, MID],
                                "run": run or RUN}))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "_collect_worker.py"), str(spec), mode],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)


def written(out: Path, mode: str) -> list:
    """The batches each rank wrote in ``mode``."""
    return [json.loads((out / f"{mode}_rank{r}.json").read_text())["written"] for r in (0, 1)]


def assert_equal_stores(a: ActivationStore, b: ActivationStore):
    """Same manifest and, read in the canonical order (batch index, then capture order), the same rows bit for bit."""
    assert a.meta == b.meta
    for hp in a.hookpoints:
        assert [p.name for p in a.shard_paths(hp)] == [p.name for p in b.shard_paths(hp)]
        for i in range(len(a.shard_paths(hp))):
            sa, sb = a.read_shard(hp, i), b.read_shard(hp, i)
            for k in ("x", "timestep", "prompt_id"):
                assert torch.equal(sa[k], sb[k]), f"{hp} shard {i} differs in {k}"


def assert_clean(root: Path):
    """No temporary files, no unmerged batch markers, no lock left behind."""
    assert not list(root.rglob("*.tmp"))
    assert not (root / ".done").exists()
    assert not (root / LOCK_NAME).exists()


def test_two_ranks_write_one_store_equal_to_one_process(reference, tmp_path):
    proc = launch(tmp_path, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = written(tmp_path, "run")
    assert w0 == [0, 2, 4] and w1 == [1, 3]  # round-robin: no batch (hence no shard file) written twice
    for r in (0, 1):  # every rank returns the finished store
        assert json.loads((tmp_path / f"run_rank{r}.json").read_text())["done"] == [0, 1, 2, 3, 4]
    store = ActivationStore(tmp_path / "store")
    assert store.done_batches() == set(range(5)) and store.pending_batches() == set()
    assert_equal_stores(store, reference)
    assert_clean(tmp_path / "store")


def test_killed_rank_then_rerun_gives_the_same_store(reference, tmp_path):
    proc = launch(tmp_path, "kill")
    assert proc.returncode != 0  # rank 1 died, the run failed
    killed = ActivationStore(tmp_path / "store")
    assert killed.done_batches() == set()  # store.json was never merged: readers see no half-finished run
    finished = killed.pending_batches()  # markers of the batches whose shards all landed
    assert 1 in finished and 3 not in finished
    assert (tmp_path / "store" / UP / "shard_000003.safetensors").exists()  # an orphan of the batch rank 1 died in
    assert list((tmp_path / "store").rglob(".*.tmp"))

    proc = launch(tmp_path, "rerun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = written(tmp_path, "rerun")
    assert not set(w0) & set(w1) and set(w0) | set(w1) == set(range(5)) - finished  # only the missing batches
    assert_equal_stores(ActivationStore(tmp_path / "store"), reference)
    assert_clean(tmp_path / "store")

    # rank 0 refuses to resume with other settings; rank 1 hears it and stops too (no hang), with the reason
    proc = launch(tmp_path, "refused", {**RUN, "num_inference_steps": 3})
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [json.loads((tmp_path / f"refused_rank{r}_error.json").read_text()) for r in (0, 1)]
    assert all(e["type"] == "ValueError" and "num_inference_steps" in e["message"] for e in errors)
    assert errors[1]["message"].startswith("rank 0 could not open the activation store")
    assert_equal_stores(ActivationStore(tmp_path / "store"), reference)


def test_distributed_needs_a_process_group(tmp_path):
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        collect(None, ["a"], tmp_path, [UP], distributed=True)


def test_torchrun_command_line_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m saeuron collect`` (the shipped MiniCanvas model) equals ``collect`` in one process."""
    from saeuron.pipelines import load_pipeline

    prompts = ["An image of circle in stripes style.", "An image of heart in blur style.",
               "An image of star in dots style."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    hps = ["up_blocks.1.attentions.1", "mid_block.attentions.0"]
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "saeuron", "collect",
                           "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "dist"),
                           "--hookpoints", *hps, "--steps", "2", "--batch-size", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("activations in") == 1 and "collected by 2 ranks" in proc.stdout  # rank 0 reports
    one = collect(load_pipeline("minicanvas", "cpu"), prompts, tmp_path / "one", hps, batch_size=1,
                  num_inference_steps=2, progress=False)
    assert_equal_stores(ActivationStore(tmp_path / "dist"), one)
    assert_clean(tmp_path / "dist")
