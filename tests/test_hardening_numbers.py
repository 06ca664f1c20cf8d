"""Issue 23, classes 2, 3 and 7: non-finite numbers, values checked where they enter, the SAE a concept file
belongs to, and concepts that share a feature."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_sae
from saeuron.concepts import ConceptTable, check_sae_for_edit, warn_shared_features
from saeuron.patching import patch, unpatch
from saeuron.sae import SparseAutoencoder
from saeuron.selection import build_concept_file, compute_statistics
from saeuron.store import ActivationStore
from saeuron.trainer import METRICS_FILE, TrainConfig, train

HP = "up_blocks.1.attentions.1"  # 32 channels in the tiny pipeline
TS = [667.0, 334.0, 1.0]


def _store(root, nan_rows=(), d=32, n=24):
    store = ActivationStore.create(root, {HP: d}, ["a cat", "a dog", "a car"], ["cat", "dog", "car"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    for r in nan_rows:
        x[r, 1] = float("nan")
    store.write_batch(0, {HP: {"x": x, "timestep": torch.tensor(TS).repeat(n // 3),
                               "prompt_id": torch.arange(n) % 3}})
    store.close()
    return store, x


# --------------------------------------------------------------------------- class 2: non-finite numbers

def test_nan_rows_in_the_data_do_not_make_the_sae_nan(tmp_path):
    x = torch.randn(512, 8)
    x[77, 3] = float("nan")
    cfg = TrainConfig(k=2, num_latents=16, batch_size=64, max_steps=8, log_every=4, save_every=100)
    with pytest.warns(UserWarning, match="NaN or Inf"):
        sae = train(x, tmp_path, "hp", cfg, progress=False)
    assert all(bool(torch.isfinite(t).all()) for t in sae.state_for_disk().values())
    log = [json.loads(ln) for ln in (tmp_path / "hp" / METRICS_FILE).read_text().splitlines()]
    assert log[-1]["skipped_rows"] == 1 and all(r["fvu"] == r["fvu"] for r in log)


def test_all_nan_batch_and_divergence_are_refused_without_saving(tmp_path, monkeypatch):
    cfg = TrainConfig(k=2, num_latents=16, batch_size=64, max_steps=4, log_every=1, save_every=100)
    with pytest.raises(ValueError, match="every row of training batch"):
        train(torch.full((128, 8), float("inf")), tmp_path / "a", "hp", cfg, progress=False)
    import sys

    tr = sys.modules["saeuron.trainer"]
    real = tr.sae_step_loss

    def nan_loss(*a, **k):
        out = real(*a, **k)
        return out._replace(loss=out.loss * float("nan"), fvu=out.fvu * float("nan"))
    monkeypatch.setattr(tr, "sae_step_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        train(torch.randn(128, 8), tmp_path / "b", "hp", cfg, progress=False)
    assert not (tmp_path / "b" / "hp" / "sae.safetensors").exists()


def test_nan_weights_are_refused_at_load_and_at_patch(tmp_path, tiny_pipe):
    sae = make_sae(32, 64, 4)
    sae.save(tmp_path / HP)
    t = load_file(str(tmp_path / HP / "sae.safetensors"))
    t["W_dec"][3, 3] = float("inf")
    save_file(t, str(tmp_path / HP / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"NaN or Inf in \['W_dec'\]"):
        SparseAutoencoder.load(tmp_path / HP)
    bad = make_sae(32, 64, 4)
    with torch.no_grad():
        bad.encoder.bias[0] = float("nan")
    table = ConceptTable(["cat", "dog"], [1, 1], TS, {HP: torch.rand(2, 3, 64)})
    with pytest.raises(ValueError, match="encoder.bias hold NaN or Inf"):
        patch(tiny_pipe, "cat", saes={HP: bad}, table=table)
    assert unpatch(tiny_pipe) is False


def test_nan_statistics_are_refused():
    mu = torch.rand(2, 3, 8)
    mu[1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN, Inf or negative means for concepts \['dog'\]"):
        ConceptTable(["cat", "dog"], [1, 1], TS, {HP: mu})
    with pytest.raises(ValueError, match="finite and distinct"):
        ConceptTable(["cat", "dog"], [1, 1], [1.0, float("nan"), 3.0], {HP: torch.rand(2, 3, 8)})


def test_nan_statistics_on_disk_are_a_corrupt_file(tmp_path):
    ConceptTable(["cat", "dog"], [1, 1], TS, {HP: torch.rand(2, 3, 8)}).save(tmp_path)
    t = {}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "concepts.safetensors"), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    t[f"mu.{HP}"][:] = float("nan")
    save_file(t, str(tmp_path / "concepts.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="corrupt concept file.*NaN"):
        ConceptTable.load(tmp_path)


@pytest.mark.parametrize("mult", [float("nan"), float("inf"), "abc", None])
def test_non_finite_multipliers_are_refused(mult, tiny_pipe):
    table = ConceptTable(["cat", "dog"], [1, 1], TS, {HP: torch.rand(2, 3, 64)})
    if mult is not None:
        with pytest.raises(ValueError, match="multiplier .*finite number"):
            table.edit_tables(HP, ["cat"], multipliers={"cat": mult})
        with pytest.raises(ValueError, match="multiplier .*finite number"):
            patch(tiny_pipe, "cat", saes={HP: make_sae(32, 64, 4)}, table=table, multiplier=mult)
        assert unpatch(tiny_pipe) is False
    with pytest.raises(ValueError, match="multiplier .*finite number"):
        ConceptTable(["cat", "dog"], [1, 1], TS, {HP: torch.rand(2, 3, 8)},
                     defaults={"multiplier": float("nan") if mult is None else mult})


def test_nan_rows_are_left_out_of_the_statistics_not_counted_as_zeros(tmp_path):
    sae = make_sae(32, 64, 4)
    clean, x = _store(tmp_path / "clean")
    dirty, _ = _store(tmp_path / "dirty", nan_rows=(0, 4))
    with pytest.warns(UserWarning, match="2 rows .* NaN or Inf"):
        got = compute_statistics(dirty, sae, HP, progress=False)
    # the same statistics as a store without those rows (exact per-prompt means of the rows left)
    keep = torch.ones(24, dtype=torch.bool)
    keep[[0, 4]] = False
    ref_store = ActivationStore.create(tmp_path / "ref", {HP: 32}, ["a cat", "a dog", "a car"], ["cat", "dog", "car"])
    ref_store.write_batch(0, {HP: {"x": x[keep], "timestep": torch.tensor(TS).repeat(8)[keep],
                                   "prompt_id": (torch.arange(24) % 3)[keep]}})
    want = compute_statistics(ref_store, sae, HP, progress=False)
    torch.testing.assert_close(got.mu[HP], want.mu[HP])


# --------------------------------------------------------------------------- class 3: checked where they enter

@pytest.mark.parametrize("kw, match", [({"percentile": 150}, r"\(0, 100\]"), ({"percentile": 0}, r"\(0, 100\]"),
                                       ({"multiplier": float("nan")}, "finite"),
                                       ({"top_n": 2.5, "percentile": None}, "whole number"),
                                       ({"top_n": None, "percentile": None}, "percentile or a top_n")])
def test_select_refuses_bad_defaults_before_computing(tmp_path, kw, match, monkeypatch):
    store, _ = _store(tmp_path / "s")
    import saeuron.selection as cm

    monkeypatch.setattr(cm, "compute_statistics", lambda *a, **k: pytest.fail("statistics computed first"))
    with pytest.raises(ValueError, match=match):
        build_concept_file(store, {HP: make_sae(32, 64, 4)}, tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "concepts.json").exists()


def test_cli_select_percentile_150_exits_with_the_reason(tmp_path):
    from saeuron.cli import main

    _store(tmp_path / "s")
    make_sae(32, 64, 4).save(tmp_path / "ck" / HP)
    with pytest.raises((SystemExit, ValueError), match=r"percentile.*\(0, 100\]"):
        main(["select", "--store", str(tmp_path / "s"), "--checkpoint", str(tmp_path / "ck"), "--percentile", "150",
              "--device", "cpu"])
    with pytest.raises((SystemExit, ValueError), match="multiplier.*finite"):
        main(["select", "--store", str(tmp_path / "s"), "--checkpoint", str(tmp_path / "ck"), "--multiplier", "nan",
              "--device", "cpu"])
    assert not (tmp_path / "ck" / "concepts.json").exists()


@pytest.mark.parametrize("change, match", [({"k": None}, "no 'k' field"), ({"k": "4"}, "'k' must be an integer"),
                                           ({"k": 0}, "'k' must be an integer >= 1"), ({"k": 65}, "k=65 exceeds"),
                                           ({"d_in": 32.0}, "'d_in' must be an integer"),
                                           ({"normalize_decoder": "yes"}, "true or false")])
def test_cfg_json_fields_are_checked_at_load(tmp_path, change, match):
    make_sae(32, 64, 4).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for k, v in change.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        SparseAutoencoder.load(tmp_path)


def test_concept_file_of_another_sae_is_refused(tmp_path, tiny_pipe):
    store, _ = _store(tmp_path / "s")
    sae = make_sae(32, 64, 4, seed=1)
    sae.save(tmp_path / "ck" / HP)
    build_concept_file(store, tmp_path / "ck", top_n=2, percentile=None, progress=False)
    other = make_sae(32, 64, 4, seed=2)  # same width and size: only the fingerprint tells them apart
    with pytest.raises(ValueError, match="computed with another SAE"):
        patch(tiny_pipe, "cat", tmp_path / "ck", saes={HP: other})
    assert unpatch(tiny_pipe) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(tiny_pipe, "cat", tmp_path / "ck")  # its own SAE
        patch(tiny_pipe, "cat", tmp_path / "ck", saes={HP: SparseAutoencoder.load(tmp_path / "ck" / HP,
                                                                                   dtype=torch.float16)})
    unpatch(tiny_pipe)
    table = ConceptTable.load(tmp_path / "ck")
    sae.cfg.k = 3
    with pytest.raises(ValueError, match="k=4.*k=3"):
        check_sae_for_edit(table, HP, sae)


def test_concept_file_without_fingerprint_loads_with_a_warning(tmp_path):
    store, _ = _store(tmp_path / "s")
    sae = make_sae(32, 64, 4)
    table = build_concept_file(store, {HP: sae}, tmp_path / "ck", top_n=2, percentile=None, progress=False)
    meta = json.loads((tmp_path / "ck" / "concepts.json").read_text())
    del meta["metadata"]["hookpoint_sae"][HP]["fingerprints"]  # as older saeuron wrote it
    (tmp_path / "ck" / "concepts.json").write_text(json.dumps(meta))
    old = ConceptTable.load(tmp_path / "ck")
    with pytest.warns(UserWarning, match="no SAE fingerprint"):
        check_sae_for_edit(old, HP, sae)
    check_sae_for_edit(table, HP, sae)


# --------------------------------------------------------------------------- class 7: shared features

def test_shared_feature_most_negative_scale_wins_and_reference_mode_warns(tiny_pipe):
    mu = torch.full((3, 3, 64), 1e-3)
    mu[0, :, 5] = mu[1, :, 5] = 1.0  # feature 5 is typical of both cat and dog
    mu[0, :, 7] = 1.0  # feature 7 of cat only
    mu[2, :, 20:40] = 1.0  # car: many features of its own
    table = ConceptTable(["cat", "dog", "car"], [1, 1, 1], TS, {HP: mu}, defaults={"top_n": 2})
    a = table.edit_tables(HP, ["cat", "dog"], multipliers={"cat": -1.0, "dog": -5.0})
    b = table.edit_tables(HP, ["dog", "cat"], multipliers={"cat": -1.0, "dog": -5.0})
    for x, y in zip(a, b):  # independent of the order of the concepts
        assert torch.equal(x, y)
    _, fi, _, sc = a
    assert sc[fi == 5].tolist() == [-5.0] * 3  # -5 * mu = -5, the most negative
    assert warn_shared_features(table, HP, ["cat", "car"]) == []
    with pytest.warns(UserWarning, match=r"share features \[5\].*error_term='reference'"):
        patch(tiny_pipe, ["cat", "dog"], saes={HP: make_sae(32, 64, 4)}, table=table, error_term="reference")
    unpatch(tiny_pipe)
