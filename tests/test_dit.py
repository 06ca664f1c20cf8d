"""DiT denoisers (SD3, PixArt-Sigma, Flux) on tiny random pipelines: hookpoints, image-stream-only edits,
identity and exact unpatch, float flow-matching timesteps, collect -> train -> select -> patch end to end."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_sae
from saeuron import list_hookpoints, reference
from saeuron.collection import collect
from saeuron.concepts import ConceptTable
from saeuron.hookpoints import hookpoint_spellings, image_stream, normalize_hookpoint, resolve_hookpoints
from saeuron.patching import get_patch, patch, unpatch
from saeuron.selection import build_concept_file
from saeuron.trainer import TrainConfig, train
from tiny_dit import FAMILIES

HOOKPOINTS = {  # family -> {hookpoint: width}, in forward order
    "sd3": {"transformer_blocks.0": 32, "transformer_blocks.1": 32},
    "pixart": {"transformer_blocks.0": 24, "transformer_blocks.1": 24},
    "flux": {"transformer_blocks.0": 32, "single_transformer_blocks.0": 32},
}
PROMPTS = {"cat": ["a cat", "a cat in sketch style"], "dog": ["a dog", "a dog in oil painting style"]}
TOKENS = 64  # image tokens per sample at FAMILIES' sizes


@pytest.fixture(scope="module")
def pipes():
    return {fam: build() for fam, (build, _) in FAMILIES.items()}


@pytest.fixture(autouse=True)
def _clean(pipes):
    yield
    for p in pipes.values():
        unpatch(p)


def _run(pipe, fam, prompt="a cat", steps=2, guidance=5.0, seed=0):
    kw = FAMILIES[fam][1]
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **kw).images


def _saes(fam, m=96):
    return {hp: make_sae(d, m, 4, seed=i + 1) for i, (hp, d) in enumerate(HOOKPOINTS[fam].items())}


def _table(fam, ts, fires=True, m=96):
    """cat vs dog statistics at timesteps ``ts``; ``fires=False`` puts the thresholds above any activation."""
    g = torch.Generator().manual_seed(0)
    mu = {}
    for hp in HOOKPOINTS[fam]:
        x = torch.rand(2, len(ts), m, generator=g) * 1e-3
        if not fires:
            x[0, :, : m // 4] = 1e6  # cat's features: tau = 5e5, never exceeded
        mu[hp] = x
    return ConceptTable(["cat", "dog"], [2, 2], ts, mu, defaults={"top_n": 24, "multiplier": -1.0})


def _capture(module, store):
    """A torch forward hook on ``module`` appending its outputs (it runs after saeuron's hook: it sees the edit)."""
    return module.register_forward_hook(
        lambda m, a, o: store.append([t.clone() if torch.is_tensor(t) else t for t in o] if isinstance(o, tuple)
                                     else o.clone()))


def _timesteps_seen(pipe, fam, **kw):
    """The timesteps the transformer receives in one run, one per call."""
    seen = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].flatten()[0].item()),
                                                   with_kwargs=True)
    try:
        _run(pipe, fam, **kw)
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_hookpoints_per_family(pipes, fam):
    pipe = pipes[fam]
    assert dict(list_hookpoints(pipe)) == HOOKPOINTS[fam]
    assert list_hookpoints(pipe.transformer) == list_hookpoints(pipe)  # the pipeline or its denoiser
    first = next(iter(HOOKPOINTS[fam]))
    assert list(resolve_hookpoints(pipe, "transformer." + first)) == [first]
    assert normalize_hookpoint("transformer." + first) == first and "transformer." + first in hookpoint_spellings(first)
    with pytest.raises(ValueError, match=r"unknown hookpoint 'transformer_blocks\.9'.*transformer blocks are: "
                                         r"transformer_blocks\.0 \("):
        resolve_hookpoints(pipe, ["transformer_blocks.9"])
    stream = {"sd3": 1, "pixart": None, "flux": 1}[fam]  # diffusers returns (text, image) from joint blocks
    assert all(image_stream(m) == stream for m in resolve_hookpoints(pipe, list(HOOKPOINTS[fam])).values())


@pytest.mark.parametrize("fam,hp", [("sd3", "transformer_blocks.0"), ("flux", "transformer_blocks.0"),
                                    ("flux", "single_transformer_blocks.0")])
def test_joint_block_edit_changes_the_image_stream_only(pipes, fam, hp):
    pipe = pipes[fam]
    ts = _timesteps_seen(pipe, fam)
    base, edited = [], []
    h = _capture(pipe.transformer.get_submodule(hp), base)
    try:
        _run(pipe, fam)
    finally:
        h.remove()
    patch(pipe, "cat", saes=_saes(fam), table=_table(fam, ts), hookpoints=[hp])
    h = _capture(pipe.transformer.get_submodule(hp), edited)
    try:
        _run(pipe, fam)
    finally:
        h.remove()
    (text0, img0), (text1, img1) = base[0], edited[0]  # first call: the block's inputs are the same
    assert img1.shape[1] == TOKENS and text1.shape[1] != TOKENS
    assert torch.equal(text1, text0)  # the text stream is never touched
    assert (img1 - img0).abs().max() > 1e-3


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_identity_unpatch_and_no_sae_in_save_pretrained(pipes, fam, tmp_path):
    pipe = pipes[fam]
    ts = _timesteps_seen(pipe, fam)
    base = _run(pipe, fam)
    keys = set(pipe.transformer.state_dict())
    h = patch(pipe, "cat", saes=_saes(fam), table=_table(fam, ts, fires=False))
    assert all(t[0].shape[1] > 0 for t in h.tables.values())  # features are selected, they just never fire
    assert torch.equal(_run(pipe, fam), base)  # bit for bit
    patch(pipe, "cat", saes=_saes(fam), table=_table(fam, ts))
    assert (_run(pipe, fam) - base).abs().max() > 1e-3
    assert set(pipe.transformer.state_dict()) == keys
    pipe.transformer.save_pretrained(tmp_path)
    saved = set(load_file(next(tmp_path.glob("*.safetensors"))))
    assert saved == keys and not any("W_dec" in k or "b_dec" in k for k in saved)
    assert unpatch(pipe) is True and get_patch(pipe) is None
    assert torch.equal(_run(pipe, fam), base)


def _direct_inputs(fam, b):
    """Random keyword inputs for a bare call of ``fam``'s transformer on ``b`` samples (timestep left out)."""
    g = torch.Generator().manual_seed(3)
    kw = dict(encoder_hidden_states=torch.randn(b, 5, 32, generator=g), return_dict=False)
    if fam == "sd3":
        kw.update(hidden_states=torch.randn(b, 4, 16, 16, generator=g),
                  pooled_projections=torch.randn(b, 64, generator=g))
    elif fam == "pixart":
        kw.update(hidden_states=torch.randn(b, 4, 32, 32, generator=g), added_cond_kwargs={"resolution": None,
                                                                                             "aspect_ratio": None})
    else:
        side = torch.arange(8.0)
        img_ids = torch.stack([torch.zeros(64), side.repeat_interleave(8), side.repeat(8)], 1)
        kw.update(hidden_states=torch.randn(b, 64, 4, generator=g), pooled_projections=torch.randn(b, 32, generator=g),
                  img_ids=img_ids, txt_ids=torch.zeros(5, 3))
    return kw


def _one(kw, i):
    return {k: (v[i:i + 1] if torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v) for k, v in kw.items()}


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_per_sample_timesteps_and_halves_on_the_bare_transformer(pipes, fam):
    """Each sample's L tokens get its own timestep's table row; on a bare DiT an even batch is [uncond, cond]."""
    tr = pipes[fam].transformer
    ts = [1.0, 0.5, 0.001] if fam == "flux" else [999.0, 500.0, 1.0]
    saes, table = _saes(fam), _table(fam, ts)
    kw = _direct_inputs(fam, 2)
    with torch.no_grad():
        plain = tr(timestep=torch.tensor([ts[0], ts[0]]), **kw)[0]
        h = patch(tr, "cat", saes=saes, table=table)
        both = tr(timestep=torch.tensor([ts[0], ts[2]]), **kw)[0]
        assert h.last_index.tolist() == [0, 2]
        one = [tr(timestep=torch.tensor([t]), **_one(kw, i))[0] for i, t in ((0, ts[0]), (1, ts[2]))]
        torch.testing.assert_close(both, torch.cat(one), rtol=1e-4, atol=1e-4)
        assert (both[0] - plain[0]).abs().max() > 1e-3
        if fam == "flux":
            return  # halves: see test_flux_halves_other_than_both_are_refused
        patch(tr, "cat", saes=saes, table=table, halves="cond")
        cond = tr(timestep=torch.tensor([ts[0], ts[0]]), **kw)[0]
    assert torch.equal(cond[0], plain[0]) and (cond[1] - plain[1]).abs().max() > 1e-3


def test_flow_matching_float_timesteps_pick_the_nearest_row():
    """SD3 with a shifted flow-matching scheduler: float timesteps, other step count than recorded."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = FAMILIES["sd3"][0]()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    recorded = _timesteps_seen(pipe, "sd3", steps=3)
    assert any(t != round(t) for t in recorded)  # really float timesteps
    h = patch(pipe, "cat", saes=_saes("sd3"), table=_table("sd3", recorded))
    got, want = [], []

    def spy(module, args, kwargs, out):
        t = kwargs["timestep"]
        got.append(h.last_index.tolist())
        want.append([min(range(3), key=lambda j: abs(recorded[j] - float(v))) for v in t.flatten()])

    s = pipe.transformer.register_forward_hook(spy, with_kwargs=True)
    try:
        _run(pipe, "sd3", steps=5)
    finally:
        s.remove()
    assert got == want and len(got) == 5
    assert {row[0] for row in got} == {0, 1, 2}  # 5 steps walk over all 3 recorded timesteps


def _fired_delta(sae, x, rows):
    """Reference edit (``x + delta``) of the tokens ``x [N, d]`` with one table row ``(fi, tau, scale)``."""
    fi, ta, sc = rows
    w = sae.weights_for(x.device, x.dtype)
    return reference.edit_delta(x, *w, sae.cfg.k, fi[:1], ta[:1], sc[:1], x.shape[0])


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_collect_train_select_patch_end_to_end(pipes, fam, tmp_path):
    pipe = pipes[fam]
    hps = list(HOOKPOINTS[fam])
    store = collect(pipe, PROMPTS, tmp_path / "store", hps, batch_size=2, num_inference_steps=2, guidance_scale=5.0,
                    progress=False, **{k: v for k, v in FAMILIES[fam][1].items() if k in ("height", "width")})
    sched = pipe.scheduler.timesteps.float()  # the last run's timesteps
    want = sched / 1000 if fam == "flux" else sched  # Flux's transformer receives sigma = timestep / 1000
    for hp in hps:
        assert store.num_rows(hp) == 4 * 2 * TOKENS and store.d_in(hp) == HOOKPOINTS[fam][hp]
    rows = store.read_shard(hps[0], 0)
    assert sorted(set(rows["timestep"].tolist())) == sorted(want.tolist())
    cfg = TrainConfig(k=4, num_latents=64, batch_size=128, max_steps=8, save_every=10_000, log_every=10_000)
    ckpt = tmp_path / "ckpt"
    for hp in hps:
        train(store, ckpt, hp, cfg, device="cpu", progress=False)
    table = build_concept_file(store, ckpt, top_n=4, percentile=None, multiplier=-5.0, progress=False)
    assert sorted(table.timesteps.tolist()) == sorted(want.tolist())

    hp = hps[0]  # the first block: its inputs at the first call do not depend on the edit
    base, edited = [], []
    h = _capture(pipe.transformer.get_submodule(hp), base)
    try:
        plain = _run(pipe, fam, prompt="a cat", seed=1)
    finally:
        h.remove()
    handle = patch(pipe, "cat", checkpoint=ckpt)
    h = _capture(pipe.transformer.get_submodule(hp), edited)
    try:
        out = _run(pipe, fam, prompt="a cat", seed=1)
    finally:
        h.remove()
    stream = image_stream(pipe.transformer.get_submodule(hp))
    x0 = base[0] if stream is None else base[0][stream]
    x1 = edited[0] if stream is None else edited[0][stream]
    d = x0.shape[-1]
    x0, x1 = x0.reshape(-1, d), x1.reshape(-1, d)
    delta = _fired_delta(handle.saes[hp], x0, handle.table(hp))  # the first call's timestep is the largest: row 0
    fired = (delta != 0).any(1)
    assert fired.any() and not fired.all()
    assert torch.equal(x1[~fired], x0[~fired])  # tokens where no selected feature fires are untouched
    torch.testing.assert_close(x1[fired], (x0 + delta)[fired], rtol=1e-4, atol=1e-4)
    assert (out - plain).abs().max() > 1e-4
    unpatch(pipe)
    assert torch.equal(_run(pipe, fam, prompt="a cat", seed=1), plain)


def test_flux_halves_other_than_both_are_refused(pipes):
    ts = _timesteps_seen(pipes["flux"], "flux")
    with pytest.raises(ValueError, match="Flux never batches CFG halves"):
        patch(pipes["flux"], "cat", saes=_saes("flux"), table=_table("flux", ts), halves="cond")


def test_command_line_stages_on_a_dit_pipeline_folder(tmp_path, capsys):
    """The README's DiT commands on a saved tiny Flux pipeline, with a ``transformer.``-prefixed hookpoint."""
    import json

    from saeuron.cli import main

    model = tmp_path / "flux"
    FAMILIES["flux"][0]().save_pretrained(model)
    main(["hookpoints", "--model", str(model)])
    assert capsys.readouterr().out.splitlines() == ["transformer_blocks.0\t32", "single_transformer_blocks.0\t32"]
    prompts = tmp_path / "concepts.json"
    prompts.write_text(json.dumps(PROMPTS))
    size = ["--height", "16", "--width", "16", "--steps", "2", "--device", "cpu"]
    main(["collect", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "acts"),
          "--hookpoints", "transformer.single_transformer_blocks.0", "--batch-size", "2", *size])
    assert "single_transformer_blocks.0: 512 rows" in capsys.readouterr().out
    main(["train", "--store", str(tmp_path / "acts"), "--out", str(tmp_path / "ckpt"), "--k", "4",
          "--num-latents", "64", "--batch-size", "128", "--device", "cpu"])
    main(["select", "--store", str(tmp_path / "acts"), "--checkpoint", str(tmp_path / "ckpt"), "--top-n", "4",
          "--multiplier", "-5", "--device", "cpu"])
    main(["generate", "--model", str(model), "--checkpoint", str(tmp_path / "ckpt"), "--concept", "cat",
          "--prompt", "a cat", "--seeds", "1", "--out", str(tmp_path / "img"), *size])
    out = tmp_path / "img"
    assert (out / "grid.png").is_file() and len(list((out / "unlearned").glob("*.png"))) == 1


def test_explain_draws_feature_maps_of_a_dit_block(pipes, tmp_path):
    """``explain`` reads a joint block's image stream and lays its tokens out on the patch grid."""
    from saeuron.evaluate.explain import explain

    pipe = pipes["sd3"]
    ts = _timesteps_seen(pipe, "sd3")
    size, pipe.default_sample_size = pipe.default_sample_size, 2  # 16 px images (the tiny VAE's factor is 8)
    try:
        res = explain(pipe, saes=_saes("sd3"), table=_table("sd3", ts), concept="cat", out_dir=tmp_path,
                      prompts=PROMPTS["cat"], other_prompts=PROMPTS["dog"], hookpoint="transformer_blocks.1",
                      num_inference_steps=2, guidance_scale=5.0, top_features=3, top_images=1, progress=False)
    finally:
        pipe.default_sample_size = size
    assert (tmp_path / "explain_cat.png").is_file()
    assert res["hookpoint"] == "transformer_blocks.1"
