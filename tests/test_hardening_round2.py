"""Issue 23, second probe round: new cases of the same kinds (values at entry, non-finite numbers, corrupt
state files, untrusted build inputs), each once silently wrong or an obscure traceback."""
import json
import os

import pytest
import torch

from conftest import make_sae
from saeuron import extension
from saeuron.concepts import ConceptTable
from saeuron.sae import SparseAutoencoder
from saeuron.store import ActivationStore
from saeuron.trainer import STATE_FILE, TrainConfig, train


def test_nan_timestep_is_refused_when_written(tmp_path):
    store = ActivationStore.create(tmp_path, {"hp": 4}, ["a", "b"])
    t = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="timestep'\\] holds NaN or Inf"):
        store.write_batch(0, {"hp": {"x": torch.randn(2, 4), "timestep": t, "prompt_id": torch.tensor([0, 1])}})
    assert store.done_batches() == set()


@pytest.mark.parametrize("kw, match", [({"lr": float("inf")}, "lr must be a finite number"),
                                       ({"k": "4"}, "k must be an integer"),
                                       ({"batch_size": 32.5}, "batch_size must be an integer"),
                                       ({"max_steps": 2.0}, "max_steps must be an integer"),
                                       ({"auxk_alpha": float("nan")}, "auxk_alpha must be a finite"),
                                       ({"batch_topk": "yes"}, "batch_topk must be True or False")])
def test_train_config_types_and_finiteness(tmp_path, kw, match):
    cfg = TrainConfig(**{"k": 2, "num_latents": 16, "batch_size": 32, "max_steps": 2, **kw})
    with pytest.raises(ValueError, match=match):
        train(torch.randn(64, 8), tmp_path, "hp", cfg, progress=False)
    assert not (tmp_path / "hp").exists()


def test_corrupt_trainer_position_is_a_clear_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = TrainConfig(k=2, num_latents=16, batch_size=32, max_steps=4, save_every=2)
    x = torch.randn(128, 8)
    train(x, tmp_path, "hp", cfg, progress=False)
    path = tmp_path / "hp" / STATE_FILE
    with safe_open(str(path), "pt") as f:
        meta, tensors = json.loads(f.metadata()["trainer_state"]), {k: f.get_tensor(k) for k in f.keys()}
    del meta["step"]
    save_file(tensors, str(path), metadata={"trainer_state": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"corrupt trainer state .*\['step'\]"):
        train(x, tmp_path, "hp", cfg, progress=False)


def test_scale_overflow_is_refused():
    mu = torch.rand(2, 1, 8)
    mu[0, 0, 3] = 3e38
    table = ConceptTable(["a", "b"], [1, 1], [1.0], {"hp": mu}, defaults={"top_n": 2, "multiplier": -5})
    with pytest.raises(ValueError, match="overflows float32"):
        table.edit_tables("hp", ["a"])


def test_checkpoint_num_latents_disagreeing_with_tensors(tmp_path):
    make_sae(8, 32, 2).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 40}))
    with pytest.raises(ValueError, match="num_latents=40 but the tensors hold 32"):
        SparseAutoencoder.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 0, "expansion_factor": 3}))
    assert SparseAutoencoder.load(tmp_path).num_latents == 32  # sparsify's expansion_factor: the tensors decide
    with pytest.raises(ValueError, match="floating torch.dtype"):
        SparseAutoencoder.load(tmp_path, dtype="fp16")


def test_sweep_grid_values_are_checked_at_entry():
    from saeuron.evaluate.sweep import grid_points

    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        grid_points("percentile", multipliers=[-1], percentiles=[150])
    with pytest.raises(ValueError, match="whole number"):
        grid_points("top_n", multipliers=[-1], top_ns=[1.5])


def test_collect_guidance_must_be_finite(tiny_pipe, tmp_path):
    from saeuron.collection import collect

    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        collect(tiny_pipe, ["a cat"], tmp_path, ["up_blocks.1.attentions.1"], num_inference_steps=2,
                guidance_scale=float("nan"), progress=False)


def test_build_inputs_are_checked(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir(mode=0o700)
    (src / "a.cpp").write_text("int f() { return 1; }\n")
    (src / "a.h").write_text("")
    os.chmod(src / "a.h", 0o666)
    with pytest.raises(RuntimeError, match=r"a\.h are writable by group or others"):
        extension._load.__wrapped__(str(src), str(tmp_path / "cache"), False, "")
    monkeypatch.setenv("SAEURON_BUILD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SAEURON_BUILD_TIMEOUT='soon'"):
        extension.build_timeout()


def test_every_hookpoint_of_a_merged_concept_file_keeps_its_sae_record(tmp_path):
    from saeuron.selection import build_concept_file

    hps = {"up_blocks.1.attentions.1": 8, "mid_block.attentions.0": 16}
    store = ActivationStore.create(tmp_path / "s", hps, ["a", "b"], ["A", "B"])
    store.write_batch(0, {hp: {"x": torch.randn(8, d), "timestep": torch.full((8,), 5.0),
                               "prompt_id": torch.arange(8) % 2} for hp, d in hps.items()})
    store.close()
    saes = {hp: make_sae(d, 4 * d, 2, seed=i) for i, (hp, d) in enumerate(hps.items())}
    table = build_concept_file(store, saes, tmp_path / "ck", top_n=1, percentile=None, progress=False)
    rec = ConceptTable.load(tmp_path / "ck").metadata["hookpoint_sae"]
    assert sorted(rec) == sorted(hps)  # the merge used to keep only the last hookpoint's record
    for hp, sae in saes.items():
        assert rec[hp]["fingerprints"]["float32"] == sae.fingerprint()
        table.check_sae(hp, sae)
    with pytest.raises(ValueError, match="another SAE"):
        table.check_sae("mid_block.attentions.0", make_sae(16, 64, 2, seed=9))


def test_lock_errors_other_than_busy_are_not_reported_as_busy(tmp_path, monkeypatch):
    import errno
    import fcntl

    from saeuron.utils import FolderLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(OSError, match="does not support flock"):
        FolderLock(tmp_path, "writing")
