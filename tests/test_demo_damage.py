"""The demo's damage measure: damaged shares and UA undamaged in metrics.md / metrics.json, and a reading that never
calls a concept removed when its target images are damaged."""
import json

import pytest

from saeuron.demo import _reading


def _res(ua=100.0, ira=95.0, cra=95.0, uu=None, dt=None, dk=None):
    u = {"UA": ua, "IRA": ira, "CRA": cra}
    if uu is not None:
        u.update({"UA undamaged": uu, "damaged target": dt, "damaged kept": dk})
    return {"unlearned": u, "unedited": {"UA": 0.0}}


def test_reading_does_not_call_damaged_targets_removed():
    # the stripes edit: the judge is fooled by noise (UA 100) but every target image is damaged
    r = _reading("style", "stripes", _res(uu=0.0, dt=100.0, dk=80.0))
    assert "not a clean removal" in r and "no longer finds" not in r
    assert "target's images are damaged (100% flagged: UA undamaged 0, not UA 100)" in r
    assert "kept images are damaged (80% flagged)" in r
    # clean targets but damaged kept images: not clean either
    r = _reading("style", "stripes", _res(uu=100.0, dt=0.0, dk=40.0))
    assert "not a clean removal" in r and "kept images are damaged (40% flagged)" in r
    # a clean removal says how many target images are undamaged pictures
    r = _reading("style", "mosaic", _res(uu=95.0, dt=5.0, dk=0.0))
    assert "no longer finds 'mosaic' in 100% of its images, 95% as undamaged pictures" in r
    # the target survives: said as before, damage or not
    r = _reading("object", "arrow", _res(ua=40.0, uu=40.0, dt=0.0, dk=0.0))
    assert "the target survives (UA 40)" in r and "damaged" not in r


@pytest.fixture(scope="module")
def micro_assets(tmp_path_factory):
    from saeuron.minicanvas.build import build_defaults

    out = tmp_path_factory.mktemp("mc") / "assets"
    build_defaults(out, "micro", seed=0, progress=False)
    return out


def test_demo_reports_damage(micro_assets, tmp_path, monkeypatch, capsys):
    from saeuron.cli import main
    from saeuron.demo import DEMO_CASES

    monkeypatch.setenv("SAEURON_MINICANVAS_ASSETS", str(micro_assets))
    main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    printed = capsys.readouterr().out
    assert "damage measure calibrated on 110 unedited images (unedited model, training form, seed 188;" in printed
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["damage"]["calibration"]["images"] == 110
    for d, t, kept, rows in DEMO_CASES:
        r = metrics[f"{d}:{t}"]
        for who in ("unedited", "unlearned"):
            got = r[who]
            assert all(0 <= got[k] <= 100 for k in ("damaged target", "damaged kept", "UA undamaged"))
            assert got["UA undamaged"] <= got["UA"] + 1e-9
        clean = r["unlearned"]["UA undamaged"] >= 75 and r["unlearned"]["damaged kept"] <= 25
        if not clean:
            assert "no longer finds" not in r["reading"]
    md = (tmp_path / "demo" / "metrics.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| unlearned"))
    assert "damaged target / kept | UA undamaged |" in head and "unedited damaged target / kept" in head
    assert "UA undamaged: UA counting an image as unlearned only if it is undamaged" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| style {DEMO_CASES[0][1]!r}"))
    assert len(row.split("|")) == len(head.split("|"))
