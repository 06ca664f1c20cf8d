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
    monkeypatch.setenv("SAEURON_MINICANVAS_ASSETS", str(micro_assets))
    stale = tmp_path / "demo" / "unlearn_object" / "grids" / "star.png"  # an earlier demo's target
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    printed = capsys.readouterr().out
    for stage in ("1/3", "2/3", "3/3", "collect:", "train:", "select:", "| stripes |", "| triangle |"):
        assert stage in printed
    listed = printed.split("Grids (original | unlearned):\n")[1].split("\nMetrics:")[0].split()
    assert [Path(p).name for p in listed] == ["stripes.png", "triangle.png"]  # this run's grids only
    assert all(Path(p).is_file() and Path(p).stat().st_size > 100 for p in listed)
    assert "UA" in (tmp_path / "demo" / "metrics.md").read_text()
    assert (tmp_path / "demo" / "small_scale" / "checkpoint" / "concepts.json").is_file()
    # rerun into the same folder after the sampling default changed: starts the small-scale stages over
    import saeuron.minicanvas.model as model

    monkeypatch.setattr(model, "DEFAULT_GUIDANCE", model.DEFAULT_GUIDANCE + 1.0)
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    assert "| stripes |" in capsys.readouterr().out


def test_demo_falls_back_to_a_toy_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAEURON_MINICANVAS_ASSETS", str(tmp_path / "nothing"))
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    printed = capsys.readouterr().out
    assert "not built" in printed and "saeuron minicanvas build" in printed
    assert Path(tmp_path / "demo" / "images" / "grid.png").is_file()
    assert "holds the target" in (tmp_path / "demo" / "metrics.md").read_text()
