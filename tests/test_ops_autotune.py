"""Automatic backend choice by measured speed (saeuron/ops.py): the fastest usable backend per op, device, dtype and
shape class, timed once on the first real call and cached in memory and in ``<SAEURON_CACHE_DIR>/autotune.json``.

Fake backends (injected through ``ops._modules``, which ``ops._load`` returns as loaded) run the reference, count
their calls and sleep to be slow; the real case times the C++ CPU edit against the reference.
"""
import json
import time
import warnings

import pytest
import torch

from conftest import sae_weights
from saeuron import extension, ops
from saeuron import reference as R

CPU = torch.device("cpu")
D, M, K = 8, 32, 4
SLOW_S = 0.02


class _Fake:
    """A backend that supports every op and float dtype and runs the reference; ``edit_`` and
    ``sparse_decode`` sleep ``delay`` seconds first and record the tensor each call got (``calls``: ``(op, data_ptr of
    the first argument)``)."""

    def __init__(self, name, delay=0.0, raises=False):
        self.name, self.delay, self.raises, self.calls = name, delay, raises, []

    def supports(self, op, device, dtype):
        return dtype in ops.FLOAT_DTYPES

    def _enter(self, op, first):
        self.calls.append((op, first.data_ptr()))
        if self.raises:
            raise RuntimeError(f"{self.name} cannot run this")
        if self.delay:
            time.sleep(self.delay)

    def edit_(self, x, *args):
        self._enter("edit_", x)
        R.edit_(x, *args)

    def sparse_decode(self, values, *args):
        self._enter("sparse_decode", values)
        return R.sparse_decode(values, *args)

    def __getattr__(self, op):  # the ops not faked: the reference, uncounted
        if op in ops.OPS:
            return getattr(ops._TorchBackend, op)
        raise AttributeError(op)

    def n(self, op="edit_"):
        return sum(c[0] == op for c in self.calls)


def _fresh_process(monkeypatch, **backends):
    """Empty every in-memory cache of ops, as in a new process, and install the given (fake) backends."""
    for name in ("_choice", "_load_errors", "_usable_cache", "_tuned", "_disk"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "_modules", {"triton": None, **backends})


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Measuring on (conftest turns it off for the rest of the suite), the cache in a temporary folder, no forced
    backend, a time budget that never cuts the timed calls short, and ops with a slow fake ``cuda`` (first in the
    CPU edit order) and a fast fake ``torch``."""
    monkeypatch.setenv("SAEURON_AUTOTUNE", "1")
    monkeypatch.setenv("SAEURON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SAEURON_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops, "AUTOTUNE_BUDGET_S", 60.0)  # call counts independent of the machine's load
    slow, fast = _Fake("cuda", SLOW_S), _Fake("torch")
    _fresh_process(monkeypatch, cuda=slow, torch=fast)
    assert ops.AUTO_ORDER["cpu"]["edit_"] == ("cuda", "torch")
    return slow, fast


def _weights(dtype=torch.float32):
    return sae_weights(M, D, dtype)


def _edit_args(n, dtype=torch.float32):
    """Tokens ``x [n, d]`` and the rest of an edit_ call where features fire (so the edit changes ``x``)."""
    W = _weights(dtype)
    x = torch.randn(n, D, dtype=dtype)
    _, idx = R.topk_encode(x, *W[:3], K)
    return x, W, idx[:2, 0].clone(), torch.zeros(2), torch.full((2,), -1.0)


def _reference(x, W, feat, tau, scale):
    want = x.clone()
    R.edit_(want, *W, K, feat[None], tau[None].float(), scale[None].float(), x.shape[0])
    return want


def _edit(n, dtype=torch.float32):
    x, W, feat, tau, scale = _edit_args(n, dtype)
    return ops.edit(x, *W, K, feat, tau, scale)


def _cache():
    return ops.autotune_cache_file()


def test_faster_backend_chosen_though_later_in_static_order_and_measured_once(tuned):
    slow, fast = tuned
    _edit(6)
    timed = 1 + ops.AUTOTUNE_REPS  # warm-up + timed calls
    assert slow.n() == timed and fast.n() == timed + 1  # + the real call
    for _ in range(3):
        _edit(6)
    assert slow.n() == timed and fast.n() == timed + 4, "measured once per key, then the choice runs"
    (entry,) = ops.status()["measured"]
    assert entry["backend"] == "torch" and entry["static"] == "cuda" and entry["source"] == "measured"
    assert entry["ms"]["cuda"] >= SLOW_S * 1e3 > entry["ms"]["torch"]
    assert entry["shape"] == {"d": D, "M": M, "k": K, "F": 2, "N": 8, "x": "tokens"}
    assert ops.backend_for("edit_", CPU) == "cuda", "backend_for stays the static choice"


def test_timing_stops_at_the_budget(tuned, monkeypatch):
    slow, fast = tuned
    monkeypatch.setattr(ops, "AUTOTUNE_BUDGET_S", 1.5 * SLOW_S)
    _edit(6)
    assert slow.n() == 1 + 2, "warm-up, then timed calls until 1.5 x 20 ms are spent: two"
    assert ops.status()["measured"][0]["backend"] == "torch"


def test_a_new_shape_class_is_measured_again_and_the_same_one_is_not(tuned):
    slow, _ = tuned
    _edit(6)
    first = slow.n()
    _edit(7)  # N rounds up to 8 as well: same class
    assert slow.n() == first
    _edit(40)  # N class 64
    assert slow.n() == 2 * first
    _edit(6, torch.float64)  # another dtype
    assert slow.n() == 3 * first
    assert sorted(e["shape"]["N"] for e in ops.status()["measured"]) == [8, 8, 64]


def test_cache_file_is_reused_by_a_new_process_without_timing(tuned, monkeypatch):
    _edit(6)
    data = json.loads(_cache().read_text())
    assert data["format"] == ops.AUTOTUNE_FORMAT
    (key,) = data["choices"]
    assert key.startswith("edit_|cpu|") and f"torch={torch.__version__}" in key and "cuda+torch" in key
    assert data["choices"][key]["backend"] == "torch"
    slow, fast = _Fake("cuda", SLOW_S), _Fake("torch")
    _fresh_process(monkeypatch, cuda=slow, torch=fast)
    _edit(6)
    assert slow.n() == 0 and fast.n() == 1
    (entry,) = ops.status()["measured"]
    assert entry["source"] == "cache" and entry["backend"] == "torch"


def test_writes_merge_with_what_another_process_saved(tuned):
    _edit(6)
    data = json.loads(_cache().read_text())
    data["choices"]["edit_|cpu|another process|float32|d=1|cuda+torch|torch=0|build=x"] = {"backend": "cuda", "ms": {}}
    _cache().write_text(json.dumps(data))
    _edit(40)
    choices = json.loads(_cache().read_text())["choices"]
    assert len(choices) == 3 and any("another process" in key for key in choices)
    assert not [p for p in _cache().parent.iterdir() if p.name != "autotune.json"], "no temporary file left behind"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"choices": []}), json.dumps([1, 2])])
def test_corrupt_or_foreign_cache_warns_once_and_is_measured_and_rewritten(tuned, content):
    slow, _ = tuned
    _cache().parent.mkdir(parents=True, mode=0o700)
    _cache().write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _edit(6)
        _edit(40)
    msgs = [str(w.message) for w in caught if "autotune cache" in str(w.message)]
    assert len(msgs) == 1 and "ignoring" in msgs[0], msgs
    assert slow.n() == 2 * (1 + ops.AUTOTUNE_REPS)
    data = json.loads(_cache().read_text())
    assert data["format"] == ops.AUTOTUNE_FORMAT and len(data["choices"]) == 2


def test_autotune_off_and_forced_backend_do_not_measure(tuned, monkeypatch):
    slow, fast = tuned
    monkeypatch.setenv("SAEURON_AUTOTUNE", "0")
    _edit(6)
    assert slow.n() == 1 and fast.n() == 0, "static order: the first usable candidate"
    monkeypatch.setenv("SAEURON_AUTOTUNE", "1")
    monkeypatch.setenv("SAEURON_BACKEND", "cuda")  # cuda and those after it are usable: still no measuring
    _edit(6)
    assert slow.n() == 2 and fast.n() == 0
    assert ops.status()["measured"] == [] and not _cache().exists()


def test_no_measuring_while_compiling(tuned, monkeypatch):
    slow, fast = tuned
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _edit(6)
    assert slow.n() == 1 and fast.n() == 0 and not _cache().exists()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    _edit(6)
    assert slow.n() == 2 + ops.AUTOTUNE_REPS and _cache().exists()


def test_callers_tensor_sees_only_the_real_call(tuned):
    slow, fast = tuned
    x, W, feat, tau, scale = _edit_args(6)
    want = _reference(x, W, feat, tau, scale)
    assert not torch.equal(want, x)
    ops.edit_(x, *W, K, feat, tau, scale)
    assert torch.equal(x, want), "edited exactly once"
    ptr = x.data_ptr()
    assert [p for _, p in slow.calls + fast.calls].count(ptr) == 1 and fast.calls[-1][1] == ptr


def test_strided_map_is_edited_once_in_place(tuned):
    W = _weights()
    x = torch.randn(2, D, 3, 5)[..., ::2]  # a view: timing runs on copies with these strides
    _, idx = R.topk_encode(R.as_tokens(x), *W[:3], K)
    feat, tau, scale = idx[:2, 0], torch.zeros(2), torch.full((2,), -1.0)
    want = x.clone()
    R.edit_(want, *W, K, feat[None], tau[None], scale[None], 18)
    ops.edit_(x, *W, K, feat, tau, scale)
    assert torch.equal(x, want) and ops.status()["measured"][0]["shape"]["x"] == "map-strided"


def test_a_candidate_that_raises_is_dropped(tuned, monkeypatch):
    broken, fast = _Fake("cuda", raises=True), _Fake("torch")
    _fresh_process(monkeypatch, cuda=broken, torch=fast)
    x, W, feat, tau, scale = _edit_args(6)
    assert torch.equal(ops.edit(x, *W, K, feat, tau, scale), _reference(x, W, feat, tau, scale))
    (entry,) = ops.status()["measured"]
    assert entry["backend"] == "torch" and "cuda" not in entry["ms"]


def test_fallback_warning_still_given(tuned, monkeypatch):
    """A faster backend that cannot run the call: one warning, whether or not anything is measured."""
    class Float32Only(_Fake):
        def supports(self, op, device, dtype):
            return dtype == torch.float32

    _fresh_process(monkeypatch, cuda=Float32Only("cuda"), torch=_Fake("torch"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _edit(6, torch.float64)
        _edit(6, torch.float64)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "does not implement edit_ on cpu for float64" in msgs[0], msgs
    assert ops.status()["measured"] == [], "one usable candidate: nothing to measure"


def test_shape_class_of_every_op():
    x, W, feat, tau, scale = _edit_args(6)
    vals, idx = R.topk_encode(x, *W[:3], K)
    W_enc, b_enc, b_dec, W_dec = W
    want = (("d", D), ("M", M), ("k", K), ("N", 8))
    assert ops.shape_class("topk_encode", (x, W_enc, b_enc, b_dec, K)) == want
    assert ops.shape_class("sparse_decode", (vals, idx, W_dec, b_dec, None)) == want
    assert ops.shape_class("gather_encode", (x, W_enc, b_enc, b_dec, idx)) == want
    assert ops.shape_class("gather_encode_bwd", (vals, x, W_enc, b_dec, idx, vals)) == want
    assert ops.shape_class("sparse_decode_bwd", (x, vals, idx, W_dec)) == want
    maps = torch.randn(2, D, 3, 5)[..., ::2]  # 2 x 3 x 3 = 18 tokens
    assert ops.shape_class("edit_", (maps, W_enc, b_enc, b_dec, W_dec, K, feat[None], tau, scale, 6)) == (
        want[:3] + (("F", 2), ("N", 32), ("x", "map-strided")))


def test_batchtopk_code_widths_share_a_shape_class():
    """BatchTopK hands the sparse training ops codes [N, k'] whose width changes every step: widths within one power
    of two are one class (timed once), so training is not timed again at every step."""
    W_enc = torch.randn(M, D)
    classes = {ops.shape_class("sparse_decode", (torch.randn(8, kk), torch.zeros(8, kk, dtype=torch.long), W_enc,
                                                 None, None)) for kk in range(K + 1, 2 * K + 1)}
    assert len(classes) == 1 if K & (K - 1) == 0 else len(classes) <= 2, classes
    assert dict(next(iter(classes)))["k"] >= K + 1


@pytest.fixture(scope="module")
def ext():
    try:
        return extension.load_backend()  # the session's build cache, before the tests move SAEURON_CACHE_DIR
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the C++ extension is unavailable here: {e}")


def test_real_cpu_edit_choice_between_extension_and_reference(ext, tuned, monkeypatch):
    """The real backends at a moderate shape: both are timed, the chosen one's result equals the reference."""
    _fresh_process(monkeypatch, cuda=ext, torch=ops._TorchBackend)
    g = torch.Generator().manual_seed(1)
    d, m, k, n = 64, 1024, 8, 256
    W_enc = torch.randn(m, d, generator=g) / d ** 0.5
    b_enc, b_dec = torch.randn(m, generator=g) * 0.1, torch.randn(d, generator=g) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    x = torch.randn(n, d, generator=g)
    _, idx = R.topk_encode(x, W_enc, b_enc, b_dec, k)
    feat = idx[:16, 0].unique()[:8]
    tau, scale = torch.zeros(feat.numel()), torch.full((feat.numel(),), -1.0)
    want = x.clone()
    R.edit_(want, W_enc, b_enc, b_dec, W_dec, k, feat[None], tau[None], scale[None], n)
    assert not torch.equal(want, x)
    got = x.clone()
    ops.edit_(got, W_enc, b_enc, b_dec, W_dec, k, feat, tau, scale)
    torch.testing.assert_close(got, want)
    (entry,) = ops.status()["measured"]
    assert set(entry["ms"]) == {"cuda", "torch"} and entry["backend"] in ("cuda", "torch")
    assert f"build={ext.path.name}" in json.dumps(json.loads(_cache().read_text()))
