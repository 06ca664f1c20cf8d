"""Op level: the SAE edit call per backend vs the eager edit vs the encoder GEMM alone (the floor).

The fire-first edit's cost depends on how many tokens have a selected feature above its threshold, so
every backend is timed with 0 %, 5 % and 100 % of the tokens firing. CPU: the issue's shape (d 1280,
M 20480, k 32, F 32, N 4096, fp32); ``SAEURON_BENCH_SMOKE=1`` shrinks it to a seconds-long smoke run.

Each backend variant is forced (``ops.set_backend``), so it is never measured or swapped. The ``auto`` variant
runs the automatic choice, as a pipeline would: measured on its first call of the shape class (or read from the
autotune cache; the fire fraction is data, not part of the key, so the 0 % case's choice also serves 5 % and
100 %); its row is renamed ``auto=<backend>`` and ``extra_info`` records the choice, where it came from and the
timings it was made on. The ``replace`` variant is the detect-then-replace edit (:mod:`saeuron.replace`, the
tokens read as one image, ``replace_background``) on the automatic backend: the same fire-first pass with zero
scales on a copy, a compare, and the fill. The ``probe`` variant is ``mode="probe_uncond"``'s decision at the
first hooked block (:mod:`saeuron.detectors`: the tokens' mean top-k code read as 16 images, 10 concepts'
logistic detectors, and the whole-map fill) with a detector over every latent's top-k code (``latents=0``): it
encodes every token whatever fires, so it costs the same at 0 %, 5 % and 100 %. ``probe_sparse`` is the same
decision with the default sparse detector (the mean ReLU pre-activations of 48 latents: one GEMM over 48 encoder
rows).
"""
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from saeuron import ops, replace
from saeuron.detectors import DEFAULT_LATENTS, mean_codes, relu_means

from .common import DEVICE, GPU, sync
from .eager import eager_edit

NF = 32  # selected features of the concept at this timestep
FRACS = (0.0, 0.05, 1.0)
if GPU:
    D, M, K, NS, DTYPES = 1280, 20480, 32, (512, 4096, 16384), (torch.float16, torch.bfloat16)
    BACKENDS = ("torch", "triton", "cuda")
elif os.environ.get("SAEURON_BENCH_SMOKE") == "1":
    D, M, K, NS, DTYPES = 64, 1024, 8, (256,), (torch.float32,)
    BACKENDS = ("torch", "cuda")
else:  # the CPU targets of performance.md
    D, M, K, NS, DTYPES = 1280, 20480, 32, (4096,), (torch.float32,)
    BACKENDS = ("torch", "cuda")


def _case(n, dtype, frac):
    """Random SAE, tokens and a 32-feature table whose tau makes about ``frac`` of the tokens fire."""
    g = torch.Generator().manual_seed(n)
    W_enc = (torch.randn(M, D, generator=g) / D ** 0.5).to(DEVICE, dtype)
    b_enc = (torch.randn(M, generator=g) * 0.01 - 0.05).to(DEVICE, dtype)
    b_dec = (torch.randn(D, generator=g) * 0.01).to(DEVICE, dtype)
    W_dec = F.normalize(torch.randn(M, D, generator=g), dim=1).to(DEVICE, dtype)
    x = torch.randn(n, D, generator=g).to(DEVICE, dtype)
    feat = torch.randperm(M, generator=g)[:NF].to(DEVICE)
    best = torch.relu((x.float() - b_dec.float()) @ W_enc[feat].float().t() + b_enc[feat].float()).amax(1)
    if frac == 0.0:  # finite, above every value: the gathered GEMM runs, nothing passes
        t = float(best.max()) + 1.0
    elif frac == 1.0:
        t = -1.0
    else:
        t = float(best.sort().values[int(n * (1 - frac))])
    tau = torch.full((NF,), t, device=DEVICE)
    scale = torch.full((NF,), -1.0, device=DEVICE)
    return x, W_enc, b_enc, b_dec, W_dec, feat, tau, scale


def _paired_ratio(fn, floor, rounds):
    """Median over ``rounds`` of time(fn) / time(floor), each pair run back to back (robust to load drift)."""
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        floor()
        sync()
        t1 = time.perf_counter()
        fn()
        sync()
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return statistics.median(ratios)


def _run(benchmark, fn, group, variant, floor):
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, kind="op")

    def call():
        fn()
        sync()
    slow = not GPU and variant in ("gemm", "eager", "torch") and M > 4096
    rounds = 20 if GPU else (3 if slow else 7)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    if variant != "gemm":  # a shared machine's load drifts between tests: also time each call beside the GEMM
        benchmark.extra_info["paired_ratio"] = _paired_ratio(fn, floor, rounds)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("frac", FRACS, ids=lambda f: f"fire{int(f * 100)}pct")
@pytest.mark.parametrize("variant", ("gemm", "eager") + BACKENDS + ("auto", "replace", "probe", "probe_sparse"))
def test_edit_call(benchmark, variant, frac, n, dtype):
    x, W_enc, b_enc, b_dec, W_dec, feat, tau, scale = _case(n, dtype, frac)
    group = f"edit d={D} M={M} k={K} F={NF} N={n} {str(dtype).split('.')[-1]} fire {int(frac * 100)}%"
    y = x.clone()
    floor = lambda: F.linear(x, W_enc)  # noqa: E731
    if variant == "gemm":
        fn = floor
    elif variant == "replace":
        zero = replace.detection_scale(tau)

        def fn():
            hit = replace.detect(x, (W_enc, b_enc, b_dec, W_dec), K, feat, tau, zero, n)
            return replace.background_fill(x.view(1, n, D), hit.view(1, n))
    elif variant in ("probe", "probe_sparse"):
        imgs = 16
        g = torch.Generator().manual_seed(1)
        lat = torch.randperm(M, generator=g)[:DEFAULT_LATENTS].sort().values.to(DEVICE)
        w = (torch.randn(M if variant == "probe" else len(lat), 10, generator=g) * 0.01).to(DEVICE)
        unc = torch.randn(n, D, generator=g).to(DEVICE, dtype)

        def fn():
            if variant == "probe":  # every latent's mean top-k code: a full encode
                z = mean_codes(x, (W_enc, b_enc, b_dec), K, imgs)
            else:  # the default sparse detector: 48 latents' mean ReLU pre-activations
                z = relu_means(x, W_enc.index_select(0, lat), b_enc.index_select(0, lat), b_dec, imgs)
            flag = torch.sigmoid(z @ w)[:, 3] >= 0.5
            return torch.where(flag.repeat_interleave(n // imgs)[:, None], unc, x)
    elif variant == "eager":
        fn = lambda: eager_edit(x, W_enc, b_enc, b_dec, W_dec, K, feat, tau, scale)  # noqa: E731
    else:
        ops.set_backend(None if variant == "auto" else variant)
        if variant == "auto" and not ops.autotune_enabled():
            pytest.skip("SAEURON_AUTOTUNE=0: the automatic choice is the static order")
        if variant != "auto" and ops.backend_for("edit_", DEVICE, dtype) != variant:
            ops.set_backend(None)
            pytest.skip(f"{variant} backend not available here: {ops.status()['errors'].get(variant, '')}")
        fn = lambda: ops.edit_(y.copy_(x), W_enc, b_enc, b_dec, W_dec, K, feat, tau, scale)  # noqa: E731
    try:
        _run(benchmark, fn, group, variant, floor)  # (auto: the warm-up round measures or reads the cache)
        if variant == "auto":
            _record_auto_choice(benchmark, n, dtype)
    finally:
        ops.set_backend(None)


def _record_auto_choice(benchmark, n, dtype):
    """Name the ``auto`` row after the backend the automatic choice picked for this case's shape class."""
    pow2 = 1 << (n - 1).bit_length()
    picked = [e for e in ops.status()["measured"] if e["op"] == "edit_" and e["shape"]["N"] == pow2
              and e["shape"]["M"] == M and e["dtype"] == str(dtype).split(".")[-1]]
    if picked:
        benchmark.extra_info.update(variant=f"auto={picked[0]['backend']}", auto_choice=picked[0]["backend"],
                                    auto_source=picked[0]["source"], auto_ms=picked[0]["ms"])
