"""SAeUron vs UCE vs ESD side by side (saeuron.evaluate.compare) on micro MiniCanvas assets built here."""
import json
import re

import pytest
import torch

from saeuron.evaluate.compare import COLUMNS, METHODS, attack_target, compare_methods, esd_prompts, uce_arguments
from saeuron.patching import get_patch

GRID = dict(objects=["circle", "ring"], styles=["stripes", "checker"], seeds=(188,))


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from saeuron.minicanvas import load_classifiers
    from saeuron.minicanvas.build import build_defaults
    from saeuron.minicanvas.model import load_pipeline

    out = tmp_path_factory.mktemp("mc") / "assets"
    build_defaults(out, "micro", seed=0, progress=False)
    pipe = load_pipeline(out / "model", "cpu")
    pipe.set_progress_bar_config(disable=True)
    return out, pipe, load_classifiers(out / "classifiers", "cpu")


def _table_rows(md: str) -> dict:
    """{method: [cells]} of the first markdown table."""
    head = md.split("\n\n")[0].splitlines()
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in head[2:]}


def test_compare_table_resume_and_exact_restore(micro, tmp_path, monkeypatch):
    import saeuron.evaluate.compare as cmp

    assets, pipe, clfs = micro
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    attacked = []  # per attack: (patched?, weights as before?)

    def spy(*a, **k):
        same = all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
        attacked.append((get_patch(pipe) is not None, same))
        return attack_target(*a, **k)

    monkeypatch.setattr(cmp, "attack_target", spy)
    kw = dict(style_targets=["stripes"], object_targets=["circle"], **GRID, attack_iterations=2, esd_iterations=2,
              esd_kwargs={"lr": 1e-2}, num_inference_steps=2, batch_size=8, out_dir=tmp_path, progress=False)
    res = compare_methods(pipe, clfs, assets / "checkpoint", **kw)
    # the control on the untouched model, SAeUron under its patch, UCE/ESD on their edited weights
    assert attacked == [(False, True)] * 2 + [(True, True)] * 2 + [(False, False)] * 4

    # UCE and ESD changed the model while they were applied, and left it exactly as it was
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters()) and get_patch(pipe) is None
    per = res["per_target"]
    for m in ("uce", "esd"):
        for d, t in (("style", "stripes"), ("object", "circle")):
            assert per[m][d][t]["edit"]["num_parameters_edited"] > 0 and per[m][d][t]["metrics"]["frechet_style"] > 0
    assert per["esd"]["style"]["stripes"]["edit"]["config"]["method"] == "xattn"
    assert per["esd"]["object"]["circle"]["edit"]["config"]["method"] == "noxattn"
    assert len(per["esd"]["object"]["circle"]["edit"]["loss_history"]) == 2
    assert per["esd"]["style"]["stripes"]["edit"]["config"]["concept"] == [
        "An image of circle in stripes style.", "An image of ring in stripes style."]

    # one row per method (+ the unedited reference) with every column; percents in [0, 100]
    rows = _table_rows(res["table"])
    assert list(rows) == ["SAeUron", "UCE", "ESD", "*(unedited)*"] and all(len(c) == 11 for c in rows.values())
    # the control: the attack on the unedited model, every prompt holding the target, so "before" is its plain UA
    ctrl = res["unedited"]["per_target"]
    for d, t in (("style", "stripes"), ("object", "circle")):
        assert ctrl[d][t]["attack"]["ua_before"] == pytest.approx(ctrl[d][t]["metrics"]["ua"])
        assert (tmp_path / "runs" / "unedited" / f"{d}_{t}.json").is_file()
    assert all(0 <= float(c) <= 100 for c in rows["*(unedited)*"][6:8])
    assert res["unedited"]["summary"]["ua_after_attack"] == pytest.approx(
        (ctrl["style"]["stripes"]["attack"]["ua_after"] + ctrl["object"]["circle"]["attack"]["ua_after"]) / 2)
    assert re.search(r"\| \*\(unedited\)\* \| style \| stripes \|", res["table"])
    for name in ("SAeUron", "UCE", "ESD"):
        cells = rows[name]
        assert all(0 <= float(c) <= 100 for c in cells[:8]) and float(cells[8]) >= 0 and float(cells[9]) > 0
    for m in METHODS:
        s = res["summary"][m]
        assert all(0 <= s[k] <= 1 for k in COLUMNS) and s["targets"] == 2 and s["seconds"] >= 0
        atk = [per[m][d][t]["attack"] for d, t in (("style", "stripes"), ("object", "circle"))]
        assert s["ua_after_attack"] == pytest.approx(sum(a["ua_after"] for a in atk) / 2)
        # the attacked prompts: the grid's captions holding the target, each with its seed
        assert [p["prompt"] for p in atk[0]["prompts"]] == ["An image of circle in stripes style.",
                                                            "An image of ring in stripes style."]
        assert s["style_ua"] == per[m]["style"]["stripes"]["metrics"]["ua"]
    assert "### Per target" in res["table"] and re.search(r"\| UCE \| object \| circle \|", res["table"])
    # the control's movement: an explicit figure with its pass/fail against 5 points
    u = res["unedited"]["summary"]
    assert res["control"]["move_points"] == pytest.approx(100 * (u["ua_after_attack"] - u["ua_before_attack"]))
    assert res["control"]["pass"] == (abs(res["control"]["move_points"]) <= 5)
    assert "- Control (the unedited model under the attack): UA " in res["table"]
    assert ("PASS" if res["control"]["pass"] else "FAIL") in res["table"].split("- Control")[1].splitlines()[0]
    # the damage measure, per target, per seed and mean, as `saeuron minicanvas eval` reports it
    assert res["damage"]["calibration"]["images"] == 4 and res["config"]["damage"] is True
    for m in list(METHODS) + ["unedited"]:
        runs = per[m] if m != "unedited" else res["unedited"]["per_target"]
        s = res["summary"][m] if m != "unedited" else res["unedited"]["summary"]
        for d, t in (("style", "stripes"), ("object", "circle")):
            mt = runs[d][t]["metrics"]
            assert 0 <= mt["ua_undamaged"] <= mt["ua"] and mt["damage_target"] is not None
            assert s[f"{d}_damage_target"] == mt["damage_target"] and s[f"{d}_ua_undamaged"] == mt["ua_undamaged"]
            one = runs[d][t]["per_seed"]["188"]                       # one seed: per seed = pooled
            assert all(one[k] == mt[k] for k in ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged"))
        assert list(s["per_seed"]) == ["188"] and s["per_seed"]["188"]["style_damage_kept"] == s["style_damage_kept"]
    dtab = res["table"].split("### Damage, per seed and mean")[1].split("### Per target")[0]
    for name in ("SAeUron", "UCE", "ESD", "*(unedited)*"):
        assert f"| {name} | 188 |" in dtab and f"| {name} | **mean** |" in dtab
    assert "style UA undamaged | style damage target | style damage kept" in dtab
    # exactly the numbers `saeuron minicanvas eval` gives for the same target, grid and sampling
    from saeuron.evaluate.unlearn_eval import evaluate_unlearning

    ev = evaluate_unlearning(pipe, clfs, assets / "checkpoint", targets=["stripes"], domain="style",
                             objects=GRID["objects"], styles=GRID["styles"], seeds=GRID["seeds"], num_inference_steps=2,
                             batch_size=8, out_dir=tmp_path / "eval", progress=False)
    assert ev["damage"]["calibration"] == res["damage"]["calibration"]
    for k in ("ua", "damage_target", "damage_kept", "ua_undamaged"):
        assert ev["per_target"]["stripes"][k] == per["saeuron"]["style"]["stripes"]["metrics"][k], k
    on_disk = json.loads((tmp_path / "comparison.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(res["summary"]))
    assert (tmp_path / "comparison.md").read_text() == res["table"]
    assert (tmp_path / "runs" / "esd" / "object_circle.json").is_file()

    calls = []
    h = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = compare_methods(pipe, clfs, assets / "checkpoint", **kw)  # every run cached: no UNet call at all
    finally:
        h.remove()
    assert calls == [] and again["summary"] == json.loads(json.dumps(res["summary"]))

    with pytest.raises(ValueError, match="valid: saeuron, uce, esd"):
        compare_methods(pipe, clfs, assets / "checkpoint", **{**kw, "methods": ["salun"]})
    with pytest.raises(ValueError, match="no prompt holds the target"):
        compare_methods(pipe, clfs, assets / "checkpoint", **{**kw, "style_targets": ["neon"]})


def test_uce_arguments_are_the_grid_captions():
    a = uce_arguments("stripes", "style", ["circle", "ring"], ["stripes", "checker", None])
    assert a["erase"] == ["stripes"] and a["preserve"] == ["checker"] and a["guide"] == ""
    assert [t.format("stripes") for t in a["templates"]] == ["An image of circle in stripes style.",
                                                             "An image of ring in stripes style."]
    o = uce_arguments("ring", "object", ["circle", "ring"], ["stripes", None])
    assert o["preserve"] == ["circle"] and [t.format("ring") for t in o["templates"]] == [
        "An image of ring in stripes style.", "An image of ring."]
    assert esd_prompts("ring", "object", ["circle", "ring"], ["stripes", None]) == [
        "An image of ring in stripes style.", "An image of ring."]
    assert esd_prompts("checker", "style", ["circle"], ["stripes", "checker"]) == [
        "An image of circle in checker style."]
    with pytest.raises(ValueError, match="unknown domain 'colour'"):
        esd_prompts("red", "colour", ["circle"], [None])


def test_cli_compare(micro, tmp_path, monkeypatch, capsys):
    from saeuron.cli import main

    assets, _, _ = micro
    monkeypatch.setenv("SAEURON_MINICANVAS_ASSETS", str(assets))
    main(["minicanvas", "compare", "--methods", "uce", "--style-targets", "--object-targets", "ring", "--objects",
          "circle", "ring", "--styles", "stripes", "--no-attack", "--steps", "2", "--device", "cpu", "--out",
          str(tmp_path)])
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "comparison.json").read_text())
    assert res["config"]["object_targets"] == ["ring"] and res["config"]["style_targets"] == []
    assert res["summary"]["uce"]["ua_after_attack"] is None and res["summary"]["uce"]["style_ua"] is None
    assert "| UCE |" in printed and "comparison:" in printed
    assert res["damage"]["calibration"]["images"] == 2 and res["summary"]["uce"]["object_damage_kept"] is not None
    assert res["control"] is None and "- Control" not in printed                # no attack: no control figure
    main(["minicanvas", "compare", "--methods", "uce", "--style-targets", "--object-targets", "ring", "--objects",
          "circle", "ring", "--styles", "stripes", "--no-attack", "--no-damage", "--steps", "2", "--device", "cpu",
          "--out", str(tmp_path / "nodmg")])
    res = json.loads((tmp_path / "nodmg" / "comparison.json").read_text())
    assert res["damage"] is None and "object_damage_kept" not in res["summary"]["uce"]
    assert "### Damage" not in capsys.readouterr().out

    main(["minicanvas", "compare", "--methods", "esd", "--esd-iterations", "2", "--esd-lr", "0.01", "--style-targets",
          "--object-targets", "ring", "--objects", "circle", "ring", "--styles", "stripes", "--no-attack",
          "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "esd")])
    run = json.loads((tmp_path / "esd" / "runs" / "esd" / "object_ring.json").read_text())["result"]["edit"]
    assert run["config"]["lr"] == 0.01 and run["config"]["iterations"] == 2 and len(run["loss_history"]) == 2
    assert run["config"]["concept"] == ["An image of ring in stripes style."]

    main(["minicanvas", "compare", "--methods", "uce", "--style-targets", "--object-targets", "ring", "--objects",
          "circle", "ring", "--styles", "stripes", "--attack-iterations", "1", "--attack-prompts", "1",
          "--attack-placement", "suffix", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "atk")])
    for who in ("uce", "unedited"):
        cfg = json.loads((tmp_path / "atk" / "runs" / who / "object_ring.json").read_text())["config"]["attack"]
        assert cfg["placement"] == "suffix" and cfg["prompts"] == 1 and cfg["iterations"] == 1
        assert {"circle", "ring", "stripes", "neon"} <= set(cfg["init_exclude"])  # the prefix starts from no concept


@pytest.mark.parametrize("before, after, note", [
    (0.83, 0.83, "does not drop (changes by +0.0 points)"),  # float noise must not print as -0.0
    (0.79, 0.82, "does not drop (changes by +3.0 points)"),
    (0.90, 0.80, "drops by 10.0 points"),
    (0.80, 0.80 - 1e-12, "does not drop (changes by +0.0 points)"),  # nor as a 0.0-point drop
])
def test_markdown_attack_note(before, after, note):
    from saeuron.evaluate.compare import markdown, summarise

    run = {"metrics": {"ua": 1.0, "ira": 1.0, "cra": 1.0},
           "attack": {"ua_before": before, "ua_after": after}, "edit": None}
    runs = {"saeuron": {"style": {"stripes": run}}}
    result = {"summary": summarise(runs, ["saeuron"]), "per_target": runs,
              "unedited": {"summary": {}, "per_target": {}},
              "config": {"style_targets": ["stripes"], "object_targets": [], "num_images_per_run": 1, "seeds": [188],
                         "num_inference_steps": 2, "guidance_scale": 1.5, "attack": False}}
    md = markdown(result)
    assert f"SAeUron's UA {note} under the attack" in md
    assert ("FAIL" in md) == (100 * (before - after) > 5)


def test_per_seed_damage_table_and_means():
    """Per-seed metrics of a run (synthetic predictions and damage flags over two seeds) and the damage table."""
    from saeuron.evaluate.compare import damage_table, markdown, per_seed_metrics, summarise
    from saeuron.evaluate.metrics import target_metrics
    from saeuron.evaluate.unlearn_eval import build_jobs, run_records

    jobs = build_jobs(["circle", "ring"], ["stripes", "checker"], seeds=(1, 2))
    sid = [j.style for j in jobs]
    # seed 1: the stripes images read as checker and are damaged; seed 2: read as checker, clean
    pred_s = [1 for _ in jobs]
    pred_o = [j.object for j in jobs]
    damaged = [j.seed == 1 and s == 0 for j, s in zip(jobs, sid)]
    per = per_seed_metrics(jobs, ("stripes",), "style", pred_o, pred_s, damaged)
    assert list(per) == ["1", "2"]
    assert per["1"]["ua"] == per["2"]["ua"] == 1.0
    assert per["1"]["ua_undamaged"] == 0.0 and per["2"]["ua_undamaged"] == 1.0
    assert per["1"]["damage_target"] == 1.0 and per["2"]["damage_target"] == 0.0 and per["1"]["damage_kept"] == 0.0
    pooled = target_metrics(run_records(jobs, ("stripes",), "style", pred_o, pred_s, damaged), ("stripes",), "style")
    assert pooled["ua_undamaged"] == pytest.approx((per["1"]["ua_undamaged"] + per["2"]["ua_undamaged"]) / 2)
    run = {"metrics": pooled, "per_seed": per, "attack": None, "edit": None}
    runs = {"saeuron": {"style": {"stripes": run}}}
    summary = summarise(runs, ["saeuron"])
    assert summary["saeuron"]["per_seed"]["1"]["style_ua_undamaged"] == 0.0
    assert summary["saeuron"]["style_ua_undamaged"] == 0.5 and summary["saeuron"]["style_damage_target"] == 0.5
    result = {"summary": summary, "per_target": runs, "unedited": {"summary": {}, "per_target": {}},
              "damage": {"calibration": {"images": 4, "source": "test", "flagged_clean": 0.0}},
              "config": {"style_targets": ["stripes"], "object_targets": [], "num_images_per_run": 8, "seeds": [1, 2],
                         "num_inference_steps": 2, "guidance_scale": 1.5, "attack": False}}
    table = damage_table(result)
    rows = {tuple(c.strip() for c in r.split("|")[1:3]): [c.strip() for c in r.split("|")[3:-1]]
            for r in table.splitlines()[2:]}
    assert rows[("SAeUron", "1")][:4] == ["100.0", "0.0", "100.0", "0.0"]      # UA, UA undamaged, damage t / k
    assert rows[("SAeUron", "2")][:4] == ["100.0", "100.0", "0.0", "0.0"]
    assert rows[("SAeUron", "**mean**")][:4] == ["100.0", "50.0", "50.0", "0.0"]
    assert rows[("SAeUron", "**mean**")][4:] == ["-"] * 4                       # no object target
    md = markdown(result)
    assert "### Damage, per seed and mean" in md and "UA undamaged counts a target image" in md
    assert "| damage target | damage kept | UA undamaged |" in md.split("### Per target")[1]
    # without the damage measure: no damage table, no damage cells
    plain = {**result, "damage": None,
             "summary": summarise({"saeuron": {"style": {"stripes": {**run, "metrics": {"ua": 1.0, "ira": 1.0,
                                                                                         "cra": 1.0}}}}}, ["saeuron"])}
    assert damage_table(plain) == "" and "### Damage" not in markdown(plain)


def test_evaluation_calibrates_damage_on_the_model_it_judges(micro, tmp_path):
    """No stored calibration: each evaluation calibrates the damage measure on the judged model's own unedited images,
    so a different model in the same output folder gets its own calibration (and its own cached runs)."""
    import copy

    from saeuron.evaluate.unlearn_eval import evaluate_unlearning

    assets, pipe, clfs = micro
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        for p_ in other.unet.conv_out.parameters():
            p_.add_(0.05 * torch.randn(p_.shape, generator=torch.Generator().manual_seed(0)))
    kw = dict(targets=["stripes"], domain="style", objects=["circle", "ring", "star"], styles=["stripes", "checker"],
              seeds=(188,), num_inference_steps=2, batch_size=8, progress=False)
    a = evaluate_unlearning(pipe, clfs, assets / "checkpoint", out_dir=tmp_path / "shared", **kw)
    b = evaluate_unlearning(other, clfs, assets / "checkpoint", out_dir=tmp_path / "shared", **kw)
    fresh = evaluate_unlearning(other, clfs, assets / "checkpoint", out_dir=tmp_path / "fresh", **kw)
    assert b["damage"]["calibration"] == fresh["damage"]["calibration"]
    assert b["damage"]["calibration"]["threshold"] != a["damage"]["calibration"]["threshold"]
    drop_grid = lambda m: {k: v for k, v in m.items() if k != "grid"}  # noqa: E731  (the grids' paths differ)
    assert drop_grid(b["per_target"]["stripes"]) == drop_grid(fresh["per_target"]["stripes"])
    assert b["baseline"]["per_run"] == fresh["baseline"]["per_run"]   # the other model's own unedited images
