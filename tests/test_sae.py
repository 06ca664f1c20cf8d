"""The SparseAutoencoder: sparsify/SAeUron checkpoint layout, encode/decode, clear load errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from saeuron import SaeConfig, SparseAutoencoder
from saeuron.sae import geometric_median


def _write_sparsify_folder(path, d=16, m=64, k=4, seed=0):
    """A hookpoint folder exactly as sparsify/SAeUron write it (written here by hand, not by saeuron)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(m, d, generator=g), "encoder.bias": torch.randn(m, generator=g) * 0.1,
               "W_dec": torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1),
               "b_dec": torch.randn(d, generator=g) * 0.1}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"expansion_factor": m // d, "normalize_decoder": True, "num_latents": 0,
                                               "k": k, "multi_topk": False, "skip_connection": False, "d_in": d}))
    return tensors


def test_sparsify_layout_loads_and_encodes_identically(tmp_path):
    t = _write_sparsify_folder(tmp_path / "ckpt" / "unet.up_blocks.1.attentions.1")
    sae = SparseAutoencoder.from_pretrained(tmp_path / "ckpt", hookpoint="up_blocks.1.attentions.1")
    assert sae.cfg.extra == {"multi_topk": False} and sae.cfg.skip_connection is False
    x = torch.randn(23, 16)
    vals, idx = sae.encode(x)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].t() + t["encoder.bias"])
    ref_vals, _ = pre.topk(4)
    torch.testing.assert_close(vals, ref_vals)
    torch.testing.assert_close(pre.gather(1, idx), vals)
    f = torch.zeros_like(pre).scatter(1, idx, vals)
    torch.testing.assert_close(sae(x).x_hat, f @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)
    # saving writes the same layout back (unknown cfg fields kept)
    sae.save(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert cfg["multi_topk"] is False and cfg["d_in"] == 16 and cfg["k"] == 4
    again = SparseAutoencoder.load(tmp_path / "again")
    for name, v in again.state_for_disk().items():
        assert torch.equal(v, t[name])


def test_load_dtype_and_unknown_hookpoint(tmp_path):
    _write_sparsify_folder(tmp_path / "ckpt" / "down_blocks.0.attentions.0")
    sae = SparseAutoencoder.from_pretrained(tmp_path / "ckpt", hookpoint="down_blocks.0.attentions.0",
                                            dtype=torch.bfloat16)
    assert sae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="available: down_blocks.0.attentions.0"):
        SparseAutoencoder.from_pretrained(tmp_path / "ckpt", hookpoint="mid_block.attentions.0")
    with pytest.raises(FileNotFoundError, match="not a folder, nor a hub id"):
        SparseAutoencoder.from_pretrained(tmp_path / "nope" / "deeper")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_tensor", "bad_json", "no_weights", "shape"])
def test_corrupt_checkpoints_raise_clear_errors(tmp_path, damage):
    p = tmp_path / "hp"
    t = _write_sparsify_folder(p)
    w = p / "sae.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:200])
    elif damage == "garbage":
        w.write_bytes(b"\x00" * 64)
    elif damage == "missing_tensor":
        save_file({k: v for k, v in t.items() if k != "W_dec"}, str(w))
    elif damage == "bad_json":
        (p / "cfg.json").write_text("{not json")
    elif damage == "no_weights":
        w.unlink()
    elif damage == "shape":
        save_file({**t, "b_dec": torch.randn(3)}, str(w))
    expected = {"no_weights": (FileNotFoundError, "missing sae.safetensors")}.get(damage, (ValueError, "corrupt checkpoint"))
    with pytest.raises(expected[0], match=expected[1]):
        SparseAutoencoder.load(p)


def test_init_and_training_helpers():
    sae = SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=4, k=2))
    assert sae.num_latents == 32 and torch.equal(sae.encoder.bias, torch.zeros(32))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(sae.W_dec, torch.nn.functional.normalize(sae.encoder.weight, dim=1))
    sae.W_dec.grad = torch.randn(32, 8)
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="input width 9 does not match this SAE's d_in=8"):
        sae.encode(torch.randn(2, 9))


def test_geometric_median_is_robust_to_outliers():
    pts = torch.randn(200, 3) * 0.1 + torch.tensor([1.0, -2.0, 0.5])
    pts[:20] += 100.0  # 10 % outliers drag the mean, not the median
    med = geometric_median(pts)
    assert (med - torch.tensor([1.0, -2.0, 0.5])).norm() < 0.1
    assert (pts.mean(0) - torch.tensor([1.0, -2.0, 0.5])).norm() > 5
