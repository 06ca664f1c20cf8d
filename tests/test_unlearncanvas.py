"""The UnlearnCanvas harness on MiniCanvas stand-ins laid out like the real thing: generate -> classify -> report."""
import json
import sys

import pytest
import torch

from conftest import make_sae
from saeuron.cli import main
from saeuron.concepts import ConceptTable
from saeuron.evaluate import judges as uj
from saeuron.evaluate import unlearncanvas as uc
from saeuron.minicanvas import build_classifier

UP = "up_blocks.1.attentions.1"  # 32 channels in the tiny pipeline
TS = [667.0, 334.0, 1.0]
STYLES, OBJECTS = ["Abstractionism", "Van_Gogh"], ["Bears", "Cats"]


def _two_head_state(seed=3):
    """A SmallCNN body with a style and an object head, as one plain state dict (random, varied weights)."""
    torch.manual_seed(seed)
    sty, obj = build_classifier(2, width=2), build_classifier(2, width=2)
    state = {k: v for k, v in sty.state_dict().items() if k.startswith("body.")}
    state.update({f"style_head.{k}": v for k, v in sty.head.state_dict().items()})
    state.update({f"object_head.{k}": v for k, v in obj.head.state_dict().items()})
    return state


def _split(state):
    """The same classifier as two single-head state dicts (style, object), each ``body.*`` + ``head.*``."""
    body = {k: v for k, v in state.items() if k.startswith("body.")}
    return [{**body, **{"head." + k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{kind}_head.")}}
            for kind in ("style", "object")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A stand-in SD folder, SAeUron checkpoint, label JSON and classifier files."""
    from saeuron.toy import tiny_pipeline

    root = tmp_path_factory.mktemp("uc")
    tiny_pipeline(words=("an image of bears cats in abstractionism van gogh style",)).save_pretrained(root / "sd")
    make_sae(32, 128, 4, seed=1).save(root / "ckpt" / UP)
    g = torch.Generator().manual_seed(0)
    mu = {UP: torch.rand(2, len(TS), 128, generator=g) * 1e-3}  # tiny thresholds: selected features fire
    ConceptTable(["Abstractionism", "Van Gogh"], [3, 3], TS, mu,  # "Van Gogh": found for the label "Van_Gogh"
                 defaults={"top_n": 16, "multiplier": -5.0}).save(root / "ckpt")
    (root / "labels.json").write_text(json.dumps({"styles": STYLES, "objects": OBJECTS}))
    state = _two_head_state()
    torch.save(state, root / "two_heads.pth")
    sty, obj = _split(state)
    torch.save({"model_state_dict": sty, "epoch": 7}, root / "style.pth")  # wrapped, as training scripts save
    torch.save({"state_dict": {f"module.{k}": v for k, v in obj.items()}}, root / "object.pt")  # DataParallel
    return root


def _files(run):
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in (run / "images").rglob("*.png")}


def test_generate_classify_report_resume(world, tmp_path, capsys):
    run = tmp_path / "run"
    gen = ["unlearncanvas", "generate", "--run", str(run), "--model", str(world / "sd"), "--checkpoint",
           str(world / "ckpt"), "--labels", str(world / "labels.json"), "--seeds", "188", "--steps", "2",
           "--guidance", "5", "--original", "--batch-size", "3", "--quiet"]
    main(gen)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["targets"] == STYLES and cfg["concepts"] == {"Abstractionism": "Abstractionism", "Van_Gogh": "Van Gogh"}
    assert (cfg["seeds"], cfg["steps"], cfg["guidance"], cfg["domain"]) == ([188], 2, 5.0, "style")
    files = _files(run)
    assert sorted(files) == sorted(f"images/{f}/{o}__{s}__188.png" for f in STYLES + ["_original"]
                                   for o in OBJECTS for s in STYLES)
    assert uc.prompt("Bears", "Van_Gogh") == "An image of Bears in Van Gogh style."
    from PIL import Image
    import numpy as np
    px = lambda f: np.asarray(Image.open(run / "images" / f / "Bears__Van_Gogh__188.png"), dtype=np.int16)  # noqa: E731
    assert np.abs(px("Van_Gogh") - px("_original")).max() > 0  # the edit changed the image

    main(gen)  # resume: nothing to do, nothing rewritten, the model is not even loaded
    assert _files(run) == files
    assert uc.generate_images(run, lambda: pytest.fail("loaded the model with nothing to do"), original=True,
                              progress=False) == {"Abstractionism": 0, "Van_Gogh": 0, "_original": 0}
    (run / "images" / "Van_Gogh" / "Cats__Abstractionism__188.png").unlink()
    main(gen)  # exactly the missing image is written again
    again = _files(run)
    assert sorted(again) == sorted(files)
    assert [f for f in files if again[f] != files[f]] == ["images/Van_Gogh/Cats__Abstractionism__188.png"]
    with pytest.raises(SystemExit, match="other settings"):
        main(gen[:-1] + ["--steps", "3"])

    cls = ["unlearncanvas", "classify", "--run", str(run), "--arch", "minicanvas", "--quiet"]
    main(cls + ["--classifier", str(world / "two_heads.pth")])
    assert "Abstractionism: done" in capsys.readouterr().out
    preds = {f: json.loads((run / "predictions" / f"{f}.json").read_text()) for f in STYLES + ["_original"]}
    assert all(len(p["predictions"]) == 4 for p in preds.values())
    stamp = (run / "predictions" / "Van_Gogh.json").stat().st_mtime_ns
    main(cls + ["--classifier", str(world / "two_heads.pth")])  # resume: kept
    assert "Van_Gogh: kept" in capsys.readouterr().out
    assert (run / "predictions" / "Van_Gogh.json").stat().st_mtime_ns == stamp
    # the same classifier split into two wrapped files gives the same predictions
    main(cls + ["--style-classifier", str(world / "style.pth"), "--object-classifier", str(world / "object.pt")])
    assert "Van_Gogh: done" in capsys.readouterr().out
    for f in preds:
        assert json.loads((run / "predictions" / f"{f}.json").read_text())["predictions"] == preds[f]["predictions"]

    main(["unlearncanvas", "report", "--run", str(run), "--quiet"])
    res = json.loads((run / "results.json").read_text())
    for t in STYLES:  # recomputed by hand from the predictions
        p = preds[t]["predictions"]
        tgt = [v for k, v in p.items() if k.split("__")[1] == t]
        rest = [(k.split("__")[1], v) for k, v in p.items() if k.split("__")[1] != t]
        m = res["per_target"][t]
        assert m["ua"] == pytest.approx(1 - sum(v["style"] == t for v in tgt) / len(tgt))
        assert m["ira"] == pytest.approx(sum(v["style"] == s for s, v in rest) / len(rest))
        assert m["cra"] == pytest.approx(sum(v["object"] == k.split("__")[0] for k, v in p.items()) / len(p))
        assert (m["n_target"], m["n_rest"]) == (2, 2)
    assert res["mean"]["ua"] == pytest.approx(sum(res["per_target"][t]["ua"] for t in STYLES) / 2)
    assert res["baseline"] is not None and res["missing"] == []
    md = (run / "results.md").read_text()
    assert "| Van_Gogh |" in md and "| **mean** |" in md and md == res["table"]


def test_report_numbers_by_hand(tmp_path):
    """Designed predictions: the table's numbers worked out by hand (object unlearning, 3 objects x 2 styles)."""
    objs, stys = ["Bears", "Cats", "Dogs"], ["Abstractionism", "Van_Gogh"]
    cfg = {"format": uc.FORMAT, "version": 1, "styles": stys, "objects": objs, "template": uc.TEMPLATE,
           "seeds": [188], "domain": "object", "targets": ["Cats", "Dogs"], "concepts": {}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    right = {f"{o}__{s}__188": {"style": s, "object": o} for s in stys for o in objs}
    cats = {**right, "Cats__Abstractionism__188": {"style": "Van_Gogh", "object": "Bears"},  # erased, style lost
            "Dogs__Van_Gogh__188": {"style": "Van_Gogh", "object": "Cats"}}  # retain error
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "Cats.json").write_text(json.dumps({"predictions": cats}))
    res = uc.report(tmp_path, progress=False)
    m = res["per_target"]["Cats"]
    assert m["ua"] == pytest.approx(1 / 2) and m["ira"] == pytest.approx(3 / 4)
    assert m["cra"] == pytest.approx(5 / 6) and m["cra_rest"] == 1.0
    assert res["missing"] == ["Dogs"] and res["mean"]["ua"] == pytest.approx(0.5)
    assert "| Cats | 50.00 | 75.00 | 83.33 | 100.00 | 6 |" in res["table"] and "Dogs" in res["table"]


def test_classifier_files_and_errors(world, tmp_path, monkeypatch):
    state = _two_head_state()
    judges = uj.load_judges("minicanvas", 2, 2, classifier=world / "two_heads.pth")
    assert judges["style"][0] is judges["object"][0]  # one shared body
    x = torch.rand(3, 3, 32, 32)
    ref = build_classifier(2, width=2)
    ref.load_state_dict(_split(state)[1])
    body, head = judges["object"]
    assert torch.allclose(head(body(x * 2 - 1)), ref.eval()(x), atol=1e-5)  # SmallCNN.forward maps [0, 1] -> [-1, 1]
    st = tmp_path / "style.safetensors"
    from safetensors.torch import save_file
    save_file(_split(state)[0], str(st))
    assert set(uj.read_state_dict(st)) == set(_split(state)[0])

    with pytest.raises(FileNotFoundError, match="not found"):
        uj.read_state_dict(tmp_path / "nope.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole module: needs full unpickling
    with pytest.raises(ValueError, match=r"cannot be loaded safely: .*torch.nn.modules.linear.Linear"):
        uj.read_state_dict(tmp_path / "pickled.pth")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt or not a plain tensor checkpoint"):
        uj.read_state_dict(tmp_path / "garbage.pt")
    torch.save({"epoch": 3, "weights": {"a": [1, 2]}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="top-level keys are: epoch, weights"):
        uj.read_state_dict(tmp_path / "odd.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown classifier file type"):
        uj.read_state_dict(tmp_path / "w.onnx")
    with pytest.raises(ValueError, match="unknown classifier architecture"):
        uj.load_judges("resnet50", 2, 2, classifier=world / "two_heads.pth")
    with pytest.raises(ValueError, match="has 2 classes but the run lists 50 styles"):
        uj.load_judges("minicanvas", 50, 2, classifier=world / "two_heads.pth")
    with pytest.raises(ValueError, match="no style head 'style_head.weight'"):
        uj.load_judges("minicanvas", 2, 2, classifier=world / "style.pth")
    with pytest.raises(ValueError, match="either one two-head"):
        uj.load_judges("minicanvas", 2, 2, classifier=world / "two_heads.pth", style_classifier=world / "style.pth")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match="pip install timm"):
        uj.load_judges("vit_large_patch16_224", 2, 2, classifier=world / "two_heads.pth")


def test_cli_and_config_errors(world, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["unlearncanvas", "classify", "--run", str(run), "--arch", "resnet50"])
    assert "invalid choice: 'resnet50'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not an UnlearnCanvas run folder"):
        main(["unlearncanvas", "report", "--run", str(run)])
    with pytest.raises(ValueError, match="a new run needs model="):
        uc.init_run(run, checkpoint=world / "ckpt")
    with pytest.raises(ValueError, match="target 'Cubism' is not one of the run's styles"):
        uc.init_run(run, model=world / "sd", checkpoint=world / "ckpt", labels=world / "labels.json",
                    targets=["Cubism"])
    with pytest.raises(ValueError, match="knows none of the objects"):
        uc.init_run(run, model=world / "sd", checkpoint=world / "ckpt", labels=world / "labels.json", domain="object")
    cfg = uc.init_run(run, model=world / "sd", checkpoint=world / "ckpt", labels=world / "labels.json",
                      targets=["Van_Gogh"], seeds=[1])
    assert cfg["targets"] == ["Van_Gogh"]
    assert uc.init_run(run, targets=["Abstractionism"])["targets"] == ["Van_Gogh", "Abstractionism"]  # appended
    with pytest.raises(SystemExit, match="classifier file .*missing.pth not found"):
        main(["unlearncanvas", "classify", "--run", str(run), "--arch", "minicanvas", "--style-classifier",
              str(tmp_path / "missing.pth"), "--object-classifier", str(world / "object.pt")])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")
    with pytest.raises(SystemExit, match="cannot be loaded safely"):  # checked now, though no image exists yet
        main(["unlearncanvas", "classify", "--run", str(run), "--arch", "minicanvas", "--classifier",
              str(tmp_path / "pickled.pth"), "--quiet"])
    bad = tmp_path / "bad_labels.json"
    bad.write_text(json.dumps({"styles": ["A", "A"], "objects": ["B"]}))
    with pytest.raises(ValueError, match="duplicates: A"):
        uc.load_labels(bad)
    bad.write_text(json.dumps({"styles": ["A__B"], "objects": ["B"]}))
    with pytest.raises(ValueError, match="cannot be file names"):
        uc.load_labels(bad)
    assert len(set(uc.STYLES)) == len(uc.STYLES) == 50 and len(set(uc.OBJECTS)) == len(uc.OBJECTS) == 20
