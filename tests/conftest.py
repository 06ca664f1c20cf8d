"""Shared fixtures: tiny models built from configs (never downloaded) and random SAEs."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in CI
# Deterministic backend choice (the static order) and no writes to the user's cache; tests/test_ops_autotune.py
# turns measuring on where it tests it.
os.environ["SAEURON_AUTOTUNE"] = "0"
torch.set_num_threads(1)  # tiny models: threads only add overhead and contention on small CI machines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, whatever an earlier test set (tiny matmuls: more threads only contend)."""
    torch.set_num_threads(1)
    yield


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


@pytest.fixture(scope="module")
def pipe(tiny_pipe_factory):
    """The tiny pipeline, one per test module (a module that needs another defines its own ``pipe``)."""
    return tiny_pipe_factory()


@pytest.fixture
def unpatched_after(pipe):
    """Remove any saeuron patch from the module's ``pipe`` after the test (``pytestmark = usefixtures(...)``)."""
    yield
    from saeuron.patching import unpatch

    unpatch(pipe)


def sae_weights(num_latents: int, d_in: int, dtype=torch.float32, seed: int = 0) -> tuple:
    """Random ``(W_enc, b_enc, b_dec, W_dec)`` of the ops' signatures (unit-norm decoder rows), for op tests."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(num_latents, d_in, generator=g) / d_in ** 0.5
    b_enc, b_dec = torch.randn(num_latents, generator=g) * 0.1, torch.randn(d_in, generator=g) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(num_latents, d_in, generator=g), dim=1)
    return tuple(t.to(dtype) for t in (W_enc, b_enc, b_dec, W_dec))


def make_sae(d_in=32, num_latents=128, k=4, seed=0, dtype=torch.float32):
    """A random SAE with non-trivial biases (not zeros) for op and patch tests."""
    from saeuron.toy import random_sae

    return random_sae(d_in=d_in, num_latents=num_latents, k=k, seed=seed, dtype=dtype)


@pytest.fixture
def sae_factory():
    return make_sae
