"""Training step (forward + backward): sparse saeuron ops vs the eager reference (dense backward)."""
import pytest
import torch
import torch.nn.functional as F

from saeuron import ops

from .common import DEVICE, GPU, sync
from .eager import eager_train_loss

D, M, K, N = (1280, 20480, 32, 8192) if GPU else (64, 1024, 8, 512)
DTYPE = torch.float32  # fp32 master weights, as the trainer keeps them


def _params():
    g = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(M, D, generator=g) / D ** 0.5).to(DEVICE, DTYPE).requires_grad_()
    b_enc = torch.zeros(M, device=DEVICE, dtype=DTYPE).requires_grad_()
    b_dec = (torch.randn(D, generator=g) * 0.05).to(DEVICE, DTYPE).requires_grad_()
    W_dec = F.normalize(W_enc.detach().clone(), dim=1).requires_grad_()
    x = torch.randn(N, D, generator=g).to(DEVICE, DTYPE)
    return x, W_enc, b_enc, b_dec, W_dec


def sparse_train_loss(x, W_enc, b_enc, b_dec, W_dec, k):
    """Select latents without grad, then differentiable gathered encode + sparse decode."""
    with torch.no_grad():
        _, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    vals = ops.gather_encode(x, W_enc, b_enc, b_dec, idx)
    x_hat = ops.sparse_decode(vals, idx, W_dec, b_dec)
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


@pytest.mark.parametrize("variant", ["eager", "saeuron"])
def test_train_step(benchmark, variant):
    x, *p = _params()
    loss_fn = eager_train_loss if variant == "eager" else sparse_train_loss
    # same loss on the same weights: the fast step computes the same function
    torch.testing.assert_close(sparse_train_loss(x, *p, K), eager_train_loss(x, *p, K), rtol=1e-4, atol=1e-5)

    def step():
        for t in p:
            t.grad = None
        loss_fn(x, *p, K).backward()
        sync()
    benchmark.group = f"train step d={D} M={M} k={K} N={N} fp32"
    benchmark.extra_info.update(variant=variant, kind="train")
    benchmark.pedantic(step, rounds=10 if GPU else 3, iterations=1, warmup_rounds=2 if GPU else 1)
