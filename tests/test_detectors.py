"""Image-level concept detectors (saeuron.detectors) and ``mode="probe_uncond"``: image codes equal the dense
definition on random inputs of several shapes and dtypes, prompt codes equal per-prompt means of a store, the fit
separates a planted concept, sparse detectors read the ReLU pre-activations of the latents a first fit weighs most,
files round-trip and refuse what is wrong, and in a UNet the flag is the detector's
decision on the first hooked block's output, flagged images' conditional maps become the unconditional ones at every
hooked block, and nothing changes when nothing is flagged."""
import json

import pytest
import torch

from conftest import make_sae
from saeuron import reference
from saeuron.concepts import ConceptTable
from saeuron.detectors import (DEFAULT_LATENTS, JSON_FILE, LATENTS, TENSORS_FILE, Detectors, exclusive_groups,
                               fit_detectors, fit_softmax, group_classes, image_codes, image_relu_means, pick_latents,
                               prompt_codes)
from saeuron.patching import patched
from saeuron.selection import build_concept_file
from saeuron.store import ActivationStore

UP = "up_blocks.1.attentions.1"  # 32 channels in the tiny pipeline
MID = "mid_block.attentions.0"  # 64 channels; runs before UP
TS = [667.0, 334.0, 1.0]


def _dense_codes(sae, tok):
    """The dense top-k code of each token, by the definition (fp32)."""
    xn = sae.preprocess(tok.float())[0]
    pre = reference.preacts(xn, sae.encoder.weight.float(), sae.encoder.bias.float(), sae.b_dec.float())
    v, i = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter_(1, i, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,unit_norm", [((3, 16, 4, 4), False), ((2, 16, 5, 3), True), ((4, 7, 16), False)])
def test_image_codes_are_each_images_mean_dense_code(dtype, shape, unit_norm):
    sae = make_sae(16, 64, 4, seed=sum(shape))
    sae.cfg.input_unit_norm = unit_norm
    g = torch.Generator().manual_seed(len(shape) + int(unit_norm))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    got = image_codes(sae.to(dtype), x)
    sae = sae.float()
    tok = reference.as_tokens(x) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
    want = _dense_codes(sae, tok.float()).view(shape[0], -1, 64).mean(1)
    assert got.shape == (shape[0], 64) and got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert (want > 0).sum() > shape[0]  # not vacuous


def _dense_relu(sae, tok):
    """Every latent's ReLU pre-activation of each token, by the definition (fp32)."""
    xn = sae.preprocess(tok.float())[0]
    return reference.preacts(xn, sae.encoder.weight.float(), sae.encoder.bias.float(), sae.b_dec.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,unit_norm,lat", [((3, 16, 4, 4), False, [0, 5, 63]), ((2, 16, 5, 3), True, [7]),
                                                 ((4, 7, 16), False, list(range(0, 64, 3)))])
def test_image_relu_means_are_each_images_mean_relu_preactivation(dtype, shape, unit_norm, lat):
    sae = make_sae(16, 64, 4, seed=sum(shape) + 1)
    sae.cfg.input_unit_norm = unit_norm
    g = torch.Generator().manual_seed(len(shape) + len(lat))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    got = image_relu_means(sae.to(dtype), x, torch.tensor(lat))
    sae = sae.float()
    tok = reference.as_tokens(x) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
    want = _dense_relu(sae, tok.float())[:, lat].view(shape[0], -1, len(lat)).mean(1)
    assert got.shape == (shape[0], len(lat)) and got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert (want > 0).sum() >= shape[0]  # not vacuous


def _store(root, d=32, seed=0, hps=(UP,)):
    """cat prompts carry one encoder direction of the SAE, dog and unlabelled prompts are noise; unequal token counts."""
    prompts = ["a cat", "the cat", "a dog", "the dog", "a car", "one cat", "one dog", "my car"]
    labels = ["cat", "cat", "dog", "dog", None, "cat", "dog", None]
    store = ActivationStore.create(root, {h: d for h in hps}, prompts, labels)
    g = torch.Generator().manual_seed(seed)
    for b, t in enumerate(TS):
        batch = {}
        for h in hps:
            xs, ts, ps = [], [], []
            for p in range(len(prompts)):
                n = 3 + p % 3
                x = torch.randn(n, d, generator=g)
                if labels[p] == "cat":
                    x[:, 5] += 4.0
                xs.append(x), ts.append(torch.full((n,), t)), ps.append(torch.full((n,), p))
            batch[h] = {"x": torch.cat(xs), "timestep": torch.cat(ts), "prompt_id": torch.cat(ps)}
        store.write_batch(b, batch)
    return ActivationStore(root)


def test_prompt_codes_are_per_prompt_means(tmp_path):
    sae = make_sae(32, 96, 4, seed=5)
    store = _store(tmp_path / "s")
    ts, codes, present = prompt_codes(store, sae, UP, batch_size=7, progress=False)
    assert ts.tolist() == sorted(TS, reverse=True) and codes.shape == (3, 8, 96) and bool(present.all())
    rows = [store.read_shard(UP, i) for i in range(len(store.shard_paths(UP)))]
    x, t, p = (torch.cat([r[k] for r in rows]) for k in ("x", "timestep", "prompt_id"))
    f = _dense_codes(sae, x.float())
    for ti, tv in enumerate(ts.tolist()):
        for q in range(8):
            torch.testing.assert_close(codes[ti, q], f[(t == tv) & (p == q)].mean(0), atol=1e-5, rtol=1e-5)


def test_prompt_relu_means_are_per_prompt_means(tmp_path):
    sae = make_sae(32, 96, 4, seed=6)
    store = _store(tmp_path / "s", seed=2)
    ts, codes, present = prompt_codes(store, sae, UP, batch_size=5, progress=False, kind="relu")
    assert codes.shape == (3, 8, 96) and bool(present.all())
    rows = [store.read_shard(UP, i) for i in range(len(store.shard_paths(UP)))]
    x, t, p = (torch.cat([r[k] for r in rows]) for k in ("x", "timestep", "prompt_id"))
    f = _dense_relu(sae, x.float())
    for ti, tv in enumerate(ts.tolist()):
        for q in range(8):
            torch.testing.assert_close(codes[ti, q], f[(t == tv) & (p == q)].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kind must be 'topk' or 'relu'"):
        prompt_codes(store, sae, UP, kind="dense")


def test_pick_latents_takes_the_largest_summed_weights():
    w = torch.zeros(2, 3, 6)
    w[0, 1, 4] = 5.0
    w[1, 2, 1] = -3.0  # counts by magnitude
    w[0, 0, 2], w[1, 0, 2] = 1.0, 1.5  # summed over timesteps and classes: 2.5
    w[0, 0, 5] = 2.5  # a tie with latent 2: the lower index wins
    assert pick_latents(w, 3).tolist() == [1, 2, 4]
    assert pick_latents(w, 1).tolist() == [4]
    assert pick_latents(w, 6).tolist() == pick_latents(w, 9).tolist() == list(range(6))


def test_sparse_detectors_fit_round_trip_and_read_only_their_latents(tmp_path):
    from saeuron.cli.common import DETECTOR_LATENTS

    assert DETECTOR_LATENTS == DEFAULT_LATENTS  # the parser's default, kept without importing torch
    ck = tmp_path / "ck"
    sae = make_sae(32, 96, 4, seed=5)
    sae.save(ck / UP)
    store = _store(tmp_path / "s")
    det = fit_detectors(store, ck, latents=6, steps=100, progress=False)
    lat = det.parts[UP][LATENTS]
    assert lat.dtype == torch.long and lat.numel() == 6 and lat.tolist() == sorted(set(lat.tolist()))
    assert det.parts[UP]["weight"].shape == (3, 3, 6)
    assert det.metadata["fit"]["latents"] == 6 and "ReLU" in det.metadata["fit"]["features"]
    assert det.metadata["train_accuracy_min_over_timesteps"][UP]["cat+dog"] == 1.0  # the planted concept is found
    assert det.metadata["all_latents_train_accuracy_min"][UP] == 1.0
    # the latents are the ones a fit on every latent's ReLU mean weighs most
    _, codes, present = prompt_codes(store, sae, UP, progress=False, kind="relu")
    y = torch.zeros(8, 2, dtype=torch.bool)
    y[[0, 1, 5], 0] = True
    y[[2, 3, 6], 1] = True
    assert torch.equal(lat, pick_latents(fit_softmax(codes, y, present, steps=100)["weight"], 6))
    back = Detectors.load(ck)
    assert torch.equal(back.parts[UP][LATENTS], lat) and back.fingerprint() == det.fingerprint()
    assert json.loads((ck / JSON_FILE).read_text())["version"] == 2
    x = torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(back.image_features(UP, sae, x), image_relu_means(sae, x, lat))
    torch.testing.assert_close(_hand_detectors(96, 0).image_features(UP, sae, x), image_codes(sae, x))
    other = Detectors(det.names, det.timesteps, {UP: {**det.parts[UP], LATENTS: lat.flip(0)}}, det.groups)
    assert other.fingerprint() != det.fingerprint()
    dense = fit_detectors(store, ck, latents=0, steps=100, progress=False)  # every latent's top-k code
    assert LATENTS not in dense.parts[UP] and dense.parts[UP]["weight"].shape == (3, 3, 96)
    assert "top-k" in dense.metadata["fit"]["features"] and "all_latents_train_accuracy_min" not in dense.metadata
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="latents must be a whole number"):
            fit_detectors(store, ck, latents=bad, progress=False)
    # refused where they enter
    part = det.parts[UP]
    for bad, msg in ((lat.float(), "1-D integer"), (lat[:0], "1-D integer"),
                     (torch.tensor([1, 1, 2, 3, 4, 5]), "distinct"), (torch.tensor([-1, 1, 2, 3, 4, 5]), "distinct"),
                     (lat[:5], "5 latents for weights over 6")):
        with pytest.raises(ValueError, match=msg):
            Detectors(det.names, det.timesteps, {UP: {**part, LATENTS: bad}}, det.groups)
    far = Detectors(det.names, det.timesteps, {UP: {**part, LATENTS: torch.tensor([1, 2, 3, 4, 5, 96])}}, det.groups)
    with pytest.raises(ValueError, match="read latent 96 but the SAE has 96"):
        far.check(UP, sae, det.timesteps)
    det.check(UP, sae, det.timesteps)


def test_version_1_files_still_load(tmp_path):
    det = _hand_detectors(96, 0.3)
    det.save(tmp_path)
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    (tmp_path / JSON_FILE).write_text(json.dumps({**meta, "version": 1}))
    back = Detectors.load(tmp_path)
    assert LATENTS not in back.parts[UP] and back.fingerprint() == det.fingerprint()


def test_exclusive_groups_and_classes():
    # prompts: (object, style or none); objects a b c exclusive, styles x y exclusive, some prompts unstyled
    held = [("a", "x"), ("b", "x"), ("c", "y"), ("a", None), ("b", "y"), ("c", None)]
    names = ["a", "b", "c", "x", "y"]
    t = torch.tensor([[n in pair for n in names] for pair in held])
    groups = exclusive_groups(t)
    assert groups == [0, 0, 0, 1, 1]
    cls, lab = group_classes(t, groups)
    assert cls == [0, 0, 0, 1, 1, 1]  # the styles' group gets a "none" class (unstyled prompts), the objects' not
    assert lab[:, 0].tolist() == [0, 1, 2, 0, 1, 2] and lab[:, 1].tolist() == [3, 3, 4, 5, 4, 5]
    assert exclusive_groups(torch.eye(4, dtype=torch.bool)) == [0, 0, 0, 0]  # one label per prompt: one group


def test_fit_separates_planted_concepts_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    T, P, M = 2, 60, 20
    obj = torch.arange(P) % 3  # three exclusive objects, latents 3, 7, 11 planted
    sty = torch.arange(P) // 3 % 3  # style x, y, or none (latents 15, 17)
    y = torch.zeros(P, 5, dtype=torch.bool)
    y[torch.arange(P), obj] = True
    y[sty == 0, 3] = True
    y[sty == 1, 4] = True
    codes = torch.rand(T, P, M, generator=g)
    for c, lat in enumerate((3, 7, 11)):
        codes[:, obj == c, lat] += 2.0
    codes[:, sty == 0, 15] += 2.0
    codes[:, sty == 1, 17] += 2.0
    fit = fit_softmax(codes, y)
    assert fit["groups"] == [0, 0, 0, 1, 1, 1] and fit["weight"].shape == (T, 6, M) and fit["bias"].shape == (T, 6)
    assert bool((fit["accuracy"] == 1).all()), fit["accuracy"]
    assert [int(fit["weight"][0, c].argmax()) for c in range(5)] == [3, 7, 11, 15, 17]
    det = Detectors(list("abcxy"), [900.0, 100.0], {UP: {k: fit[k] for k in ("weight", "bias", "mean", "std")}},
                    fit["groups"])
    prob = det.probability(UP, codes[1], torch.tensor([1]), list("abcxy"))
    assert bool((prob[y] > 0.5).all()) and bool((prob[~y] < 0.5).all())
    torch.testing.assert_close(prob[:, :3].sum(1), torch.ones(P))  # one softmax over the objects
    assert bool((prob[:, 3:].sum(1) < 1).all())  # the styles' group also has its "none" class
    again = fit_softmax(codes, y)
    assert all(torch.equal(fit[k], again[k]) for k in ("weight", "bias", "mean", "std", "accuracy"))
    with pytest.raises(ValueError, match="have no prompts"):
        fit_softmax(codes, torch.cat([y, torch.zeros(P, 1, dtype=torch.bool)], 1))
    with pytest.raises(ValueError, match="hold every prompt"):
        fit_softmax(codes, torch.ones(P, 1, dtype=torch.bool))


def _hand_detectors(M, bias, hps=(UP,), timesteps=TS, names=("cat", "dog")):
    """Random detectors of one group of ``names`` plus its "none" class; the first concept's bias is ``bias``."""
    g = torch.Generator().manual_seed(1)
    T, K = len(timesteps), len(names) + 1
    b = torch.zeros(T, K)
    b[:, 0] = float(bias)
    return Detectors(names, timesteps, {h: {"weight": torch.randn(T, K, M, generator=g) * 0.1, "bias": b,
                                             "mean": torch.rand(T, M) * 0.1, "std": torch.ones(T, M)} for h in hps},
                     groups=[0] * K)


def test_files_round_trip_and_refuse_what_is_wrong(tmp_path):
    det = _hand_detectors(96, 0.3, hps=(UP, MID))
    det.save(tmp_path)
    back = Detectors.load(tmp_path)
    assert back.names == det.names and back.hookpoints == det.hookpoints and back.fingerprint() == det.fingerprint()
    for h in det.hookpoints:
        assert all(torch.equal(back.parts[h][k], det.parts[h][k]) for k in det.parts[h])
    other = _hand_detectors(96, 0.4)
    assert other.fingerprint() != det.fingerprint() and "fingerprint=" in repr(det)
    with pytest.raises(FileNotFoundError, match="no detectors in .*saeuron detectors"):
        Detectors.load(tmp_path / "nowhere")
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    (tmp_path / JSON_FILE).write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        Detectors.load(tmp_path)
    (tmp_path / JSON_FILE).write_text(json.dumps({**meta, "hookpoints": [UP, "down_blocks.0.attentions.0"]}))
    with pytest.raises(ValueError, match="lacks"):
        Detectors.load(tmp_path)
    assert back.groups == det.groups == [0, 0, 0]
    parts = {UP: {**det.parts[UP], "bias": torch.zeros(2, 2)}}
    with pytest.raises(ValueError, match="bias has shape"):
        Detectors(det.names, TS, parts, det.groups)
    parts = {UP: {**det.parts[UP], "std": det.parts[UP]["std"].clone().fill_(float("nan"))}}
    with pytest.raises(ValueError, match="std holds NaN"):
        Detectors(det.names, TS, parts, det.groups)
    with pytest.raises(ValueError, match="one per class"):
        Detectors(det.names, TS, det.parts, [0])
    assert (tmp_path / TENSORS_FILE).is_file()


pytestmark = pytest.mark.usefixtures("unpatched_after")  # the module pipe of conftest, unpatched after each test


def _table():
    g = torch.Generator().manual_seed(0)
    up = torch.rand(2, len(TS), 128, generator=g) * 1e-3
    mid = torch.rand(2, len(TS), 96, generator=g) * 1e-3
    return ConceptTable(["cat", "dog"], [3, 4], TS, {UP: up, MID: mid}, defaults={"top_n": 4, "multiplier": -1.0})


def _outputs(pipe, x, ehs, **kw):
    seen = {}
    hs = [pipe.unet.get_submodule(hp).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, (o[0] if isinstance(o, tuple) else o.sample).clone()))
        for n, hp in (("mid", MID), ("up", UP))]
    flag = None
    try:
        with torch.no_grad():
            if kw:
                with patched(pipe.unet, "cat", **kw) as h:
                    pipe.unet(x, TS[1], ehs)
                    flag = h.state.flag
            else:
                pipe.unet(x, TS[1], ehs)
    finally:
        for hh in hs:
            hh.remove()
    return seen, flag


@pytest.mark.parametrize("sparse", [False, True], ids=["all-latents", "sparse"])
@pytest.mark.parametrize("bias", [0.0, 40.0, -40.0])
def test_probe_flags_images_on_the_first_block_and_replaces_whole_maps(pipe, bias, sparse):
    saes = {UP: make_sae(32, 128, 4, seed=1), MID: make_sae(64, 96, 4, seed=2)}
    g = torch.Generator().manual_seed(3)
    x, ehs = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 5, 32, generator=g)
    lat = torch.tensor([3, 17, 40, 41, 90])
    det = _hand_detectors(len(lat) if sparse else 96, bias, hps=(MID,))
    if sparse:
        det = Detectors(det.names, det.timesteps, {MID: {**det.parts[MID], LATENTS: lat}}, det.groups)
    det.parts[UP] = _hand_detectors(128, -40.0).parts[UP]  # UP never flags by itself: MID decides
    plain, _ = _outputs(pipe, x, ehs)
    got, flag = _outputs(pipe, x, ehs, saes=saes, table=_table(), mode="probe_uncond", detectors=det,
                         hookpoints=[MID, UP])
    mid = plain["mid"][3:]
    codes = image_relu_means(saes[MID], mid, lat) if sparse else image_codes(saes[MID], mid)
    want = det.probability(MID, codes, torch.tensor([1]), ["cat"])[:, 0] >= 0.5  # TS[1] is index 1
    assert torch.equal(flag, want)
    if bias == 40.0:
        assert bool(flag.all())
    elif bias == -40.0:
        assert not bool(flag.any())
    assert torch.equal(got["mid"][:3], plain["mid"][:3])  # the unconditional half is never edited
    for i in range(3):
        assert torch.equal(got["mid"][3 + i], plain["mid"][i] if flag[i] else plain["mid"][3 + i])
        if flag[i]:
            assert torch.equal(got["up"][3 + i], got["up"][i])
    if not bool(flag.any()):
        assert torch.equal(got["up"], plain["up"])


def test_probe_in_a_pipeline_from_a_fitted_checkpoint_and_its_errors(pipe, tmp_path):
    ck = tmp_path / "ck"
    make_sae(32, 96, 4, seed=5).save(ck / UP)
    store = _store(tmp_path / "s")
    build_concept_file(store, ck, top_n=2, progress=False)
    det = fit_detectors(store, ck, steps=100, progress=False)
    assert det.hookpoints == [UP] and det.names == ["cat", "dog"]
    assert det.groups == [0, 0, 0]  # cat and dog never share a prompt; "a car" holds neither: a "none" class
    assert det.metadata["train_accuracy_min_over_timesteps"][UP]["cat+dog"] == 1.0  # the planted concept is found

    base = _sample(pipe)
    with patched(pipe, "cat", checkpoint=ck, mode="probe_uncond") as h:
        assert h.gate == 0.5 and isinstance(h.detectors, Detectors)
        _sample(pipe)
        assert h.state.flag.dtype == torch.bool and h.state.flag.shape == (1,)
    # flag everything: the cond map is the uncond one at the block, so the image changes; flag nothing: identical
    bias = torch.zeros(3, 3)
    bias[:, 0] = 60.0
    assert det.parts[UP][LATENTS].numel() == DEFAULT_LATENTS  # sparse by default
    always = Detectors(det.names, det.timesteps, {UP: {**det.parts[UP], "bias": bias,
                                                       "weight": torch.zeros(3, 3, DEFAULT_LATENTS)}}, det.groups)
    with patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", detectors=always) as h:
        edited = _sample(pipe)
        assert bool(h.state.flag.all())
    assert (edited - base).abs().max() > 1e-4
    never = Detectors(det.names, det.timesteps, {UP: {**always.parts[UP], "bias": -bias}}, det.groups)
    with patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", detectors=never):
        assert torch.equal(_sample(pipe), base)
    assert torch.equal(_sample(pipe), base)
    # errors, at patch time
    for bad in (0, 1.0, 1.5, True, "x"):
        with pytest.raises(ValueError, match="probe_uncond' takes the detector probability"):
            patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", gate=bad).__enter__()
    with pytest.raises(ValueError, match="detectors= belongs to mode='probe_uncond'"):
        patched(pipe, "cat", checkpoint=ck, detectors=det).__enter__()
    with pytest.raises(ValueError, match="no detector at hookpoint 'up_blocks.1.attentions.1'"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", detectors=_hand_detectors(96, 0, hps=(MID,))).__enter__()
    with pytest.raises(ValueError, match="timesteps"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_uncond",
                detectors=_hand_detectors(96, 0, timesteps=[900.0, 1.0])).__enter__()
    with pytest.raises(ValueError, match="read 128 latents"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", detectors=_hand_detectors(128, 0)).__enter__()
    renamed = Detectors(["bird", "dog"], det.timesteps, det.parts, det.groups, det.metadata)
    with pytest.raises(ValueError, match="unknown concept 'cat'.*no detector"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", detectors=renamed).__enter__()
    make_sae(32, 96, 4, seed=6).save(ck / UP)  # another SAE: the detectors (and statistics) no longer fit it
    with pytest.raises(ValueError, match="another SAE"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", detectors=det, table=_table_up()).__enter__()
    with pytest.raises(ValueError, match="needs fitted detectors"):
        patched(pipe, "cat", saes={UP: make_sae(32, 128, 4)}, table=_table(), mode="probe_uncond").__enter__()


def _sample(pipe):
    """Latents of one CFG sampling run of "a cat" (3 steps, a fixed seed)."""
    return pipe("a cat", num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _table_up():
    return ConceptTable(["cat", "dog"], [3, 4], TS, {UP: torch.rand(2, 3, 96) * 1e-3}, defaults={"top_n": 2})


def test_detectors_on_the_command_line(tmp_path, capsys):
    from saeuron.cli import build_parser, main
    from saeuron.cli.common import EDIT_MODES, patch_kwargs
    from saeuron.replace import MODES

    assert EDIT_MODES == MODES
    ck = tmp_path / "ck"
    make_sae(32, 96, 4, seed=5).save(ck / UP)
    _store(tmp_path / "s")
    assert main(["detectors", "--store", str(tmp_path / "s"), "--checkpoint", str(ck), "--steps", "50"]) in (0, None)
    assert "detectors for 2 concepts at up_blocks.1.attentions.1" in capsys.readouterr().out
    assert Detectors.load(ck).metadata["fit"]["steps"] == 50
    a = build_parser().parse_args(["minicanvas", "eval", "--out", "x", "--mode", "probe_uncond", "--gate", "0.7"])
    assert patch_kwargs(a) == {"mode": "probe_uncond", "gate": 0.7}


def test_probe_anchor_reruns_the_flagged_images_blocks_with_the_anchor_text(pipe, tmp_path):
    from saeuron.pipelines import encode_text

    saes = {UP: make_sae(32, 128, 4, seed=1), MID: make_sae(64, 96, 4, seed=2)}
    g = torch.Generator().manual_seed(4)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1), torch.randn(4, 5, 32, generator=g)  # CFG batch
    det = _hand_detectors(96, 0.0, hps=(MID,))
    det.parts[UP] = _hand_detectors(128, 0.0).parts[UP]
    blk = pipe.unet.get_submodule(MID)
    seen = {}
    h1 = blk.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("in", (a, kw)), with_kwargs=True)
    h2 = blk.register_forward_hook(lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple)
                                                                             else o.sample).clone()))
    try:
        with torch.no_grad():
            pipe.unet(x, TS[1], ehs)
            plain = seen["out"]
            for bias, want_all in ((60.0, True), (-60.0, False)):
                d = _hand_detectors(96, bias, hps=(MID,))
                d.parts[UP] = det.parts[UP]
                with patched(pipe, "cat", saes=saes, table=_table(), mode="probe_anchor", detectors=d,
                             hookpoints=[MID, UP], anchor="a dog") as h:
                    pipe.unet(x, TS[1], ehs)
                    flag = h.state.flag
                    emb = h.anchor_embeds["cat"]
                assert bool(flag.all()) if want_all else not bool(flag.any())
                got = seen["out"]
                assert torch.equal(got[:2], plain[:2])  # the unconditional half is never edited
                if not want_all:
                    assert torch.equal(got, plain)
                    continue
                a, kw = seen["in"]  # the block's inputs in this call (MID runs first: same as unpatched)
                kw = {k: (v[2:] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 4 else v) for k, v in kw.items()
                      if k != "encoder_hidden_states"}
                want = type(blk).forward(blk, a[0][2:], encoder_hidden_states=emb.expand(2, -1, -1), **kw)
                want = want[0] if isinstance(want, tuple) else want.sample
                torch.testing.assert_close(got[2:], want, rtol=1e-5, atol=1e-6)
                assert (got[2:] - plain[2:]).abs().max() > 1e-4  # the anchor's text changes the block's output
        torch.testing.assert_close(emb, encode_text(pipe, ["a dog"]))
    finally:
        h1.remove()
        h2.remove()


def test_probe_anchor_in_a_pipeline_automatic_anchor_and_errors(pipe, tmp_path):
    ck = tmp_path / "ck"
    make_sae(32, 96, 4, seed=5).save(ck / UP)
    store = _store(tmp_path / "s")
    build_concept_file(store, ck, top_n=2, progress=False)
    det = fit_detectors(store, ck, steps=100, progress=False)
    assert det.metadata["prompts"] == {"cat": "a cat", "dog": "a dog"}

    base = _sample(pipe)
    bias = torch.zeros(3, 3)
    bias[:, 0] = 60.0
    always = Detectors(det.names, det.timesteps, {UP: {**det.parts[UP], "bias": bias,
                                                       "weight": torch.zeros(3, 3, DEFAULT_LATENTS)}}, det.groups, det.metadata)
    with patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", detectors=always) as h:  # automatic: dog
        from saeuron.pipelines import encode_text
        torch.testing.assert_close(h.anchor_embeds["cat"], encode_text(pipe, ["a dog"]))
        edited = _sample(pipe)
        assert bool(h.state.flag.all())
    assert (edited - base).abs().max() > 1e-4 and torch.equal(_sample(pipe), base)
    with patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", detectors=always, anchor={"cat": "a car"}) as h:
        torch.testing.assert_close(h.anchor_embeds["cat"], encode_text(pipe, ["a car"]))
    # the concept file's own mode and anchor: patch() with no mode= follows them
    t = ConceptTable.load(ck)
    t.defaults["cat"].update(mode="probe_anchor", anchor="a car")
    with patched(pipe, "cat", saes={UP: make_sae(32, 96, 4, seed=5)}, table=ConceptTable(
            t.names, t.counts, t.timesteps, t.mu, t.defaults, t.metadata), detectors=always) as h:
        assert h.mode == "probe_anchor"
        torch.testing.assert_close(h.anchor_embeds["cat"], encode_text(pipe, ["a car"]))
    never = Detectors(det.names, det.timesteps, {UP: {**always.parts[UP], "bias": -bias}}, det.groups, det.metadata)
    with patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", detectors=never):
        assert torch.equal(_sample(pipe), base)
    with pytest.raises(ValueError, match="anchor= belongs to mode='probe_anchor'"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_uncond", anchor="a dog").__enter__()
    with pytest.raises(ValueError, match="needs the pipeline"):
        patched(pipe.unet, "cat", checkpoint=ck, mode="probe_anchor").__enter__()
    with pytest.raises(ValueError, match="missing: \\['cat'\\]"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", anchor={"dog": "a car"}).__enter__()
    with pytest.raises(ValueError, match="non-empty string"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", anchor=" ").__enter__()
    with pytest.raises(ValueError, match="every other concept of its group is being unlearned"):
        patched(pipe, ["cat", "dog"], checkpoint=ck, mode="probe_anchor").__enter__()
    # one patch: cat by probe_anchor, dog by the scale edit; cat's automatic anchor may not be dog (unlearned too)
    with pytest.raises(ValueError, match="every other concept of its group is being unlearned"):
        patched(pipe, ["cat", "dog"], checkpoint=ck, mode={"cat": "probe_anchor", "dog": "scale"},
                detectors=always).__enter__()
    with patched(pipe, ["cat", "dog"], checkpoint=ck, mode={"cat": "probe_anchor", "dog": "scale"}, detectors=always,
                 anchor="a car") as h:
        assert h.mode == {"cat": "probe_anchor", "dog": "scale"} and h.flag_concepts == ["cat"]
        assert list(h.anchor_embeds) == ["cat"] and h.hook_modes(UP) == ("probe_anchor", "scale")
        both = _sample(pipe)
        assert bool(h.state.flag.all()) and h.state.flag_concept.eq(0).all()  # detector columns: cat's alone
    with patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", detectors=always, anchor="a car"):
        cat_only = _sample(pipe)
    assert (both - cat_only).abs().max() > 0 and (cat_only - base).abs().max() > 1e-4  # dog's scale edit adds on
    with pytest.raises(ValueError, match="anchor=5"):
        patched(pipe, "cat", checkpoint=ck, mode="probe_anchor", anchor=5).__enter__()
    from saeuron.cli import build_parser
    from saeuron.cli.common import patch_kwargs
    a = build_parser().parse_args(["minicanvas", "eval", "--out", "x", "--mode", "probe_anchor", "--anchor",
                                   "circle=An image of arrow.", "ring=An image of star."])
    assert patch_kwargs(a) == {"mode": "probe_anchor", "anchor": {"circle": "An image of arrow.",
                                                                   "ring": "An image of star."}}
    a = build_parser().parse_args(["generate", "--concept", "cat", "--out", "x", "--mode", "probe_anchor", "--anchor",
                                   "a dog"])
    assert patch_kwargs(a)["anchor"] == "a dog"


def test_a_direct_unet_call_after_cfg_sampling_is_all_conditional(pipe):
    """An attack's loss calls the UNet directly, between CFG sampling runs: probe_anchor then flags and re-runs every
    image of that batch (none is an unconditional half), and the modes that need the unconditional half refuse
    clearly instead of pairing unrelated images."""
    from saeuron.evaluate.attack import attack

    saes = {UP: make_sae(32, 128, 4, seed=1), MID: make_sae(64, 96, 4, seed=2)}
    always = _hand_detectors(96, 60.0, hps=(MID,))
    always.parts[UP] = _hand_detectors(128, 60.0).parts[UP]
    g = torch.Generator().manual_seed(5)
    x, ehs = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, 32, generator=g)
    with patched(pipe, "cat", saes=saes, table=_table(), mode="probe_anchor", detectors=always, hookpoints=[MID, UP],
                 anchor="a dog") as h:
        _sample(pipe)  # the pipeline ran with CFG: its calls were [uncond, cond] batches
        assert h.state.cfg is True and h.state.flag.shape == (1,)
        with torch.no_grad():
            pipe.unet(x, TS[1], ehs)
        assert h.state.cfg is False and h.state.flag.shape == (4,) and bool(h.state.flag.all())
        with torch.no_grad():  # a batch with identical halves is a CFG batch: two conditional images
            pipe.unet(torch.cat([x[:2], x[:2]]), TS[1], ehs)
        assert h.state.cfg is True and h.state.flag.shape == (2,)
        res = attack(pipe, "a cat", torch.rand(3, 3, 64, 64) * 2 - 1, iterations=2, num_prefix_tokens=2, progress=False)
        assert len(res.loss_history) == 2 and all(torch.isfinite(torch.tensor(res.loss_history)))
        assert h.state.flag.shape == (3,)  # the attack's 3 images, all conditional (an odd batch would have failed)
    with patched(pipe, "cat", saes=saes, table=_table(), mode="probe_uncond", detectors=always, hookpoints=[MID, UP]):
        _sample(pipe)
        with pytest.raises(ValueError, match="needs a classifier-free guidance batch"):
            with torch.no_grad():
                pipe.unet(x, TS[1], ehs)
