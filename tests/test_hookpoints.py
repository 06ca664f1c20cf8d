"""Hookpoint discovery on UNets of different shapes."""
import pytest
from diffusers import UNet2DConditionModel

from saeuron.hookpoints import list_hookpoints, resolve_hookpoints
from saeuron.toy import tiny_unet_config


def test_lists_every_transformer_block_with_channels(tiny_pipe):
    hps = list_hookpoints(tiny_pipe)
    assert hps == {"down_blocks.0.attentions.0": 32, "up_blocks.1.attentions.0": 32,
                   "up_blocks.1.attentions.1": 32, "mid_block.attentions.0": 64}
    assert list_hookpoints(tiny_pipe.unet) == hps


def test_three_level_unet_and_sdxl_style_blocks():
    cfg = tiny_unet_config(channels=(16, 32, 64))
    cfg["transformer_layers_per_block"] = (1, 2, 1)  # SDXL-style deeper blocks
    hps = list_hookpoints(UNet2DConditionModel(**cfg))
    assert hps["down_blocks.1.attentions.0"] == 32 and hps["mid_block.attentions.0"] == 64
    assert len(hps) == 2 + 1 + 2 * 2  # down 2 levels x1, mid, up 2 levels x2


def test_unknown_hookpoint_lists_valid_ones(tiny_pipe):
    with pytest.raises(ValueError, match=r"unknown hookpoint 'up_blocks\.9'.*up_blocks\.1\.attentions\.1 \(32 ch\)"):
        resolve_hookpoints(tiny_pipe, ["up_blocks.9"])
    assert list(resolve_hookpoints(tiny_pipe, "unet.up_blocks.1.attentions.1")) == ["up_blocks.1.attentions.1"]
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        list_hookpoints(object())


def test_sd15_config_has_sixteen_blocks():
    import torch

    from saeuron.toy import SD15_UNET

    with torch.device("meta"):  # shapes only: no 3.4 GB of weights
        hps = list_hookpoints(UNet2DConditionModel(**SD15_UNET))
    assert len(hps) == 16
    assert hps["up_blocks.1.attentions.1"] == 1280 and hps["down_blocks.0.attentions.0"] == 320
    assert sorted(set(hps.values())) == [320, 640, 1280]
