"""The trainer: sparse training step vs a dense reference, BatchTopK, AuxK, planted-dictionary
recovery, resume equivalence, bf16/fp16, store-backed data and a two-process gloo run."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeuron import SparseAutoencoder
import importlib

train_mod = importlib.import_module("saeuron.trainer")  # `saeuron.train` the attribute is the function
from saeuron.trainer import TrainConfig, batch_topk_select, lr_at, sae_step_loss, train

ROOT = Path(__file__).resolve().parents[1]


def planted(n=4096, d=32, atoms=64, seed=0):
    """Tokens that are sums of 3-4 of ``atoms`` known unit-norm directions with positive weights, plus noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    count = torch.randint(3, 5, (n,), generator=g)
    order = torch.rand(n, atoms, generator=g).argsort(1)
    active = torch.zeros(n, atoms)
    for j in range(4):
        active[torch.arange(n), order[:, j]] = (j < count).float()
    coef = active * (0.5 + torch.rand(n, atoms, generator=g))
    return coef @ dictionary + 0.01 * torch.randn(n, d, generator=g), dictionary


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def dense_reference_loss(sae, x, k, batch_topk, dead_mask, auxk_alpha):
    """The same loss written densely with plain autograd: what the sparse path must equal."""
    W_enc, b_enc, W_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    pre = torch.relu((x - b_dec) @ W_enc.t() + b_enc)
    if batch_topk:
        keep = pre >= pre.detach().flatten().topk(k * x.shape[0]).values.min()
    else:
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(k).indices, True)
    x_hat = (pre * keep) @ W_dec + b_dec
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    e = (x - x_hat).detach()
    num_dead, k_aux = int(dead_mask.sum()), x.shape[1] // 2
    aux_keep = torch.zeros_like(keep).scatter(
        1, torch.where(dead_mask, pre.detach(), -torch.inf).topk(min(k_aux, num_dead)).indices, True)
    e_hat = (pre * aux_keep) @ W_dec
    auxk = min(num_dead / k_aux, 1.0) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return fvu + auxk_alpha * auxk, fvu, auxk, keep | aux_keep


@pytest.mark.parametrize("batch_topk", [True, False])
def test_sparse_step_matches_dense_reference(sae_factory, batch_topk):
    sae = sae_factory(d_in=16, num_latents=64, k=4)
    ref = copy.deepcopy(sae)
    x = torch.randn(48, 16) * 2 + 0.3
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:12]] = True  # 12 dead > k_aux = 8: a real top-k among them
    out = sae_step_loss(sae, x, 4, batch_topk, dead, auxk_alpha=0.5)
    out.loss.backward()
    loss, fvu, auxk, used = dense_reference_loss(ref, x, 4, batch_topk, dead, 0.5)
    loss.backward()
    torch.testing.assert_close(out.fvu, fvu.detach())
    torch.testing.assert_close(out.auxk, auxk.detach())
    assert auxk > 0.01  # AuxK is active when latents are dead
    for p, q in zip(sae.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # the gradient is sparse: encoder rows of latents used neither by TopK nor AuxK get nothing
    unused = ~used.any(0)
    assert unused.any() and sae.encoder.weight.grad[unused].abs().max() == 0
    assert sae.encoder.weight.grad[dead & used.any(0)].abs().sum() > 0  # dead latents learn through AuxK
    assert out.l0.item() == pytest.approx(4.0)


def test_batch_topk_keeps_exactly_k_times_n():
    pre = torch.relu(torch.randn(40, 96) * torch.rand(40, 1) * 3)  # rows of very different scale
    idx, mask = batch_topk_select(pre, 5)
    assert int(mask.sum()) == 5 * 40
    chosen = pre.gather(1, idx)[mask]
    torch.testing.assert_close(chosen.sort().values, pre.flatten().topk(200).values.sort().values)
    counts = mask.sum(1)
    assert counts.max() > 5 and counts.min() < 5  # variable count per row, unlike per-token top-k
    assert idx.shape[1] == counts.max()


def test_lr_schedule_decays_linearly_to_zero():
    assert lr_at(0, 100, 1.0) == 1.0 and lr_at(50, 100, 1.0) == 0.5 and lr_at(99, 100, 1.0) == pytest.approx(0.01)
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1) and lr_at(9, 100, 1.0, warmup=10) == pytest.approx(0.91)


def test_planted_dictionary_is_recovered(tmp_path):
    x, dictionary = planted()
    cfg = TrainConfig(k=4, num_latents=128, batch_size=256, lr=1e-2, epochs=16, log_every=1, save_every=10**6,
                      dead_tokens_threshold=20_000)
    sae = train(x, tmp_path, "hp", cfg, progress=False)
    cos = (dictionary @ sae.W_dec.detach().t()).max(1).values
    assert (cos > 0.9).float().mean() >= 0.8, f"recovered {(cos > 0.9).float().mean():.2f} of the atoms"
    log = metrics(tmp_path / "hp")
    assert len(log) == 16 * 16 and log[-1]["step"] == 256 and log[-1]["tokens"] == 256 * 256
    assert log[-1]["fvu"] < 0.25 * log[0]["fvu"]
    assert sae.fvu(x) < 0.15  # per-token top-k inference on the trained SAE
    assert any(r["auxk"] > 0 and r["dead_frac"] > 0 for r in log)  # spare latents went dead and AuxK ran
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    loaded = SparseAutoencoder.load(tmp_path / "hp")
    for (name, a), b in zip(sae.state_for_disk().items(), loaded.state_for_disk().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "hp").iterdir()) == [
        "cfg.json", "metrics.jsonl", "sae.safetensors", "trainer_state.json", "trainer_state.safetensors"]


class _Interrupt(Exception):
    pass


def test_resume_gives_the_same_weights(tmp_path, monkeypatch):
    x, _ = planted(n=512, d=16, atoms=24, seed=1)
    cfg = TrainConfig(k=3, num_latents=48, batch_size=64, lr=5e-3, epochs=3, save_every=5, log_every=2,
                      dead_tokens_threshold=256, warmup_steps=3)
    full = train(x, tmp_path / "full", None, cfg, progress=False)

    orig, fetched = train_mod._TensorBatches.iter, [0]

    def interrupted(self, *args):
        for batch in orig(self, *args):
            if fetched[0] == 13:  # after step 13; the last checkpoint is step 10, across an epoch boundary
                raise _Interrupt
            fetched[0] += 1
            yield batch

    monkeypatch.setattr(train_mod._TensorBatches, "iter", interrupted)
    with pytest.raises(_Interrupt):
        train(x, tmp_path / "cut", None, cfg, progress=False)
    state = load_file(tmp_path / "cut" / "trainer_state.safetensors")
    assert json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["step"] == 10
    assert {"adam.W_dec.exp_avg", "adam.W_dec.exp_avg_sq", "tokens_since_fired", "sae.W_dec"} <= set(state)
    monkeypatch.setattr(train_mod._TensorBatches, "iter", orig)
    resumed = train(x, tmp_path / "cut", None, cfg, progress=False)
    for (name, a), b in zip(full.state_for_disk().items(), resumed.state_for_disk().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in metrics(tmp_path / "cut")] == list(range(2, 25, 2))
    for r, s in zip(metrics(tmp_path / "full"), metrics(tmp_path / "cut")):
        assert r == pytest.approx(s, rel=1e-5)
    with pytest.raises(ValueError, match="k: saved 3, now 4"):
        train(x, tmp_path / "cut", None, TrainConfig(**{**cfg.__dict__, "k": 4}), progress=False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    x, _ = planted(n=1024, d=16, atoms=24, seed=2)
    cfg = TrainConfig(k=3, num_latents=48, batch_size=128, lr=1e-2, epochs=6, log_every=1, amp_dtype=amp)
    sae = train(x, tmp_path, None, cfg, progress=False)
    fp32 = train(x, tmp_path / "fp32", None, TrainConfig(**{**cfg.__dict__, "amp_dtype": None}), progress=False)
    log = metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(r["fvu"])) for r in log)
    assert log[-1]["fvu"] < 0.6 * log[0]["fvu"]
    assert abs(log[-1]["fvu"] - metrics(tmp_path / "fp32")[-1]["fvu"]) < 0.03  # tracks the fp32 run
    assert abs(sae.fvu(x) - fp32.fvu(x)) < 0.03
    assert sae.W_dec.dtype == torch.float32  # fp32 master weights
    if amp == "fp16":
        assert json.loads((tmp_path / "trainer_state.json").read_text())["grad_scaler"]["scale"] > 1


def make_store(root, x, hookpoint="up_blocks.1.attentions.1", shard_rows=48):
    """A real ActivationStore holding ``x`` in shards of ``shard_rows`` rows (fp16 on disk, as collect writes)."""
    from saeuron.store import ActivationStore

    store = ActivationStore.create(root, {hookpoint: x.shape[1]}, ["a cat", "a dog"])
    for b, i in enumerate(range(0, x.shape[0], shard_rows)):
        rows = x[i:i + shard_rows].half()
        store.write_batch(b, {hookpoint: {"x": rows, "timestep": torch.full((len(rows),), 981.0),
                                          "prompt_id": torch.arange(len(rows)) % 2}})
    return store


def test_store_backed_run_and_resume(tmp_path, monkeypatch):
    hp = "up_blocks.1.attentions.1"
    x, _ = planted(n=720, d=16, atoms=24, seed=3)  # 15 shards of 48 rows
    store = make_store(tmp_path / "store", x)
    calls = []
    orig = store.iter_batches

    def recording(*args, **kw):
        calls.append(kw)
        yield from orig(*args, **kw)

    monkeypatch.setattr(store, "iter_batches", recording)
    cfg = TrainConfig(k=3, expansion_factor=3, batch_size=64, lr=1e-2, epochs=2, save_every=4, log_every=5, seed=4,
                      dead_tokens_threshold=300)
    sae = train(store, tmp_path / "full", hp, cfg, progress=False)
    assert [(c["epoch"], c["start_batch"], c["rank"], c["world_size"], c["seed"]) for c in calls] == [(0, 0, 0, 1, 4), (1, 0, 0, 1, 4)]
    assert sae.num_latents == 48 and SparseAutoencoder.load(tmp_path / "full" / hp).num_latents == 48
    log = metrics(tmp_path / "full" / hp)
    assert log[-1]["step"] == 22 and log[-1]["fvu"] < 0.8 * log[0]["fvu"]  # 720 // 64 = 11 steps per epoch

    fetched = [0]

    def interrupted(*args, **kw):
        calls.append(kw)
        for batch in orig(*args, **kw):
            if fetched[0] == 14:
                raise _Interrupt
            fetched[0] += 1
            yield batch

    monkeypatch.setattr(store, "iter_batches", interrupted)
    with pytest.raises(_Interrupt):
        train(store, tmp_path / "cut", hp, cfg, progress=False)
    monkeypatch.setattr(store, "iter_batches", recording)
    calls.clear()
    resumed = train(store, tmp_path / "cut", hp, cfg, progress=False)
    assert [(c["epoch"], c["start_batch"]) for c in calls] == [(1, 1)]  # resumes at step 12 = epoch 1, batch 1
    for (name, a), b in zip(sae.state_for_disk().items(), resumed.state_for_disk().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    calls.clear()
    again = train(store, tmp_path / "cut", hp, cfg, progress=False)  # a finished run resumes to itself
    assert calls == [] and torch.equal(again.W_dec, sae.W_dec)
    with pytest.raises(ValueError, match="hookpoint is required"):
        train(store, tmp_path, None, cfg, progress=False)


def test_bad_input_is_named(tmp_path):
    x = torch.randn(100, 8)
    with pytest.raises(ValueError, match="amp_dtype"):
        train(x, tmp_path, None, TrainConfig(amp_dtype="fp8"), progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(x, tmp_path, None, TrainConfig(batch_size=128, k=2, num_latents=16), progress=False)
    with pytest.raises(ValueError, match="tokens \\[N, d\\]"):
        train(torch.randn(2, 3, 4), tmp_path, None, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="k=40"):
        train(x, tmp_path, None, TrainConfig(batch_size=50, k=40, num_latents=16), progress=False)
    with pytest.raises(TypeError, match="ActivationStore or a tensor"):
        train([1, 2], tmp_path, None, TrainConfig(), progress=False)


def test_ddp_two_gloo_processes_agree(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "weights0.safetensors"), load_file(tmp_path / "weights1.safetensors")
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"ranks disagree on {name}"
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes
    saved = SparseAutoencoder.load(tmp_path / "rank0" / "hp")
    assert torch.equal(saved.W_dec, w0["W_dec"])
    log = metrics(tmp_path / "rank0" / "hp")
    assert log[-1]["step"] == 32 and log[-1]["tokens"] == 32 * 128
    assert log[-1]["fvu"] < 0.75 * log[0]["fvu"]
    # from a store whose shards split unevenly (12 vs 11 shards of 48 rows, 64 rows per rank per step):
    # every epoch runs as many steps as the poorer rank has batches, and the ranks still agree
    s0, s1 = load_file(tmp_path / "store_weights0.safetensors"), load_file(tmp_path / "store_weights1.safetensors")
    assert all(torch.equal(s0[n], s1[n]) for n in s0) and not (tmp_path / "store_rank1").exists()
    log = metrics(tmp_path / "store_rank0" / "hp")
    assert log[-1]["step"] == 16 and log[-1]["fvu"] < 0.8 * log[0]["fvu"]


def test_torchrun_train_command_runs_ddp(tmp_path):
    """``torchrun --nproc_per_node 2 -m saeuron train`` joins one process group: the ranks split the store and
    only rank 0 writes and reports (before, each rank trained alone on everything into the same folder)."""
    import os

    x, _ = planted(n=768, d=16, atoms=24, seed=5)
    make_store(tmp_path / "store", x)  # 16 shards of 48 rows
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "saeuron", "train",
                           "--store", str(tmp_path / "store"), "--out", str(tmp_path / "ckpt"), "--k", "4",
                           "--expansion", "2", "--batch-size", "64", "--dead-tokens", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("SAE for up_blocks.1.attentions.1") == 1 and "trained by 2 ranks" in proc.stdout
    log = metrics(tmp_path / "ckpt" / "up_blocks.1.attentions.1")
    state = json.loads((tmp_path / "ckpt" / "up_blocks.1.attentions.1" / "trainer_state.json").read_text())
    assert state["world_size"] == 2  # one DDP run, not two lone runs into the same folder
    assert log[-1]["step"] == 768 // 64 and log[-1]["tokens"] == 768  # the global batch of 64 split over 2 ranks
    assert SparseAutoencoder.load(tmp_path / "ckpt" / "up_blocks.1.attentions.1").num_latents == 32
