"""Issue 23, class 4: checkpoint fields. input_unit_norm (published SAeUron code) and skip_connection
(sparsify's W_skip) are implemented and checked against the formulas on files written in those layouts;
fields whose math is not implemented are refused with an error naming them."""
import json

import pytest
import torch
from safetensors.torch import save_file

from saeuron.concepts import ConceptTable, check_sae_for_edit
from saeuron.sae import SparseAutoencoder

D, M, K = 16, 64, 4


def _folder(path, cfg_extra=None, skip=False, seed=0):
    """A hookpoint folder as sparsify / the SAeUron code write it (by hand, not by saeuron)."""
    g = torch.Generator().manual_seed(seed)
    t = {"encoder.weight": torch.randn(M, D, generator=g), "encoder.bias": torch.randn(M, generator=g) * 0.1,
         "W_dec": torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1),
         "b_dec": torch.randn(D, generator=g) * 0.1}
    if skip:
        t["W_skip"] = torch.randn(D, D, generator=g) * 0.2
    path.mkdir(parents=True)
    save_file(t, str(path / "sae.safetensors"))
    cfg = {"expansion_factor": M // D, "normalize_decoder": True, "num_latents": 0, "k": K, "multi_topk": False,
           "skip_connection": skip, "d_in": D, **(cfg_extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return t


def _codes(pre):
    vals, idx = pre.topk(K)
    return torch.zeros_like(pre).scatter(1, idx, vals)


def test_input_unit_norm_matches_the_published_formula(tmp_path):
    t = _folder(tmp_path / "hp", {"input_unit_norm": True, "batch_topk": True, "sample_topk": False})
    sae = SparseAutoencoder.load(tmp_path / "hp")
    assert sae.cfg.input_unit_norm is True
    x = torch.randn(23, D) * 7 + 3
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)  # unbiased, as torch.std and the published code
    xn = (x - mean) / (std + 1e-5)
    pre = torch.relu((xn - t["b_dec"]) @ t["encoder.weight"].t() + t["encoder.bias"])
    f = _codes(pre)
    vals, idx = sae.encode(x)
    torch.testing.assert_close(vals, pre.topk(K).values)
    torch.testing.assert_close(sae.pre_acts(x), pre)
    want = (f @ t["W_dec"] + t["b_dec"]) * (std + 1e-5) + mean
    torch.testing.assert_close(sae(x).x_hat, want, atol=1e-4, rtol=1e-5)
    # a scaled and shifted token gets the same codes
    torch.testing.assert_close(sae.encode(x * 5 - 2).values, vals, atol=1e-4, rtol=1e-4)
    # round trip keeps the field
    sae.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["input_unit_norm"] is True
    again = SparseAutoencoder.load(tmp_path / "again")
    torch.testing.assert_close(again(x).x_hat, want, atol=1e-4, rtol=1e-5)


def test_skip_connection_matches_sparsify_formula_and_round_trips(tmp_path):
    t = _folder(tmp_path / "hp", skip=True)
    sae = SparseAutoencoder.load(tmp_path / "hp")
    x = torch.randn(19, D)
    f = _codes(torch.relu((x - t["b_dec"]) @ t["encoder.weight"].t() + t["encoder.bias"]))
    want = f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].t()
    torch.testing.assert_close(sae(x).x_hat, want, atol=1e-5, rtol=1e-5)
    fvu = float((want - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert sae.fvu(x) == pytest.approx(fvu, rel=1e-5)  # through forward, skip included
    sae.save(tmp_path / "again")
    again = SparseAutoencoder.load(tmp_path / "again")
    assert torch.equal(again.W_skip, t["W_skip"])
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["skip_connection"] is True


@pytest.mark.parametrize("field, value", [("activation", "groupmax"), ("transcode", True), ("sample_topk", True),
                                          ("jumprelu_threshold", 0.3)])
def test_unimplemented_fields_are_refused_by_name(tmp_path, field, value):
    _folder(tmp_path / "hp", {field: value})
    with pytest.raises(ValueError, match=f"cfg.json field {field}="):
        SparseAutoencoder.load(tmp_path / "hp")


@pytest.mark.parametrize("field, value", [("activation", "topk"), ("transcode", False), ("sample_topk", False),
                                          ("multi_topk", True), ("batch_topk", True), ("some_new_flag", False)])
def test_neutral_or_training_only_fields_load(tmp_path, field, value):
    _folder(tmp_path / "hp", {field: value})
    assert SparseAutoencoder.load(tmp_path / "hp").cfg.k == K


def test_a_tensor_cfg_json_does_not_account_for_is_refused(tmp_path):
    t = _folder(tmp_path / "hp")
    save_file({**t, "W_skip": torch.zeros(D, D)}, str(tmp_path / "hp" / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"\['W_skip'\].*skip_connection"):
        SparseAutoencoder.load(tmp_path / "hp")
    _folder(tmp_path / "hp2", skip=True)
    cfg = json.loads((tmp_path / "hp2" / "cfg.json").read_text())
    save_file({k: v for k, v in t.items()}, str(tmp_path / "hp2" / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"lacks \['W_skip'\]"):
        SparseAutoencoder.load(tmp_path / "hp2")
    assert cfg["skip_connection"] is True


def test_patch_refuses_what_its_hook_does_not_implement(tmp_path):
    _folder(tmp_path / "norm", {"input_unit_norm": True})
    _folder(tmp_path / "skip", skip=True)
    table = ConceptTable(["a", "b"], [1, 1], [1.0], {"hp": torch.rand(2, 1, M)})
    norm = SparseAutoencoder.load(tmp_path / "norm")
    check_sae_for_edit(table, "hp", norm)  # the correct edit standardises tokens (test_patch.py)
    with pytest.raises(ValueError, match="input_unit_norm"):
        check_sae_for_edit(table, "hp", norm, error_term="reference")
    skip = SparseAutoencoder.load(tmp_path / "skip")
    check_sae_for_edit(table, "hp", skip)  # the correct edit does not involve the skip connection
    with pytest.raises(ValueError, match="skip_connection"):
        check_sae_for_edit(table, "hp", skip, error_term="reference")
