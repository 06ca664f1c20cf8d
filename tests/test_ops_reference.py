"""The ops seam on the torch backend: reference semantics, autograd and torch.library checks."""
import pytest
import torch

from saeuron import ops, reference


def _weights(d, m, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(m, d, generator=g) / d ** 0.5
    return (W_enc.to(dtype), (torch.randn(m, generator=g) * 0.1).to(dtype), (torch.randn(d, generator=g) * 0.1).to(dtype),
            torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype))


@pytest.mark.parametrize("n,d,m,k", [(37, 8, 64, 4), (5, 64, 256, 32), (1, 16, 16, 16)])
def test_topk_encode_matches_dense(n, d, m, k):
    W_enc, b_enc, b_dec, _ = _weights(d, m)
    x = torch.randn(n, d)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    pre = torch.relu((x - b_dec) @ W_enc.t() + b_enc)
    ref_vals = pre.topk(k).values
    torch.testing.assert_close(vals, ref_vals)
    torch.testing.assert_close(pre.gather(1, idx), vals)  # indices point at the values (ties may swap)


def test_edit_keeps_reconstruction_error_and_unfired_tokens():
    d, m, k = 16, 64, 4
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = torch.randn(50, d)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    feat = idx[0, :2].clone()
    tau = torch.zeros(2)
    scale = torch.tensor([-2.0, 0.5])
    out = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale)
    # brute force: decode(f') + (x - decode(f))
    f = torch.zeros(50, m).scatter(1, idx, vals)
    f2 = f.clone()
    for j, i in enumerate(feat.tolist()):
        fire = f[:, i] > tau[j]
        f2[fire, i] = f[fire, i] * scale[j]
    expect = (f2 @ W_dec + b_dec) + (x - (f @ W_dec + b_dec))
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    untouched = ~(torch.isin(idx, feat).any(1))
    assert untouched.any() and torch.equal(out[untouched], x[untouched])
    assert not torch.equal(out[0], x[0])


def test_edit_nchw_equals_tokens_and_groups():
    d, m, k = 8, 32, 3
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = torch.randn(2, d, 3, 5)  # non-square map
    tok = x.permute(0, 2, 3, 1).reshape(-1, d)
    _, idx = reference.topk_encode(tok, W_enc, b_enc, b_dec, k)
    feat = torch.stack([idx[0, :2], idx[20, :2]])  # a different table for each image
    tau, scale = torch.zeros(2, 2), torch.full((2, 2), -1.0)
    out = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rows_per_group=15)
    out_tok = ops.edit(tok, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, rows_per_group=15)
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, d), out_tok)
    assert not torch.equal(out, x)


def test_edit_nan_rows_pass_through():
    d, m, k = 8, 32, 3
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = torch.randn(10, d)
    x[3, 2] = float("nan")
    feat = torch.arange(m)
    out = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, torch.zeros(m), torch.full((m,), -1.0))
    assert torch.isnan(out[3, 2]) and torch.equal(out[3, [0, 1, 3]], x[3, [0, 1, 3]])
    assert torch.isfinite(out[torch.arange(10) != 3]).all()


def test_training_ops_gradients_match_dense_autograd():
    d, m, k, n = 12, 40, 5, 9
    W_enc, b_enc, b_dec, W_dec = (t.double().requires_grad_() for t in _weights(d, m))
    x = torch.randn(n, d, dtype=torch.double, requires_grad=True)
    with torch.no_grad():
        _, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    vals = ops.gather_encode(x, W_enc, b_enc, b_dec, idx)
    out = ops.sparse_decode(vals, idx, W_dec, b_dec)
    loss = (out - x).pow(2).sum()
    grads = torch.autograd.grad(loss, (x, W_enc, b_enc, b_dec, W_dec))
    pre = torch.relu((x - b_dec) @ W_enc.t() + b_enc)
    f = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))
    loss2 = ((f @ W_dec + b_dec) - x).pow(2).sum()
    grads2 = torch.autograd.grad(loss2, (x, W_enc, b_enc, b_dec, W_dec))
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_opcheck_all_ops():
    d, m, k, n = 8, 32, 4, 6
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = torch.randn(n, d)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    torch.library.opcheck(ops._topk_encode, (x, W_enc, b_enc, b_dec, k))
    torch.library.opcheck(ops._sparse_decode, (vals.requires_grad_(), idx, W_dec.requires_grad_(), b_dec, None))
    torch.library.opcheck(ops._gather_encode, (x, W_enc.requires_grad_(), b_enc, b_dec, idx))
    feat = idx[:2, 0]
    torch.library.opcheck(ops._edit_, (x.clone(), W_enc.detach(), b_enc, b_dec, W_dec.detach(), k,
                                       feat[None], torch.zeros(1, 2), torch.full((1, 2), -1.0), n))


def test_bad_inputs_raise_clear_errors():
    W_enc, b_enc, b_dec, W_dec = _weights(8, 32)
    with pytest.raises(ValueError, match="does not match the SAE input width d_in=8"):
        ops.topk_encode(torch.randn(3, 9), W_enc, b_enc, b_dec, 2)
    with pytest.raises(TypeError, match="dtype"):
        ops.topk_encode(torch.randn(3, 8).half(), W_enc, b_enc, b_dec, 2)
    with pytest.raises(ValueError, match="k=40"):
        ops.topk_encode(torch.randn(3, 8), W_enc, b_enc, b_dec, 40)


def test_backend_override(monkeypatch):
    monkeypatch.setenv("SAEURON_BACKEND", "torch")
    assert ops.backend_for("edit_", torch.device("cpu")) == "torch"
    monkeypatch.setenv("SAEURON_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="valid: cuda, triton, torch"):
        ops.backend_for("edit_", torch.device("cpu"))


def test_gpu_selfcheck_accepts_reference_and_rejects_wrong_kernels():
    """The first-use check that guards compiled kernels on GPUs (run here on CPU tensors)."""
    cpu = torch.device("cpu")
    impls = {"topk_encode": reference.topk_encode, "sparse_decode": reference.sparse_decode,
             "gather_encode": reference.gather_encode, "gather_encode_bwd": reference.gather_encode_backward,
             "sparse_decode_bwd": reference.sparse_decode_backward, "edit_": reference.edit_}
    for op, fn in impls.items():
        assert ops._selfcheck(fn, op, cpu) is None, op

    def wrong_decode(values, indices, W_dec, b_dec=None, residual=None):
        return reference.sparse_decode(values, indices, W_dec, b_dec, residual) * 1.1

    def broken_edit(x, *args):
        raise RuntimeError("no kernel image is available for execution on the device")

    assert "relative error" in ops._selfcheck(wrong_decode, "sparse_decode", cpu)
    assert "no kernel image" in ops._selfcheck(broken_edit, "edit_", cpu)


def test_ops_trace_into_one_graph_under_torch_compile():
    """Custom ops with fake implementations: fullgraph capture works (aot_eager keeps it fast on CPU)."""
    d, m, k = 16, 64, 4
    W_enc, b_enc, b_dec, W_dec = _weights(d, m)
    x = torch.randn(2, d, 3, 5)
    feat, tau, scale = torch.tensor([[1, 5, 9]]), torch.zeros(1, 3), torch.full((1, 3), -2.0)

    def step(x):
        y = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale, 15)
        vals, idx = ops.topk_encode(reference.as_tokens(y), W_enc, b_enc, b_dec, k)
        return y, ops.sparse_decode(vals, idx, W_dec, b_dec)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), step(x)):
        torch.testing.assert_close(got, want)


def test_edit_tie_at_the_kth_value_goes_to_the_lower_index():
    """Latents 9 and 12 tie exactly at the k-th (2nd) place behind latent 2: 9 is in the top k, 12 is not."""
    d, m, k = 8, 16, 2
    g = torch.Generator().manual_seed(3)
    W_enc = -torch.rand(m, d, generator=g)  # with x > 0 every other latent is negative, ReLU'd to 0
    W_enc[2], W_enc[9], W_enc[12] = torch.full((d,), 0.5), torch.full((d,), 0.25), torch.full((d,), 0.25)
    b_enc, b_dec = torch.zeros(m), torch.zeros(d)
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    x = torch.rand(4, d, generator=g) + 0.5
    for feat, edited in ((9, True), (12, False)):
        out = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, torch.tensor([feat]), torch.zeros(1), torch.tensor([-1.0]))
        assert bool((out != x).any(1).all()) == edited and bool((out == x).all(1).all()) != edited, feat
        want = x.clone()
        reference.edit_(want, W_enc, b_enc, b_dec, W_dec, k, torch.tensor([[feat]]), torch.zeros(1, 1),
                        torch.tensor([[-1.0]]), 4)
        assert torch.equal(out, want)


def test_topk_member_equals_a_stable_descending_sort():
    """The counting rule of reference.topk_member against its definition, on rows full of exact ties."""
    g = torch.Generator().manual_seed(5)
    for trial in range(60):
        n, m = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 300, (1,), generator=g))
        k = int(torch.randint(1, m + 1, (1,), generator=g))
        levels = int(torch.randint(1, 12, (1,), generator=g))  # few distinct values: many ties at the k-th
        pre = torch.randint(0, levels, (n, m), generator=g).float() * 0.5
        ids = torch.randint(0, m, (n, 7), generator=g)
        top = torch.sort(pre, dim=-1, descending=True, stable=True).indices[:, :k]
        want = (top.unsqueeze(1) == ids.unsqueeze(2)).any(-1)
        assert torch.equal(reference.topk_member(pre, ids, k), want), (trial, n, m, k)
