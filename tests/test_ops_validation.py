"""Arguments are validated once, in saeuron/ops.py, before any backend runs; backends are chosen by dtype.

Every bad input of every public op raises ValueError (shapes, devices, ranges) or TypeError (dtypes,
non-integers) naming the argument, for each backend that can be forced on this machine (``torch``;
``cuda``: the C++ CPU ops; ``triton`` under ``TRITON_INTERPRET=1``, which conftest sets), and no backend
is reached. A fake backend that supports only float32 shows that the choice follows the call's dtype.
"""
import os
import warnings

import pytest
import torch

from conftest import sae_weights
from saeuron import ops
from saeuron import reference as R

CPU = torch.device("cpu")
META = torch.device("meta")
D, M, K, N = 8, 32, 4, 6


def _weights(dtype=torch.float32):
    return sae_weights(M, D, dtype)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device=META)


def _good():
    """Valid arguments of every public op: ``{op: (function, positional args)}``."""
    W_enc, b_enc, b_dec, W_dec = _weights()
    x = torch.randn(N, D)
    vals, idx = R.topk_encode(x, W_enc, b_enc, b_dec, K)
    feat, tau, scale = idx[:2, 0][None].clone(), torch.zeros(1, 2), torch.full((1, 2), -1.0)
    return {"topk_encode": (ops.topk_encode, [x, W_enc, b_enc, b_dec, K]),
            "sparse_decode": (ops.sparse_decode, [vals, idx, W_dec, b_dec, x.clone()]),
            "gather_encode": (ops.gather_encode, [x, W_enc, b_enc, b_dec, idx]),
            "edit_": (ops.edit_, [x.clone(), W_enc, b_enc, b_dec, W_dec, K, feat, tau, scale, N])}


# (op, position of the argument, replacement given the valid value, expected error, name in the message)
BAD = [
    ("topk_encode", 0, lambda x: x[0], ValueError, "x"),
    ("topk_encode", 0, lambda x: x[None], ValueError, "x"),
    ("topk_encode", 0, lambda x: x.tolist(), TypeError, "x"),
    ("topk_encode", 0, lambda x: x.long(), TypeError, "x"),
    ("topk_encode", 0, lambda x: torch.randn(N, D + 1), ValueError, "width"),
    ("topk_encode", 1, lambda w: w[0], ValueError, "W_enc"),
    ("topk_encode", 1, lambda w: w.half(), TypeError, "W_enc"),
    ("topk_encode", 1, _meta, ValueError, "W_enc"),
    ("topk_encode", 2, lambda b: b[:-1], ValueError, "b_enc"),
    ("topk_encode", 2, lambda b: b.double(), TypeError, "b_enc"),
    ("topk_encode", 3, lambda b: b[None], ValueError, "b_dec"),
    ("topk_encode", 3, _meta, ValueError, "b_dec"),
    ("topk_encode", 4, lambda k: 0, ValueError, "k=0"),
    ("topk_encode", 4, lambda k: M + 1, ValueError, f"k={M + 1}"),
    ("topk_encode", 4, lambda k: 2.0, TypeError, "k"),
    ("sparse_decode", 0, lambda v: v[:, 0], ValueError, "values"),
    ("sparse_decode", 0, lambda v: v[:, :-1], ValueError, "values"),
    ("sparse_decode", 0, lambda v: v.half(), TypeError, "values"),
    ("sparse_decode", 1, lambda i: i.float(), TypeError, "indices"),
    ("sparse_decode", 1, lambda i: i > 0, TypeError, "indices"),
    ("sparse_decode", 1, _meta, ValueError, "indices"),
    ("sparse_decode", 2, lambda w: w[0], ValueError, "W_dec"),
    ("sparse_decode", 2, lambda w: w.long(), TypeError, "W_dec"),
    ("sparse_decode", 3, lambda b: b[:-1], ValueError, "b_dec"),
    ("sparse_decode", 3, lambda b: b.double(), TypeError, "b_dec"),
    ("sparse_decode", 3, _meta, ValueError, "b_dec"),
    ("sparse_decode", 4, lambda r: r[:-1], ValueError, "residual"),
    ("sparse_decode", 4, lambda r: r.half(), TypeError, "residual"),
    ("gather_encode", 0, lambda x: x[None], ValueError, "x"),
    ("gather_encode", 0, lambda x: x.int(), TypeError, "x"),
    ("gather_encode", 0, lambda x: torch.randn(N, D - 1), ValueError, "width"),
    ("gather_encode", 1, lambda w: w.bfloat16(), TypeError, "W_enc"),
    ("gather_encode", 1, _meta, ValueError, "W_enc"),
    ("gather_encode", 2, lambda b: b[None], ValueError, "b_enc"),
    ("gather_encode", 3, lambda b: b.double(), TypeError, "b_dec"),
    ("gather_encode", 4, lambda i: i.double(), TypeError, "indices"),
    ("gather_encode", 4, lambda i: i[0], ValueError, "indices"),
    ("gather_encode", 4, lambda i: i[:-1], ValueError, "indices"),
    ("gather_encode", 4, _meta, ValueError, "indices"),
    ("edit_", 0, lambda x: x[None], ValueError, "edit_"),
    ("edit_", 0, lambda x: x.long(), TypeError, "x"),
    ("edit_", 0, lambda x: torch.randn(2, D + 1, 3, 4), ValueError, "width"),
    ("edit_", 1, lambda w: w[:, :-1], ValueError, "width"),
    ("edit_", 2, lambda b: b.half(), TypeError, "b_enc"),
    ("edit_", 3, _meta, ValueError, "b_dec"),
    ("edit_", 4, lambda w: w[:-1], ValueError, "W_dec"),
    ("edit_", 4, lambda w: w.double(), TypeError, "W_dec"),
    ("edit_", 4, _meta, ValueError, "W_dec"),
    ("edit_", 5, lambda k: 0, ValueError, "k=0"),
    ("edit_", 5, lambda k: M + 1, ValueError, f"k={M + 1}"),
    ("edit_", 5, lambda k: "4", TypeError, "k"),
    ("edit_", 6, lambda f: f.float(), TypeError, "feat_idx"),
    ("edit_", 6, lambda f: f[..., :1], ValueError, "feat_idx"),
    ("edit_", 6, lambda f: f[None], ValueError, "feat_idx"),
    ("edit_", 6, _meta, ValueError, "feat_idx"),
    ("edit_", 7, lambda t: t.long(), TypeError, "tau"),
    ("edit_", 7, lambda t: torch.zeros(2, 2), ValueError, "tau"),
    ("edit_", 7, _meta, ValueError, "tau"),
    ("edit_", 8, lambda s: s[0], ValueError, "scale"),
    ("edit_", 8, lambda s: s.numpy(), TypeError, "scale"),
    ("edit_", 9, lambda r: 0, ValueError, "rows_per_group"),
    ("edit_", 9, lambda r: 1.5, TypeError, "rows_per_group"),
]


@pytest.fixture(params=["torch", "cuda", "triton"])
def forced(request, monkeypatch):
    """A backend forced with ``ops.set_backend`` (skipped where it cannot load) and a spy on backend choice."""
    for name in ("_choice", "_load_errors"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.delenv("SAEURON_BACKEND", raising=False)
    name = request.param
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    if ops._load(name) is None:
        pytest.skip(f"{name} backend unavailable: {ops._load_errors.get(name)}")
    ops.set_backend(name)
    reached = []
    choose = ops._choose

    def spy(op, device, dtype):
        reached.append(op)
        return choose(op, device, dtype)

    monkeypatch.setattr(ops, "_choose", spy)
    yield name, reached
    ops.set_backend(None)


@pytest.mark.parametrize("op,pos,bad,error,name", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_in_ops_before_any_backend(forced, op, pos, bad, error, name):
    fn, args = _good()[op]
    x0 = args[0].clone() if op == "edit_" else None
    args[pos] = bad(args[pos])
    with pytest.raises(error, match=name):
        fn(*args)
    assert forced[1] == [], f"a backend was reached: {forced[1]}"
    if x0 is not None and pos != 0:
        assert torch.equal(args[0], x0), "a refused edit_ must not touch x"


def test_valid_inputs_reach_the_forced_backend(forced):
    name, reached = forced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cuda on the CPU: topk_encode falls back, with a warning
        for op, (fn, args) in _good().items():
            fn(*args)
            assert reached[-1] == op
            want = name if name != "cuda" or op != "topk_encode" else ops.backend_for(op, CPU)
            assert ops.backend_for(op, CPU) == want


def test_edit_accepts_flat_tables_strided_maps_and_other_int_ids():
    """What validation lets through is normalised, not refused: [F] tables, int32 ids, float64 tau, views."""
    W_enc, b_enc, b_dec, W_dec = _weights()
    x = torch.randn(2, D, 3, 5)[:, :, :, ::2]  # a strided view, edited in place
    x0 = x.clone()
    _, idx = R.topk_encode(R.as_tokens(x), W_enc, b_enc, b_dec, K)
    feat, tau, scale = idx[:3, 0], torch.zeros(3, dtype=torch.float64), torch.full((3,), -1.0)
    want = x.clone()
    R.edit_(want, W_enc, b_enc, b_dec, W_dec, K, feat[None], tau[None].float(), scale[None], x[0, 0].numel() * 2)
    got = ops.edit_(x, W_enc, b_enc, b_dec, W_dec, K, feat.int(), tau, scale)
    assert got is x and not torch.equal(x, x0)
    torch.testing.assert_close(x, want)
    vals, idx32 = ops.topk_encode(R.as_tokens(x), W_enc, b_enc, b_dec, K)
    torch.testing.assert_close(ops.sparse_decode(vals, idx32.int(), W_dec), R.sparse_decode(vals, idx32, W_dec))


# ------------------------------------------------------------------------------------------ choice by dtype

class _Float32Only:
    """A fake compiled backend: supports every op for float32 only, runs the reference, counts calls."""

    name = "cuda"

    def __init__(self):
        self.calls, self.asked = [], []

    def supports(self, op, device, dtype):
        self.asked.append((op, torch.device(device).type, dtype))
        return dtype == torch.float32

    def edit_(self, *args):
        self.calls.append(args[0].dtype)
        R.edit_(*args)


def test_backend_choice_depends_on_dtype(monkeypatch):
    fake = _Float32Only()
    monkeypatch.setattr(ops, "_modules", {"cuda": fake})
    for name in ("_choice", "_load_errors"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.delenv("SAEURON_BACKEND", raising=False)
    monkeypatch.setenv("SAEURON_AUTOTUNE", "0")  # static order: measuring would call the fake more times
    assert ops.AUTO_ORDER["cpu"]["edit_"][0] == "cuda"
    W32 = _weights()
    x = torch.randn(N, D)
    _, idx = R.topk_encode(x, *W32[:3], K)
    feat, tau, scale = idx[:2, 0], torch.zeros(2), torch.full((2,), -1.0)
    for _ in range(2):
        ops.edit(x, *W32, K, feat, tau, scale)
    assert fake.calls == [torch.float32, torch.float32]
    assert fake.asked.count(("edit_", "cpu", torch.float32)) == 1  # the choice is cached per dtype
    W64 = tuple(t.double() for t in W32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ops.edit(x.double(), *W64, K, feat, tau, scale)
        ops.edit(x.double(), *W64, K, feat, tau, scale)
    assert fake.calls == [torch.float32, torch.float32], "float64 must not reach a float32-only backend"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "does not implement edit_ on cpu for float64" in msgs[0], msgs
    want = x.double().clone()
    R.edit_(want, *W64, K, feat[None], tau[None], scale[None], N)
    assert torch.equal(got, want)
    assert ops.backend_for("edit_", CPU, torch.float32) == "cuda"
    assert ops.backend_for("edit_", CPU, torch.float64) == "torch"
    assert ops.backend_for("edit_", CPU, torch.bfloat16) == "torch"
    per_dtype = ops.status()["ops"]["edit_@cpu"]
    assert per_dtype == {"float32": "cuda", "float16": "torch", "bfloat16": "torch", "float64": "torch"}


def test_backends_declare_support_per_dtype_without_their_own_op_list():
    """Each backend answers supports(op, device, dtype) for the names of ops.OPS; none lists ops of its own."""
    assert all(ops._load("torch").supports(op, CPU, dt) for op in ops.OPS for dt in ops.FLOAT_DTYPES)
    triton = ops._load("triton") if os.environ.get("TRITON_INTERPRET") == "1" else None
    if triton is not None:
        assert all(triton.supports(op, CPU, dt) for op in ops.OPS for dt in (torch.float32, torch.float16,
                                                                             torch.bfloat16))
        assert not any(triton.supports(op, CPU, torch.float64) for op in ops.OPS)
        assert not triton.supports("edit_", META, torch.float32)
    compiled = ops._load("cuda")
    if compiled is not None:
        assert set(compiled.kernels) == set(ops.OPS)
        assert compiled.supports("edit_", CPU, torch.float64) and not compiled.supports("topk_encode", CPU,
                                                                                         torch.float32)
