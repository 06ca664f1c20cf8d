"""The unedited model's gates (saeuron.minicanvas.build.model_gates): training form and held-out caption forms
with per-form figures, the attack control's movement, gates.json of a micro build with caption forms, and the
standalone ``saeuron minicanvas gates`` command."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from saeuron.minicanvas import data as D
from saeuron.minicanvas.build import (FORM_GATES, GENERATED_GATE, HELDOUT_FORM_GATE, gate_jobs, gate_lines,
                                      generated_accuracy, model_gates)

WRONG_FORM = 16  # the fake model draws the wrong object for this held-out form


class _FakeTokenizer:
    def __init__(self, words):
        self.words = {w: i for i, w in enumerate(words)}

    def get_vocab(self):
        return dict(self.words)


class _FakePipe:
    """Draws (object, style) as two constant channels; wrong object for held-out form 16 (styled)."""

    def __init__(self, forms=True):
        self.tokenizer = _FakeTokenizer(D.vocabulary(with_forms=forms))
        self.prompts = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, output_type, generator):
        assert output_type == "pt" and len(generator) == len(prompts)
        self.prompts += prompts
        out = []
        for p in prompts:
            words = D.caption_words(p)
            o = next(i for i, n in enumerate(D.OBJECTS) if n in words)
            s = next((i for i, n in enumerate(D.STYLES) if n in words), len(D.STYLES))
            if p.startswith("This is an image of a"):
                o = (o + 1) % len(D.OBJECTS)
            img = torch.zeros(3, 8, 8)
            img[0], img[1] = o / len(D.OBJECTS) + 0.05, s / len(D.STYLE_LABELS) + 0.02
            out.append(img)
        return SimpleNamespace(images=torch.stack(out))


class _Decoder(nn.Module):
    """A perfect judge of the fake drawings (channel 0: object, channel 1: style)."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.size = kind, 8
        self.n = len(D.OBJECTS) if kind == "object" else len(D.STYLE_LABELS)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = 0 if self.kind == "object" else 1
        ids = (x[:, c].mean((1, 2)) * self.n).floor().long().clamp(0, self.n - 1)
        return nn.functional.one_hot(ids, self.n).float() * 10


JUDGES = {"object": _Decoder("object"), "style": _Decoder("style")}


def test_gate_jobs_cover_every_prompt_of_every_heldout_form():
    jobs = gate_jobs((1, 2), "heldout")
    per_seed = len(D.STYLES) * len(D.OBJECTS) * len(D.HELDOUT_FORMS) + len(D.OBJECTS) * len(
        D.UNSTYLED_HELDOUT_FORMS)
    assert len(jobs) == 2 * per_seed == 1280 and len(set(jobs)) == len(jobs)
    assert {j[3] for j in jobs if j[1] < len(D.STYLES)} == set(D.HELDOUT_FORMS)
    assert {j[3] for j in jobs if j[1] == len(D.STYLES)} == set(D.UNSTYLED_HELDOUT_FORMS)
    assert gate_jobs(188) == [(o, s, 188) for s in range(len(D.STYLE_LABELS)) for o in range(len(D.OBJECTS))]
    with pytest.raises(ValueError, match="unknown caption-form split"):
        gate_jobs((1,), "paraphrase")
    with pytest.raises(ValueError, match="at least one seed"):
        gate_jobs(())


def test_heldout_form_gates_per_form_and_pass_fail():
    pipe = _FakePipe()
    g = model_gates(pipe, JUDGES, seeds=(1, 2), batch_size=100, progress=False, damage=False)
    assert g["caption_forms"] is True                                # read from the tokenizer
    # the training form: every prompt x seed, drawn right: the issue-21 gates (98 / 99 %)
    assert g["generated"]["object"] == {"accuracy": 1.0, "gate": FORM_GATES["object"], "pass": True}
    assert g["generated"]["style"]["gate"] == FORM_GATES["style"] == 0.99
    assert g["counts"]["generated"] == 220 and g["counts"]["heldout_forms"] == 1280
    per = g["heldout_forms_detail"]["per_form"]
    assert list(per) == [f"styled {f}" for f in D.HELDOUT_FORMS] + [f"unstyled {f}" for f in D.UNSTYLED_HELDOUT_FORMS]
    assert per[f"styled {WRONG_FORM}"]["object"] == 0.0 and per[f"styled {WRONG_FORM}"]["style"] == 1.0
    assert per[f"styled {WRONG_FORM}"]["n"] == 200 and per["unstyled 10"]["n"] == 20
    assert all(f["object"] == 1.0 for k, f in per.items() if k != f"styled {WRONG_FORM}")
    assert per["styled 14"]["caption"] == D.CAPTION_FORMS[14]
    # pooled over the held-out forms: 100 wrong objects of 640 per seed -> 84.4 % < 90 %: FAIL; styles pass
    obj = g["heldout_forms"]["object"]
    assert obj["accuracy"] == pytest.approx(540 / 640) and obj["gate"] == HELDOUT_FORM_GATE and obj["pass"] is False
    assert g["heldout_forms"]["style"]["pass"] is True and g["pass"] is False
    assert g["sampling"]["seeds"] == [1, 2] and g["sampling"]["form_seeds"] == [1, 2]
    assert "attack_control" not in g                                 # no control asked
    text = "\n".join(gate_lines(g))
    assert "held-out forms     object   84.4 %  (gate >= 90 %)  FAIL" in text and text.endswith("all gates: FAIL")
    # every held-out caption was generated, each with its own seed
    assert {p for p in pipe.prompts} >= {D.form_caption("star", "neon", f) for f in D.HELDOUT_FORMS}
    # other form seeds; one seed only
    g1 = model_gates(_FakePipe(), JUDGES, seeds=(1,), form_seeds=(5,), batch_size=64, progress=False,
                     damage=False)
    assert g1["counts"] == {"generated": 110, "heldout_forms": 640} and g1["sampling"]["form_seeds"] == [5]


def test_a_model_without_caption_forms_keeps_the_old_gates():
    g = model_gates(_FakePipe(forms=False), JUDGES, seeds=(1,), batch_size=110, progress=False, damage=False)
    assert g["caption_forms"] is False and g["generated"]["object"]["gate"] == GENERATED_GATE == 0.95
    assert "heldout_forms" not in g and g["pass"] is True and g["counts"] == {"generated": 110}
    # forced: the held-out forms of an old model, measured on request
    g = model_gates(_FakePipe(forms=False), JUDGES, seeds=(1,), heldout_forms=True, batch_size=110,
                    progress=False, damage=False)
    assert g["heldout_forms"]["object"]["pass"] is False and g["generated"]["object"]["gate"] == 0.95


def test_generated_accuracy_default_is_the_training_form():
    pipe = _FakePipe()
    res = generated_accuracy(pipe, JUDGES, (3,), batch_size=50, progress=False)
    assert pipe.prompts == [D.caption(o, s, 0) for s in range(len(D.STYLE_LABELS)) for o in range(len(D.OBJECTS))]
    assert res["object"] == 1.0 and "per_form" not in res and res["n"] == 110


@pytest.mark.parametrize("before, after, move, ok", [
    (0.13, 0.51, 38.0, False),      # the shipped model (issue 21): the prefix breaks its captions
    (0.18, 0.20, 2.0, True),
    (0.50, 0.45, -5.0, True),       # either way, float noise at the bar does not fail it
    (0.50, 0.449, -5.1, False),
])
def test_control_movement(before, after, move, ok):
    from saeuron.evaluate.compare import CONTROL_BAR, control_movement

    c = control_movement(before, after)
    assert c["move_points"] == pytest.approx(move) and c["pass"] is ok and c["bar_points"] == CONTROL_BAR == 5.0


@pytest.fixture(scope="module")
def forms_build(tmp_path_factory):
    from saeuron.minicanvas.build import build_defaults

    out = tmp_path_factory.mktemp("gates") / "build"
    rec = build_defaults(out, "micro", progress=False, stages=("classifiers", "model", "gates"),
                         settings={"model": {"caption_forms": True}})
    return out, rec


def test_gates_json_of_a_caption_forms_build(forms_build):
    out, rec = forms_build
    g = json.loads((out / "gates.json").read_text())
    assert g["caption_forms"] is True
    for part, gates in (("generated", FORM_GATES), ("heldout_forms", {"object": 0.9, "style": 0.9}),
                        ("heldout", {"object": 0.99, "style": 0.99})):
        for k in ("object", "style"):
            assert g[part][k]["gate"] == gates[k] and g[part][k]["pass"] == (g[part][k]["accuracy"] >= gates[k])
    assert len(g["heldout_forms_detail"]["per_form"]) == len(D.HELDOUT_FORMS) + len(D.UNSTYLED_HELDOUT_FORMS)
    assert g["heldout_forms_detail"]["forms"] == {"styled": list(D.HELDOUT_FORMS),
                                                  "unstyled": list(D.UNSTYLED_HELDOUT_FORMS)}
    assert g["counts"] == {"generated": 110, "heldout_forms": 640, "attack_control": 2, "heldout": 64}
    assert g["sampling"]["seeds"] == [188] and g["sampling"]["form_seeds"] == [188]
    c = g["attack_control"]                                          # micro: stripes and circle, 1 prompt each
    assert set(c["per_target"]) == {"style", "object"} and c["targets"] == 2 and c["iterations"] == 1
    assert c["move_points"] == pytest.approx(100 * (c["ua_after"] - c["ua_before"]))
    assert c["pass"] == (abs(c["move_points"]) <= 5) and c["bar_points"] == 5.0
    # the control's "before" is the judges' reading of the gate's own training-form images
    assert c["per_target"]["style"]["stripes"]["prompts"][0]["prompt"] == D.caption("circle", "stripes")
    # the damage measure calibrated for this model (one gate seed: the check is in-sample), not a gate
    d = g["damage_check"]
    assert d["calibration"]["images"] == 110 and d["calibration_seeds"] == [188] and d["check_images"] == 110
    assert d["calibration"]["source"] == "unedited model, training form, seed 188" and 0 <= d["flagged_clean"] <= 0.1
    parts = [g[p][k]["pass"] for p in ("heldout", "generated", "heldout_forms") for k in ("object", "style")]
    assert g["pass"] == (all(parts) and c["pass"])
    st = rec["stages"]["gates"]
    assert st["all_pass"] == g["pass"] and st["heldout_forms"]["object"] == g["heldout_forms"]["object"]["accuracy"]
    assert st["attack_control_move_points"] == c["move_points"]


def test_cli_gates_on_a_saved_pipeline(forms_build, tmp_path, capsys):
    from saeuron.cli import main

    out, _ = forms_build
    dest = tmp_path / "g" / "gates.json"
    main(["minicanvas", "gates", "--pipeline", str(out / "model"), "--classifiers", str(out / "classifiers"),
          "--seeds", "188", "--steps", "4", "--control-prompts", "1", "--control-iterations", "1", "--device", "cpu",
          "--out", str(dest), "--no-progress"])
    printed = capsys.readouterr().out
    g = json.loads(dest.read_text())
    assert f"gates of {out / 'model'} (trained 30 steps; caption forms: yes)" in printed
    assert "held-out forms" in printed and "attack control" in printed and "all gates:" in printed
    assert g["model_steps"] == 30 and g["pipeline"] == str(out / "model") and g["command"].startswith("saeuron")
    assert g["attack_control"]["targets"] == 20 and g["counts"]["heldout_forms"] == 640
    # the same images as the build's gates stage (same seeds and steps): the same figures
    built = json.loads((out / "gates.json").read_text())
    for part in ("generated", "heldout_forms"):
        assert {k: v["accuracy"] for k, v in g[part].items()} == {k: v["accuracy"] for k, v in built[part].items()}
    assert not list(dest.parent.glob(".*"))                          # written atomically: no temporary left
    main(["minicanvas", "gates", "--pipeline", str(out / "model"), "--classifiers", str(out / "classifiers"),
          "--seeds", "188", "--steps", "2", "--no-heldout-forms", "--no-control", "--caption-forms", "no",
          "--no-progress"])
    printed = capsys.readouterr().out
    assert "held-out forms" not in printed and "attack control" not in printed and "(gate >= 95 %)" in printed
    assert "damage measure" in printed and "not a gate" in printed
    with pytest.raises(SystemExit, match="not a saved MiniCanvas pipeline"):
        main(["minicanvas", "gates", "--pipeline", str(tmp_path / "nothing")])


def test_damage_check_calibrates_on_the_first_seed_and_checks_the_others(forms_build):
    from saeuron.minicanvas.classifiers import load_classifiers
    from saeuron.minicanvas.model import load_pipeline

    out, _ = forms_build
    g = model_gates(load_pipeline(out / "model"), load_classifiers(out / "classifiers"), seeds=(188, 288),
                    heldout_forms=False, num_inference_steps=2, progress=False)
    d = g["damage_check"]
    assert d["calibration_seeds"] == [188] and d["check_seeds"] == [288]
    assert d["calibration"]["images"] == 110 and d["check_images"] == 110 and 0 <= d["flagged_clean"] <= 1
    assert "heldout_forms" not in g and "attack_control" not in g and g["counts"] == {"generated": 220}
