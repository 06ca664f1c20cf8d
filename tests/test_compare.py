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
