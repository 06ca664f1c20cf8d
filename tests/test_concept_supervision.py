"""Concept-supervised SAE training (issue 22, the SAEmnesia idea): the loss, reserved latents that bind to their
concepts on a planted store, the flag off = the unsupervised trainer, the cfg.json round trip, the "reserved"
selection rule, the edit it drives, and clear errors for bad settings."""
import json

import pytest
import torch

from saeuron import ops
from saeuron.concepts import ConceptTable
from saeuron.sae import SaeConfig, SparseAutoencoder
from saeuron.selection import build_concept_file
from saeuron.store import ActivationStore
from saeuron.supervision import reserve_latents, supervision_loss
from saeuron.trainer import TrainConfig, train

HP = "hp"
CONCEPTS = ("cat", "dog", "car")
PROMPTS = ["a cat", "the cat", "one cat", "a dog", "the dog", "one dog", "a car", "the car", "one car",
           "a tree", "a house"]
LABELS = ["cat"] * 3 + ["dog"] * 3 + ["car"] * 3 + [None, None]
TIMESTEPS = (801.0, 1.0)
# small and quick: 4224 rows of width 16, 48 latents, k 4; 132 steps
CFG = dict(k=4, num_latents=48, batch_size=128, lr=1e-2, epochs=4, log_every=4, save_every=1000, seed=0)


def planted_store(root, labels=LABELS, batches=12, tokens=16, seed=0):
    """Tokens = 2 of 24 random atoms (positive weights) + noise; each concept adds its own direction (weight 1.5-2)
    to its prompts' rows, unlabelled prompts add none. Returns (store, concept directions [3, d])."""
    d = 16
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(24, d, generator=g), dim=1)
    dirs = torch.nn.functional.normalize(torch.randn(len(CONCEPTS), d, generator=g), dim=1)
    store = ActivationStore.create(root, {HP: d}, PROMPTS, labels)
    for b in range(batches):
        xs, ts, ps = [], [], []
        for t in TIMESTEPS:
            for p, lab in enumerate(LABELS):
                pick = torch.rand(tokens, 24, generator=g).argsort(1)[:, :2]
                coef = torch.zeros(tokens, 24).scatter_(1, pick, 0.5 + torch.rand(tokens, 2, generator=g))
                x = coef @ atoms + 0.02 * torch.randn(tokens, d, generator=g)
                if lab is not None:
                    x += (1.5 + 0.5 * torch.rand(tokens, 1, generator=g)) * dirs[CONCEPTS.index(lab)]
                xs.append(x), ts.append(torch.full((tokens,), t)), ps.append(torch.full((tokens,), p))
        store.write_batch(b, {HP: {"x": torch.cat(xs), "timestep": torch.cat(ts), "prompt_id": torch.cat(ps)}})
    store.close()
    return ActivationStore(root), dirs


def rows_of(store):
    parts = [store.read_shard(HP, i) for i in range(len(store.shard_paths(HP)))]
    return {k: torch.cat([p[k] for p in parts]) for k in ("x", "timestep", "prompt_id")}


def fire_rates(sae, rows, latent):
    """Per concept (and for the unlabelled prompts, last): the share of its rows on which ``latent`` is in the
    per-token top k with a value > 0 (inference-time encoding)."""
    vals, idx = sae.encode(rows["x"])
    fires = ((idx == latent) & (vals > 0)).any(1)
    out = []
    for group in [[i for i, lab in enumerate(LABELS) if lab == c] for c in CONCEPTS] + [[9, 10]]:
        m = torch.isin(rows["prompt_id"], torch.tensor(group))
        out.append(fires[m].float().mean().item())
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One planted store; a supervised and an unsupervised SAE on it (same seed)."""
    root = tmp_path_factory.mktemp("sup")
    store, dirs = planted_store(root / "store")
    sup = train(store, root / "sup", HP, TrainConfig(**CFG, concept_supervision=1.0), progress=False)
    plain = train(store, root / "plain", HP, TrainConfig(**CFG), progress=False)
    return store, sup, plain, root


# --------------------------------------------------------------------------- the loss

def test_supervision_loss_pushes_own_latents_in_and_others_out():
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)  # row 2: two concepts, row 3: none
    z = torch.tensor([[0.0, 0.5], [2.0, 0.0], [0.0, 0.0], [5.0, 5.0]], requires_grad=True)
    loss = supervision_loss(z, targets, theta, 1)
    loss.backward()
    g = z.grad
    assert g[0, 0] < 0 and g[0, 1] > 0  # own latent up (below theta + margin), the other's positive value down
    assert g[1, 1] < 0 and g[1, 0] > 0
    assert g[2, 0] < 0 and g[2, 1] < 0  # both concepts of a two-concept row are pushed in
    assert torch.equal(g[3], torch.zeros(2))  # an unlabelled row adds nothing
    # satisfied: own latents far above theta + margin, the others <= 0: only the (tiny) cross-entropy is left
    ok = supervision_loss(torch.tensor([[50.0, -1.0], [-1.0, 50.0]]), targets[:2], theta[:2], 1)
    assert 0 <= ok.item() < 1e-6
    none = torch.zeros(3, 2, requires_grad=True)
    out = supervision_loss(none, torch.zeros(3, 2, dtype=torch.bool), torch.ones(3), 1)
    out.backward()
    assert out.item() == 0 and torch.equal(none.grad, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="2 concepts x 2 latents"):
        supervision_loss(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool), torch.ones(3), 2)


def test_reservation_layout():
    assert reserve_latents(["a", "b", "c"], 2, 16, 4) == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}


# --------------------------------------------------------------------------- training

def test_reserved_latents_bind_to_their_concepts(trained):
    store, sup, plain, root = trained
    assert sup.cfg.concept_latents == {"cat": [0], "dog": [1], "car": [2]}
    assert plain.cfg.concept_latents is None
    rows = rows_of(store)
    for c, name in enumerate(CONCEPTS):
        rates = fire_rates(sup, rows, c)
        own, others = rates[c], max(r for j, r in enumerate(rates[:3]) if j != c)
        assert own >= 0.95 and others <= 0.05, (name, rates)
    # the unsupervised SAE's latents 0..2 are not bound to these concepts
    gaps = []
    for c in range(3):
        rates = fire_rates(plain, rows, c)
        gaps.append(rates[c] - max(r for j, r in enumerate(rates[:3]) if j != c))
    assert min(gaps) < 0.5, gaps
    logs = [json.loads(line) for line in (root / "sup" / HP / "metrics.jsonl").read_text().splitlines()]
    assert all("sup" in r for r in logs) and logs[-1]["sup"] < logs[0]["sup"]
    assert sup.fvu(rows["x"]) < plain.fvu(rows["x"]) + 0.05  # reconstruction is hardly worse
    assert all("sup" not in json.loads(line) for line in (root / "plain" / HP / "metrics.jsonl").read_text().splitlines())


def test_flag_off_is_the_unsupervised_trainer(tmp_path, monkeypatch):
    """Weight 0 never reaches the supervision code (so the run is the unsupervised trainer's, step for step) and
    gives the same weights and files as a config that does not mention supervision."""
    import importlib

    tr = importlib.import_module("saeuron.trainer")
    store, _ = planted_store(tmp_path / "store", batches=3)
    cfg = dict(CFG, epochs=1, batch_size=64)
    ref = train(store, tmp_path / "a", HP, TrainConfig(**cfg), progress=False)

    def boom(*a, **k):
        raise AssertionError("supervision code ran with the flag off")
    for name in ("supervision_loss", "membership", "reserve_latents", "row_thresholds"):
        monkeypatch.setattr(tr, name, boom)
    off = train(store, tmp_path / "b", HP, TrainConfig(**cfg, concept_supervision=0.0, latents_per_concept=3),
                progress=False)
    for k, v in ref.state_for_disk().items():
        assert torch.equal(v, off.state_for_disk()[k]), k
    cfg_a = json.loads((tmp_path / "a" / HP / "cfg.json").read_text())
    assert cfg_a == json.loads((tmp_path / "b" / HP / "cfg.json").read_text()) and "concept_latents" not in cfg_a
    assert (tmp_path / "a" / HP / "metrics.jsonl").read_text() == (tmp_path / "b" / HP / "metrics.jsonl").read_text()


class _Interrupt(Exception):
    pass


def test_supervised_resume_matches_uninterrupted(tmp_path, monkeypatch):
    store, _ = planted_store(tmp_path / "store", batches=3)
    cfg = TrainConfig(**dict(CFG, epochs=2, batch_size=64, save_every=4), concept_supervision=1.0)
    full = train(store, tmp_path / "full", HP, cfg, progress=False)
    orig, fetched = store.iter_batches, [0]

    def interrupted(*args, **kw):
        for batch in orig(*args, **kw):
            if fetched[0] == 14:  # the last checkpoint is step 12, in the second epoch
                raise _Interrupt
            fetched[0] += 1
            yield batch
    monkeypatch.setattr(store, "iter_batches", interrupted)
    with pytest.raises(_Interrupt):
        train(store, tmp_path / "cut", HP, cfg, progress=False)
    monkeypatch.setattr(store, "iter_batches", orig)
    with pytest.raises(ValueError, match="concept_supervision: saved 1.0, now 2.0"):
        train(store, tmp_path / "cut", HP, TrainConfig(**dict(CFG, epochs=2, batch_size=64, save_every=4),
                                                       concept_supervision=2.0), progress=False)
    resumed = train(store, tmp_path / "cut", HP, cfg, progress=False)
    for name, a in full.state_for_disk().items():
        torch.testing.assert_close(a, resumed.state_for_disk()[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.cfg.concept_latents == full.cfg.concept_latents


def test_concepts_dict_on_an_unlabelled_store_and_multi_concept_prompts(tmp_path):
    store, _ = planted_store(tmp_path / "store", labels=None, batches=2)
    # a prompt may belong to two concepts (an object and a style, say): "a cat" is both "cat" and "small"
    concepts = {"cat": ["a cat", "the cat", "one cat"], "dog": ["a dog", "the dog"], "small": ["a cat", 3]}
    sae = train(store, tmp_path / "o", HP, TrainConfig(**dict(CFG, epochs=1, batch_size=64, max_steps=3),
                                                       concept_supervision=0.5, latents_per_concept=2),
                concepts=concepts, progress=False)
    assert sae.cfg.concept_latents == {"cat": [0, 1], "dog": [2, 3], "small": [4, 5]}
    assert SparseAutoencoder.load(tmp_path / "o" / HP).cfg.concept_latents == sae.cfg.concept_latents


# --------------------------------------------------------------------------- cfg.json

def test_reservation_round_trips_and_old_checkpoints_load(tmp_path, trained):
    _, sup, plain, _ = trained
    sup.save(tmp_path / "s")
    raw = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert raw["concept_latents"] == {"cat": [0], "dog": [1], "car": [2]}
    back = SparseAutoencoder.load(tmp_path / "s")
    assert back.cfg.concept_latents == sup.cfg.concept_latents and back.fingerprint() == sup.fingerprint()
    plain.save(tmp_path / "p")
    assert "concept_latents" not in json.loads((tmp_path / "p" / "cfg.json").read_text())
    assert SparseAutoencoder.load(tmp_path / "p").cfg.concept_latents is None  # a missing field: unsupervised
    for bad, msg in (({"cat": [0], "dog": [0]}, "reserved for both"), ({"cat": [48]}, "outside the SAE's 48"),
                     ({"cat": []}, "non-empty list"), ([0, 1], "must be an object")):
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**raw, "concept_latents": bad}))
        with pytest.raises(ValueError, match=msg):
            SparseAutoencoder.load(tmp_path / "s")
    assert SaeConfig.from_json({"d_in": 4, "k": 1, "concept_latents": {"a": [2]}}).concept_latents == {"a": [2]}


# --------------------------------------------------------------------------- selection and the edit

def test_selection_picks_the_reserved_latents_and_the_edit_spares_other_concepts(tmp_path, trained):
    store, sup, plain, _ = trained
    table = build_concept_file(store, {HP: sup}, tmp_path / "ck", top_n=3, reserved=True, progress=False)
    back = ConceptTable.load(tmp_path / "ck")
    assert back.reservation(HP) == {"cat": [0], "dog": [1], "car": [2]}
    for c, name in enumerate(CONCEPTS):
        assert back.defaults[name]["reserved"] is True and back.rule(name) == ("reserved", True)
        assert [s.tolist() for s in back.select(HP, name)] == [[c]] * len(TIMESTEPS)
        assert back.rule(name, top_n=3) == ("top_n", 3)  # an explicit rule still wins
        assert back.rule(name, reserved=False) == ("top_n", 3)
    ts, fi, tau, sc = back.edit_tables(HP, ["dog"])
    assert fi.tolist() == [[1]] * len(TIMESTEPS) and bool((sc < 0).all()) and bool((tau > 0).all())
    # the edit the patch hook applies (ops.edit_), per timestep: dog's tokens change, cat's and car's do not
    rows = rows_of(store)
    W = sup.weights_for("cpu", torch.float32)
    for t_i, t in enumerate(ts.tolist()):
        at = rows["timestep"] == t
        x = rows["x"][at].clone()
        y = x.clone()
        ops.edit_(y, *W, sup.cfg.k, fi[t_i], tau[t_i], sc[t_i])
        changed = (y != x).any(1)
        pid = rows["prompt_id"][at]
        dog = torch.isin(pid, torch.tensor([3, 4, 5]))
        assert changed[dog].float().mean() >= 0.9
        others = torch.isin(pid, torch.tensor([0, 1, 2, 6, 7, 8]))  # cat's and car's (unlabelled rows: unsupervised)
        assert changed[others].float().mean() <= 0.01
    # an unsupervised file carries no "reserved" key; asking for reserved there is a clear error
    plain_tab = build_concept_file(store, {HP: plain}, tmp_path / "plain", top_n=3, progress=False)
    assert "reserved" not in plain_tab.defaults["cat"] and plain_tab.rule("cat") == ("top_n", 3)
    with pytest.raises(ValueError, match="reserves no latents"):
        plain_tab.select(HP, "cat", reserved=True)
    with pytest.raises(ValueError, match="none of the SAEs"):
        build_concept_file(store, {HP: plain}, tmp_path / "plain2", top_n=3, reserved=True, progress=False)
    with pytest.raises(ValueError, match="reserves no latents"):
        ConceptTable(table.names, table.counts, table.timesteps, table.mu, {"reserved": True})  # no metadata
    assert table.names == list(CONCEPTS)


# --------------------------------------------------------------------------- bad settings

def test_bad_settings_fail_clearly_where_they_enter(tmp_path):
    labelled, _ = planted_store(tmp_path / "l", batches=1)
    with pytest.raises(ValueError, match="concept_supervision .* >= 0"):
        TrainConfig(concept_supervision=-1.0).validate()
    with pytest.raises(ValueError, match="concept_supervision .* >= 0"):
        TrainConfig(concept_supervision=float("nan")).validate()
    with pytest.raises(ValueError, match="latents_per_concept must be an integer >= 1"):
        TrainConfig(latents_per_concept=0).validate()
    small = dict(CFG, batch_size=64)
    with pytest.raises(ValueError, match="3 concepts = 6 latents, more than the SAE's 4"):
        train(labelled, tmp_path / "a", HP, TrainConfig(**dict(small, num_latents=4, k=2), concept_supervision=1.0,
                                                        latents_per_concept=2), progress=False)
    with pytest.raises(ValueError, match="latents_per_concept=5 exceeds k=4"):
        train(labelled, tmp_path / "b", HP, TrainConfig(**small, concept_supervision=1.0, latents_per_concept=5),
              progress=False)
    with pytest.raises(ValueError, match="not a tensor of tokens"):
        train(torch.randn(256, 16), tmp_path / "c", HP, TrainConfig(**small, concept_supervision=1.0), progress=False)
    unlabelled, _ = planted_store(tmp_path / "u", labels=None, batches=1)
    with pytest.raises(ValueError, match="needs concept labels"):
        train(unlabelled, tmp_path / "d", HP, TrainConfig(**small, concept_supervision=1.0), progress=False)
    with pytest.raises(ValueError, match="only matters for concept-supervised training"):
        train(labelled, tmp_path / "e", HP, TrainConfig(**small), concepts={"cat": ["a cat"]}, progress=False)
    for folder in "abcde":
        assert not (tmp_path / folder / HP / "sae.safetensors").exists()


def test_cli_flags(tmp_path):
    from saeuron.cli import build_parser, main

    a = build_parser().parse_args(["train", "--store", "s", "--out", "o"])
    assert a.concept_supervision == 0.0 and a.latents_per_concept == 1 and a.concepts is None
    assert build_parser().parse_args(["select", "--store", "s", "--checkpoint", "c"]).reserved is False
    with pytest.raises(SystemExit, match="concept_supervision .* >= 0"):
        main(["train", "--store", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--concept-supervision", "-1"])
    store, _ = planted_store(tmp_path / "store", batches=2)
    main(["train", "--store", str(store.root), "--out", str(tmp_path / "ck"), "--k", "4", "--num-latents", "48",
          "--batch-size", "64", "--device", "cpu", "--concept-supervision", "1", "--latents-per-concept", "1"])
    assert SparseAutoencoder.load(tmp_path / "ck" / HP).cfg.concept_latents == {"cat": [0], "dog": [1], "car": [2]}
    main(["select", "--store", str(store.root), "--checkpoint", str(tmp_path / "ck"), "--top-n", "2", "--reserved",
          "--device", "cpu"])
    tab = ConceptTable.load(tmp_path / "ck")
    assert all(tab.defaults[c]["reserved"] is True for c in CONCEPTS)


# --------------------------------------------------------------------------- DDP

def _ddp_rank(rank: int, world: int, out: str) -> None:
    """One gloo rank of :func:`test_ddp_with_supervision_ranks_agree`: supervised training from the shared store."""
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank, world_size=world)
    try:
        store = ActivationStore(os.path.join(out, "store"))
        sae = train(store, os.path.join(out, f"rank{rank}"), HP, TrainConfig(**CFG, concept_supervision=1.0),
                    progress=False)
        save_file({k: v.contiguous() for k, v in sae.state_for_disk().items()}, os.path.join(out, f"w{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_main(out: str) -> None:
    import torch.multiprocessing as mp

    planted_store(f"{out}/store")
    mp.spawn(_ddp_rank, args=(2, out), nprocs=2, join=True)


def test_ddp_with_supervision_ranks_agree(tmp_path):
    """Two gloo ranks, each supervising its own rows: the ranks end with the same weights, only rank 0 writes, and
    the reserved latents bind to their concepts."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    tests = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(tests)!r}); import test_concept_supervision as t; t._ddp_main({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tests.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "w0.safetensors"), load_file(tmp_path / "w1.safetensors")
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert not (tmp_path / "rank1").exists()
    sae = SparseAutoencoder.load(tmp_path / "rank0" / HP)
    assert sae.cfg.concept_latents == {"cat": [0], "dog": [1], "car": [2]}
    rows = rows_of(ActivationStore(tmp_path / "store"))
    for c in range(3):
        rates = fire_rates(sae, rows, c)
        assert rates[c] >= 0.9 and max(r for j, r in enumerate(rates[:3]) if j != c) <= 0.05, rates


# --------------------------------------------------------------------------- the patch

def test_patch_on_a_tiny_pipeline_edits_through_the_reserved_latent_only(tiny_pipe):
    """patch() turns a "reserved" concept file into edit tables of just the concept's latent: unlearning "cat",
    whose latent fires on every token, changes the sample; unlearning "dog", whose latent never fires, leaves it
    bit for bit unchanged."""
    from conftest import make_sae
    from saeuron.patching import patched

    up, ts = "up_blocks.1.attentions.1", [667.0, 334.0, 1.0]  # the tiny pipeline's DDIM timesteps at 3 steps
    sae = make_sae(32, 128, 4, seed=1)
    sae.cfg.concept_latents = {"cat": [0], "dog": [1]}
    with torch.no_grad():
        sae.encoder.bias[0] = 100.0
        sae.encoder.bias[1] = -1e4
    mu = torch.rand(2, len(ts), 128, generator=torch.Generator().manual_seed(0)) * 1e-3
    mu[0, :, 0] = mu[1, :, 1] = 1.0
    meta = {"hookpoint_sae": {up: {"d_in": 32, "k": 4, "dtype": "float32",
                                   "fingerprints": {"float32": sae.fingerprint(torch.float32)},
                                   "concept_latents": sae.cfg.concept_latents}}}
    table = ConceptTable(["cat", "dog"], [1, 1], ts, {up: mu}, {"reserved": True, "top_n": 8}, meta)

    def run():
        return tiny_pipe("a cat", num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images
    base = run()
    with patched(tiny_pipe, "cat", saes={up: sae}, table=table) as handle:
        assert handle.table(up)[0].tolist() == [[0]] * len(ts)
        cat = run()
    with patched(tiny_pipe, "dog", saes={up: sae}, table=table) as handle:
        assert handle.table(up)[0].tolist() == [[1]] * len(ts)
        dog = run()
    assert not torch.equal(base, cat) and torch.equal(base, dog)
