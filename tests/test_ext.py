"""The compiled backend (csrc/ built by saeuron.extension): JIT build and cache, CPU ops against the
reference on fresh random inputs, the ops seam with SAEURON_BACKEND=cuda, fallbacks with one
warning, and nvcc/g++ compiling the CUDA sources (which cannot run without a GPU)."""
import functools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from saeuron import extension, ops
from saeuron import reference as R

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 8, 64, 1), (101, 64, 512, 8), (19, 320, 1280, 32), (5, 1280, 20480, 64)]  # (N, d, M, k)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


@pytest.fixture(scope="session")
def ext():
    """The extension, built once per session (and cached on disk across sessions)."""
    return extension.load_backend()


@pytest.fixture
def fresh_ops(monkeypatch):
    """ops with empty backend caches (restored afterwards), so each test sees its own load/warnings.

    Triton is marked unavailable so fallbacks from the extension land on the reference (these tests
    are about the compiled backend; Triton has its own tests).
    """
    for name in ("_modules", "_choice", "_load_errors"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "_forced", None)
    ops._modules["triton"] = None
    ops._load_errors["triton"] = "disabled in this test"


@functools.lru_cache(maxsize=None)
def _weights32(d, m, seed):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(m, d, generator=g) / d ** 0.5
    b_enc = torch.randn(m, generator=g) * 0.1
    b_enc[m - 1] = -1e3  # latent m-1 never fires
    b_dec = torch.randn(d, generator=g) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    return W_enc, b_enc, b_dec, W_dec


@pytest.fixture(scope="module", autouse=True)
def _free_weights():
    yield
    _weights32.cache_clear()  # the M=20480 matrices are large


def _weights(d, m, dtype, seed=0):
    return tuple(t.to(dtype) for t in _weights32(d, m, seed))


def _close(got, want, dtype):
    """|got - want| <= tol * (|want| + max|want|), elementwise (cheap enough for [20480, 1280] gradients)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if want.numel() == 0:
        return
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g, w, tol = got.to(acc), want.to(acc), TOL[dtype]
    same_nan = g.isnan() == w.isnan()
    err = torch.where(w.isnan(), 0.0, (g - w).abs() - tol * (w.abs() + max(1.0, w.abs().max().item())))
    assert same_nan.all() and err.max().item() <= 0, f"max |got - want| = {(g - w).abs().nan_to_num().max().item():.3g}"


def _edit_both(ext, x, W, k, feat, tau, scale, rpg):
    """(extension result, reference result) of the edit on copies of x."""
    a, b = x.clone(), x.clone()
    ext.edit_(a, *W, k, feat, tau, scale, rpg)
    R.edit_(b, *W, k, feat, tau, scale, rpg)
    return a, b


def _bits(t):
    """Integer view, so bit equality also holds for NaN."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_edit_matches(got, want, x, dtype):
    got, want, x = (R.as_tokens(t) for t in (got, want, x))
    unchanged = (_bits(want) == _bits(x)).all(1)
    assert torch.equal(unchanged, (_bits(got) == _bits(x)).all(1)), "the same tokens must be edited"
    _close(got[~unchanged], want[~unchanged], dtype)


# ------------------------------------------------------------------------------------------ build and cache

def test_sources_and_supports(ext):
    cpu_only = {p.name for p in extension.sources(False)}
    everything = {p.name for p in extension.sources(True)}
    assert {"cpu_ops.cpp", "bindings.cpp"} <= cpu_only and not any(n.endswith(".cu") for n in cpu_only)
    assert "cuda_ops.cpp" not in cpu_only and {"cuda_ops.cpp", "topk_encode.cu", "edit.cu"} <= everything
    F32, F64 = torch.float32, torch.float64
    assert set(ext.kernels) == set(ops.OPS), "the build declares what it has for exactly the ops of ops.OPS"
    assert ext.supports("edit_", CPU, F32) and ext.supports("gather_encode_bwd", "cpu", torch.bfloat16)
    assert ext.supports("edit_", CPU, F64) and ext.supports("sparse_decode", CPU, torch.float16)
    assert not any(ext.supports("topk_encode", CPU, dt) for dt in ops.FLOAT_DTYPES)
    assert not ext.supports("edit_", CPU, torch.int64) and not ext.supports("no_such_op", CPU, F32)
    assert ext.supports("edit_", torch.device("cuda"), F32) == ext.with_cuda
    assert not ext.supports("edit_", torch.device("cuda"), F64)  # the CUDA edit ranks fp32: no float64 kernel
    assert not ext.supports("topk_encode", torch.device("cuda"), F64)
    assert ext.supports("gather_encode", torch.device("cuda"), F64) == ext.with_cuda
    assert ext.module.cuda_enabled() == ext.with_cuda == extension.cuda_buildable()


def test_build_is_cached_across_processes(ext):
    assert extension.load_backend() is ext  # same process: no second load
    so = next(ext.path.glob("saeuron_C_*.so"))
    log = ext.path / ".ninja_log"
    before = (so.stat().st_mtime_ns, log.read_text())
    code = "from saeuron import extension; b = extension.load_backend(); print(b.path)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ext.path
    assert "building the C++ extension" not in proc.stderr
    assert (so.stat().st_mtime_ns, log.read_text()) == before, "a fresh process must not recompile"


def test_no_build_env_raises(monkeypatch):
    monkeypatch.setenv("SAEURON_NO_BUILD", "1")
    with pytest.raises(RuntimeError, match="SAEURON_NO_BUILD"):
        extension.load_backend()


def test_cache_key_depends_on_sources(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int g() { return 2; }\n")
    k1 = extension.build_key([a, b], False, "")
    assert k1 == extension.build_key([b, a], False, "")
    a.write_text("int f() { return 3; }\n")
    assert extension.build_key([a, b], False, "") != k1
    assert extension.build_key([a, b], True, "9.0") != extension.build_key([a, b], True, "8.0")


# ------------------------------------------------------------------------------------------ CPU ops vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,m,k", SHAPES)
def test_training_ops_match_reference(ext, n, d, m, k, dtype):
    W_enc, b_enc, b_dec, W_dec = _weights(d, m, dtype)
    x = (torch.randn(n, d) * 1.5).to(dtype)
    vals, idx = R.topk_encode(x, W_enc, b_enc, b_dec, k)
    resid = torch.randn(n, d).to(dtype)
    _close(ext.sparse_decode(vals, idx, W_dec), R.sparse_decode(vals, idx, W_dec), dtype)
    _close(ext.sparse_decode(vals, idx, W_dec, b_dec, resid), R.sparse_decode(vals, idx, W_dec, b_dec, resid), dtype)
    g = torch.randn(n, d).to(dtype)
    for a, b in zip(ext.sparse_decode_bwd(g, vals, idx, W_dec), R.sparse_decode_backward(g, vals, idx, W_dec)):
        _close(a, b, dtype)
    got = ext.gather_encode(x, W_enc, b_enc, b_dec, idx)
    want = R.gather_encode(x, W_enc, b_enc, b_dec, idx)
    _close(got, want, dtype)
    gv = torch.randn(n, k).to(dtype)
    for a, b in zip(ext.gather_encode_bwd(gv, x, W_enc, b_dec, idx, want),
                    R.gather_encode_backward(gv, x, W_enc, b_dec, idx, want)):
        _close(a, b, dtype)


def test_training_ops_float64_and_fresh_outputs(ext):
    W_enc, b_enc, b_dec, W_dec = _weights(16, 48, torch.float64)
    x = torch.randn(11, 16, dtype=torch.float64)
    vals, idx = R.topk_encode(x, W_enc, b_enc, b_dec, 5)
    out = ext.sparse_decode(vals, idx, W_dec, b_dec, x)
    _close(out, R.sparse_decode(vals, idx, W_dec, b_dec, x), torch.float64)
    assert out.data_ptr() != x.data_ptr()
    gv = torch.randn(11, 5, dtype=torch.float64)
    for a, b in zip(ext.gather_encode_bwd(gv, x, W_enc, b_dec, idx, vals),
                    R.gather_encode_backward(gv, x, W_enc, b_dec, idx, vals)):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("bad", [64, -1, 1 << 40])
def test_bounds_guard_raises_on_out_of_range_ids_in_direct_calls(ext, bad):
    """ops validates shapes and dtypes but never reads ids; the C++ ops check each one before reading its row."""
    W_enc, b_enc, b_dec, W_dec = _weights(8, 64, torch.float32)
    x, vals, idx = torch.randn(3, 8), torch.rand(3, 2), torch.tensor([[0, 1], [2, bad], [3, 4]])
    msg = f"index {bad} is out of range; valid latent ids are 0..63"
    with pytest.raises(RuntimeError, match=msg):
        ext.sparse_decode(vals, idx, W_dec)
    with pytest.raises(RuntimeError, match=msg):
        ext.sparse_decode_bwd(torch.randn(3, 8), vals, idx, W_dec)
    with pytest.raises(RuntimeError, match=msg):
        ext.gather_encode(x, W_enc, b_enc, b_dec, idx)
    with pytest.raises(RuntimeError, match=msg):
        ext.gather_encode_bwd(torch.rand(3, 2), x, W_enc, b_dec, idx, vals)
    with pytest.raises(RuntimeError, match=msg):  # through ops (with the C++ backend forced), the same guard
        ops.set_backend("cuda")
        try:
            ops.sparse_decode(vals, idx, W_dec)
        finally:
            ops.set_backend(None)
    y = x.clone()  # edit_: such an id is padding, never read, never fires (a finite tau, a scale != 1)
    ext.edit_(y, W_enc, b_enc, b_dec, W_dec, 2, torch.tensor([[bad]]), torch.full((1, 1), -1.0),
              torch.full((1, 1), -1.0), 3)
    assert torch.equal(y, x)


def test_dispatch_errors_stay(ext):
    """The only other errors of the bindings: no kernel for a device (or, in CUDA builds, a dtype)."""
    W_enc, b_enc, b_dec, _ = _weights(8, 64, torch.float32)
    with pytest.raises(RuntimeError, match="no CPU kernel"):
        ext.topk_encode(torch.randn(3, 8), W_enc, b_enc, b_dec, 2)
    meta = torch.empty(3, 2, device="meta")
    with pytest.raises(RuntimeError, match="has no kernel for device meta"):
        ext.sparse_decode(meta, meta.long(), torch.empty(64, 8, device="meta"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,m,k", SHAPES)
def test_edit_tokens_match_reference(ext, n, d, m, k, dtype):
    W = _weights(d, m, dtype)
    x = (torch.randn(n, d) * 1.5).to(dtype)
    x[2, 1] = float("nan")  # a corrupt token passes through
    x[n - 1, 0] = float("inf")
    _, idx = R.topk_encode(x, *W[:3], k)
    rpg = (n + 1) // 2  # two groups; the last rows clamp to the last table row
    # per group: features in some token's top-k (for k=1 a duplicate), a never-firing one, padding
    feat = torch.tensor([[idx[0, 0], idx[0, -1], idx[3, 0], m - 1, 0, 5],
                         [idx[rpg, 0], idx[rpg, -1], idx[n - 2, 0], m - 1, 0, 5]])
    tau = torch.tensor([[0.0, 0.05, -1.0, 0.0, float("inf"), 0.0]] * 2)
    scale = torch.tensor([[-1.0, 0.5, -3.0, -1.0, -1.0, 1.0], [2.0, -1.0, 0.0, -1.0, -1.0, 1.0]])
    got, want = _edit_both(ext, x, W, k, feat, tau, scale, rpg)
    assert (want != x).any(), "the case must edit something"
    assert torch.equal(got[2, [0] + list(range(2, d))], x[2, [0] + list(range(2, d))]) and got[2, 1].isnan()
    assert torch.equal(got[n - 1], x[n - 1])
    _assert_edit_matches(got, want, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edit_nchw_groups_and_layouts(ext, dtype):
    d, m, k = 64, 512, 8
    W = _weights(d, m, dtype)
    x = torch.randn(2, d, 5, 3).to(dtype)  # non-square map, 15 tokens per image
    _, idx = R.topk_encode(R.as_tokens(x), *W[:3], k)
    feat = torch.stack([idx[0, :3], idx[20, :3]])  # one table per image
    tau, scale = torch.zeros(2, 3), torch.tensor([[-1.0, -2.0, 0.5], [-1.0, 3.0, -1.0]])
    got, want = _edit_both(ext, x, W, k, feat, tau, scale, 15)
    assert (want != x).any()
    _assert_edit_matches(got, want, x, dtype)
    cl = x.to(memory_format=torch.channels_last)  # strided tokens
    got_cl, _ = _edit_both(ext, cl, W, k, feat, tau, scale, 15)
    assert got_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(got_cl, got)
    tok = R.as_tokens(x).contiguous()
    got_tok, _ = _edit_both(ext, tok, W, k, feat, tau, scale, 15)
    assert torch.equal(got_tok, R.as_tokens(got))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_edit_every_feature(ext, dtype):
    """All M features selected: every top-k latent fires (the binary search over many passing features)."""
    d, m, k = 32, 256, 16
    W = _weights(d, m, dtype)
    x = torch.randn(45, d).to(dtype)
    g = torch.Generator().manual_seed(1)
    feat = torch.arange(m)
    tau, scale = torch.rand(m, generator=g) * 0.2, -torch.rand(m, generator=g) * 3
    got, want = _edit_both(ext, x, W, k, feat[None], tau[None], scale[None], 45)
    assert (want != x).any(1).all()
    _assert_edit_matches(got, want, x, dtype)


def test_edit_noops_leave_x_bit_equal(ext):
    d, m, k = 16, 64, 4
    W = _weights(d, m, torch.float16)
    x = torch.randn(21, d).half()
    for feat, tau, scale in [
        (torch.empty(1, 0, dtype=torch.long), torch.empty(1, 0), torch.empty(1, 0)),  # empty concept set
        (torch.tensor([[m - 1]]), torch.zeros(1, 1), torch.full((1, 1), -1.0)),  # never fires
        (torch.arange(m)[None], torch.full((1, m), float("inf")), torch.full((1, m), -1.0)),  # padded: tau inf
        (torch.arange(m)[None], torch.zeros(1, m), torch.ones(1, m)),  # padded: scale 1
    ]:
        y = x.clone()
        ext.edit_(y, *W, k, feat, tau, scale, 21)
        assert torch.equal(y, x)
    empty = torch.empty(0, d).half()
    ext.edit_(empty, *W, k, torch.tensor([[1]]), torch.zeros(1, 1), torch.full((1, 1), -1.0), 1)


# ------------------------------------------------------------------------------------------ the ops seam

def test_seam_routes_cpu_ops_to_extension(ext, fresh_ops, monkeypatch):
    monkeypatch.setenv("SAEURON_BACKEND", "cuda")
    for op in set(ops.OPS) - {"topk_encode"}:  # (topk_encode: the fallback warning is checked below)
        for dt in ops.FLOAT_DTYPES:
            assert ops.backend_for(op, CPU, dt) == "cuda", (op, dt)
    d, m, k = 24, 96, 6
    W_enc, b_enc, b_dec, W_dec = _weights(d, m, torch.float32)
    x = torch.randn(2, d, 3, 4)
    _, idx = R.topk_encode(R.as_tokens(x), W_enc, b_enc, b_dec, k)
    feat, tau, scale = idx[:2, 0], torch.zeros(2), torch.tensor([-1.0, -2.0])
    out = ops.edit(x, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale)
    want = x.clone()
    R.edit_(want, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], 24)
    assert torch.equal(out, want) and not torch.equal(out, x)

    with warnings.catch_warnings(record=True) as caught:  # topk_encode: no CPU kernel -> one fallback warning
        warnings.simplefilter("always")
        vals, idx = ops.topk_encode(R.as_tokens(x).contiguous(), W_enc, b_enc, b_dec, k)
        ops.topk_encode(R.as_tokens(x).contiguous(), W_enc, b_enc, b_dec, k)
    fallbacks = [w for w in caught if issubclass(w.category, RuntimeWarning) and "topk_encode" in str(w.message)]
    assert len(fallbacks) == 1 and "does not implement topk_encode on cpu" in str(fallbacks[0].message)
    assert ops.backend_for("topk_encode", CPU) == "torch"
    ref_vals, _ = R.topk_encode(R.as_tokens(x), W_enc, b_enc, b_dec, k)
    torch.testing.assert_close(vals, ref_vals)

    # training through autograd: same gradients as the torch backend
    def grads():
        params = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
        xs = R.as_tokens(x).contiguous().requires_grad_()
        v = ops.gather_encode(xs, params[0], params[1], params[2], idx)
        loss = (ops.sparse_decode(v, idx, params[3], params[2]) - xs).pow(2).sum()
        return torch.autograd.grad(loss, [xs] + params)

    got = grads()
    monkeypatch.setenv("SAEURON_BACKEND", "torch")
    assert ops.backend_for("sparse_decode_bwd", CPU) == "torch"
    for a, b in zip(got, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_with_extension(ext, fresh_ops, monkeypatch):
    monkeypatch.setenv("SAEURON_BACKEND", "cuda")
    d, m, k, n = 8, 32, 4, 6
    W_enc, b_enc, b_dec, W_dec = _weights(d, m, torch.float32)
    x = torch.randn(n, d)
    vals, idx = R.topk_encode(x, W_enc, b_enc, b_dec, k)
    torch.library.opcheck(ops._sparse_decode, (vals.clone().requires_grad_(), idx, W_dec.clone().requires_grad_(),
                                               b_dec, None))
    torch.library.opcheck(ops._sparse_decode_bwd, (torch.randn(n, d), vals, idx, W_dec))
    torch.library.opcheck(ops._gather_encode, (x, W_enc.clone().requires_grad_(), b_enc, b_dec, idx))
    torch.library.opcheck(ops._gather_encode_bwd, (torch.randn(n, k), x, W_enc, b_dec, idx, vals))
    torch.library.opcheck(ops._edit_, (x.clone(), W_enc, b_enc, b_dec, W_dec, k, idx[:2, 0][None],
                                       torch.zeros(1, 2), torch.full((1, 2), -1.0), n))
    for op in ("sparse_decode", "sparse_decode_bwd", "gather_encode", "gather_encode_bwd", "edit_"):
        assert ops.backend_for(op, CPU) == "cuda"


# ------------------------------------------------------------------------------------------ fallbacks

def _fallback_edit_case():
    d, m, k = 16, 64, 4
    W = _weights(d, m, torch.float32)
    x = torch.randn(10, d)
    _, idx = R.topk_encode(x, *W[:3], k)
    return x, W, k, idx[0, :2], torch.zeros(2), torch.tensor([-1.0, 0.5])


def _assert_falls_back(reason):
    x, W, k, feat, tau, scale = _fallback_edit_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ops.edit(x, *W, k, feat, tau, scale)
        ops.edit(x, *W, k, feat, tau, scale)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and reason in msgs[0], msgs
    assert ops.backend_for("edit_", CPU) == "torch" and reason in ops._load_errors["cuda"]
    want = x.clone()
    R.edit_(want, *W, k, feat[None], tau[None], scale[None], 10)
    assert torch.equal(out, want) and not torch.equal(out, x)


def test_no_build_falls_back_with_one_warning(fresh_ops, monkeypatch):
    monkeypatch.setenv("SAEURON_BACKEND", "cuda")
    monkeypatch.setenv("SAEURON_NO_BUILD", "1")
    _assert_falls_back("SAEURON_NO_BUILD")


def test_automatic_cpu_edit_uses_extension_or_warns_once(ext, fresh_ops, monkeypatch):
    """Without SAEURON_BACKEND the CPU edit runs the compiled op; when it cannot be built, one warning."""
    monkeypatch.delenv("SAEURON_BACKEND", raising=False)
    assert ops.backend_for("edit_", CPU) == "cuda" and ops.backend_for("topk_encode", CPU) == "torch"
    ops._choice.clear()
    ops._modules.pop("cuda")
    monkeypatch.setenv("SAEURON_NO_BUILD", "1")
    _assert_falls_back("SAEURON_NO_BUILD")


def test_broken_sources_fall_back_with_one_warning(fresh_ops, monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "bindings.cpp").write_text("#error deliberately broken source for the fallback test\n")
    monkeypatch.setenv("SAEURON_CSRC_DIR", str(src))
    monkeypatch.setenv("SAEURON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SAEURON_BACKEND", "cuda")
    _assert_falls_back("Error building extension")


# ------------------------------------------------------------------------------------------ CUDA sources compile

def _cuda_include(nvcc):
    """The toolkit's include folder, as nvcc itself reports it (nvcc may be a wrapper script)."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True).stderr
    top = [ln.split("=", 1)[1].strip() for ln in dry.splitlines() if ln.startswith("#$ TOP=")]
    assert top, dry
    return str(Path(top[0]).resolve() / "include")


def _saeuron_symbols(obj, defined, ns="saeuron_ext::"):
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-C", flag, str(obj)], capture_output=True, text=True, check=True).stdout
    names = (re.match(r"^\s*(?:[0-9a-fA-F]+\s+)?[A-Za-z?]\s+(.*)$", ln) for ln in out.splitlines())
    return {m.group(1) for m in names if m and m.group(1).startswith(ns)}


def test_cuda_sources_compile(ext, tmp_path):
    """nvcc compiles every .cu (sm_90 SASS + compute_75 PTX, torch's half flags); g++ compiles the
    ATen bridge of CUDA builds, and every function the bindings call is defined."""
    nvcc = extension.nvcc_path()
    if nvcc is None and not os.environ.get("CI"):  # CI machines have nvcc: there a missing one is a failure
        pytest.skip("nvcc not found: install the CUDA toolkit to compile-check the CUDA kernels")
    assert nvcc is not None, "nvcc not found: install the CUDA toolkit (needed to check the CUDA kernels)"
    csrc = extension.source_dir()
    cu = sorted(str(p) for p in csrc.glob("*.cu"))
    assert len(cu) >= 3
    nv = subprocess.Popen(
        [nvcc, "-c", "-std=c++17", "-O3", "--threads", "2", "-gencode", "arch=compute_90,code=sm_90",
         "-gencode", "arch=compute_75,code=compute_75", "-D__CUDA_NO_HALF_OPERATORS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr", *cu],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A CPU torch lacks one generated CUDA header of c10; a stub stands in for it.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    flags = ["-std=c++20", "-O0", "-fPIC", "-c", "-DSAEURON_WITH_CUDA", "-DTORCH_EXTENSION_NAME=saeuron_C_check",
             *(f"-I{p}" for p in include_paths()), f"-I{csrc}", f"-I{_cuda_include(nvcc)}",
             f"-I{sysconfig.get_paths()['include']}", f"-idirafter{tmp_path / 'stub'}"]
    cxx = os.environ.get("CXX", "g++")
    gxx = [subprocess.Popen([cxx, *flags, str(csrc / f"{name}.cpp"), "-o", str(tmp_path / f"host_{name}.o")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for name in ("cuda_ops", "bindings")]
    nv_out, _ = nv.communicate(timeout=600)
    assert nv.returncode == 0, nv_out
    assert sorted(p.name for p in tmp_path.glob("*.o")) == sorted(Path(p).stem + ".o" for p in cu)
    for proc in gxx:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    defined = _saeuron_symbols(tmp_path / "host_cuda_ops.o", True) | _saeuron_symbols(ext.path / "cpu_ops.o", True)
    needed = (_saeuron_symbols(tmp_path / "host_bindings.o", False)
              | _saeuron_symbols(tmp_path / "host_cuda_ops.o", False))
    assert any("edit_cuda" in s for s in needed) and needed <= defined, needed - defined
    launchers = _saeuron_symbols(tmp_path / "host_cuda_ops.o", False, "saeuron_cuda::")
    kernels = set().union(*(_saeuron_symbols(tmp_path / f"{Path(p).stem}.o", True, "saeuron_cuda::") for p in cu))
    assert any("edit_apply" in s for s in launchers) and launchers <= kernels, launchers - kernels


def test_two_checkouts_never_share_a_build_folder(tmp_path):
    """The same sources in two folders get two cache folders: ninja would rebuild a shared one on every switch."""
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.cpp").write_text("int f() { return 1; }\n")
    one, two = ([tmp_path / d / "a.cpp"] for d in ("one", "two"))
    assert extension.build_key(one, False, "") != extension.build_key(two, False, "")
    assert extension.build_key(one, False, "") == extension.build_key(list(one), False, "")
