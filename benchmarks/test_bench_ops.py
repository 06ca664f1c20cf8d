"""Op level: the SAE edit call per backend vs the eager reference vs the encoder GEMM alone (the floor)."""
import pytest
import torch
import torch.nn.functional as F

from saeuron import ops, reference

from .common import DEVICE, GPU, sync
from .eager import eager_edit

if GPU:
    D, M, K, NS, DTYPES = 1280, 20480, 32, (512, 4096, 16384), (torch.float16, torch.bfloat16)
    BACKENDS = ("torch", "triton", "cuda")
else:  # smoke sizes: the whole file runs in seconds on 2 cores
    D, M, K, NS, DTYPES = 64, 1024, 8, (256,), (torch.float32,)
    BACKENDS = ("torch", "cuda")


def _case(n, dtype):
    g = torch.Generator().manual_seed(n)
    W_enc = (torch.randn(M, D, generator=g) / D ** 0.5).to(DEVICE, dtype)
    b_enc = (torch.randn(M, generator=g) * 0.05).to(DEVICE, dtype)
    b_dec = (torch.randn(D, generator=g) * 0.05).to(DEVICE, dtype)
    W_dec = F.normalize(torch.randn(M, D, generator=g), dim=1).to(DEVICE, dtype)
    x = torch.randn(n, D, generator=g).to(DEVICE, dtype)
    # a realistic concept: 4 features at this timestep, chosen among ones that do fire on these tokens
    _, idx = reference.topk_encode(x[:64], W_enc, b_enc, b_dec, K)
    feat = idx[:4, 0].unique().to(DEVICE)
    tau = torch.zeros(feat.numel(), device=DEVICE)
    scale = torch.full((feat.numel(),), -2.0, device=DEVICE)
    return x, W_enc, b_enc, b_dec, W_dec, feat, tau, scale


def _run(benchmark, fn, group, variant):
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, kind="op")

    def call():
        fn()
        sync()
    benchmark.pedantic(call, rounds=20 if GPU else 5, iterations=1, warmup_rounds=3 if GPU else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("variant", ("gemm", "eager") + BACKENDS)
def test_edit_call(benchmark, variant, n, dtype):
    x, W_enc, b_enc, b_dec, W_dec, feat, tau, scale = _case(n, dtype)
    group = f"edit d={D} M={M} k={K} N={n} {str(dtype).split('.')[-1]}"
    if variant == "gemm":
        fn = lambda: F.linear(x, W_enc)  # noqa: E731
    elif variant == "eager":
        fn = lambda: eager_edit(x, W_enc, b_enc, b_dec, W_dec, K, feat, tau, scale)  # noqa: E731
    else:
        ops.set_backend(variant)
        if ops.backend_for("edit_", DEVICE) != variant:
            ops.set_backend(None)
            pytest.skip(f"{variant} backend not available here: {ops.status()['errors'].get(variant, '')}")
        fn = lambda: ops.edit(x, W_enc, b_enc, b_dec, W_dec, K, feat, tau, scale)  # noqa: E731
    try:
        _run(benchmark, fn, group, variant)
    finally:
        ops.set_backend(None)
