"""MiniCanvas model: the pipeline (shapes, determinism, CFG layout, save/load), patch and collect on it,
training (loss, exact resume), the defaults build end to end and the CLI, all on the micro config."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_sae
from saeuron.collection import collect
from saeuron.concepts import ConceptTable
from saeuron.hookpoints import list_hookpoints
from saeuron.minicanvas import data
from saeuron.minicanvas.build import BUILD_DEFAULTS
from saeuron.minicanvas.model import (MODEL_CONFIGS, MiniCanvasPipeline, build_pipeline, load_pipeline,
                                      num_parameters, save_pipeline)
from saeuron.minicanvas.train_model import (STATE_FILE, STATE_JSON, _state_files, read_metrics, train_model,
                                            train_seconds)
from saeuron.patching import get_patch, patch, unpatch

HP = BUILD_DEFAULTS["micro"]["hookpoints"][0]  # up_blocks.0.attentions.1: 32 channels at 8x8
PROMPTS = ["An image of circle in stripes style.", "An image of ring.", "An image of star in neon style."]


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("micro", seed=0)


def _run(pipe, prompts=PROMPTS, seed=0, **kw):
    kw = {"num_inference_steps": 3, "output_type": "pt", **kw}
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kw).images


def test_configs_hookpoints_and_sizes():
    for name, cfg in MODEL_CONFIGS.items():
        p = build_pipeline(name)
        hps = list_hookpoints(p)
        assert all(h in hps for h in BUILD_DEFAULTS[name]["hookpoints"]), (name, list(hps))
        n = num_parameters(p)
        assert 2 * max(n.values()) < 16 * 2 ** 20, (name, n)  # each fp16 weight file stays under 16 MiB
    assert 6e6 <= num_parameters(build_pipeline("gpu"))["unet"] <= 24e6
    with pytest.raises(ValueError, match="valid: micro, cpu, gpu"):
        build_pipeline("huge")


def test_call_shapes_types_and_determinism(pipe):
    a = _run(pipe)
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1 and a.std() > 0.01
    assert torch.equal(a, _run(pipe))  # same generator seed, same images
    assert not torch.equal(a, _run(pipe, seed=1))
    lat = _run(pipe, output_type="latent")
    torch.testing.assert_close((lat / 2 + 0.5).clamp(0, 1), a)
    np_img = _run(pipe, output_type="np")
    assert np_img.shape == (3, 16, 16, 3)
    pil = _run(pipe, output_type="pil")
    assert len(pil) == 3 and pil[0].size == (16, 16)
    # one generator per image: an image does not depend on its batch
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = pipe(PROMPTS, generator=gens, num_inference_steps=3, output_type="pt").images
    alone = pipe(PROMPTS[1:2], generator=[torch.Generator().manual_seed(6)], num_inference_steps=3,
                 output_type="pt").images
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    many = _run(pipe, PROMPTS[0], num_images_per_prompt=2, height=32, width=32)
    assert many.shape == (2, 3, 32, 32)
    out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="pt",
               return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], a)
    with pytest.raises(ValueError, match="output_type"):
        _run(pipe, output_type="jpeg")
    with pytest.raises(ValueError, match="negative_prompt has 2 entries for 3 prompts"):
        _run(pipe, negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="multiples of 2"):
        _run(pipe, height=15)


def test_cfg_layout_matches_stable_diffusion(pipe):
    seen = []
    h = pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[0].shape[0], kw["encoder_hidden_states"].clone())), with_kwargs=True)
    try:
        _run(pipe, guidance_scale=3.0, negative_prompt="An image of heart.")
        assert pipe.do_classifier_free_guidance and len(seen) == 3
        b, ehs = seen[0]
        assert b == 6  # [uncond, cond] along the batch
        with torch.no_grad():
            torch.testing.assert_close(ehs[:3], pipe.encode_prompt(["An image of heart."] * 3))
            torch.testing.assert_close(ehs[3:], pipe.encode_prompt(PROMPTS))
        seen.clear()
        no_cfg = _run(pipe, guidance_scale=1.0)
        assert not pipe.do_classifier_free_guidance and seen[0][0] == 3
    finally:
        h.remove()
    assert not torch.equal(no_cfg, _run(pipe, guidance_scale=3.0))
    assert not torch.equal(_run(pipe, negative_prompt="An image of heart."), _run(pipe))


def test_save_load_round_trip(pipe, tmp_path):
    from saeuron.pipelines import load_pipeline as cli_load

    want = _run(pipe)
    save_pipeline(pipe, tmp_path / "fp32")
    got = MiniCanvasPipeline.from_pretrained(tmp_path / "fp32")
    assert type(got) is MiniCanvasPipeline and got.tokenizer.model_max_length == 16
    assert got.tokenizer(PROMPTS[0]).input_ids == pipe.tokenizer(PROMPTS[0]).input_ids
    assert torch.equal(_run(got), want)
    assert json.loads((tmp_path / "fp32" / "model_index.json").read_text())["_class_name"] == "MiniCanvasPipeline"
    save_pipeline(pipe, tmp_path / "fp16", dtype=torch.float16, extra={"note": "x"})
    assert pipe.unet.dtype == torch.float32  # the source pipeline is untouched
    with safe_open(str(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    half = cli_load(str(tmp_path / "fp16"), "cpu")  # `saeuron collect/generate --model` load it too
    assert isinstance(half, MiniCanvasPipeline) and half.unet.dtype == torch.float32
    assert (_run(half) - want).abs().max() < 0.05
    save_pipeline(pipe, tmp_path / "fp16")  # overwriting an existing folder
    assert torch.equal(_run(load_pipeline(tmp_path / "fp16")), want)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path / "missing")


def _table(pipe, steps=3, seed=0):
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    ts = [float(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(seed)
    mu = {HP: torch.rand(2, len(ts), 128, generator=g) * 1e-3}
    return ConceptTable(["circle", "stripes"], [3, 4], ts, mu, defaults={"top_n": 24, "multiplier": -1.0})


def test_patch_and_unpatch(pipe):
    saes, table = {HP: make_sae(32, 128, 4, seed=1)}, _table(pipe)
    base = _run(pipe, output_type="latent")
    try:
        h = patch(pipe, "circle", saes=saes, table=table)
        edited = _run(pipe, output_type="latent")
        assert (edited - base).abs().max() > 1e-3
        assert h.last_index.tolist() == [2]  # the last call's timestep is the table's last one
        patch(pipe, "circle", saes=saes, table=table, halves="cond")
        assert pipe.do_classifier_free_guidance
        cond = _run(pipe, output_type="latent")
        assert (cond - edited).abs().max() > 1e-4 and (cond - base).abs().max() > 1e-3
        patch(pipe, "circle", saes=saes, table=table, halves="uncond")
        assert torch.equal(_run(pipe, output_type="latent", guidance_scale=1.0),
                           _run_plain(pipe))  # no CFG: nothing is unconditional
    finally:
        assert unpatch(pipe) and get_patch(pipe) is None
    assert torch.equal(_run(pipe, output_type="latent"), base)


def _run_plain(pipe):
    h = get_patch(pipe)
    h.remove()
    try:
        return _run(pipe, output_type="latent", guidance_scale=1.0)
    finally:
        h.install()


def test_collect_on_minicanvas(pipe, tmp_path):
    prompts = {"circle": PROMPTS[:1], "neon": PROMPTS[2:]}
    store = collect(pipe, prompts, tmp_path, [HP], batch_size=2, num_inference_steps=2, guidance_scale=3.0,
                    progress=False)
    rows = store.read_shard(HP, 0)
    assert store.num_rows(HP) == 2 * 2 * 8 * 8 and rows["x"].shape[1] == 32  # prompts x steps x 8x8 tokens
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(2)
    assert sorted(set(rows["timestep"].tolist())) == sorted(float(t) for t in sched.timesteps)
    assert store.labels == ["circle", "neon"]


def test_train_lowers_loss_and_resumes_exactly(tmp_path):
    kw = dict(config="micro", batch_size=8, progress=False, save_every=4, log_every=1)
    full = train_model(tmp_path / "full", steps=24, **kw)
    loss = [r["loss"] for r in read_metrics(tmp_path / "full")]
    assert len(loss) == 24 and all(map(torch.isfinite, torch.tensor(loss)))
    assert sum(loss[-6:]) / 6 < 0.85 * sum(loss[:6]) / 6, loss
    train_model(tmp_path / "cut", steps=10, **kw)  # "killed" after 10 steps (last checkpoint: step 10)
    (state_file,) = _state_files(tmp_path / "cut")  # the micro model's state fits in one file
    with safe_open(str(state_file), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 10
        assert any(k.endswith("exp_avg_sq") for k in f.keys()) and any(k.startswith("ema.") for k in f.keys())
    resumed = train_model(tmp_path / "cut", steps=24, **kw)
    for a, b in zip(full.components["unet"].state_dict().values(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.text_encoder.parameters(), resumed.text_encoder.parameters()):
        assert torch.equal(a, b)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 25))
    # training time adds up over both runs: every step's 1/speed, nothing counted twice
    want = sum(1 / r["steps_per_s"] for r in read_metrics(tmp_path / "cut"))
    assert train_seconds(read_metrics(tmp_path / "cut")) == pytest.approx(want, abs=0.06) and want > 0
    info = json.loads((tmp_path / "cut" / "pipeline" / "minicanvas.json").read_text())
    assert info["train_seconds"] == train_seconds(read_metrics(tmp_path / "cut"))
    assert not [p for p in (tmp_path / "cut").rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    saved = load_pipeline(tmp_path / "cut" / "pipeline")
    assert torch.equal(_run(saved), _run(resumed))
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        train_model(tmp_path / "cut", steps=30, **{**kw, "batch_size": 4})
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        train_model(tmp_path / "bad", config="micro", steps=0)


def _params(pipe):
    return [p.detach().clone() for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())]


def test_state_shards_time_limit_and_compact_state(tmp_path, capsys):
    kw = dict(config="micro", batch_size=4, progress=False, save_every=100, log_every=2)
    full = _params(train_model(tmp_path / "full", steps=6, **kw))
    # a run stopped by its time limit after every step, in shards of at most 0.05 MiB, goes on exactly
    assert train_model(tmp_path / "cut", steps=6, shard_mib=0.05, time_limit=1e-9, **kw) is None
    assert "stopped at step 1 of 6" in capsys.readouterr().out
    files = _state_files(tmp_path / "cut")
    meta = json.loads((tmp_path / "cut" / STATE_JSON).read_text())
    assert len(files) > 3 and meta["step"] == 1 and [f.name for f in files] == meta["files"]
    biggest = max(t.numel() * t.element_size() for f in files for t in load_file(f).values())
    assert all(f.stat().st_size <= max(0.05 * 2 ** 20, biggest) + 4096 for f in files)  # + the file header
    while (out := train_model(tmp_path / "cut", steps=6, shard_mib=0.05, time_limit=1e-9, **kw)) is None:
        assert sorted(tmp_path.joinpath("cut").glob("train_state*.safetensors")) == \
            sorted(_state_files(tmp_path / "cut"))  # each save replaced the files of the one before
    for a, b in zip(full, _params(out)):
        assert torch.equal(a, b)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]  # every stop logged its step

    # a state of shards from two saves (a crash between writes cannot make one, a hand copy can) is refused
    other, second = tmp_path / "other", tmp_path / "second"
    for d in (other, second):
        train_model(d, steps=2, shard_mib=0.05, **kw)
    _state_files(other)[0].write_bytes(_state_files(second)[0].read_bytes())
    with pytest.raises(ValueError, match="corrupt training state.*different saves"):
        train_model(other, steps=4, shard_mib=0.05, **kw)

    # compact: a quarter of the bytes (bf16 weights and EMA, no moments); resumes with a warning, approximately
    train_model(tmp_path / "compact", steps=3, compact_state=True, **kw)
    size = lambda d: sum(f.stat().st_size for f in _state_files(d))  # noqa: E731
    train_model(tmp_path / "exact", steps=3, **kw)
    assert size(tmp_path / "compact") < 0.3 * size(tmp_path / "exact")
    with safe_open(str(_state_files(tmp_path / "compact")[0]), "pt") as f:
        assert not any(k.startswith("adam.") for k in f.keys())
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with pytest.warns(UserWarning, match="compact state.*step 3"):
        approx = _params(train_model(tmp_path / "compact", steps=6, compact_state=True, **kw))
    assert all(torch.isfinite(p).all() for p in approx)
    assert max((a - b).abs().max().item() for a, b in zip(full, approx)) < 0.1  # the same run, to bf16 and Adam's restart

    # a state saved before shards (one train_state.safetensors, no file list) still resumes exactly
    legacy = tmp_path / "legacy"
    train_model(legacy, steps=3, **kw)
    (only,) = _state_files(legacy)
    only.rename(legacy / STATE_FILE)
    (legacy / STATE_JSON).write_text(json.dumps({k: v for k, v in json.loads((legacy / STATE_JSON).read_text()).items()
                                                 if k != "files"}))
    for a, b in zip(full, _params(train_model(legacy, steps=6, **kw))):
        assert torch.equal(a, b)
    assert [p.name for p in legacy.glob("train_state*.safetensors")] == [_state_files(legacy)[0].name]
    with pytest.raises(ValueError, match="time_limit"):
        train_model(tmp_path / "bad", config="micro", steps=2, time_limit=0, progress=False)

def test_lr_warmup_constant_then_linear_decay(tmp_path):
    train_model(tmp_path / "run", config="micro", steps=12, batch_size=4, lr=1e-3, warmup=2, lr_decay=0.5,
                progress=False, log_every=1, save_every=100)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]  # the rate used at steps 0..11
    want = [5e-4] + [1e-3] * 5 + [1e-3 * (12 - s) / 6 for s in range(6, 12)]
    assert lrs == pytest.approx(want), lrs
    with pytest.raises(ValueError, match="lr_decay <= 1"):
        train_model(tmp_path / "bad", config="micro", steps=4, lr_decay=1.5, progress=False)


def test_build_defaults_micro_end_to_end(tmp_path, monkeypatch, capsys):
    from saeuron.minicanvas import defaults
    from saeuron.minicanvas.build import STAGES, build_defaults, dependents

    monkeypatch.setattr(defaults, "assets_dir", lambda: tmp_path / "assets")
    with pytest.raises(FileNotFoundError, match="saeuron minicanvas build"):
        defaults.load_pipeline()
    rec = build_defaults(tmp_path / "assets", "micro", seed=3, progress=False, command="saeuron minicanvas build x")
    out = tmp_path / "assets"
    assert rec["seed"] == 3 and rec["config"] == "micro" and rec["command"] == "saeuron minicanvas build x"
    assert all(rec["stages"][s]["done"] for s in STAGES)
    assert json.loads((out / "BUILD.json").read_text())["stages"].keys() == set(STAGES)
    gates = json.loads((out / "gates.json").read_text())
    for part in ("heldout", "generated"):
        for kind in ("object", "style"):
            g = gates[part][kind]
            assert 0 <= g["accuracy"] <= 1 and g["pass"] == (g["accuracy"] >= g["gate"])
    assert Path(gates["samples"]).is_file() and out not in Path(gates["samples"]).parents
    assert all(n < 16 * 2 ** 20 for n in rec["files"].values())
    assert not [p for p in out.rglob("*") if "train_state" in p.name or "shard_" in p.name]  # work files stay out
    pipe = defaults.load_pipeline()
    assert isinstance(pipe, MiniCanvasPipeline) and pipe.unet.dtype == torch.float32
    clfs = defaults.load_classifiers()
    assert set(clfs) == {"object", "style"}
    table = ConceptTable.load(defaults.checkpoint_dir())
    assert table.names == list(data.OBJECTS) + list(data.STYLES) and table.hookpoints == [HP]
    assert table.defaults["circle"]["top_n"] == 2
    base = _run(pipe, output_type="latent", num_inference_steps=4)
    with patch(pipe, ["stripes"], checkpoint=defaults.checkpoint_dir()) as h:
        assert h.table(HP)[0].shape[1] > 0
        _run(pipe, output_type="latent", num_inference_steps=4)
    assert torch.equal(_run(pipe, output_type="latent", num_inference_steps=4), base)
    capsys.readouterr()
    build_defaults(out, "micro", seed=3, progress=False)  # everything done: every stage skipped
    assert capsys.readouterr().out.count("already done, skipped") == len(STAGES)
    # a model that is built again makes the activations, the SAE and the concept file stale
    record = json.loads((out / "BUILD.json").read_text())
    del record["stages"]["model"]
    (out / "BUILD.json").write_text(json.dumps(record))
    marker = tmp_path / "assets.work" / "activations" / "stale-marker"
    marker.write_text("from the old model")
    rec = build_defaults(out, "micro", seed=3, progress=False)
    said = capsys.readouterr().out
    for s in ("gates", "collect", "sae", "concepts"):
        assert f"{s}: built from the old model, will be redone" in said and f"[build] {s} done" in said
    assert "classifiers: already done, skipped" in said and not marker.exists()
    assert all(rec["stages"][s]["done"] for s in STAGES)
    assert dependents("classifiers") == ["gates"] and dependents("collect") == ["sae", "concepts"]
    assert dependents("concepts") == []
    with pytest.raises(ValueError, match="was built with config='micro', seed=3"):
        build_defaults(out, "micro", seed=4, progress=False)
    # a changed setting redoes the stages that read it, and what is built from them, nothing else
    capsys.readouterr()
    rec = build_defaults(out, "micro", seed=3, progress=False, settings={"multiplier": -2.0})
    said = capsys.readouterr().out
    assert "concepts: its settings changed (multiplier), will be redone" in said and "[build] concepts done" in said
    assert all(f"{s}: already done, skipped" in said for s in STAGES if s != "concepts")
    assert rec["settings"]["multiplier"] == -2.0 and ConceptTable.load(out / "checkpoint").defaults["circle"][
        "multiplier"] == -2.0
    rec = build_defaults(out, "micro", seed=3, progress=False, settings={"multiplier": -2.0, "guidance": 2.0})
    said = capsys.readouterr().out
    assert "gates: its settings changed (guidance)" in said and "collect: its settings changed (guidance)" in said
    assert all(f"{s}: built from the old collect, will be redone" in said for s in ("sae", "concepts"))
    assert all(f"{s}: already done, skipped" in said for s in ("classifiers", "model"))
    assert json.loads((out / "gates.json").read_text())["sampling"]["guidance_scale"] == 2.0
    assert all(rec["stages"][s]["done"] for s in STAGES)
    # hookpoints are a collect setting: a second one gets its SAE and statistics; dropping it removes its SAE
    mid = "mid_block.attentions.0"
    both = {"multiplier": -2.0, "guidance": 2.0, "hookpoints": [HP, mid]}
    rec = build_defaults(out, "micro", seed=3, progress=False, settings=both)
    said = capsys.readouterr().out
    assert "collect: its settings changed (hookpoints)" in said and "gates: already done, skipped" in said
    assert rec["hookpoints"] == [HP, mid] and ConceptTable.load(out / "checkpoint").hookpoints == [HP, mid]
    assert (out / "checkpoint" / mid / "sae.safetensors").is_file()
    build_defaults(out, "micro", seed=3, progress=False, settings={"multiplier": -2.0, "guidance": 2.0})
    assert f"removed the SAE of {mid}" in capsys.readouterr().out and not (out / "checkpoint" / mid).exists()
    assert ConceptTable.load(out / "checkpoint").hookpoints == [HP]
    # concept supervision (issue 22's lever): the SAE and the concept file are redone, nothing else
    sup = {"multiplier": -2.0, "guidance": 2.0, "supervise": {"concepts": "objects"}}
    rec = build_defaults(out, "micro", seed=3, progress=False, settings=sup)
    said = capsys.readouterr().out
    assert "sae: its settings changed (supervise)" in said and "collect: already done, skipped" in said
    sae_cfg = json.loads((out / "checkpoint" / HP / "cfg.json").read_text())
    assert sorted(sae_cfg["concept_latents"]) == sorted(data.OBJECTS)
    table = ConceptTable.load(out / "checkpoint")
    assert table.defaults["circle"].get("reserved") is True and not table.defaults["stripes"].get("reserved")
    circle = sae_cfg["concept_latents"]["circle"]
    picked = [t.tolist() for t in table.select(HP, "circle") if t.numel()]
    assert picked and all(x == circle for x in picked)  # its reserved latent, at every timestep where it fires
    with pytest.raises(ValueError, match="supervise"):
        build_defaults(out, "micro", seed=3, progress=False, settings={"supervise": {"concept": "objects"}})


def test_stages_need_what_they_are_built_from_so_the_gates_can_come_last(tmp_path, capsys):
    from saeuron.minicanvas.build import STAGES, ancestors, build_defaults

    assert ancestors("concepts") == ["model", "collect", "sae"] and ancestors("gates") == ["classifiers", "model"]
    assert ancestors("classifiers") == ancestors("model") == []
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match=r"build stage 'sae' needs stages \['model', 'collect'\] first"):
        build_defaults(out, "micro", seed=3, progress=False, stages=("sae",))
    early = [s for s in STAGES if s != "gates"]
    rec = build_defaults(out, "micro", seed=3, progress=False, stages=early)  # everything but the gates
    assert all(rec["stages"][s]["done"] for s in early) and "gates" not in rec["stages"]
    assert not (out / "gates.json").exists() and ConceptTable.load(out / "checkpoint").names
    capsys.readouterr()
    rec = build_defaults(out, "micro", seed=3, progress=False)  # then the gates, and nothing else again
    said = capsys.readouterr().out
    assert "[build] gates done" in said and all(f"{s}: already done, skipped" in said for s in early)
    assert all(rec["stages"][s]["done"] for s in STAGES) and (out / "gates.json").is_file()


def test_every_build_setting_is_read_by_a_stage():
    from saeuron.minicanvas.build import BUILD_DEFAULTS, STAGE_SETTINGS, STAGES, _changed_stages

    assert set(STAGE_SETTINGS) == set(STAGES)
    for cfg in BUILD_DEFAULTS.values():
        assert set(cfg) == set().union(*STAGE_SETTINGS.values())
    st = BUILD_DEFAULTS["cpu"]
    assert _changed_stages(st, dict(st)) == []
    assert _changed_stages(st, {**st, "guidance": 9.0}) == ["gates", "collect"]
    assert _changed_stages(st, {**st, "sae": {**st["sae"], "k": 8}}) == ["sae"]
    assert _changed_stages(st, {**st, "gate_seeds": [188]}) == ["gates"]
    assert _changed_stages(st, {**st, "gate_seeds": list(st["gate_seeds"])}) == []  # JSON round trip: tuple == list
    assert _changed_stages(st, {**st, "hookpoints": ["up_blocks.1.attentions.1"]}) == ["collect"]


def test_cli_minicanvas_train(tmp_path, capsys):
    from saeuron.cli import main

    main(["minicanvas", "train", "--out", str(tmp_path), "--config", "micro", "--steps", "3", "--batch-size", "4",
          "--fp16", "--threads", "1"])
    assert (tmp_path / "pipeline" / "model_index.json").is_file() and _state_files(tmp_path)
    with safe_open(str(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    with pytest.raises(SystemExit):
        main(["minicanvas", "train", "--out", str(tmp_path), "--config", "huge"])
    capsys.readouterr()
    main(["minicanvas", "train", "--out", str(tmp_path / "limited"), "--config", "micro", "--steps", "3",
          "--batch-size", "4", "--time-limit", "1e-9", "--compact-state", "--threads", "1"])
    out = capsys.readouterr().out
    assert "stopped at step 1 of 3" in out and "pipeline in" not in out
    assert not (tmp_path / "limited" / "pipeline").exists()
    with safe_open(str(_state_files(tmp_path / "limited")[0]), "pt") as f:
        assert json.loads(f.metadata()["state"])["compact"] and not any(k.startswith("adam.") for k in f.keys())


def test_cli_minicanvas_build_set(tmp_path, capsys):
    from saeuron.cli import main

    out, work = tmp_path / "assets", tmp_path / "work"
    base = ["minicanvas", "build", "--config", "micro", "--out", str(out), "--work", str(work), "--threads", "1"]
    main(base + ["--set", "multiplier=-2.5", "--set", 'sae={"k": 2}', "--set", "gate_seeds=[188]"])
    rec = json.loads((out / "BUILD.json").read_text())
    assert rec["settings"]["multiplier"] == -2.5 and rec["settings"]["sae"]["k"] == 2
    assert rec["settings"]["sae"]["expansion_factor"] == 4  # dicts merge with the config's defaults
    assert ConceptTable.load(out / "checkpoint").defaults["circle"]["multiplier"] == -2.5
    capsys.readouterr()
    main(base + ["--set", "multiplier=-2.5", "--set", 'sae={"k": 2}', "--set", "gate_seeds=[188]"])
    assert capsys.readouterr().out.count("already done, skipped") == 6
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(base + ["--set", "multiplier"])
    with pytest.raises(SystemExit, match="unknown build setting 'guidence'; valid: .*guidance"):
        main(base + ["--set", "guidence=2"])


def test_build_takes_its_judges_from_a_folder(tmp_path, capsys):
    """``classifiers_from``: the judges are loaded from a folder (or the shipped ones), checked, saved into the build
    with their source and sha256 recorded; a folder without judges fails before any stage runs; switching back to
    training redoes the stage."""
    from safetensors.torch import load_file

    from saeuron.minicanvas import classifiers as clf
    from saeuron.minicanvas.build import build_defaults
    from saeuron.utils import file_sha256

    src = tmp_path / "a"
    build_defaults(src, "micro", seed=5, progress=False, stages=("classifiers",))
    out = tmp_path / "b"
    rec = build_defaults(out, "micro", seed=5, progress=False, stages=("classifiers",),
                         settings={"classifiers_from": str(src / "classifiers")})
    stage = rec["stages"]["classifiers"]
    assert stage["done"] and stage["source"] == str(src / "classifiers") and "final_loss" not in stage
    for k in clf.KINDS:
        mine, theirs = load_file(out / "classifiers" / k / clf.WEIGHTS_FILE), load_file(src / "classifiers" / k / clf.WEIGHTS_FILE)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
        assert stage["sha256"][k] == file_sha256(out / "classifiers" / k / clf.WEIGHTS_FILE)
    bad = tmp_path / "not_judges"
    (bad / "object").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"classifiers_from=.*missing .*style.*classifier\.safetensors"):
        build_defaults(tmp_path / "c", "micro", seed=5, progress=False, settings={"classifiers_from": str(bad)})
    assert not (tmp_path / "c" / "BUILD.json").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="give null"):
        build_defaults(tmp_path / "c", "micro", seed=5, progress=False, settings={"classifiers_from": 3})
    capsys.readouterr()
    rec = build_defaults(out, "micro", seed=5, progress=False, stages=("classifiers",))  # back to training them
    assert "classifiers: its settings changed (classifiers_from), will be redone" in capsys.readouterr().out
    assert "final_loss" in rec["stages"]["classifiers"] and "source" not in rec["stages"]["classifiers"]


def test_build_setting_shipped_judges_names_the_package_folder():
    from saeuron.minicanvas.build import build_settings, classifiers_source
    from saeuron.minicanvas.defaults import assets_dir

    assert classifiers_source(build_settings("cpu", {"classifiers_from": "shipped"})) == assets_dir() / "classifiers"
    assert classifiers_source(build_settings("cpu")) is None
