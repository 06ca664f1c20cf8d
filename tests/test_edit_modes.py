"""Each concept's own edit mode: the concept file's ``mode``/``gate`` defaults (validated where they enter, saved
and loaded), ``patch`` without ``mode=`` following them, one patch mixing the scale edit with one other mode (the
other mode first, then the scale edit, at a block edited in both), a sweep run in a mode storing it, and the
evaluation layer loading detectors for a default detector mode."""
import pytest
import torch

from conftest import make_sae
from saeuron import reference, replace
from saeuron.concepts import ConceptTable
from saeuron.evaluate.common import with_detectors
from saeuron.evaluate.sweep import sweep
from saeuron.evaluate.unlearn_eval import edit_signature
from saeuron.patching import patch, patched, unpatch

UP = "up_blocks.1.attentions.1"  # 32 channels in the tiny pipeline
TS = [667.0, 334.0, 1.0]


pytestmark = pytest.mark.usefixtures("unpatched_after")  # the module pipe of conftest, unpatched after each test


def _table(defaults=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(3, len(TS), 128, generator=g) * 1e-3
    base = {"top_n": 24, "multiplier": -1.0}
    return ConceptTable(["cat", "dog", "owl"], [3, 4, 5], TS, {UP: mu},
                        defaults={c: {**base, **d} for c, d in (defaults or {}).items()} if defaults else base)


def test_default_modes_are_validated_where_they_enter_and_saved(tmp_path):
    t = _table({"cat": {"mode": "replace_background"}, "dog": {"mode": "probe_anchor", "gate": 0.7}, "owl": {}})
    assert t.edit_mode("cat") == ("replace_background", None)
    assert t.edit_mode("dog") == ("probe_anchor", 0.7)
    assert t.edit_mode("owl") == ("scale", None) and "mode" not in t.defaults["owl"]  # absent = scale
    t.save(tmp_path)
    back = ConceptTable.load(tmp_path)
    assert [back.edit_mode(c) for c in t.names] == [t.edit_mode(c) for c in t.names]
    # "scale" given explicitly is stored as absent: files without modes stay as before
    assert "mode" not in _table({"cat": {"mode": "scale"}}).defaults["cat"]
    with pytest.raises(ValueError, match="defaults of 'cat': mode='sideways'; valid: scale, replace_uncond"):
        _table({"cat": {"mode": "sideways"}})
    with pytest.raises(ValueError, match="defaults of 'cat': gate=0.5 belongs to mode='gate_uncond'"):
        _table({"cat": {"gate": 0.5}})
    with pytest.raises(ValueError, match="defaults of 'dog': gate=1.5: mode='probe_uncond' takes the detector"):
        _table({"dog": {"mode": "probe_uncond", "gate": 1.5}})
    with pytest.raises(ValueError, match="defaults of 'cat': gate=None: mode='gate_uncond' needs"):
        _table({"cat": {"mode": "gate_uncond"}})
    a = _table({"cat": {"mode": "probe_anchor", "anchor": "a dog"}})
    assert a.default_anchor("cat") == "a dog" and a.default_anchor("dog") is None
    for bad in ({"anchor": "a dog"}, {"mode": "probe_uncond", "anchor": "a dog"}, {"mode": "probe_anchor", "anchor": " "}):
        with pytest.raises(ValueError, match="defaults of 'cat': anchor=.* belongs to mode 'probe_anchor'"):
            _table({"cat": bad})


def _inputs(b=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 32, generator=g)


def _block(pipe, concepts, x, ehs, **kw):
    """The hooked block's output without and with the patch, the patch and its rows of that call."""
    block = pipe.unet.get_submodule(UP)
    seen = []
    h = block.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
    try:
        with torch.no_grad():
            pipe.unet(x, TS[1], ehs)
        h.remove()
        with patched(pipe.unet, concepts, **kw) as handle:
            h = block.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
            with torch.no_grad():
                pipe.unet(x, TS[1], ehs)
            rows = dict(handle.state.rows)
    finally:
        h.remove()
    return seen[0].clone(), seen[1].clone(), handle, rows


def test_patch_follows_each_concepts_default_mode(pipe):
    saes, (x, ehs) = {UP: make_sae(32, 128, 4, seed=1)}, _inputs(4)
    t = _table({"cat": {"mode": "replace_background"}, "dog": {}, "owl": {}})
    before, by_default, h, _ = _block(pipe, "cat", x, ehs, saes=saes, table=t)
    assert h.mode == "replace_background" and h.hook_modes(UP) == ("replace_background",)
    _, explicit, _, _ = _block(pipe, "cat", x, ehs, saes=saes, table=_table(), mode="replace_background")
    assert torch.equal(by_default, explicit) and not torch.equal(by_default, before)  # not vacuous
    # mode= overrides the default, for all concepts or per concept
    _, scaled, h, _ = _block(pipe, "cat", x, ehs, saes=saes, table=t, mode="scale")
    _, want, _, _ = _block(pipe, "cat", x, ehs, saes=saes, table=_table())
    assert h.mode == "scale" and torch.equal(scaled, want)
    _, per, h, _ = _block(pipe, "cat", x, ehs, saes=saes, table=t, mode={"cat": "scale"})
    assert h.mode == "scale" and torch.equal(per, want)


def test_one_patch_mixes_the_scale_edit_with_one_other_mode(pipe):
    saes, (x, ehs) = {UP: make_sae(32, 128, 4, seed=1)}, _inputs(4)
    t = _table({"cat": {"mode": "replace_background"}, "dog": {"multiplier": -3.0}, "owl": {}})
    before, after, h, rows = _block(pipe, ["cat", "dog"], x, ehs, saes=saes, table=t)
    assert h.mode == {"cat": "replace_background", "dog": "scale"} and "'cat': 'replace_background'" in repr(h)
    assert h.hook_modes(UP) == ("replace_background", "scale") and h.hookpoints == [UP]
    # each mode's tables hold its own concepts' features only
    cat_only = patch(pipe.unet, "cat", saes=saes, table=t).table(UP)
    dog_only = patch(pipe.unet, "dog", saes=saes, table=t).table(UP)
    unpatch(pipe)
    assert all(torch.equal(a, b) for a, b in zip(h.table(UP, "replace_background"), cat_only))
    assert all(torch.equal(a, b) for a, b in zip(h.table(UP, "scale"), dog_only))
    with pytest.raises(ValueError, match="no single-mode edit table"):
        h.table(UP)
    # the block's output: cat's tokens replaced first, then dog's scale edit on the result
    sae = saes[UP]
    W = sae.weights_for(before.device, before.dtype)
    rpg = before[:, 0].numel()
    hit = replace.detect(before, W, sae.cfg.k, *rows[(UP, "replace_background")], rpg)
    mid = replace.background_fill(before, hit)
    tok = reference.as_tokens(mid)
    delta = reference.edit_delta(tok, *W, sae.cfg.k, *rows[(UP, "scale")], rpg)
    want = reference.from_tokens(tok + delta, mid)
    assert 0 < int(hit.sum()) < hit.numel() and (delta != 0).any()  # both edits act
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_mixing_two_other_modes_or_their_gates_is_refused(pipe):
    saes = {UP: make_sae(32, 128, 4, seed=1)}
    t = _table({"cat": {"mode": "replace_background"}, "dog": {"mode": "replace_uncond"}, "owl": {}})
    with pytest.raises(ValueError, match="mixes the scale edit with at most one other mode"):
        patch(pipe.unet, ["cat", "dog"], saes=saes, table=t)
    assert patch(pipe.unet, ["cat", "dog"], saes=saes, table=t, mode="scale").mode == "scale"  # mode= decides
    g = _table({"cat": {"mode": "gate_uncond", "gate": 0.2}, "dog": {"mode": "gate_uncond", "gate": 0.4}, "owl": {}})
    with pytest.raises(ValueError, match="different default gates"):
        patch(pipe.unet, ["cat", "dog"], saes=saes, table=g)
    assert patch(pipe.unet, ["cat", "dog"], saes=saes, table=g, gate=0.3).gate == 0.3
    assert patch(pipe.unet, "dog", saes=saes, table=g).gate == 0.4  # a concept's own gate
    with pytest.raises(ValueError, match="mode= names concepts \\['owl'\\] that are not unlearned here"):
        patch(pipe.unet, "cat", saes=saes, table=t, mode={"owl": "scale"})
    with pytest.raises(ValueError, match="gate=0.5 belongs to mode='gate_uncond'"):
        patch(pipe.unet, "owl", saes=saes, table=t, gate=0.5)
    with pytest.raises(ValueError, match="error_term='reference' belongs to the scale edit"):
        patch(pipe.unet, ["cat", "owl"], saes=saes, table=t, error_term="reference")


def test_a_default_detector_mode_needs_detectors_and_the_evaluation_loads_them():
    t = _table({"cat": {"mode": "probe_anchor"}, "dog": {}, "owl": {}})
    with pytest.raises(ValueError, match="mode 'probe_anchor' needs fitted detectors"):
        with_detectors({}, None, t)
    assert with_detectors({"mode": "scale"}, None, t) == {"mode": "scale"}  # mode= overrides: none needed
    assert with_detectors({}, None, _table()) == {}
    sig = edit_signature(t, ["cat", "dog"], {})
    assert sig["concepts"]["cat"]["mode"] == "probe_anchor" and "mode" not in sig["concepts"]["dog"]


def test_a_sweep_in_a_mode_stores_it_as_the_default(tmp_path):
    t = _table()
    scored = []

    def scorer(c, rule, value, mult, hps, thr):
        scored.append((c, value))
        return {"ua": 0.5 + value / 100, "ira": 0.9, "cra": 1.0}

    sweep(table=t, concepts=["cat"], domain="object", seeds=[1], rule="top_n", top_ns=[1, 2], multipliers=[-1.0],
          thresholds=[1.0], scorer=scorer, save_to=tmp_path, progress=False, mode="probe_anchor", gate=0.6)
    back = ConceptTable.load(tmp_path)
    assert back.edit_mode("cat") == ("probe_anchor", 0.6) and back.defaults["cat"]["top_n"] == 2
    assert back.default_anchor("cat") is None  # automatic
    assert back.edit_mode("dog") == ("scale", None)
    # a later sweep without mode= scores the concept in its default mode and keeps it
    n = len(scored)
    sweep(table=back, concepts=["cat"], domain="object", seeds=[1], rule="top_n", top_ns=[1, 2, 4],
          multipliers=[-1.0], thresholds=[1.0], scorer=scorer, save_to=tmp_path, progress=False)
    again = ConceptTable.load(tmp_path)
    assert again.edit_mode("cat") == ("probe_anchor", 0.6) and again.defaults["cat"]["top_n"] == 4
    assert again.metadata["sweep"]["cat"]["spec"]["mode"] == "probe_anchor"
    assert len(scored) == n + 3  # the spec differs (mode from the defaults), so nothing was reused
    # an anchor given to the sweep is stored with the mode; a later sweep without one keeps it
    sweep(table=again, concepts=["cat"], domain="object", seeds=[1], rule="top_n", top_ns=[1], multipliers=[-1.0],
          thresholds=[1.0], scorer=scorer, save_to=tmp_path, progress=False, mode="probe_anchor",
          anchor={"cat": "a dog"})
    assert ConceptTable.load(tmp_path).default_anchor("cat") == "a dog"
    sweep(table=ConceptTable.load(tmp_path), concepts=["cat"], domain="object", seeds=[1], rule="top_n", top_ns=[1],
          multipliers=[-1.0], thresholds=[1.0], scorer=scorer, save_to=tmp_path, progress=False)
    kept = ConceptTable.load(tmp_path)
    assert kept.default_anchor("cat") == "a dog" and kept.metadata["sweep"]["cat"]["spec"]["anchor"] == "a dog"
    # and a scale sweep puts it back on the method's edit
    sweep(table=kept, concepts=["cat"], domain="object", seeds=[1], rule="top_n", top_ns=[1], multipliers=[-1.0],
          thresholds=[1.0], scorer=scorer, save_to=tmp_path, progress=False, mode="scale")
    assert ConceptTable.load(tmp_path).edit_mode("cat") == ("scale", None)
    assert ConceptTable.load(tmp_path).default_anchor("cat") is None
