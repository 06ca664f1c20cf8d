"""The image-damage measure (saeuron.evaluate.damage): it flags corrupted images, including the issue's
"stripes still visible under heavy pixel noise" that the style judge reads as checker, and passes clean
renders and clean generations; and its per-run rates (damage_target, damage_kept, ua_undamaged)."""
import random

import pytest
import torch

from saeuron.evaluate.common import judge
from saeuron.evaluate.damage import (CORRUPTIONS, DamageMeasure, corrupt, damage_rates, fit_damage_measure,
                                     render_references)
from saeuron.evaluate.metrics import DAMAGE_METRICS, Record, target_metrics
from saeuron.minicanvas import data as D
from saeuron.minicanvas import rendering
from saeuron.minicanvas import defaults
from saeuron.minicanvas.classifiers import build_classifier

needs_judges = pytest.mark.skipif(not defaults.available(), reason="the shipped MiniCanvas judges are not built")


@pytest.fixture(scope="module")
def judges():
    return defaults.load_classifiers()


@pytest.fixture(scope="module")
def measure(judges):
    return fit_damage_measure(judges, renders_per_pair=8)      # calibrated on fresh renders


def _records(target, domain, oid, sid, judged, damaged):
    return [Record((target,), domain, int(o), None if int(s) == len(D.STYLES) else int(s), int(po), int(ps), bool(d))
            for o, s, po, ps, d in zip(oid, sid, judged["pred_object"], judged["pred_style"], damaged)]


@needs_judges
def test_clean_renders_pass_and_corruptions_are_flagged(judges, measure):
    imgs, oid, sid = render_references(3, 32, seed=4242)       # other seeds than references and calibration
    clean = measure.score(judge(judges, imgs), oid, sid)
    assert clean["damaged"].float().mean() <= 0.05
    assert measure.calibration["source"] == "renders" and measure.calibration["flagged_clean"] <= 0.05
    for kind in ("noise", "blotches", "invert"):
        bad = measure.score(judge(judges, corrupt(imgs, kind, seed=7)), oid, sid)
        assert bad["damaged"].float().mean() >= 0.8, kind
        assert bad["distance"].median() > 2 * clean["distance"].median(), kind


@needs_judges
def test_stripes_under_heavy_noise_is_flagged_though_the_judge_is_fooled(judges, measure):
    n = 40
    oid = torch.arange(n) % len(D.OBJECTS)
    seeds = torch.arange(n) + 9_000_000
    stripes = rendering.render_batch(oid, [0] * n, seeds)                # the target style, still drawn
    checker = rendering.render_batch(oid, [1] * n, seeds + n)            # a kept style with the same palette
    moved = rendering.render_batch(oid, [8] * n, seeds + 2 * n)          # a clean style change: what unlearning should give
    noisy = corrupt(torch.cat([stripes, checker]), "noise", 0.75, seed=3)
    sid = torch.tensor([0] * n + [1] * n)
    j = judge(judges, noisy)
    sc = measure.score(j, torch.cat([oid, oid]), sid, targets=["stripes"], domain="style")
    m = target_metrics(_records("stripes", "style", torch.cat([oid, oid]), sid, j, sc["damaged"]))
    assert m["ua"] >= 0.5                                        # the judge reads noisy stripes as another style...
    assert m["damage_target"] >= 0.9 and m["damage_kept"] >= 0.9  # ...the measure sees the damage on both
    assert m["ua_undamaged"] <= 0.05 and sc["target"].tolist() == [True] * n + [False] * n
    # clean images: not unlearned (still stripes) or cleanly unlearned (another style): neither is damaged
    clean = torch.cat([stripes, moved, checker])
    cid = torch.tensor([0] * n + [0] * n + [1] * n)              # prompts: stripes, stripes, checker
    j = judge(judges, clean)
    sc = measure.score(j, torch.cat([oid, oid, oid]), cid, targets=["stripes"], domain="style")
    assert sc["damaged"].float().mean() <= 0.05
    m = target_metrics(_records("stripes", "style", torch.cat([oid, oid, oid]), cid, j, sc["damaged"]))
    assert m["ua"] == pytest.approx(0.5, abs=0.05) and m["ua_undamaged"] == pytest.approx(m["ua"], abs=0.05)
    # an object edit: the style must stay; a clean other object in the prompt's style is no damage
    sc = measure.score(judge(judges, moved), oid, [8] * n, targets=["circle"], domain="object")
    assert sc["damaged"].float().mean() <= 0.05


@needs_judges
def test_clean_generations_of_a_micro_model_pass(judges, tmp_path):
    from saeuron.evaluate.common import sample_images
    from saeuron.minicanvas.train_model import train_model

    pipe = train_model(tmp_path / "m", config="micro", steps=30, batch_size=16, progress=False)
    pairs = [(o, s) for s in range(len(D.STYLE_LABELS)) for o in range(len(D.OBJECTS))]
    prompts = [D.caption(o, s) for o, s in pairs]
    oid, sid = [o for o, _ in pairs], [s for _, s in pairs]
    gen = {seed: sample_images(pipe, prompts, [seed] * len(prompts), num_inference_steps=3, batch_size=110)
           for seed in (1, 2)}
    cal = judge(judges, gen[1])
    m = fit_damage_measure(judges, {**cal, "objects": oid, "styles": sid, "source": "micro"}, renders_per_pair=8)
    assert m.calibration["source"] == "micro" and m.calibration["images"] == 110
    other = m.score(judge(judges, gen[2]), oid, sid)["damaged"].float().mean()
    assert other <= 0.08                                         # the model's own images pass (calibrated: ~3 %)
    noisy = m.score(judge(judges, corrupt(gen[2], "invert")), oid, sid)["damaged"].float().mean()
    assert noisy >= 0.5 and noisy > 4 * other


def test_allowed_pairs_by_role():
    mask = DamageMeasure.allowed_mask(["ring", "ring", "star"], ["stripes", None, "neon"], ["stripes"], "style")
    assert mask.shape == (3, len(D.OBJECTS), len(D.STYLE_LABELS))
    assert mask[0, D.object_id("ring")].all() and mask[0].sum() == len(D.STYLE_LABELS)  # target: any style
    assert mask[1].sum() == 1 and mask[1, D.object_id("ring"), len(D.STYLES)]          # kept: its own pair
    assert mask[2].sum() == 1 and mask[2, D.object_id("star"), D.style_id("neon")]
    omask = DamageMeasure.allowed_mask(["ring", "star"], ["dots", "dots"], ["ring"], "object")
    assert omask[0, :, D.style_id("dots")].all() and omask[0].sum() == len(D.OBJECTS)  # object target: any object
    assert omask[1].sum() == 1
    assert DamageMeasure.allowed_mask(["ring"], ["dots"]).sum() == 1                    # no targets: all kept
    with pytest.raises(ValueError, match="unknown domain 'colour'"):
        DamageMeasure.allowed_mask(["ring"], ["dots"], ["ring"], "colour")
    with pytest.raises(ValueError, match="equal lengths"):
        DamageMeasure.allowed_mask(["ring", "star"], ["dots"])


def test_damage_metrics_on_random_records():
    rng = random.Random(8)
    for _ in range(20):
        recs = [Record(("stripes",), "style", rng.randrange(10), rng.choice([0, 1, 2, None]), rng.randrange(10),
                       rng.randrange(11), rng.random() < 0.3) for _ in range(60)]
        m = target_metrics(recs)
        tgt = [r for r in recs if r.style == 0]
        rest = [r for r in recs if r.style != 0]
        assert m["damage_target"] == pytest.approx(sum(r.damaged for r in tgt) / len(tgt))
        assert m["damage_kept"] == pytest.approx(sum(r.damaged for r in rest) / len(rest))
        assert m["ua_undamaged"] == pytest.approx(sum(r.pred_style != 0 and not r.damaged for r in tgt) / len(tgt))
        assert m["ua_undamaged"] <= m["ua"] and set(DAMAGE_METRICS) <= set(m)
        assert damage_rates([r.damaged for r in recs], [r.style == 0 for r in recs]) == {
            "damage_target": m["damage_target"], "damage_kept": m["damage_kept"]}
    plain = target_metrics([Record(("stripes",), "style", 1, 0, 1, 0)])                # no flags: no damage keys
    assert not set(DAMAGE_METRICS) & set(plain)
    with pytest.raises(ValueError, match="2 damage flags for 1 images"):
        damage_rates([True, False], [True])


def test_corruptions_change_images_and_stay_in_range():
    x = rendering.render_batch(["heart", "ring"], ["dots", None], [5, 6])
    for kind in CORRUPTIONS:
        y = corrupt(x, kind, seed=1)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        assert (y - x).abs().mean() > 0.02, kind
        assert torch.equal(y, corrupt(x, kind, seed=1))
    assert torch.allclose(corrupt(x, "invert"), 1 - x)
    with pytest.raises(ValueError, match="unknown corruption 'blur'; valid: noise, blotches, invert, shuffle"):
        corrupt(x, "blur")


def test_fit_errors_and_a_tiny_measure():
    torch.manual_seed(2)
    clfs = {"object": build_classifier(len(D.OBJECTS), width=2, kind="object").eval(),
            "style": build_classifier(len(D.STYLE_LABELS), width=2, kind="style").eval()}
    m = fit_damage_measure(clfs, renders_per_pair=4, k=2)
    assert m.ref.shape[:3] == (len(D.OBJECTS), len(D.STYLE_LABELS), 4) and (m.pair_scale > 0).all()
    assert m.threshold < float("inf") and 0 <= m.calibration["flagged_clean"] <= 0.2
    assert m.config()["renders_per_pair"] == 4 and m.config()["k"] == 2
    with pytest.raises(ValueError, match="k must be an int in 1..renders_per_pair-1"):
        fit_damage_measure(clfs, renders_per_pair=4, k=4)
    with pytest.raises(ValueError, match="calibration must be a dict with 'objects', 'styles'"):
        fit_damage_measure(clfs, {"images": torch.rand(2, 3, 32, 32)}, renders_per_pair=4)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        fit_damage_measure(clfs, renders_per_pair=4, alpha=0.9)
    with pytest.raises(ValueError, match="at least 2 clean images"):
        fit_damage_measure(clfs, {"images": torch.rand(1, 3, 32, 32), "objects": [0], "styles": [0]},
                           renders_per_pair=4)
    with pytest.raises(ValueError, match="renders_per_pair must be an int >= 2"):
        render_references(1)
