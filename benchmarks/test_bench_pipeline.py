"""Pipeline level: a UNet step unpatched, with the edit on up_blocks.1.attentions.1, and on every block.

GPU: UNet2DConditionModel from the SD1.5 config (random weights), 512x512, CFG, fp16, batch 1 and 8.
CPU: a tiny UNet, batch 1 (smoke).
"""
import pytest
import torch

import saeuron
from saeuron.concepts import ConceptTable
from saeuron.toy import SD15_UNET, random_sae, tiny_unet_config

from .common import DEVICE, GPU, sync

if GPU:
    CFG, DTYPE, BATCHES, LATENT, CTX, TEXT_LEN, EXPANSION, K = SD15_UNET, torch.float16, (1, 8), 64, 768, 77, 16, 32
else:
    CFG, DTYPE, BATCHES, LATENT, CTX, TEXT_LEN, EXPANSION, K = tiny_unet_config(), torch.float32, (1,), 8, 32, 16, 4, 8
ONE_BLOCK = "up_blocks.1.attentions.1"


@pytest.fixture(scope="module")
def world():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CFG).to(DEVICE, DTYPE).eval()
    hps = saeuron.list_hookpoints(unet)
    saes = {hp: random_sae(d_in=c, num_latents=EXPANSION * c, k=K, seed=i) for i, (hp, c) in enumerate(hps.items())}
    T = 50
    ts = torch.linspace(981, 1, T)
    mu = {hp: torch.rand(2, T, s.num_latents) * (torch.rand(2, T, s.num_latents) < 0.01) for hp, s in saes.items()}
    table = ConceptTable(["a", "b"], [10, 10], ts, mu, defaults={"top_n": 4, "multiplier": -1.0})
    return unet, saes, table


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["unpatched", "one block", "all blocks"])
def test_unet_step(benchmark, world, variant, batch):
    unet, saes, table = world
    g = torch.Generator().manual_seed(batch)
    sample = torch.randn(2 * batch, 4, LATENT, LATENT, generator=g).to(DEVICE, DTYPE)
    ctx = torch.randn(2 * batch, TEXT_LEN, CTX, generator=g).to(DEVICE, DTYPE)
    t = torch.tensor(500.0, device=DEVICE)
    hps = {"one block": [ONE_BLOCK], "all blocks": list(saes)}.get(variant)
    handle = saeuron.patch(unet, ["a"], saes=saes, table=table, hookpoints=hps) if hps else None

    @torch.no_grad()
    def step():
        unet(sample, t, encoder_hidden_states=ctx)
        sync()
    benchmark.group = f"UNet step {'SD1.5 512x512 fp16' if GPU else 'tiny'} CFG batch {batch}"
    benchmark.extra_info.update(variant=variant, kind="pipeline")
    try:
        benchmark.pedantic(step, rounds=20 if GPU else 5, iterations=1, warmup_rounds=3 if GPU else 1)
    finally:
        if handle is not None:
            handle.remove()
