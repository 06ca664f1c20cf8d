"""GPU-only checks: the compiled CUDA extension and Triton on real CUDA tensors, CUDA graphs, compile.

On machines without a GPU this module is skipped as a whole: the same kernels are covered on the CPU
by test_kernels_triton.py (interpreter), test_ext.py (C++ ops, nvcc compilation) and the references.
"""
import pytest
import torch

from saeuron import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


def _case(n, d, m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(CUDA, dtype)  # noqa: E731
    return r(n, d), r(m, d, sc=d ** -0.5), r(m, sc=0.05), r(d, sc=0.05), r(m, d, sc=d ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d,m,k", [(1000, 1280, 20480, 32), (4099, 320, 5120, 64), (7, 640, 10240, 1)])
def test_ops_match_reference_on_gpu(backend, n, d, m, k, dtype):
    x, W_enc, b_enc, b_dec, W_dec = _case(n, d, m, k, dtype)
    for op in ("topk_encode", "sparse_decode", "edit_", "gather_encode"):
        assert ops.backend_for(op, CUDA, dtype) == backend, ops.status()
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    rv, _ = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(vals.float(), rv.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(reference.preacts(x, W_enc, b_enc, b_dec).gather(1, idx), vals.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(ops.sparse_decode(vals, idx, W_dec, b_dec).float(),
                               reference.sparse_decode(vals, idx, W_dec, b_dec).float(), atol=tol, rtol=tol)
    feat = idx[:8, 0].unique()[None]
    tau, scale = torch.zeros_like(feat, dtype=torch.float32), torch.full(feat.shape, -3.0, device=CUDA)
    got = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale)
    want = x.clone()
    reference.edit_(want, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, n)
    torch.testing.assert_close(got.float(), want.float(), atol=5 * tol, rtol=5 * tol)


def test_float64_edit_runs_the_reference_on_gpu(backend):
    """Neither GPU backend declares a float64 edit (they rank fp32 pre-activations): ops chooses the reference."""
    assert ops.backend_for("edit_", CUDA, torch.float64) == "torch"
    assert ops.backend_for("gather_encode", CUDA, torch.float64) == ("cuda" if backend == "cuda" else "torch")
    x, W_enc, b_enc, b_dec, W_dec = _case(300, 64, 512, 8, torch.float64)
    _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 8)
    feat = idx[:4, 0][None]
    tau, scale = torch.zeros(1, 4, device=CUDA), torch.full((1, 4), -2.0, device=CUDA)
    want = x.clone()
    reference.edit_(want, W_enc, b_enc, b_dec, W_dec, 8, feat, tau, scale, 300)
    assert torch.equal(ops.edit(x, W_enc, b_enc, b_dec, W_dec, 8, feat, tau, scale), want)


def test_edit_under_cuda_graph_capture(backend):
    x, W_enc, b_enc, b_dec, W_dec = _case(4096, 1280, 20480, 32, torch.float16)
    _, idx = reference.topk_encode(x[:16], W_enc, b_enc, b_dec, 32)
    feat = idx[:4, 0][None]
    tau, scale = torch.zeros(1, 4, device=CUDA), torch.full((1, 4), -2.0, device=CUDA)
    buf = x.clone()
    ops.edit_(buf, W_enc, b_enc, b_dec, W_dec, 32, feat, tau, scale)  # warm-up (builds, caches)
    graph = torch.cuda.CUDAGraph()
    buf.copy_(x)
    with torch.cuda.graph(graph):
        ops.edit_(buf, W_enc, b_enc, b_dec, W_dec, 32, feat, tau, scale)
    buf.copy_(x)
    graph.replay()
    want = x.clone()
    reference.edit_(want, W_enc, b_enc, b_dec, W_dec, 32, feat, tau, scale, 4096)
    torch.testing.assert_close(buf.float(), want.float(), atol=0.1, rtol=0.05)


def test_patched_unet_compiles_and_matches(tiny_pipe, sae_factory):
    import saeuron
    from saeuron.concepts import ConceptTable

    unet = tiny_pipe.unet.to(CUDA, torch.float16)
    hps = saeuron.list_hookpoints(unet)
    saes = {hp: sae_factory(d_in=c, num_latents=4 * c, k=4, seed=i) for i, (hp, c) in enumerate(hps.items())}
    mu = {hp: torch.rand(2, 3, s.num_latents) for hp, s in saes.items()}
    table = ConceptTable(["a", "b"], [4, 4], torch.tensor([900.0, 500.0, 100.0]), mu, defaults={"top_n": 8})
    x = torch.randn(2, 4, 8, 8, device=CUDA, dtype=torch.float16)
    ctx = torch.randn(2, 16, 32, device=CUDA, dtype=torch.float16)
    t = torch.tensor(480.0, device=CUDA)
    with saeuron.patched(unet, ["a"], saes=saes, table=table):
        eager = unet(x, t, encoder_hidden_states=ctx).sample
        compiled = torch.compile(unet)(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(compiled.float(), eager.float(), atol=2e-2, rtol=2e-2)
    assert not torch.equal(eager, unet(x, t, encoder_hidden_states=ctx).sample)
