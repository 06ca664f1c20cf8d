"""The evaluation layer: UnlearnCanvas metrics, Frechet distance, the MiniCanvas protocol, the sweep, explain."""
import json

import pytest
import torch
from PIL import Image

from conftest import make_sae
from saeuron.concepts import ConceptTable
from saeuron.evaluate.explain import explain
from saeuron.evaluate.metrics import (Record, frechet_distance, frechet_distance_gaussians, target_metrics,
                                      unlearning_metrics)
from saeuron.evaluate.sweep import choose_rule, sweep, sweep_table
from saeuron.evaluate.unlearn_eval import build_jobs, edit_signature, evaluate_unlearning
from saeuron.minicanvas import build_classifier, data
from saeuron.patching import get_patch

UP = "up_blocks.1.attentions.1"  # 32 channels in the tiny pipeline
DOWN = "down_blocks.1.attentions.0"  # a second hookpoint name for concept tables (no pipeline needed)
TS = [667.0, 334.0, 1.0]


# ---------------------------------------------------------------- metrics (numbers worked out by hand)

def _records(targets, domain):
    rows = [  # object, style, pred_object, pred_style
        (0, 0, 0, 0),      # circle/stripes: style kept, object right
        (1, 0, 1, 3),      # ring/stripes: style gone, object right
        (0, 1, 2, 1),      # circle/checker: style right, object wrong
        (1, None, 1, 10),  # ring/unstyled: "unstyled" (id 10) right, object right
        (2, 1, 2, 0),      # square/checker: style wrong, object right
    ]
    return [Record(tuple(targets), domain, *r) for r in rows]


def test_metrics_by_hand():
    m = target_metrics(_records(["stripes"], "style"))
    assert m["ua"] == pytest.approx(1 - 1 / 2)      # target images 1, 2: one still stripes
    assert m["ira"] == pytest.approx(2 / 3)          # images 3, 4 right, 5 wrong
    assert m["cra"] == pytest.approx(4 / 5)          # object right on all but image 3
    assert m["cra_rest"] == pytest.approx(2 / 3)     # images 3, 4, 5
    assert (m["n_target"], m["n_rest"]) == (2, 3)
    o = target_metrics(_records(["ring"], "object"))
    assert o["ua"] == 0.0                            # images 2, 4: both still rings
    assert o["ira"] == pytest.approx(2 / 3)          # images 1, 5 right, 3 wrong
    assert o["cra"] == pytest.approx(3 / 5)          # style right on images 1, 3, 4
    multi = target_metrics(_records(["stripes", "checker"], "style"))
    assert multi["ua"] == pytest.approx(0.5) and multi["ira"] == 1.0 and multi["n_target"] == 4
    res = unlearning_metrics(_records(["stripes"], "style") + _records([1], "object"))
    assert set(res["per_target"]) == {"stripes", "1"}
    assert res["mean"]["ua"] == pytest.approx(0.25) and res["mean"]["cra"] == pytest.approx(0.7)
    assert target_metrics(_records(["neon"], "style"))["ua"] is None  # no image of the target
    with pytest.raises(ValueError, match="unknown domain"):
        target_metrics(_records(["stripes"], "colour"))
    with pytest.raises(ValueError, match="unknown style"):
        target_metrics(_records(["vangogh"], "style"))


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.randn(6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.double().pow(2).sum()), rel=1e-9)
    b = torch.randn(40, 6, generator=g) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with unbiased variances 5/3 and 10
    x, y = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[0.0], [2.0], [4.0], [6.0], [8.0]])
    assert frechet_distance(x, y) == pytest.approx(1.5 ** 2 + ((5 / 3) ** 0.5 - 10 ** 0.5) ** 2, rel=1e-12)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    va, vb = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 16.0])
    mu = torch.tensor([1.0, 0.0, -1.0])
    assert frechet_distance_gaussians(mu, torch.diag(va), torch.zeros(3), torch.diag(vb)) == pytest.approx(2 + 3)
    # general SPD: tr sqrt(S1 S2) from the (real, positive) eigenvalues of S1 S2
    A, B = torch.randn(5, 5, generator=g).double(), torch.randn(5, 5, generator=g).double()
    s1, s2 = A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64), B @ B.T + 0.1 * torch.eye(5, dtype=torch.float64)
    expect = float(s1.trace() + s2.trace() - 2 * torch.linalg.eigvals(s1 @ s2).real.sqrt().sum())
    assert frechet_distance_gaussians(torch.zeros(5), s1, torch.zeros(5), s2) == pytest.approx(expect, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, a[:, :3])


# ---------------------------------------------------------------- the protocol on a tiny random pipeline

@pytest.fixture(scope="module")
def mc_pipe():
    from saeuron.toy import tiny_pipeline

    return tiny_pipeline(words=data.vocabulary())


def _classifiers():
    torch.manual_seed(5)
    return {"object": build_classifier(len(data.OBJECTS), width=2, kind="object").eval(),
            "style": build_classifier(len(data.STYLE_LABELS), width=2, kind="style").eval()}


def _table(names, m=128, seed=0, **defaults):
    g = torch.Generator().manual_seed(seed)
    mu = {UP: torch.rand(len(names), len(TS), m, generator=g) * 1e-3}  # tiny thresholds: selected features fire
    return ConceptTable(names, [3] * len(names), TS, mu, defaults=defaults or {"top_n": 16, "multiplier": -5.0})


def _count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_evaluate_unlearning_reports_each_template(mc_pipe, tmp_path):
    saes, table = {UP: make_sae(32, 128, 4, seed=1)}, _table(["stripes", "checker"])
    kw = dict(saes=saes, table=table, domain="style", seeds=(188,), objects=["circle", "ring"],
              styles=["stripes", "checker"], num_inference_steps=2, guidance_scale=5.0, batch_size=8,
              out_dir=tmp_path, progress=False)
    res = evaluate_unlearning(mc_pipe, _classifiers(), templates=(0, 1), **kw)
    per = res["per_template"]
    assert list(per) == ["0", "1"] and all(per[t]["images"] == 4 for t in per)
    jobs = build_jobs(["circle", "ring"], ["stripes", "checker"], seeds=(188,), templates=(0, 1))
    for target in ("stripes", "checker"):
        run = json.loads((tmp_path / "runs" / f"{target}.json").read_text())["result"]
        for t in ("0", "1"):
            recs = [Record((target,), "style", j.object, j.style, o, s)
                    for j, o, s in zip(jobs, run["pred_object"], run["pred_style"]) if j.template == int(t)]
            want = target_metrics(recs)
            assert {k: per[t]["per_target"][target][k] for k in want} == want
        # both templates hold as many target images, so the pooled UA is the mean of the two
        assert res["per_target"][target]["ua"] == pytest.approx(
            (per["0"]["per_target"][target]["ua"] + per["1"]["per_target"][target]["ua"]) / 2)
    assert "Per caption template" in (tmp_path / "results.md").read_text()
    single = evaluate_unlearning(mc_pipe, _classifiers(), **{**kw, "out_dir": tmp_path / "one"})
    assert "per_template" not in single


def test_evaluate_unlearning_end_to_end_and_resume(mc_pipe, tmp_path):
    saes, table = {UP: make_sae(32, 128, 4, seed=1)}, _table(["stripes", "checker"])
    clfs = _classifiers()
    kw = dict(saes=saes, table=table, domain="style", seeds=(188,), objects=["circle", "ring"],
              styles=["stripes", "checker"], num_inference_steps=2, guidance_scale=5.0, batch_size=4, multi=2,
              out_dir=tmp_path, progress=False)
    res = evaluate_unlearning(mc_pipe, clfs, **kw)
    assert list(res["per_target"]) == ["stripes", "checker"] and list(res["multi"]) == ["stripes", "stripes+checker"]
    for m in list(res["per_target"].values()) + list(res["multi"].values()):
        assert all(m[k] is None if m["n_rest"] == 0 and k in ("ira", "cra_rest") else 0.0 <= m[k] <= 1.0
                   for k in ("ua", "ira", "cra", "cra_rest"))
        assert m["frechet_object"] >= 0 and m["frechet_style"] >= 0
        w, h = Image.open(m["grid"]).size  # both styles (target and kept) x original | unlearned, a row per object
        assert w >= 110 + 4 * 96 and 2 * 96 <= h < 3 * 96 + 120, (w, h)
    assert (res["per_target"]["stripes"]["n_target"], res["per_target"]["stripes"]["n_rest"]) == (2, 2)
    assert (res["multi"]["stripes+checker"]["n_target"], res["multi"]["stripes+checker"]["n_rest"]) == (4, 0)
    assert res["multi"]["stripes"]["n"] == 1 and res["multi"]["stripes+checker"]["n"] == 2
    assert res["mean"]["ua"] == pytest.approx((res["per_target"]["stripes"]["ua"] + res["per_target"]["checker"]["ua"]) / 2)
    assert 0 <= res["baseline"]["object_acc"] <= 1 and res["baseline"]["images"] == 4
    assert res["per_target"]["stripes"]["frechet_object"] > 0  # the edit changed the images
    run = json.loads((tmp_path / "runs" / "checker.json").read_text())["result"]  # wiring: predictions -> metrics
    jobs = build_jobs(["circle", "ring"], ["stripes", "checker"], seeds=(188,))
    recs = [Record(("checker",), "style", j.object, j.style, o, s)
            for j, o, s in zip(jobs, run["pred_object"], run["pred_style"])]
    assert {k: v for k, v in target_metrics(recs).items()} == {k: res["per_target"]["checker"][k] for k in
                                                                ("ua", "ira", "cra", "cra_rest", "n_target", "n_rest")}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["per_target"] == json.loads(json.dumps(res["per_target"]))
    assert "| stripes |" in (tmp_path / "results.md").read_text()
    assert get_patch(mc_pipe) is None

    calls, h = _count_unet_calls(mc_pipe)
    try:
        again = evaluate_unlearning(mc_pipe, clfs, **kw)  # everything cached: no sampling at all
        assert calls == [] and again["per_target"] == json.loads(json.dumps(res["per_target"]))
        table.defaults["checker"]["multiplier"] = -10.0  # a changed default invalidates checker's runs only
        evaluate_unlearning(mc_pipe, clfs, **kw)
        assert len(calls) == 2 * 2  # 2 runs x 1 batch x 2 steps (CFG in the same call)
    finally:
        h.remove()
    with pytest.raises(ValueError, match="no prompt holds the target"):
        evaluate_unlearning(mc_pipe, clfs, **{**kw, "targets": ["stripes"], "styles": ["checker"]})
    with pytest.raises(ValueError, match="not a MiniCanvas style"):
        evaluate_unlearning(mc_pipe, clfs, **{**kw, "targets": ["circle"]})
    with pytest.raises(TypeError, match="patch options"):
        evaluate_unlearning(mc_pipe, clfs, **kw, multiplyer=-5)
    with pytest.raises(ValueError, match="classifiers must be a dict"):
        evaluate_unlearning(mc_pipe, {"object": clfs["object"]}, **kw)


def test_evaluate_unlearning_reports_damage(mc_pipe, tmp_path):
    """The damage measure's columns, JSON fields and wiring (per-image flags -> run metrics, baseline rates)."""
    from saeuron.evaluate.metrics import DAMAGE_METRICS

    saes, table = {UP: make_sae(32, 128, 4, seed=1)}, _table(["stripes", "checker"])
    kw = dict(saes=saes, table=table, domain="style", seeds=(188, 288), objects=["circle", "ring", "star"],
              styles=["stripes", "checker", None], num_inference_steps=2, guidance_scale=5.0, batch_size=9,
              progress=False)
    res = evaluate_unlearning(mc_pipe, _classifiers(), templates=(0, 1), out_dir=tmp_path, **kw)
    jobs = build_jobs(["circle", "ring", "star"], ["stripes", "checker", None], seeds=(188, 288), templates=(0, 1))
    assert res["damage"]["calibration"]["images"] == sum(j.template == 0 for j in jobs) == 18
    assert res["damage"]["calibration"]["source"] == "unedited model, training form"
    for target in ("stripes", "checker"):
        m = res["per_target"][target]
        assert all(0.0 <= m[k] <= 1.0 for k in DAMAGE_METRICS) and m["ua_undamaged"] <= m["ua"]
        run = json.loads((tmp_path / "runs" / f"{target}.json").read_text())
        assert run["config"]["damage"]["version"] == 1 and len(run["result"]["damaged"]) == len(jobs)
        recs = [Record((target,), "style", j.object, j.style, o, s, d) for j, o, s, d in
                zip(jobs, run["result"]["pred_object"], run["result"]["pred_style"], run["result"]["damaged"])]
        want = target_metrics(recs)
        assert {k: m[k] for k in want} == want                      # wiring: flags -> metrics
        b = res["baseline"]["per_run"][target]
        assert all(0.0 <= b[k] <= 1.0 for k in DAMAGE_METRICS)
        assert set(DAMAGE_METRICS) <= set(res["per_template"]["1"]["per_target"][target])
    assert res["mean"]["damage_target"] == pytest.approx(
        (res["per_target"]["stripes"]["damage_target"] + res["per_target"]["checker"]["damage_target"]) / 2)
    md = (tmp_path / "results.md").read_text()
    assert "| Damage target | Damage kept | UA undamaged |" in md and "UA undamaged counts" in md
    assert md.count("UA undamaged") >= 3                              # main table, note, per-template table
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["damage"]["rule"].startswith("damaged:") and on_disk["mean"]["ua_undamaged"] is not None
    off = evaluate_unlearning(mc_pipe, _classifiers(), out_dir=tmp_path / "off", damage=False, **kw)
    assert "damage" not in off and not set(DAMAGE_METRICS) & set(off["per_target"]["stripes"])
    assert "Damage" not in off["table"] and off["table"].startswith("| run | UA | IRA | CRA | CRA (rest) |")


def test_resolve_sampling_names_the_pipelines_defaults(mc_pipe):
    from saeuron.evaluate.common import resolve_sampling
    from saeuron.minicanvas.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, build_pipeline, model_config

    class Pipe:
        def __call__(self, prompt, num_inference_steps=10, guidance_scale=4):
            return prompt

    mini = build_pipeline(model_config("micro"))
    assert resolve_sampling(mini) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert resolve_sampling(mini, 3, 2) == (3, 2.0) and resolve_sampling(mini, None, 2)[0] == DEFAULT_STEPS
    assert resolve_sampling(mc_pipe) == (50, 7.5)  # a StableDiffusionPipeline's own defaults
    assert resolve_sampling(Pipe()) == (10, 4.0) and isinstance(resolve_sampling(Pipe())[1], float)
    assert resolve_sampling(lambda prompt: None) == (50, 7.5)  # diffusers' usual defaults when the call says nothing


def test_build_jobs_templates_and_unstyled():
    jobs = build_jobs(["circle"], ["stripes", None], seeds=(1, 2), templates=(0, 1))
    assert len(jobs) == 2 * 2 * 2
    assert {j.prompt for j in jobs} == {data.caption("circle", "stripes", 0), data.caption("circle", None, 0),
                                        data.caption("circle", "stripes", 1), data.caption("circle", None, 1)}


# ---------------------------------------------------------------- sweep

def test_sweep_picks_best_and_writes_defaults(tmp_path):
    table = _table(["stripes", "checker", "dots"])
    table.save(tmp_path)
    assert choose_rule(table) == "top_n"  # 128 latents: a 99.99 percentile keeps < 2 features
    best = {"stripes": (4, -10.0), "checker": (1, -1.0)}
    calls = []

    def scorer(concept, rule, value, multiplier, hookpoints, threshold):
        calls.append((concept, rule, value, multiplier, hookpoints))
        assert threshold == 1.0  # default: the method's tau only
        hit = best.get(concept) == (value, multiplier)
        return {"ua": 0.9 if hit else 0.5, "ira": 0.8 if hit else 0.5, "cra": 0.7}

    res = sweep(checkpoint=tmp_path, concepts=["stripes", "checker"], scorer=scorer, progress=False)
    assert len(calls) == 2 * 4 * 7 and {c[-1] for c in calls} == {(UP,)}  # default: one choice, every hookpoint
    assert res["stripes"]["best"]["value"] == 4 and res["stripes"]["best"]["multiplier"] == -10.0
    assert res["stripes"]["best"]["score"] == pytest.approx(0.85)
    loaded = ConceptTable.load(tmp_path)
    assert loaded.defaults["stripes"] == {"multiplier": -10.0, "percentile": None, "top_n": 4, "hookpoints": [UP],
                                          "threshold": 1.0}
    assert loaded.defaults["checker"] == {"multiplier": -1.0, "percentile": None, "top_n": 1, "hookpoints": [UP],
                                          "threshold": 1.0}
    assert loaded.defaults["dots"]["top_n"] == 16  # not swept: unchanged
    assert len(loaded.metadata["sweep"]["stripes"]["grid"]) == 28
    assert loaded.select(UP, "stripes")[0].numel() <= 4  # the stored default is what selection now uses

    calls.clear()
    sweep(checkpoint=tmp_path, concepts=["stripes", "checker"], scorer=scorer, progress=False)
    assert calls == []  # same grid and seeds: resumed from the concept file
    sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, styles=["stripes", None], progress=False)
    assert len(calls) == 28  # other prompts scored: not resumed
    assert loaded.metadata["sweep"]["stripes"]["spec"]["prompts"]["styles"] is None
    assert ConceptTable.load(tmp_path).metadata["sweep"]["stripes"]["spec"]["prompts"]["styles"] == ["stripes", None]
    calls.clear()
    sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, styles=("stripes", None), progress=False)
    assert calls == []  # the same prompts again (a tuple reads back as the stored list): resumed
    tie = sweep(table=_table(["stripes"]), scorer=lambda *a: {"ua": 0.5, "ira": 0.5}, rule="percentile",
                multipliers=(-1, -5), progress=False)
    assert (tie["stripes"]["best"]["value"], tie["stripes"]["best"]["multiplier"]) == (99.99, -1.0)  # ties: first
    with pytest.raises(ValueError, match="disjoint"):
        sweep(checkpoint=tmp_path, scorer=scorer, seeds=(1, 188), progress=False)


def test_sweep_reuses_scored_points_and_resumes_an_interrupted_concept(tmp_path):
    _table(["stripes", "checker"]).save(tmp_path)
    calls = []

    def scorer(concept, rule, value, multiplier, hookpoints, threshold):
        calls.append((concept, value, multiplier, threshold))
        if len(calls) == stop_after:
            raise KeyboardInterrupt  # the sweep killed in the middle of a concept
        good = (value, multiplier, threshold) == (2, -5.0, 10.0)
        return {"ua": 1.0 if good else 0.1 * value, "ira": 0.9 if good else 0.5}

    stop_after = 3
    with pytest.raises(KeyboardInterrupt):
        sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, top_ns=(1, 2), multipliers=(-1.0, -5.0),
              progress=False)
    partial = ConceptTable.load(tmp_path).metadata["sweep"]["stripes"]
    assert partial["partial"] and len(partial["grid"]) == 2  # the two finished points were saved
    assert ConceptTable.load(tmp_path).defaults["stripes"]["top_n"] == 16  # defaults change only when it finishes
    calls.clear()
    stop_after = None
    res = sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, top_ns=(1, 2), multipliers=(-1.0, -5.0),
                progress=False)
    assert calls == [("stripes", 2, -1.0, 1.0), ("stripes", 2, -5.0, 1.0)]  # resumed at the third point
    assert (res["stripes"]["best"]["value"], res["stripes"]["best"]["multiplier"]) == (2, -1.0)
    assert "partial" not in ConceptTable.load(tmp_path).metadata["sweep"]["stripes"]

    calls.clear()  # a wider grid (another threshold, another top-n) scores only its new points
    res = sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, top_ns=(1, 2, 4), multipliers=(-1.0, -5.0),
                thresholds=(1, 10), progress=False)
    assert len(calls) == 12 - 4 and ("stripes", 1, -1.0, 1.0) not in calls
    assert [r["threshold"] for r in res["stripes"]["grid"]] == [1.0] * 6 + [10.0] * 6  # grid order kept
    best = res["stripes"]["best"]
    assert (best["value"], best["multiplier"], best["threshold"]) == (2, -5.0, 10.0)
    assert ConceptTable.load(tmp_path).defaults["stripes"]["threshold"] == 10.0
    calls.clear()  # a narrower grid: its best among its own points, nothing rescored
    res = sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, top_ns=(4,), multipliers=(-1.0,),
                progress=False)
    assert calls == [] and res["stripes"]["best"]["value"] == 4 and len(res["stripes"]["grid"]) == 1
    sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, seeds=(2,), top_ns=(4,), multipliers=(-1.0,),
          progress=False)
    assert calls == [("stripes", 4, -1.0, 1.0)]  # other seeds: scored again
    calls.clear()
    sweep(checkpoint=tmp_path, concepts=["stripes"], scorer=scorer, seeds=(2,), top_ns=(4,), multipliers=(-1.0,),
          resume=False, progress=False)
    assert len(calls) == 1  # resume=False rescores

def test_sweep_over_hookpoint_choices_sets_where_each_concept_is_edited(tmp_path):
    table = _table(["stripes", "circle"])
    g = torch.Generator().manual_seed(3)
    table = ConceptTable.merge([table, ConceptTable(table.names, table.counts, TS,
                                                    {DOWN: torch.rand(2, len(TS), 64, generator=g) * 1e-3},
                                                    defaults=table.defaults)])
    table.save(tmp_path)
    best = {"stripes": (UP,), "circle": (DOWN,)}
    seen = []

    def scorer(concept, rule, value, multiplier, hookpoints, threshold):
        seen.append(hookpoints)
        hit = best[concept] == hookpoints and multiplier == -5.0
        return {"ua": 1.0 if hit else 0.5, "ira": 1.0 if hit else 0.5}

    res = sweep(checkpoint=tmp_path, concepts=["stripes", "circle"], scorer=scorer, top_ns=(2,),
                multipliers=(-1.0, -5.0), hookpoints=[UP, DOWN, f"{DOWN}, unet.{UP}"], progress=False)
    assert seen[:6] == [(UP,), (UP,), (DOWN,), (DOWN,), (DOWN, UP), (DOWN, UP)]  # choices outermost, names normalised
    assert res["circle"]["best"]["hookpoints"] == [DOWN] and res["stripes"]["best"]["hookpoints"] == [UP]
    loaded = ConceptTable.load(tmp_path)
    assert loaded.concept_hookpoints("circle") == [DOWN] and loaded.concept_hookpoints("stripes") == [UP]
    assert "| circle | " + DOWN + " | 1 | top_n" in sweep_table(res)
    with pytest.raises(ValueError, match="unknown hookpoint.*did you mean"):
        sweep(checkpoint=tmp_path, scorer=scorer, hookpoints=["up_blocks.1.attentions.9"], progress=False)
    with pytest.raises(ValueError, match="empty hookpoint choice"):
        sweep(checkpoint=tmp_path, scorer=scorer, hookpoints=[","], progress=False)


def test_sweep_over_thresholds_stores_each_concepts_factor(tmp_path):
    table = _table(["stripes", "circle"])
    table.save(tmp_path)
    seen = []

    def scorer(concept, rule, value, multiplier, hookpoints, threshold):
        seen.append((threshold, value, multiplier))
        hit = threshold == (10.0 if concept == "circle" else 1.0) and multiplier == -20.0
        return {"ua": 1.0 if hit else 0.5, "ira": 0.9 if hit else 0.5}

    res = sweep(checkpoint=tmp_path, concepts=["stripes", "circle"], scorer=scorer, top_ns=(2, 8),
                multipliers=(-5.0, -20.0), thresholds=(1, 10), progress=False)
    assert seen[:8] == [(1.0, 2, -5.0), (1.0, 2, -20.0), (1.0, 8, -5.0), (1.0, 8, -20.0),
                        (10.0, 2, -5.0), (10.0, 2, -20.0), (10.0, 8, -5.0), (10.0, 8, -20.0)]  # thresholds, then values
    assert res["circle"]["best"]["threshold"] == 10.0 and res["stripes"]["best"]["threshold"] == 1.0
    loaded = ConceptTable.load(tmp_path)
    assert loaded.threshold("circle") == 10.0 and loaded.threshold("stripes") == 1.0
    assert loaded.defaults["circle"]["multiplier"] == -20.0
    assert "| circle | " + UP + " | 10 | top_n | 2 | -20 |" in sweep_table(res)
    assert edit_signature(loaded, ["circle"], {})["concepts"]["circle"]["threshold"] == 10.0  # cache keys see it
    assert edit_signature(loaded, ["circle"], {"threshold": {"circle": 3}})["concepts"]["circle"]["threshold"] == 3.0
    seen.clear()
    sweep(checkpoint=tmp_path, concepts=["stripes", "circle"], scorer=scorer, top_ns=(2, 8),
          multipliers=(-5.0, -20.0), thresholds=(1, 10), progress=False)
    assert seen == []  # resumed
    for bad in ((), (0,), (-1.0,)):
        with pytest.raises(ValueError, match="threshold"):
            sweep(checkpoint=tmp_path, scorer=scorer, thresholds=bad, progress=False)


def test_sweep_default_scorer_on_tiny_pipeline(mc_pipe):
    table = _table(["stripes", "checker"])
    res = sweep(mc_pipe, _classifiers(), saes={UP: make_sae(32, 128, 4, seed=1)}, table=table, concepts="stripes",
                seeds=(1,), multipliers=(-1.0, -5.0), top_ns=(1,), thresholds=(1.0, 1e12), objects=["circle"],
                styles=["stripes", "checker"], num_inference_steps=2, guidance_scale=5.0, progress=False)
    grid = res["stripes"]["grid"]
    assert [(r["threshold"], r["value"], r["multiplier"]) for r in grid] == [
        (1.0, 1, -1.0), (1.0, 1, -5.0), (1e12, 1, -1.0), (1e12, 1, -5.0)]
    assert (grid[2]["ua"], grid[2]["ira"]) == (grid[3]["ua"], grid[3]["ira"])  # tau x1e12 edits nothing
    assert all(r["ua"] in (0.0, 1.0) and r["ira"] in (0.0, 1.0) for r in grid)  # one target and one other image
    assert table.defaults["stripes"]["top_n"] == 1 and get_patch(mc_pipe) is None
    # the default: the damage measure judges every image too, and the score counts only undamaged ones
    for r in grid:
        assert {"ua_undamaged", "ira_undamaged", "damage_target", "damage_kept"} <= set(r)
        assert r["ua_undamaged"] <= r["ua"] and r["score"] == (r["ua_undamaged"] + r["ira_undamaged"]) / 2
    assert table.metadata["sweep"]["stripes"]["spec"]["damage"] is True
    plain = sweep(mc_pipe, _classifiers(), saes={UP: make_sae(32, 128, 4, seed=1)}, table=_table(["stripes", "checker"]),
                  concepts="stripes", seeds=(1,), multipliers=(-1.0,), top_ns=(1,), thresholds=(1.0,),
                  objects=["circle"], styles=["stripes", "checker"], num_inference_steps=2, guidance_scale=5.0,
                  progress=False, damage=False)["stripes"]["grid"]
    assert "ua_undamaged" not in plain[0] and plain[0]["score"] == (plain[0]["ua"] + plain[0]["ira"]) / 2
    assert (plain[0]["ua"], plain[0]["ira"]) == (grid[0]["ua"], grid[0]["ira"])  # the same images


def test_sweep_calibrates_damage_on_unedited_images_and_restores_a_callers_patch(mc_pipe, monkeypatch):
    from saeuron.evaluate import sweep as sweep_module
    from saeuron.evaluate.common import sample_images
    from saeuron.patching import patch, unpatch

    seen = []
    real = sweep_module.fit_run_damage
    monkeypatch.setattr(sweep_module, "fit_run_damage", lambda c, jobs, base: seen.append(base) or real(c, jobs, base))
    saes = {UP: make_sae(32, 128, 4, seed=1)}
    kw = dict(objects=["circle"], styles=["stripes", "checker"], num_inference_steps=2, guidance_scale=5.0)
    jobs = build_jobs(kw["objects"], kw["styles"], (1,))
    clean = sample_images(mc_pipe, [j.prompt for j in jobs], [j.seed for j in jobs], num_inference_steps=2,
                          guidance_scale=5.0)
    mine = patch(mc_pipe, "stripes", saes=saes, table=_table(["stripes", "checker"]), multiplier=-30.0)
    try:
        edited = sample_images(mc_pipe, [j.prompt for j in jobs], [j.seed for j in jobs], num_inference_steps=2,
                               guidance_scale=5.0)
        assert (edited - clean).abs().max() > 1e-3  # the caller's patch changes these images
        sweep(mc_pipe, _classifiers(), saes=saes, table=_table(["stripes", "checker"]), concepts="checker", seeds=(1,),
              multipliers=(-1.0,), top_ns=(1,), thresholds=(1.0,), progress=False, **kw)
        assert get_patch(mc_pipe) is mine and mine.active  # restored
    finally:
        unpatch(mc_pipe)
    from saeuron.evaluate.common import judge
    want = judge(_classifiers(), clean)
    assert len(seen) == 1 and torch.allclose(seen[0]["feat_object"], want["feat_object"], atol=1e-5)


def test_sweep_prefers_a_clean_edit_to_a_destructive_one(tmp_path):
    """A point that "removes" the concept by breaking its images (high UA, low UA undamaged) loses to a clean one."""
    def scorer(c, rule, value, mult, hps, thr):
        if mult == -50.0:  # destroys: the judge no longer sees the target, but the images are broken
            return {"ua": 1.0, "ira": 0.95, "cra": 0.9, "ua_undamaged": 0.3, "ira_undamaged": 0.7,
                    "damage_target": 0.7, "damage_kept": 0.25}
        return {"ua": 0.9, "ira": 0.95, "cra": 0.95, "ua_undamaged": 0.88, "ira_undamaged": 0.94,
                "damage_target": 0.02, "damage_kept": 0.01}

    t = _table(["stripes", "checker"])
    res = sweep(table=t, concepts="stripes", seeds=(1,), rule="top_n", top_ns=(1,), multipliers=(-50.0, -1.0),
                thresholds=(1.0,), scorer=scorer, progress=False)
    best = res["stripes"]["best"]
    assert best["multiplier"] == -1.0 and best["score"] == pytest.approx((0.88 + 0.94) / 2)
    assert best["damage_target"] == 0.02 and t.defaults["stripes"]["multiplier"] == -1.0
    assert "UA undamaged" in sweep_table(res) and "| 88.00 | 94.00 | 2.00 / 1.00 |" in sweep_table(res)


# ---------------------------------------------------------------- explain

def test_explain_writes_png_and_html(tiny_pipe, tmp_path):
    table = ConceptTable(["cat", "dog"], [2, 2], TS, {UP: torch.rand(2, len(TS), 128) * 1e-3},
                         defaults={"top_n": 3, "multiplier": -5.0})
    res = explain(tiny_pipe, None, "cat", tmp_path, saes={UP: make_sae(32, 128, 4, seed=1)}, table=table,
                  prompts=["a cat", "a cat in cartoon style"], other_prompts=["a dog"], seeds=(0,),
                  top_features=2, top_images=2, num_inference_steps=2, guidance_scale=5.0, progress=False)
    im = Image.open(res["png"])
    assert im.size[0] >= 600 and im.size[1] >= 400
    assert len(res["features"]) == 2 and res["num_selected"] >= 3
    for f in res["features"]:
        acts = [t["activation"] for t in f["top_images"]]
        assert len(acts) == 2 and acts == sorted(acts, reverse=True) and f["effect"] >= 0
        assert f["steps_selected"] >= 1
    assert res["effect_all"] > 0  # the full edit changes the concept's images
    html = (tmp_path / "index.html").read_text()
    assert "explain_cat.png" in html and all(Image.open(p).size[0] > 0 for p in res["feature_pngs"])
    assert json.loads((tmp_path / "explain_cat.json").read_text())["concept"] == "cat"
    assert res["threshold"] == 1.0  # the concept file's default (the method's tau)
    assert get_patch(tiny_pipe) is None
    high = explain(tiny_pipe, None, "cat", tmp_path / "high", saes={UP: make_sae(32, 128, 4, seed=1)}, table=table,
                   prompts=["a cat"], other_prompts=["a dog"], seeds=(0,), top_features=1, top_images=1,
                   num_inference_steps=2, guidance_scale=5.0, threshold=1e12, progress=False)
    assert high["threshold"] == 1e12  # above any activation: the edit changes nothing (up to batching round-off)
    assert high["effect_all"] < 1e-5 and high["features"][0]["effect"] < 1e-5 < res["effect_all"] / 100
    with pytest.raises(ValueError, match="not a MiniCanvas object or style"):
        explain(tiny_pipe, None, "dog", tmp_path, saes={UP: make_sae(32, 128, 4, seed=1)}, table=table)


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("argv", [["explain"], ["sweep"], ["minicanvas", "eval"]])
def test_cli_help(argv, capsys):
    from saeuron.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "usage: saeuron " + " ".join(argv) in capsys.readouterr().out


def test_cli_explain_sweep_and_minicanvas_eval(mc_pipe, tmp_path, capsys):
    from saeuron.cli import main
    from saeuron.minicanvas import save_classifier

    model, ckpt, clf = tmp_path / "model", tmp_path / "ckpt", tmp_path / "clf"
    mc_pipe.save_pretrained(model)
    make_sae(32, 128, 4, seed=1).save(ckpt / UP)
    _table(["stripes", "checker"]).save(ckpt)
    for kind, m in _classifiers().items():
        save_classifier(m, clf / kind)
    common = ["--model", str(model), "--checkpoint", str(ckpt), "--steps", "2", "--guidance", "5", "--device", "cpu"]
    main(["explain", *common, "--concept", "stripes", "--out", str(tmp_path / "ex"), "--top-features", "1",
          "--top-images", "1"])
    assert (tmp_path / "ex" / "explain_stripes.png").is_file() and "explanation:" in capsys.readouterr().out
    main(["sweep", *common, "--classifiers", str(clf), "--concepts", "checker", "--seeds", "3", "--objects", "circle",
          "--styles", "stripes", "checker", "--multipliers", "-2", "--top-ns", "2", "--hookpoints", f"unet.{UP}",
          "--thresholds", "4"])
    assert f"| checker | {UP} | 4 | top_n | 2 | -2 |" in capsys.readouterr().out
    assert ConceptTable.load(ckpt).defaults["checker"] == {"multiplier": -2.0, "percentile": None, "top_n": 2,
                                                           "hookpoints": [UP], "threshold": 4.0}

    main(["minicanvas", "eval", *common, "--classifiers", str(clf), "--targets", "checker", "--seeds", "188",
          "--objects", "circle", "--styles", "checker", "unstyled", "--out", str(tmp_path / "ev"),
          "--threshold", "checker=2"])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["config"]["patch"] == {"threshold": {"checker": 2.0}}
    run = json.loads((tmp_path / "ev" / "runs" / "checker.json").read_text())
    assert run["config"]["edit"]["concepts"]["checker"]["threshold"] == 2.0  # the cache key holds the factor
    assert res["per_target"]["checker"]["n_target"] == 1 and res["per_target"]["checker"]["n_rest"] == 1
    assert res["config"]["targets"] == ["checker"] and "| checker |" in capsys.readouterr().out
