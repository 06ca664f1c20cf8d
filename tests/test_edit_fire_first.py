"""Fire-first edit: every backend against the reference (full top-k, explicit tie rule) on random cases.

Cases mix shapes, dtypes, token [N, d] / channel-first [B, C, H, W] / channels-last layouts, firing
fractions 0 / 5 / 100 %, exact ties at the k-th value (quantised weights and inputs make every dot
product exact, so equal latents tie in any summation order), NaN/inf rows, empty and padded tables
and several concept-table rows. A token where nothing fires must stay bit for bit unchanged.
The compiled C++ op runs 1200 cases; Triton (``TRITON_INTERPRET=1``) a small subset.
"""
import os

import pytest
import torch

from saeuron import extension, ops
from saeuron import reference as R

# f is rounded to x.dtype in every implementation: a one-ulp flip of f is amplified by |scale - 1| |W_dec|
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _q(t: torch.Tensor, step: float) -> torch.Tensor:
    """Round to a multiple of ``step`` in [-4, 4] steps: products and sums stay exact in every dtype used."""
    return (t / step).round().clamp(-4, 4) * step


def make_case(seed: int, dtypes=(torch.float32, torch.float16, torch.bfloat16), small: bool = False):
    """One random edit problem: ``(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rows_per_group, info)``."""
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    dtype = dtypes[seed % len(dtypes)]
    d = ri(2, 24 if small else 48)
    m = ri(8, 96 if small else 400)
    k = ri(1, min(m, 24))
    layout = ("tokens", "nchw", "channels_last")[ri(0, 2)]
    if layout == "tokens":
        n = ri(0 if seed % 97 == 0 else 1, 40 if small else 120)
        shape, per_image = (n, d), max(n, 1)
    else:
        b, h, w = ri(1, 3), ri(1, 5), ri(1, 6)
        shape, per_image, n = (b, d, h, w), h * w, b * h * w
    tied = seed % 3 == 0  # quantised: exact dot products, many equal latents (ties at the k-th value)
    W_enc = torch.randn(m, d, generator=g) / d ** 0.5
    b_enc = torch.randn(m, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    x = torch.randn(shape, generator=g)
    if tied:
        W_enc, b_enc, b_dec, x = _q(W_enc, 0.25), _q(b_enc, 0.25), _q(b_dec, 0.25), _q(x, 0.5)
        dup = torch.randint(0, m, (m // 4,), generator=g)
        W_enc[torch.randint(0, m, (m // 4,), generator=g)] = W_enc[dup]  # duplicated latents tie exactly
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    W_enc, b_enc, b_dec, W_dec, x = (t.to(dtype) for t in (W_enc, b_enc, b_dec, W_dec, x))
    if ri(0, 3) == 0 and n > 2:  # NaN / inf rows
        tok = R.as_tokens(x) if x.dim() == 2 else None
        if tok is not None:
            tok[ri(0, n - 1), ri(0, d - 1)] = float("nan")
            tok[ri(0, n - 1), 0] = float("inf")
        else:
            x[0, ri(0, d - 1), 0, 0] = float("nan")
    xt = R.as_tokens(x)
    # tables: G rows (one per image or a few blocks of tokens), F features, mostly latents that do fire
    G = ri(1, 3) if layout == "tokens" else (shape[0] if ri(0, 1) else 1)
    F = 0 if seed % 50 == 1 else ri(1, 12)
    rpg = per_image if (layout != "tokens" and G > 1) else max(-(-max(n, 1) // G), 1)
    pre = torch.nan_to_num(R.preacts(xt, W_enc, b_enc, b_dec), nan=0.0, posinf=0.0) if n else torch.zeros(1, m)
    top = torch.sort(pre, dim=-1, descending=True, stable=True).indices[:, :k]
    rows = torch.randint(0, max(top.shape[0], 1), (G, F), generator=g)
    slots = torch.randint(0, k, (G, F), generator=g)
    feat = top[rows, slots] if top.numel() else torch.randint(0, m, (G, F), generator=g)
    other = torch.randint(0, m, (G, F), generator=g)
    pick = torch.rand(G, F, generator=g)
    feat = torch.where(pick < 0.25, other, feat)
    feat = torch.where(pick > 0.95, torch.full_like(feat, -1), feat)  # padding ids
    scale = torch.randint(-3, 3, (G, F), generator=g).float() * 0.5
    scale = torch.where(pick < 0.05, torch.ones_like(scale), scale)  # padding scale
    # firing fraction: 0 % (tau above every value), 5 % (tau at a quantile of the best selected value), 100 %
    frac = (0.0, 0.05, 1.0)[(seed // 3) % 3]
    vals = pre[:, feat.clamp_min(0)].amax(-1) if n and F else torch.zeros(1)
    if frac == 0.0:
        tau = torch.full((G, F), float(vals.max()) + 1.0)
    elif frac == 1.0:
        tau = torch.full((G, F), -1.0)
    else:
        s = vals.to(dtype).float().flatten().unique()  # codes are compared in x.dtype: tau between two of them
        i = max(int(len(s) * 0.95) - 1, 0)
        hi = s[i + 1] if i + 1 < len(s) else s[i] + 1.0
        tau = torch.full((G, F), float(s[i] + hi) / 2)
    tau = torch.where(pick > 0.9, torch.full_like(tau, float("inf")), tau)  # padding tau
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rpg, dict(seed=seed, layout=layout, frac=frac,
                                                                           tied=tied, dtype=dtype, G=G, F=F)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return R.as_tokens(t).contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def check_case(fn, case):
    """Run backend ``fn`` and the reference on copies of the case's x; compare."""
    x, *args, info = case
    got, want = x.clone(), x.clone()
    fn(got, *args)
    R.edit_(want, *args)
    untouched = (_bits(want) == _bits(x)).all(1)
    assert torch.equal((_bits(got) == _bits(x)).all(1), untouched), f"different tokens edited: {info}"
    assert torch.equal(_bits(got)[untouched], _bits(x)[untouched]), info
    tol = TOL[x.dtype]
    a, b = R.as_tokens(got).double(), R.as_tokens(want).double()
    err = ((a - b).abs() - tol * (1 + b.abs())).nan_to_num(0.0)
    assert err.numel() == 0 or err.max() <= 0, f"max error {(a - b).abs().nan_to_num().max():.3g}: {info}"
    return bool((~untouched).any())


@pytest.fixture(scope="module")
def ext():
    """The compiled extension (built once, cached on disk)."""
    try:
        return extension.load_backend()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"compiled extension unavailable: {e}")


def test_cpp_edit_matches_reference_on_1200_cases(ext):
    """The compiled C++ CPU op against the reference: 1200 random cases, fp32/fp16/bf16/fp64."""
    seen = {"edited": 0, "untouched": 0}
    kinds = set()
    for seed in range(1200):
        case = make_case(seed, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        edited = check_case(ext.edit_, case)
        seen["edited" if edited else "untouched"] += 1
        info = case[-1]
        kinds.add((info["layout"], info["frac"], info["tied"]))
    assert seen["edited"] > 200 and seen["untouched"] > 200, seen
    assert len(kinds) == 18, kinds


def test_ops_seam_picks_cpp_on_cpu_and_matches(ext, monkeypatch):
    """Automatic choice on the CPU runs the compiled edit; through the seam it matches the reference (40 cases)."""
    monkeypatch.delenv("SAEURON_BACKEND", raising=False)
    ops.set_backend(None)
    assert ops.backend_for("edit_", torch.device("cpu")) == "cuda"
    for seed in range(40):
        check_case(ops.edit_, make_case(seed))


def test_nothing_fires_is_bit_for_bit_noop(ext):
    """Finite tau above every value, tau = inf, scale = 1, -1 ids, empty tables, N = 0: x is never written."""
    g = torch.Generator().manual_seed(7)
    d, m, k = 24, 200, 8
    W_enc, b_enc, b_dec = torch.randn(m, d, generator=g) / 5, torch.randn(m, generator=g) * 0.1, torch.randn(d, generator=g)
    W_dec = torch.randn(m, d, generator=g)
    x = torch.randn(3, d, 4, 5, generator=g)
    feat = torch.randint(0, m, (1, 6), generator=g)
    tables = [(feat, torch.full((1, 6), 1e6), torch.full((1, 6), -1.0)),
              (feat, torch.full((1, 6), float("inf")), torch.full((1, 6), -1.0)),
              (feat, torch.full((1, 6), -1.0), torch.ones(1, 6)),
              (torch.full((1, 6), -1), torch.zeros(1, 6), torch.full((1, 6), -1.0)),
              (feat[:, :0], torch.zeros(1, 0), torch.zeros(1, 0))]
    for fi, ta, sc in tables:
        for fn in (ext.edit_, R.edit_):
            y = x.clone()
            fn(y, W_enc, b_enc, b_dec, W_dec, k, fi, ta, sc, 20)
            assert torch.equal(y, x)
    empty = torch.randn(0, d)
    ext.edit_(empty, W_enc, b_enc, b_dec, W_dec, k, feat, torch.zeros(1, 6), torch.full((1, 6), -1.0), 1)


def test_triton_edit_matches_reference_interpreted():
    """The Triton kernels under TRITON_INTERPRET=1 against the reference on 1000 random cases (small shapes: the
    interpreter runs a program instance at a time), every layout, firing fraction, tie and dtype of ``make_case``."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    K = pytest.importorskip("saeuron.kernels.backend")
    edited, kinds = 0, set()
    for seed in range(1000):
        case = make_case(seed, small=True)
        edited += check_case(K.edit_, case)
        kinds.add((case[-1]["layout"], case[-1]["frac"], case[-1]["tied"]))
    assert edited > 100 and len(kinds) == 18, (edited, kinds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_reference(backend):
    """On a GPU: the CUDA and Triton fire-first edits against the reference, 1000 random cases each."""
    ops.set_backend(backend)
    try:
        if ops.backend_for("edit_", torch.device("cuda")) != backend:
            pytest.skip(f"{backend} unavailable: {ops.status()['errors'].get(backend, '')}")
        dev = torch.device("cuda")

        def on_gpu(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rpg):
            y = x.to(dev)
            ops.edit_(y, W_enc.to(dev), b_enc.to(dev), b_dec.to(dev), W_dec.to(dev), k, feat.to(dev), tau.to(dev),
                      scale.to(dev), rpg)
            x.copy_(y.cpu())

        for seed in range(1000):
            check_case(on_gpu, make_case(seed))
    finally:
        ops.set_backend(None)
