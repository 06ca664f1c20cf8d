"""Issue 23, class 1: one writer per output folder (store, training, concept file, evaluation), clear errors."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from saeuron.concepts import ConceptTable
from saeuron.store import ActivationStore
from saeuron.trainer import TrainConfig, train
from saeuron.utils import LOCK_NAME, FolderBusyError, FolderLock, holds_lock

HP = {"hp": 4}


def rows(n=3, pid=0):
    return {"hp": {"x": torch.randn(n, 4), "timestep": torch.full((n,), 1.0), "prompt_id": torch.full((n,), pid)}}


class Holder:
    """Holds a folder's lock in another thread until released (a second writer in the same process)."""

    def __init__(self, folder):
        self.ready, self.stop = threading.Event(), threading.Event()
        self.t = threading.Thread(target=self._run, args=(folder,), daemon=True)
        self.t.start()
        assert self.ready.wait(10)

    def _run(self, folder):
        with FolderLock(folder, "testing"):
            self.ready.set()
            self.stop.wait(30)

    def release(self):
        self.stop.set()
        self.t.join(10)


def test_second_collect_into_one_folder_fails_clearly_and_kill_frees_the_lock(tmp_path):
    root = tmp_path / "store"
    code = ("import sys, time; from saeuron.store import ActivationStore; "
            f"s = ActivationStore.create({str(root)!r}, {{'hp': 4}}, ['a', 'b']); print('ready', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(FolderBusyError, match=f"pid {p.pid}.*collecting activations"):
            ActivationStore.create(root, HP, ["x", "y"])  # other prompts: would have mixed two runs
        assert not (root / "hp").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the killed writer's lock is gone with it (the kernel drops flock): resuming works at once
    store = ActivationStore.create(root, HP, ["a", "b"])
    store.write_batch(0, rows())
    store.close()
    assert ActivationStore(root).done_batches() == {0}
    assert not (root / LOCK_NAME).exists()


def test_two_handles_merge_done_batches_instead_of_overwriting(tmp_path):
    a = ActivationStore.create(tmp_path, HP, ["a", "b"])
    b = ActivationStore(tmp_path)  # a second handle of the same run (same thread: allowed)
    a.write_batch(0, rows())
    b.write_batch(1, rows(pid=1))  # used to rewrite the manifest from memory, dropping batch 0
    a.close(), b.close()
    assert ActivationStore(tmp_path).done_batches() == {0, 1}


def test_a_replaced_manifest_is_never_written_over(tmp_path):
    old = ActivationStore.create(tmp_path / "s", HP, ["a", "b"])
    old.close()
    import shutil

    shutil.rmtree(tmp_path / "s")
    ActivationStore.create(tmp_path / "s", HP, ["c", "d"]).close()  # another run took the folder
    with pytest.raises(ValueError, match="replaced by another run"):
        old.write_batch(0, rows())


def test_writer_in_another_thread_is_refused(tmp_path):
    h = Holder(tmp_path / "s")
    try:
        with pytest.raises(FolderBusyError, match="in use by another saeuron run"):
            ActivationStore.create(tmp_path / "s", HP, ["a"])
    finally:
        h.release()
    ActivationStore.create(tmp_path / "s", HP, ["a"]).close()


def test_two_trainings_into_one_folder(tmp_path):
    h = Holder(tmp_path / "ckpt" / "hp")
    cfg = TrainConfig(k=2, num_latents=16, batch_size=32, max_steps=2, save_every=1, log_every=1)
    try:
        with pytest.raises(FolderBusyError, match="training an SAE"):
            train(torch.randn(64, 8), tmp_path / "ckpt", "hp", cfg, progress=False)
        assert not (tmp_path / "ckpt" / "hp" / "trainer_state.safetensors").exists()
    finally:
        h.release()
    train(torch.randn(64, 8), tmp_path / "ckpt", "hp", cfg, progress=False)
    assert not holds_lock(tmp_path / "ckpt" / "hp") and not (tmp_path / "ckpt" / "hp" / LOCK_NAME).exists()


def test_concept_file_and_sweep_and_eval_folders_are_locked(tmp_path):
    from saeuron.evaluate.sweep import sweep
    from saeuron.evaluate.unlearn_eval import evaluate_unlearning

    table = ConceptTable(["a", "b"], [1, 1], [1.0], {"hp": torch.rand(2, 1, 8)})
    h = Holder(tmp_path)
    try:
        with pytest.raises(FolderBusyError):
            table.save(tmp_path)
        with pytest.raises(FolderBusyError, match="sweeping"):
            sweep(table=table, save_to=tmp_path, scorer=lambda *a: {"ua": 1, "ira": 1})
        with pytest.raises(FolderBusyError, match="evaluating"):
            evaluate_unlearning(None, {}, out_dir=tmp_path)
        from saeuron.evaluate import compare, explain, unlearncanvas

        with pytest.raises(FolderBusyError, match="comparing"):
            compare.compare_methods(None, {}, out_dir=tmp_path)
        with pytest.raises(FolderBusyError, match="explaining"):
            explain.explain(None, out_dir=tmp_path)
        for fn in (unlearncanvas.init_run, unlearncanvas.generate_images, unlearncanvas.classify_run,
                   unlearncanvas.report):
            args = {"generate_images": (None,), "classify_run": ("resnet",)}.get(fn.__name__, ())
            with pytest.raises(FolderBusyError):
                fn(tmp_path, *args)
    finally:
        h.release()
    table.save(tmp_path)
    assert ConceptTable.load(tmp_path).names == ["a", "b"]


def test_lock_waits_with_a_timeout_and_is_reentrant(tmp_path):
    with FolderLock(tmp_path, "outer"):
        with FolderLock(tmp_path, "inner"):  # same thread: re-entrant
            assert holds_lock(tmp_path)
        assert holds_lock(tmp_path)
    assert not holds_lock(tmp_path)
    h = Holder(tmp_path)
    threading.Timer(0.3, h.release).start()
    t0 = time.monotonic()
    with FolderLock(tmp_path, "waiting", timeout=10):
        assert time.monotonic() - t0 >= 0.2
    assert os.listdir(tmp_path) == []


def test_a_forgotten_store_releases_its_lock_and_a_refused_lock_releases_nothing(tmp_path):
    import gc

    ActivationStore.create(tmp_path / "s", HP, ["a"])  # never closed, dropped at once
    gc.collect()
    h = Holder(tmp_path / "s")  # another thread can take it now
    try:
        with pytest.raises(FolderBusyError):
            FolderLock(tmp_path / "s", "second")
        gc.collect()  # the refused attempt's object must not release the holder's lock
        with pytest.raises(FolderBusyError):
            FolderLock(tmp_path / "s", "third")
    finally:
        h.release()
