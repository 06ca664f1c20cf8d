"""`make demo`'s command: the MiniCanvas path (on micro assets built here) and the random-toy fallback."""
from pathlib import Path

import pytest

from saeuron.cli import main


@pytest.fixture(scope="module")
def micro_assets(tmp_path_factory):
    from saeuron.minicanvas.build import build_defaults

    out = tmp_path_factory.mktemp("mc") / "assets"
    build_defaults(out, "micro", seed=0, progress=False)
    return out


def test_demo_on_minicanvas_defaults(micro_assets, tmp_path, monkeypatch, capsys):
    import json

    from PIL import Image

    from saeuron.demo import DEMO_CASES

    monkeypatch.setenv("SAEURON_MINICANVAS_ASSETS", str(micro_assets))
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    printed = capsys.readouterr().out
    for stage in ("1/3", "2/3", "3/3", "collect:", "train:", "select:"):
        assert stage in printed
    for domain, target, kept, rows in DEMO_CASES:
        assert printed.count(f"| {domain} {target!r} |") == 1  # the table is printed once
        grid = tmp_path / "demo" / f"unlearn_{domain}_{target}.png"
        with Image.open(grid) as im:  # every concept twice (original | unlearned), 32x32 shown 4x, rows labelled
            assert im.width >= 2 * (1 + len(kept)) * 128 and im.height >= len(rows) * 128
    assert printed.count("UA (unlearning accuracy)") == 1 and printed.count("Reading:") == len(DEMO_CASES)
    listed = printed.split("kept concepts after):\n")[1].split("\nMetrics:")[0].split()
    assert [Path(p).name for p in listed] == [f"unlearn_{d}_{t}.png" for d, t, _, _ in DEMO_CASES]
    md = (tmp_path / "demo" / "metrics.md").read_text()
    assert "UA (unlearning accuracy)" in md and "Reading:" in md
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for d, t, _, _ in DEMO_CASES:
        got = metrics[f"{d}:{t}"]["unlearned"]
        assert all(0 <= got[m] <= 100 for m in ("UA", "IRA", "CRA")) and got["kept change"] >= 0
    assert (tmp_path / "demo" / "small_scale" / "checkpoint" / "concepts.json").is_file()
    # rerun into the same folder after the sampling default changed: starts the small-scale stages over
    import saeuron.minicanvas.model as model

    monkeypatch.setattr(model, "DEFAULT_GUIDANCE", model.DEFAULT_GUIDANCE + 1.0)
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    assert f"| style {DEMO_CASES[0][1]!r} |" in capsys.readouterr().out


def test_demo_reading_says_when_the_effect_is_not_clean():
    from saeuron.demo import _reading

    clean = {"unlearned": {"UA": 100.0, "IRA": 90.0, "CRA": 95.0}, "unedited": {"UA": 0.0}}
    assert "no longer finds 'mosaic' in 100%" in _reading("style", "mosaic", clean)
    weak = {"unlearned": {"UA": 40.0, "IRA": 90.0, "CRA": 60.0}, "unedited": {"UA": 0.0}}
    r = _reading("object", "arrow", weak)
    assert "not a clean removal" in r and "UA 40" in r and "CRA 60" in r and "IRA" not in r
    undrawn = {"unlearned": {"UA": 100.0, "IRA": 100.0, "CRA": 100.0}, "unedited": {"UA": 60.0}}
    assert "cannot show its removal" in _reading("object", "arrow", undrawn)


def test_demo_falls_back_to_a_toy_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAEURON_MINICANVAS_ASSETS", str(tmp_path / "nothing"))
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    printed = capsys.readouterr().out
    assert "not built" in printed and "saeuron minicanvas build" in printed
    assert Path(tmp_path / "demo" / "images" / "grid.png").is_file()
    assert "holds the target" in (tmp_path / "demo" / "metrics.md").read_text()
