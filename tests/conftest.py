"""Shared fixtures: tiny models built from configs (never downloaded) and random SAEs."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in CI


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipe_factory():
    from saeuron.toy import tiny_pipeline

    def make(**kw):
        return tiny_pipeline(words=("an image of a cat dog car tree house in style photo cartoon sketch "
                                    "watercolor oil painting",), **kw)
    return make


@pytest.fixture
def tiny_pipe(tiny_pipe_factory):
    return tiny_pipe_factory()


def make_sae(d_in=32, num_latents=128, k=4, seed=0, dtype=torch.float32):
    """A random SAE with non-trivial biases (not zeros) for op and patch tests."""
    from saeuron import SaeConfig, SparseAutoencoder

    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, num_latents=num_latents, k=k))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(num_latents, d_in, generator=g) / d_in ** 0.5)
        sae.encoder.bias.copy_(torch.randn(num_latents, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(num_latents, d_in, generator=g))
        sae.set_decoder_norm_to_unit_norm()
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae.to(dtype)


@pytest.fixture
def sae_factory():
    return make_sae
