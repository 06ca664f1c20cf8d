"""Concept statistics, scores, selection, edit tables and the concept file."""
import json

import pytest
import torch

from conftest import make_sae
from saeuron.concepts import ConceptTable, load_concepts
from saeuron.selection import build_concept_file, compute_statistics
from saeuron.store import ActivationStore

HP = "up_blocks.1.attentions.1"


def _table(C=3, T=2, M=16, seed=0, counts=(2, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(C, T, M, generator=g)
    mu[mu < 0.3] = 0.0  # sparse-ish, like real codes
    return ConceptTable([f"c{i}" for i in range(C)], list(counts)[:C], [500.0, 10.0][:T], {HP: mu})


def test_scores_and_tau_match_direct_formula():
    tab = _table()
    mu, n = tab.mu[HP].double(), tab.counts.double()
    for c in range(3):
        for t in range(2):
            others = [j for j in range(3) if j != c]
            mn = sum(n[j] * mu[j, t] for j in others) / n[others].sum()
            want = mu[c, t] / (mu[c, t].sum() + 1e-8) - mn / (mn.sum() + 1e-8)
            torch.testing.assert_close(tab.scores(HP, f"c{c}")[t], want.float())
    torch.testing.assert_close(tab.tau(HP), tab.mu[HP].mean(0))


def test_select_percentile_and_top_n():
    tab = _table(M=64)
    s, mu = tab.scores(HP, "c1").double(), tab.mu[HP][1]
    sel = tab.select(HP, "c1", percentile=90)
    for t in range(2):
        q = torch.quantile(s[t], 0.9)
        want = ((s[t] > q) & (mu[t] > 0) & (s[t] > 0)).nonzero().flatten()
        assert sel[t].tolist() == want.tolist() and len(want) > 0
    top = tab.select(HP, "c1", top_n=3)
    for t in range(2):
        assert sorted(top[t].tolist()) == sorted(s[t].topk(3).indices.tolist())
    # features that never fire for the concept are never selected, even when asking for all of them
    every = tab.select(HP, "c1", top_n=64)
    for t in range(2):
        assert len(every[t]) > 0 and bool((mu[t][every[t]] > 0).all()) and bool((s[t][every[t]] > 0).all())
        assert set(every[t].tolist()) == set(((mu[t] > 0) & (s[t] > 0)).nonzero().flatten().tolist())
    # defaults: table default percentile 99.99 -> at most one feature of 64 per timestep
    assert all(len(x) <= 1 for x in tab.select(HP, "c1"))
    with pytest.raises(ValueError, match="not both"):
        tab.select(HP, "c1", percentile=90, top_n=2)


def test_unknown_concept_lists_known_and_suggests():
    tab = ConceptTable(["Cartoon", "Dogs"], [1, 1], [1.0], {HP: torch.rand(2, 1, 8)})
    with pytest.raises(ValueError, match=r"(?s)unknown concept 'Cartton'.*did you mean 'Cartoon'.*Cartoon, Dogs"):
        tab.select(HP, "Cartton")
    with pytest.raises(ValueError, match="no statistics"):
        tab.scores("down_blocks.0.attentions.0", "Dogs")


def test_edit_tables_union_padding_most_negative():
    T, M = 3, 10
    mu = torch.full((3, T, M), 0.01)  # concept "rest" (many prompts) is the background
    mu[0, 0, [1, 2]] = 1.0  # a: {1, 2} at t0, {3} at t1
    mu[0, 1, 3] = 1.0
    mu[0, 2] = 0.0  # a never fires at t2: nothing may be selected there
    mu[1, 0, [2, 5]] = 2.0  # b: {2, 5} at t0 (2 shared with a), {7} at t2
    mu[1, 1] = 0.0
    mu[1, 2, 7] = 3.0
    tab = ConceptTable(["a", "b", "rest"], [1, 1, 20], [900.0, 500.0, 1.0], {HP: mu}, defaults={"top_n": 2})
    assert [x.tolist() for x in tab.select(HP, "a")] == [[1, 2], [3], []]  # score > 0 only: no filler features
    assert [x.tolist() for x in tab.select(HP, "b")] == [[2, 5], [], [7]]
    ts, fi, tau, sc = tab.edit_tables(HP, ["a", "b"], multipliers={"a": -2.0, "b": -1.0})
    assert fi.dtype == torch.int64 and tau.dtype == sc.dtype == torch.float32
    assert fi.shape == (3, 3) and ts.tolist() == [900.0, 500.0, 1.0]
    assert fi.tolist() == [[1, 2, 5], [3, 0, 0], [7, 0, 0]]
    # feature 2 is selected by both: it keeps the most negative scale, min(-2 * 1.0, -1 * 2.0)
    torch.testing.assert_close(sc[0], torch.tensor([-2.0, -2.0, -2.0]))
    torch.testing.assert_close(sc[1, 0], torch.tensor(-2.0))
    torch.testing.assert_close(sc[2, 0], torch.tensor(-3.0))
    _, _, _, sc2 = tab.edit_tables(HP, ["a", "b"], multipliers={"a": -1.0, "b": -3.0})
    torch.testing.assert_close(sc2[0], torch.tensor([-1.0, -6.0, -6.0]))
    torch.testing.assert_close(tau[0], mu[:, 0, [1, 2, 5]].mean(0))
    assert (tau[1:, 1:] == float("inf")).all() and (sc[1:, 1:] == 1.0).all()  # padding never edits
    # a single concept, the default multiplier (-1) and percentile rule
    _, fi, tau, sc = tab.edit_tables(HP, "b", percentiles=95.0)
    assert fi.tolist() == [[5], [0], [7]] and sc[0, 0] == -2.0  # 5 is more typical of b than the shared 2
    assert tau[1, 0] == float("inf")
    # an empty selection gives F = 0
    _, fi, tau, sc = tab.edit_tables(HP, "a", top_ns=0)
    assert fi.shape == tau.shape == sc.shape == (3, 0)
    with pytest.raises(ValueError, match="unknown concept"):
        tab.edit_tables(HP, ["a"], multipliers={"zz": -1.0})


def test_edit_tables_threshold_scales_tau_per_concept():
    T, M = 2, 12
    g = torch.Generator().manual_seed(7)
    mu = torch.rand(3, T, M, generator=g) * 0.05  # fresh random background
    mu[0, :, [1, 2]] += 1.0  # a: {1, 2}
    mu[1, :, [2, 6]] += 2.0  # b: {2, 6}, 2 shared with a
    tab = ConceptTable(["a", "b", "rest"], [1, 1, 20], [900.0, 1.0], {HP: mu}, defaults={"top_n": 2})
    base = tab.tau(HP)
    _, fi, tau1, sc1 = tab.edit_tables(HP, ["a", "b"])
    assert torch.equal(tau1, torch.gather(base, 1, fi))  # threshold 1 (the default) is the method's tau, exactly
    _, fi2, tau, sc = tab.edit_tables(HP, ["a", "b"], thresholds={"a": 4.0, "b": 10.0})
    assert torch.equal(fi2, fi) and torch.equal(sc, sc1)  # only tau changes
    want = {1: 4.0, 2: 4.0, 6: 10.0}  # a shared feature keeps the smaller factor (the stronger edit)
    for t in range(T):
        for j, f in enumerate(fi[t].tolist()):
            torch.testing.assert_close(tau[t, j], base[t, f] * want[f])
    _, _, tau_b, _ = tab.edit_tables(HP, "b", thresholds=3.0)  # one number for all
    torch.testing.assert_close(tau_b, torch.gather(base, 1, tab.edit_tables(HP, "b")[1]) * 3.0)
    # the concept's default is used when not given, and explicit beats it
    tab.defaults["b"]["threshold"] = 10.0
    assert torch.equal(tab.edit_tables(HP, "b")[2], tab.edit_tables(HP, "b", thresholds=10.0)[2])
    assert torch.equal(tab.edit_tables(HP, "b", thresholds=1.0)[2], tab.edit_tables(HP, "b", thresholds={"b": 1})[2])
    assert tab.threshold("b") == 10.0 and tab.threshold("b", 2) == 2.0
    for bad in (0, -1.0, float("nan"), float("inf"), "x", True):
        with pytest.raises(ValueError, match="threshold .*finite number > 0"):
            tab.edit_tables(HP, "a", thresholds=bad)
    with pytest.raises(ValueError, match="threshold in the defaults of 'a'"):
        ConceptTable(["a", "b"], [1, 1], [1.0], {HP: torch.rand(2, 1, 8)}, defaults={"a": {"threshold": 0}})
    with pytest.raises(ValueError, match="unknown concept in thresholds"):
        tab.edit_tables(HP, "a", thresholds={"zz": 2.0})


def _make_store(root, sae, *, unequal=False, seed=0):
    """cat prompts carry feature 7's encoder direction; dog and unlabelled prompts are noise."""
    prompts = ["a cat", "the cat", "a dog", "the dog", "a car", "one cat"]
    labels = ["cat", "cat", "dog", "dog", None, "cat"]
    d = sae.d_in
    store = ActivationStore.create(root, {HP: d}, prompts, labels)
    g = torch.Generator().manual_seed(seed)
    direction = sae.encoder.weight[7].detach() / sae.encoder.weight[7].norm()
    b = 0
    for t in (801.0, 401.0, 1.0):
        xs, ts, ps = [], [], []
        for p in range(len(prompts)):
            n = 4 + (p if unequal else 0)
            x = torch.randn(n, d, generator=g) * 0.3
            if labels[p] == "cat":
                x += 6.0 * direction
            xs.append(x), ts.append(torch.full((n,), t)), ps.append(torch.full((n,), p))
        store.write_batch(b, {HP: {"x": torch.cat(xs), "timestep": torch.cat(ts), "prompt_id": torch.cat(ps)}})
        b += 1
    return ActivationStore(root)


def _dense_mu(store, sae, members):
    """mu by the definition: dense codes, mean per (prompt, t), then mean over the concept's prompts."""
    rows = [store.read_shard(HP, i) for i in range(len(store.shard_paths(HP)))]
    x = torch.cat([r["x"] for r in rows])
    t = torch.cat([r["timestep"] for r in rows])
    p = torch.cat([r["prompt_id"] for r in rows])
    pre = sae.pre_acts(x)
    v, i = pre.topk(sae.cfg.k, dim=-1)
    f = torch.zeros_like(pre).scatter_(1, i, v)
    out = []
    for ids in members:
        per_t = []
        for tv in (801.0, 401.0, 1.0):
            per_t.append(torch.stack([f[(p == q) & (t == tv)].mean(0) for q in ids]).mean(0))
        out.append(torch.stack(per_t))
    return torch.stack(out)


def test_statistics_find_planted_feature(tmp_path):
    sae = make_sae(d_in=16, num_latents=64, k=4)
    store = _make_store(tmp_path / "s", sae)
    tab = compute_statistics(store, sae, HP, batch_size=7, progress=False)
    assert tab.names == ["cat", "dog"] and tab.counts.tolist() == [3, 2]
    assert tab.timesteps.tolist() == [801.0, 401.0, 1.0]
    assert [x.tolist() for x in tab.select(HP, "cat", top_n=1)] == [[7], [7], [7]]
    assert all(7 in x.tolist() for x in tab.select(HP, "cat", percentile=95))
    assert all(7 not in x.tolist() for x in tab.select(HP, "dog", top_n=3))
    # unlabelled prompts count nowhere: mu equals the definition over labelled prompts only
    torch.testing.assert_close(tab.mu[HP], _dense_mu(store, sae, [[0, 1, 5], [2, 3]]), rtol=1e-5, atol=1e-6)


def test_statistics_unequal_token_counts_and_concept_dict(tmp_path):
    sae = make_sae(d_in=16, num_latents=64, k=4, seed=3)
    store = _make_store(tmp_path / "s", sae, unequal=True, seed=1)
    concepts = {"feline": ["a cat", "one cat", 1], "animal": [0, "a dog", 3, 5], "car": ["a car"]}
    tab = compute_statistics(store, sae, "unet." + HP, concepts, batch_size=5, progress=False)
    assert tab.names == ["feline", "animal", "car"] and tab.counts.tolist() == [3, 4, 1]
    want = _dense_mu(store, sae, [[0, 1, 5], [0, 2, 3, 5], [4]])
    torch.testing.assert_close(tab.mu[HP], want, rtol=1e-5, atol=1e-6)


def test_statistics_bad_input(tmp_path):
    sae = make_sae(d_in=16, num_latents=64, k=4)
    store = _make_store(tmp_path / "s", sae)
    with pytest.raises(ValueError, match=r"(?s)unknown hookpoint 'mid'.*up_blocks.1.attentions.1"):
        compute_statistics(store, sae, "mid", progress=False)
    with pytest.raises(ValueError, match=r"d_in=32.*width 16"):
        compute_statistics(store, make_sae(d_in=32), HP, progress=False)
    with pytest.raises(ValueError, match=r"(?s)'a cta'.*did you mean 'a cat'"):
        compute_statistics(store, sae, HP, {"cat": ["a cta"]}, progress=False)
    with pytest.raises(ValueError, match="'cat' has no prompts"):
        compute_statistics(store, sae, HP, {"cat": []}, progress=False)
    with pytest.raises(ValueError, match="prompt id"):
        compute_statistics(store, sae, HP, {"cat": [99]}, progress=False)


def test_nan_rows_do_not_crash(tmp_path):
    sae = make_sae(d_in=16, num_latents=64, k=4)
    store = ActivationStore.create(tmp_path / "s", {HP: 16}, ["a", "b"], ["A", "B"])
    x = torch.randn(8, 16)
    x[0, 3] = float("nan")
    store.write_batch(0, {HP: {"x": x, "timestep": torch.full((8,), 5.0), "prompt_id": torch.arange(8) % 2}})
    with pytest.warns(UserWarning, match="1 rows .* NaN or Inf"):
        tab = compute_statistics(store, sae, HP, progress=False)
    assert torch.isfinite(tab.mu[HP]).all()


def test_concept_file_round_trip_and_errors(tmp_path):
    tab = ConceptTable(["a", "b"], [2, 3], [900.0, 1.0], {HP: torch.rand(2, 2, 8), "mid_block.attentions.0": torch.rand(2, 2, 4)},
                       defaults={"a": {"multiplier": -5.0, "top_n": 2}}, metadata={"note": "x"})
    tab.save(tmp_path / "ck")
    back = load_concepts(tmp_path / "ck")
    assert back.names == tab.names and back.hookpoints == tab.hookpoints and back.metadata == {"note": "x"}
    assert back.defaults == tab.defaults and back.defaults["a"]["multiplier"] == -5.0 and back.defaults["b"]["top_n"] is None
    assert torch.equal(back.counts, tab.counts) and torch.equal(back.timesteps, tab.timesteps)
    for h in tab.hookpoints:
        assert torch.equal(back.mu[h], tab.mu[h])
    for a, b in zip(back.edit_tables(HP, ["a", "b"]), tab.edit_tables(HP, ["a", "b"])):
        assert torch.equal(a, b)
    assert back.defaults["a"]["threshold"] == back.defaults["b"]["threshold"] == 1.0
    tab.defaults["b"]["threshold"] = 8.0
    tab.save(tmp_path / "ck")
    assert load_concepts(tmp_path / "ck").defaults["b"]["threshold"] == 8.0
    meta = json.loads((tmp_path / "ck" / "concepts.json").read_text())
    for d in meta["defaults"].values():
        del d["threshold"]  # a concept file from before thresholds existed
    (tmp_path / "ck" / "concepts.json").write_text(json.dumps(meta))
    assert load_concepts(tmp_path / "ck").defaults["b"]["threshold"] == 1.0
    tab.save(tmp_path / "ck")

    with pytest.raises(FileNotFoundError, match="concepts.json"):
        ConceptTable.load(tmp_path / "nothing")
    js = tmp_path / "ck" / "concepts.json"
    good = js.read_text()
    js.write_text(good[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        ConceptTable.load(tmp_path / "ck")
    js.write_text(good)
    st = tmp_path / "ck" / "concepts.safetensors"
    st.write_bytes(st.read_bytes()[:-16])
    with pytest.raises(ValueError, match="corrupt concept file"):
        ConceptTable.load(tmp_path / "ck")
    tab.save(tmp_path / "ck")
    js.write_text(good)  # a JSON from another save
    with pytest.raises(ValueError, match="different saves"):
        ConceptTable.load(tmp_path / "ck")
    tab.save(tmp_path / "ck")
    meta = json.loads(js.read_text())
    meta["names"] = ["a"]
    js.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt concept file"):
        ConceptTable.load(tmp_path / "ck")


def test_build_concept_file_from_checkpoint_folder(tmp_path):
    sae = make_sae(d_in=16, num_latents=64, k=4)
    store = _make_store(tmp_path / "s", sae)
    sae.save(tmp_path / "ck" / f"unet.{HP}")  # published layout: unet.-prefixed folder names
    tab = build_concept_file(str(store.root), tmp_path / "ck", top_n=2, multiplier=-2.0, progress=False)
    back = ConceptTable.load(tmp_path / "ck")
    assert back.hookpoints == [HP] and back.names == ["cat", "dog"]
    assert back.defaults["cat"] == {"multiplier": -2.0, "percentile": 99.99, "top_n": 2, "hookpoints": None,
                                    "threshold": 1.0}
    assert torch.equal(back.mu[HP], tab.mu[HP])
    assert [len(x) for x in back.select(HP, "cat")] == [2, 2, 2]  # top_n default wins over percentile
    with pytest.raises(ValueError, match="no SAE"):
        build_concept_file(store, tmp_path / "empty", progress=False)
