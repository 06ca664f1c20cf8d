"""Triton backend (``saeuron.kernels``) against :mod:`saeuron.reference`, directly and through the ops seam.

Runs the kernels through Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``) or compiled on
a GPU when one is present and the interpreter is off. Shapes are kept small: the interpreter is slow.
"""
import importlib

import pytest
import torch
import triton

from saeuron.kernels import backend as K
from saeuron import ops, reference

te = importlib.import_module("saeuron.kernels.topk_encode")
ed = importlib.import_module("saeuron.kernels.edit")
sd = importlib.import_module("saeuron.kernels.sparse_decode")
tr = importlib.import_module("saeuron.kernels.training")

DEV = torch.device("cuda" if torch.cuda.is_available() and not K.INTERPRET else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2e-3, atol=2e-3), BF16: dict(rtol=2e-2, atol=2e-2)}


def _weights(d, m, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(m, d, generator=g) / d ** 0.5
    b_enc = torch.randn(m, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    return [t.to(DEV, dtype) for t in (W_enc, b_enc, b_dec, W_dec)]


def _x(*shape, dtype=F32):
    return torch.randn(*shape).to(DEV, dtype)


def _gpu_like_plan(monkeypatch):
    """Force the GPU tiling (BM=128, T=8) so the interpreter runs the overflow/recompute path too."""
    orig = te.plan

    def plan(n, m, d, k, dtype=F16):
        p = orig(n, m, d, k, dtype)
        bm = min(128, p["BM"])
        nt = -(-m // bm)
        t = min(8, bm)
        p.update(BM=bm, NT=nt, NTP=1 << (nt - 1).bit_length(), T=t, FULL=t >= bm, BN=32, R=16)
        return p

    monkeypatch.setattr(te, "plan", plan)
    # the edit: GPU-sized blocks, several latent ranges per row block (atomic counts), small row blocks
    monkeypatch.setattr(ed, "blocks", lambda n, m, d, nf, dtype=F16: dict(
        R=16, FP=max(16, triton.next_power_of_2(nf)), BK=16, BM=64, MSPAN=128, BD=32))


def _gpu_like_blocks(monkeypatch):
    """Force the GPU blocking of the gather kernels (few rows per block, several blocks per program)."""
    def row_blocks(n, k, d):
        return max(1, min(16, 4096 // (triton.next_power_of_2(k) * 32))), 32

    monkeypatch.setattr(sd, "row_blocks", row_blocks)
    monkeypatch.setattr(tr, "row_blocks", row_blocks)
    monkeypatch.setattr(tr, "_sub_blocks", lambda n, r: max(1, min(32 // r, triton.cdiv(n, r))))


def _check_topk(x, W_enc, b_enc, b_dec, k, vals, idx):
    """Values equal the reference top-k (sorted, within dtype tolerance) and indices point at them."""
    ref_vals, _ = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    pre = torch.nan_to_num(reference.preacts(x, W_enc, b_enc, b_dec), nan=0.0, posinf=0.0, neginf=0.0)
    assert vals.shape == idx.shape == (x.shape[0], k) and vals.dtype == x.dtype and idx.dtype == torch.int64
    tol = TOL[x.dtype]
    torch.testing.assert_close(vals.float(), ref_vals.float(), **tol)
    torch.testing.assert_close(pre.gather(1, idx), vals.float(), **tol)  # tied indices may swap
    assert (vals[:, :-1] >= vals[:, 1:]).all(), "values must be sorted in descending order"
    assert (idx.sort(1).values.diff(dim=1) > 0).all(), "indices within a row must be distinct"


# --------------------------------------------------------------------------- topk_encode

@pytest.mark.parametrize("n,d,m,k,dtype", [
    (1, 8, 64, 1, F32),
    (7, 64, 256, 8, F16),
    (33, 64, 1000, 32, BF16),
    (130, 8, 512, 64, F32),
    (7, 320, 640, 32, F16),
    (5, 640, 300, 8, BF16),
    (3, 1280, 256, 64, F32),
    (7, 8, 20480, 32, F16),
])
@pytest.mark.parametrize("gpu_plan", [False, True])
def test_topk_encode_matches_reference(monkeypatch, n, d, m, k, dtype, gpu_plan):
    if gpu_plan:
        _gpu_like_plan(monkeypatch)
    W_enc, b_enc, b_dec, _ = _weights(d, m, dtype)
    x = _x(n, d, dtype=dtype)
    vals, idx = K.topk_encode(x, W_enc, b_enc, b_dec, k)
    _check_topk(x, W_enc, b_enc, b_dec, k, vals, idx)


@pytest.mark.parametrize("gpu_plan", [False, True])
@pytest.mark.parametrize("k", [8, 20, 32])
def test_topk_encode_exact_when_one_tile_holds_the_top_k(monkeypatch, gpu_plan, k):
    """A block of latents dominates: tiles overflow their partial top-T and rows must be recomputed exactly."""
    if gpu_plan:
        _gpu_like_plan(monkeypatch)
    n, d, m = 20, 16, 1024
    W_enc, b_enc, b_dec, _ = _weights(d, m)
    lo = 500  # every token's top-k sits in latents 500..500+k-1: one or two tiles (and recompute chunks)
    b_enc[lo:lo + k] += 20.0
    x = _x(n, d)
    x[3] *= 0.0  # a token decided by the biases alone
    vals, idx = K.topk_encode(x, W_enc, b_enc, b_dec, k)
    p = te.plan(n, m, d, k)
    assert not gpu_plan or (not p["FULL"] and k >= p["T"])  # the GPU-like plan really overflows
    _check_topk(x, W_enc, b_enc, b_dec, k, vals, idx)
    assert ((idx >= lo) & (idx < lo + k)).all()


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_topk_encode_ties(monkeypatch, dtype):
    """Duplicated latents tie (up to GEMM rounding): values match, indices point at them, none repeated."""
    _gpu_like_plan(monkeypatch)
    n, d, m, k = 9, 16, 300, 16
    W_enc, b_enc, b_dec, _ = _weights(d, m, dtype)
    W_enc[150:] = W_enc[:150]  # latent j + 150 == latent j: equal values in different tiles
    b_enc[150:] = b_enc[:150]
    x = _x(n, d, dtype=dtype)
    vals, idx = K.topk_encode(x, W_enc, b_enc, b_dec, k)
    _check_topk(x, W_enc, b_enc, b_dec, k, vals, idx)
    assert ((idx[:, 0] - idx[:, 1]).abs() == 150).all()  # the largest value comes twice: latent j and its twin
    torch.testing.assert_close(vals[:, 0], vals[:, 1], **TOL[dtype])


def test_topk_encode_nan_and_inf_rows_give_zero_codes():
    n, d, m, k = 10, 32, 256, 8
    W_enc, b_enc, b_dec, _ = _weights(d, m)
    x = _x(n, d)
    x[2, 5] = float("nan")
    x[7, 0] = float("inf")
    vals, idx = K.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert (vals[[2, 7]] == 0).all() and torch.isfinite(vals).all()
    ok = torch.ones(n, dtype=torch.bool, device=DEV)
    ok[[2, 7]] = False
    _check_topk(x[ok], W_enc, b_enc, b_dec, k, vals[ok], idx[ok])


def test_topk_encode_strided_tokens():
    W_enc, b_enc, b_dec, _ = _weights(24, 128)
    x = _x(40, 48)[::2, ::2]  # non-contiguous view
    vals, idx = K.topk_encode(x, W_enc, b_enc, b_dec, 4)
    _check_topk(x.contiguous(), W_enc, b_enc, b_dec, 4, vals, idx)


def test_folded_bias_cache_follows_in_place_updates():
    """``b_enc - W_enc b_dec`` is cached per weights; in-place updates (optimiser steps) must invalidate it."""
    W_enc, b_enc, b_dec, _ = _weights(16, 96)
    x = _x(9, 16)
    c1 = te.folded_bias(W_enc, b_enc, b_dec)
    assert te.folded_bias(W_enc, b_enc, b_dec) is c1  # cache hit
    _check_topk(x, W_enc, b_enc, b_dec, 8, *K.topk_encode(x, W_enc, b_enc, b_dec, 8))
    for t in (b_dec, b_enc, W_enc):
        t.add_(torch.randn_like(t))
        vals, idx = K.topk_encode(x, W_enc, b_enc, b_dec, 8)
        _check_topk(x, W_enc, b_enc, b_dec, 8, vals, idx)
    torch.testing.assert_close(te.folded_bias(W_enc, b_enc, b_dec), b_enc - W_enc @ b_dec, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- sparse_decode

@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("bias,res,gpu_blocks", [(False, False, False), (True, False, True), (False, True, False),
                                                 (True, True, True)])
def test_sparse_decode(monkeypatch, dtype, bias, res, gpu_blocks):
    if gpu_blocks:
        _gpu_like_blocks(monkeypatch)
    n, d, m, k = 37, 48, 200, 8
    W_enc, b_enc, b_dec, W_dec = _weights(d, m, dtype)
    idx = torch.stack([torch.randperm(m)[:k] for _ in range(n)]).to(DEV)
    vals = torch.rand(n, k).to(DEV, dtype)
    r = _x(n, d, dtype=dtype) if res else None
    b = b_dec if bias else None
    out = K.sparse_decode(vals, idx, W_dec, b, r)
    assert out.dtype == dtype and out.shape == (n, d)
    torch.testing.assert_close(out.float(), reference.sparse_decode(vals, idx, W_dec, b, r).float(), **TOL[dtype])


# --------------------------------------------------------------------------- edit_

def _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rpg):
    a, b = x.clone(), x.clone()
    K.edit_(a, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rpg)
    reference.edit_(b, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rpg)
    return a, b


# f is rounded to x.dtype in both implementations; a one-ulp flip of f is amplified by |scale - 1| |W_dec|
EDIT_TOL = {F32: TOL[F32], F16: dict(rtol=2e-3, atol=1e-2), BF16: dict(rtol=2e-2, atol=6e-2)}


def _assert_edit(x, a, b):
    """Kernel result ``a`` equals the reference ``b``; tokens the reference leaves alone are bit-identical."""
    tok = lambda t: reference.as_tokens(t)  # noqa: E731
    torch.testing.assert_close(a.float(), b.float(), **EDIT_TOL[x.dtype], equal_nan=True)
    untouched = (tok(b) == tok(x)).all(1) | tok(x).isnan().any(1)
    assert untouched.any() and (~untouched).any(), "the case must have both edited and untouched tokens"
    assert torch.equal(tok(a)[untouched].view(torch.int16 if x.dtype != F32 else torch.int32),
                       tok(x)[untouched].view(torch.int16 if x.dtype != F32 else torch.int32))


@pytest.mark.parametrize("dtype,gpu_plan", [(F32, False), (F16, True), (BF16, False)])
@pytest.mark.parametrize("b,h,w", [(2, 5, 7), (3, 4, 8)])  # H*W not / a multiple of the row block
def test_edit_nchw_groups(monkeypatch, dtype, gpu_plan, b, h, w):
    """Non-square NCHW maps, one table per image, with padding, never-firing features and -1 indices."""
    if gpu_plan:
        _gpu_like_plan(monkeypatch)
    d, m, k = 32, 300, 8
    W_enc, b_enc, b_dec, W_dec = _weights(d, m, dtype)
    b_enc[7] = -50.0  # latent 7 never fires
    x = _x(b, d, h, w, dtype=dtype)
    _, idx = reference.topk_encode(reference.as_tokens(x), W_enc, b_enc, b_dec, k)
    feat = torch.tensor([[idx[0, 0], idx[3, 1], 7, idx[9, 0], -1],
                         [idx[35, 0], idx[40, 2], idx[1, 0], 7, 0]], device=DEV)
    tau = torch.tensor([[0.0, 0.1, 0.0, float("inf"), 0.0], [0.0, 0.0, 0.0, 0.0, float("inf")]], device=DEV)
    scale = torch.tensor([[-1.0, -5.0, -2.0, -3.0, 1.0], [-2.0, 0.5, 1.0, -1.0, -4.0]], device=DEV)
    a, ref = _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, h * w)
    _assert_edit(x, a, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NumPy meeting the NaN row in the interpreter
@pytest.mark.parametrize("gpu_plan", [False, True])
def test_edit_tokens_with_overflowing_tiles(monkeypatch, gpu_plan):
    """Tokens [N, d], a dominant latent block (overflow recompute), NaN rows, features outside any top-k."""
    if gpu_plan:
        _gpu_like_plan(monkeypatch)
    n, d, m, k = 70, 24, 600, 16
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    b_enc[200:200 + k] += 3.0
    x = _x(n, d)
    x[4, 1] = float("nan")
    x[9, 2] = float("-inf")
    _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    feat = torch.cat([idx[0, :3], idx[10, -2:], torch.tensor([0, 599], device=DEV)])
    tau = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.2, 0.0, 0.0], device=DEV)
    scale = torch.tensor([-1.0, -2.0, 0.0, 3.0, -1.0, -1.0, -1.0], device=DEV)
    a, b = _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], n)
    _assert_edit(x, a, b)
    assert torch.equal(a[4].isnan(), x[4].isnan()) and torch.equal(a[9], x[9])


def test_edit_channels_last_and_non_flat_views():
    d, m, k = 16, 128, 4
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    base = _x(2, d, 6, 10)
    _, idx = reference.topk_encode(reference.as_tokens(base), W_enc, b_enc, b_dec, k)
    feat, tau, scale = idx[0, :2], torch.zeros(2, device=DEV), torch.full((2,), -1.0, device=DEV)
    cl = base.to(memory_format=torch.channels_last)
    a, b = _edit_both(cl, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], 60)
    torch.testing.assert_close(a, b, **TOL[F32])
    assert not torch.equal(a, cl)
    views = (lambda t: t[:, :, :, ::2], lambda t: t[:, :, ::2, :], lambda t: t[:, :, 1:2, :])  # 2nd: (h, w) not flat
    for view in views:
        x = view(base)
        a, b = _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], x[0, 0].numel())
        torch.testing.assert_close(a, b, **TOL[F32])
        assert not torch.equal(a, x)
        store = base.clone()  # in place: the edit lands in the viewed storage, nowhere else
        K.edit_(view(store), W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], x[0, 0].numel())
        touched = torch.zeros_like(base, dtype=torch.bool)
        view(touched).fill_(True)
        assert torch.equal(view(store), a) and torch.equal(store[~touched], base[~touched])


def test_edit_empty_concept_set_and_padding_change_nothing():
    d, m, k = 16, 64, 4
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = _x(3, d, 4, 4)
    empty = torch.zeros(3, 0, dtype=torch.long, device=DEV)
    a, _ = _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, empty, empty.float(), empty.float(), 16)
    assert torch.equal(a, x)
    feat = torch.arange(m, device=DEV)[None]
    a, _ = _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, feat, torch.full((1, m), float("inf"), device=DEV),
                      torch.full((1, m), -1.0, device=DEV), 48)
    assert torch.equal(a, x)
    a, _ = _edit_both(x, W_enc, b_enc, b_dec, W_dec, k, feat, torch.zeros(1, m, device=DEV),
                      torch.ones(1, m, device=DEV), 48)
    assert torch.equal(a, x)


# --------------------------------------------------------------------------- training ops

@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("gpu_blocks", [False, True])
def test_training_ops_match_reference(monkeypatch, dtype, gpu_blocks):
    if gpu_blocks:
        _gpu_like_blocks(monkeypatch)
    n, d, m, k = 37, 48, 200, 8
    W_enc, b_enc, b_dec, W_dec = _weights(d, m, dtype)
    x = _x(n, d, dtype=dtype)
    _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    idx[:, -1] = 3  # a latent shared by every token: many atomic adds on one row
    tol = TOL[dtype]
    vals = K.gather_encode(x, W_enc, b_enc, b_dec, idx)
    torch.testing.assert_close(vals.float(), reference.gather_encode(x, W_enc, b_enc, b_dec, idx).float(), **tol)
    assert (vals == 0).any() and (vals > 0).any()  # both sides of the ReLU gate are exercised
    gv = _x(n, k, dtype=dtype)
    got = K.gather_encode_bwd(gv, x, W_enc, b_dec, idx, vals)
    want = reference.gather_encode_backward(gv, x, W_enc, b_dec, idx, vals)
    for name, a, b in zip(("grad_x", "grad_W_enc", "grad_b_enc", "grad_b_dec"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
    go = _x(n, d, dtype=dtype)
    got = K.sparse_decode_bwd(go, vals, idx, W_dec)
    want = reference.sparse_decode_backward(go, vals, idx, W_dec)
    for name, a, b in zip(("grad_values", "grad_W_dec", "grad_b_dec"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


def test_gather_encode_keeps_nan_like_relu():
    W_enc, b_enc, b_dec, _ = _weights(8, 32)
    x = _x(3, 8)
    x[1, 0] = float("nan")
    idx = torch.randint(0, 32, (3, 4), device=DEV)
    torch.testing.assert_close(K.gather_encode(x, W_enc, b_enc, b_dec, idx),
                               reference.gather_encode(x, W_enc, b_enc, b_dec, idx), equal_nan=True)


# --------------------------------------------------------------------------- the ops seam

@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setenv("SAEURON_BACKEND", "triton")
    yield
    ops._choice.clear()


def test_seam_selects_triton_and_matches_reference(triton_backend):
    for op in ops.OPS:
        assert ops.backend_for(op, DEV) == "triton", op
    d, m, k, n = 16, 96, 6, 21
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = _x(n, d)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    _check_topk(x, W_enc, b_enc, b_dec, k, vals, idx)
    torch.testing.assert_close(ops.sparse_decode(vals, idx, W_dec, b_dec, x),
                               reference.sparse_decode(vals, idx, W_dec, b_dec, x))
    feat, tau, scale = idx[0, :3], torch.zeros(3, device=DEV), torch.full((3,), -2.0, device=DEV)
    b = x.clone()
    reference.edit_(b, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], n)
    torch.testing.assert_close(ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale), b)
    # autograd through the custom ops uses the triton backward kernels
    params = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    loss = (ops.sparse_decode(ops.gather_encode(*params[:4], idx), idx, params[4], params[3]) - params[0]).pow(2).sum()
    grads = torch.autograd.grad(loss, params)
    ref_params = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    v = reference.gather_encode(*ref_params[:4], idx)
    ref_loss = (reference.sparse_decode(v, idx, ref_params[4], ref_params[3]) - ref_params[0]).pow(2).sum()
    for a, b in zip(grads, torch.autograd.grad(ref_loss, ref_params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_opcheck_with_triton_backend(triton_backend):
    d, m, k, n = 8, 32, 4, 6
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = _x(n, d)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    torch.library.opcheck(ops._topk_encode, (x, W_enc, b_enc, b_dec, k))
    torch.library.opcheck(ops._sparse_decode, (vals.clone().requires_grad_(), idx, W_dec.clone().requires_grad_(),
                                               b_dec, None))
    torch.library.opcheck(ops._gather_encode, (x, W_enc.clone().requires_grad_(), b_enc, b_dec, idx))
    torch.library.opcheck(ops._sparse_decode_bwd, (_x(n, d), vals, idx, W_dec))
    torch.library.opcheck(ops._gather_encode_bwd, (_x(n, k), x, W_enc, b_dec, idx, vals))
    torch.library.opcheck(ops._edit_, (x.clone(), W_enc, b_enc, b_dec, W_dec, k, idx[:2, 0][None],
                                       torch.zeros(1, 2, device=DEV), torch.full((1, 2), -1.0, device=DEV), n))


def test_supports_by_dtype():
    """fp32/fp16/bf16 kernels for every op where Triton runs; no float64, no other device, no other name."""
    for op in ops.OPS:
        assert all(K.supports(op, DEV, dt) for dt in (F32, F16, BF16)) and not K.supports(op, DEV, torch.float64), op
    assert not K.supports("no_such_op", DEV, F32) and not K.supports("topk_encode", torch.device("meta"), F32)


def test_seam_sends_float64_past_triton(triton_backend, monkeypatch):
    """Forced Triton has no float64 kernels: ops runs float64 calls on the next backend (the reference)."""
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(RuntimeWarning, match="triton: does not implement .* for float64"):
        for op in ops.OPS:
            assert ops.backend_for(op, DEV, torch.float64) == "torch" and ops.backend_for(op, DEV, F32) == "triton"
    d, m, k, n = 16, 96, 6, 21
    W_enc, b_enc, b_dec, W_dec = (t.double() for t in _weights(d, m))
    x = _x(n, d).double()
    _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    feat, tau, scale = idx[0, :3], torch.zeros(3, device=DEV), torch.full((3,), -2.0, device=DEV)
    want = x.clone()
    reference.edit_(want, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], n)
    assert torch.equal(ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale), want)


_COMPILE_SCRIPT = r'''
import importlib, triton
from triton.backends.compiler import GPUTarget
m = {n: importlib.import_module("saeuron.kernels." + n) for n in ("topk_encode", "edit", "sparse_decode", "training")}
ptr = dict(x_ptr="*fp16", W_ptr="*fp16", c_ptr="*fp32", cand_ptr="*i64", W_dec_ptr="*fp16", val_ptr="*fp16",
           idx_ptr="*i64", feat_ptr="*i64", tau_ptr="*fp32", scale_ptr="*fp32", b_enc_ptr="*fp16", b_dec_ptr="*fp16",
           be_ptr="*fp16", bd_ptr="*fp16", i_ptr="*i64", out_ptr="*fp16", gv_ptr="*fp16", v_ptr="*fp16",
           gx_ptr="*fp16", gW_ptr="*fp32", gbe_ptr="*fp32", gbd_ptr="*fp32", go_ptr="*fp16", gb_ptr="*fp32",
           b_ptr="*fp16", r_ptr="*fp16", sxb="i64", sxs="i64", sxc="i64", pv_ptr="*fp32", flag_ptr="*i32",
           order_ptr="*i64", cnt_ptr="*i32")
enc = dict(R=16, NTP=256, T=8, KP=32, BM=128, BK=64, FULL=False, DOT_F32=False, UPCAST=False)
cases = [("topk_encode", "_tile_topk_kernel", dict(BN=64, BM=128, BK=64, T=8, DOT_F32=False, UPCAST=False)),
         ("topk_encode", "_tile_topk_kernel", dict(BN=128, BM=128, BK=32, T=8, DOT_F32=True, UPCAST=False)),
         ("topk_encode", "_fold_bias_kernel", dict(BM=64, BK=128)),
         ("topk_encode", "_merge_kernel", enc),
         ("edit", "_select_kernel", dict(R=64, FP=32, BK=64, DOT_F32=False, UPCAST=False)),
         ("edit", "_count_kernel", dict(R=64, FP=32, BM=128, BK=64, DOT_F32=False, UPCAST=False)),
         ("edit", "_apply_kernel", dict(R=64, FP=32, BD=64)),
         ("sparse_decode", "_sparse_decode_kernel", dict(HAS_B=True, HAS_R=True, R=4, KP=32, BD=32)),
         ("training", "_gather_encode_kernel", dict(R=4, KP=32, BD=32)),
         ("training", "_gather_encode_bwd_kernel", dict(R=4, SUB=8, KP=32, BD=32)),
         ("training", "_sparse_decode_bwd_kernel", dict(R=4, SUB=8, KP=32, BD=32))]
for mod, name, consts in cases:
    fn = getattr(m[mod], name)
    sig = {a: "constexpr" if a in consts else ptr.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    k = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8 if name == "_merge_kernel" else 4, num_stages=3))
    assert k.asm["cubin"], name
print("compiled", len(cases))
'''


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """GPU-only code paths (wgmma, pipelining, constexpr branches) compile to sm_90 cubins without a GPU."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled 11" in r.stdout, r.stderr[-3000:]
