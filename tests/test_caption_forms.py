"""MiniCanvas caption forms: the family, its fixed train / held-out split, the vocabulary, the sampler and
training a micro model on the forms (default off: the shipped model's training is unchanged)."""
import json
import re
import warnings

import pytest
import torch

from saeuron.minicanvas import data as D
from saeuron.minicanvas import dataset
from saeuron.minicanvas.model import build_pipeline, load_pipeline, make_tokenizer
from saeuron.minicanvas.train_model import caption_table, form_rows, train_model
from saeuron.toy import word_tokenizer


def _words(text):
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_family_sizes_and_split_keep_the_old_templates():
    styled, plain = D.caption_forms(), D.caption_forms(unstyled=True)
    assert len(styled) >= 12 and len(plain) >= 6
    assert len(D.caption_forms("train")) >= 8 and len(D.caption_forms("heldout")) >= 4
    assert len(D.caption_forms("train", unstyled=True)) >= 5 and len(D.caption_forms("heldout", unstyled=True)) >= 3
    for unstyled in (False, True):
        tr, ho = D.caption_forms("train", unstyled), D.caption_forms("heldout", unstyled)
        assert not set(tr) & set(ho) and set(tr) | set(ho) == set(D.caption_forms("all", unstyled))
        assert 0 in tr and {1, 2} <= set(ho)               # form 0 trains, the two paraphrases stay held out
        assert len(set(D.caption_forms("all", unstyled).values())) == len(D.caption_forms("all", unstyled))
    for t in range(len(D.TEMPLATES)):                      # forms 0-2 are the old templates, unchanged
        for s in ("neon", None):
            assert D.form_caption("arrow", s, t) == D.caption("arrow", s, t)
    # the split is fixed: recomputing it gives the same indices
    assert tuple(D.caption_forms("train")) == D.TRAIN_FORMS == (0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 18, 19)
    assert tuple(D.caption_forms("heldout", unstyled=True)) == D.UNSTYLED_HELDOUT_FORMS == (1, 2, 10, 11)


def test_form_captions_name_what_they_should():
    g = torch.Generator().manual_seed(11)
    for _ in range(40):
        o = D.OBJECTS[int(torch.randint(len(D.OBJECTS), (1,), generator=g))]
        s = D.STYLES[int(torch.randint(len(D.STYLES), (1,), generator=g))]
        for f in D.caption_forms():
            w = _words(D.form_caption(o, s, f))
            assert o in w and s in w and not (set(D.OBJECTS) - {o}) & w and not (set(D.STYLES) - {s}) & w
        for f in D.caption_forms(unstyled=True):
            w = _words(D.form_caption(o, None, f))
            assert o in w and not set(D.STYLES) & w and not (set(D.OBJECTS) - {o}) & w
    caps = D.all_form_captions("all")
    n = len(D.OBJECTS) * (len(D.STYLES) * len(D.CAPTION_FORMS) + len(D.UNSTYLED_CAPTION_FORMS))
    assert len(caps) == len(set(caps)) == n               # every caption distinct
    assert not set(D.all_form_captions("train")) & set(D.all_form_captions("heldout"))
    with pytest.raises(ValueError, match="form must be an int in 0..19"):
        D.form_caption("ring", "neon", 20)
    with pytest.raises(ValueError, match="form must be an int in 0..12 for an unstyled"):
        D.form_caption("ring", None, 13)
    with pytest.raises(ValueError, match="unknown caption-form split 'test'; valid: train, heldout, all"):
        D.caption_forms("test")


def test_heldout_forms_use_only_training_words_and_neutral_words_exist():
    train_words = set().union(*(_words(c) for c in D.all_form_captions("train")))
    for c in D.all_form_captions("heldout"):
        assert _words(c) <= train_words, c                 # held out: new orders, never new words
    # neutral words before and after the description among the training forms
    styled = D.caption_forms("train")
    starts = {re.findall(r"[a-z]+", t.lower())[0] for t in styled.values()}
    assert {"here", "please", "look"} <= starts
    assert any(t.endswith(", please.") for t in styled.values())
    assert any(t.endswith("here it is.") for t in styled.values())


def test_vocabulary_default_is_the_shipped_one_and_forms_extend_it():
    base, full = D.vocabulary(), D.vocabulary(with_forms=True)
    assert base == sorted(w for w in make_tokenizer().get_vocab() if not w.startswith("["))
    assert set(base) < set(full) and {"please", "painted", "here", "look"} <= set(full) - set(base)
    tok = word_tokenizer(full)
    caps = D.all_form_captions("all")
    ids = tok(caps)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert max(len(r) for r in ids) <= make_tokenizer().model_max_length  # BOS + words + EOS fit 16 tokens
    assert len(tok(D.caption("heart", "mosaic"))["input_ids"]) + 5 <= 16   # form 0 + the attack's 5-token prefix
    # training forms that shift the description by 5 neutral words, as the attack's prefix does
    for unstyled in (False, True):
        shifted = [t for t in D.caption_forms("train", unstyled).values()
                   if re.findall(r"[a-z]+", t.lower())[5:8] in (["an", "image", "of"], ["a", "object", "drawn"])]
        assert shifted, unstyled


def test_prompt_warnings_know_the_training_forms():
    old = make_tokenizer().get_vocab()
    new = word_tokenizer(D.vocabulary(with_forms=True)).get_vocab()
    held = D.form_caption("heart", "sketch", 15)
    trained = D.form_caption("heart", "sketch", 12)
    # the shipped vocabulary: form 0 only; the forms' extra words are unknown to it
    assert D.prompt_warnings([D.caption("heart", "sketch")], old) == []
    w = D.prompt_warnings([trained], old)
    assert any("'look'" in m for m in w) and any("other word orders" in m for m in w)
    # a forms model (read from its vocabulary): every training form passes, held-out forms are flagged
    assert D.prompt_warnings(D.all_form_captions("train")[::7] + [""], new) == []
    msgs = D.prompt_warnings([held], new)
    assert len(msgs) == 1 and "held-out forms" in msgs[0] and "14 styled and 9 unstyled" in msgs[0]
    assert D.prompt_warnings([trained.upper()], new) == []
    assert D.prompt_warnings([trained], old, forms="train") != []      # unknown words still reported
    with pytest.raises(ValueError, match="forms='all'; valid"):
        D.prompt_warnings([trained], new, forms="all")


def test_sampler_draws_training_forms_and_leaves_the_default_stream_alone():
    a = dataset.sample_batch(300, torch.Generator().manual_seed(5))
    b = dataset.sample_batch(300, torch.Generator().manual_seed(5), forms="train")
    assert len(a) == 4 and len(b) == 5
    for x, y in zip(a, b[:4]):
        assert torch.equal(x, y)                           # the forms are drawn after everything else
    _, _, sid, _, f = b
    unstyled = sid == len(D.STYLES)
    assert set(f[~unstyled].tolist()) == set(D.TRAIN_FORMS)          # 300 draws reach every form
    assert set(f[unstyled].tolist()) <= set(D.UNSTYLED_TRAIN_FORMS) and unstyled.any()
    hf = dataset.sample_forms(sid, torch.Generator().manual_seed(2), "heldout")
    assert set(hf[~unstyled].tolist()) <= set(D.HELDOUT_FORMS) and set(hf[unstyled].tolist()) <= set(
        D.UNSTYLED_HELDOUT_FORMS)
    assert torch.equal(hf, dataset.sample_forms(sid.tolist(), torch.Generator().manual_seed(2), "heldout"))
    with pytest.raises(ValueError, match="unknown caption-form split"):
        dataset.sample_batch(2, torch.Generator(), forms="paraphrase")


def test_form_rows_and_caption_table():
    caps, lookup = form_rows()
    tok = word_tokenizer(D.vocabulary(with_forms=True))
    table = caption_table(tok, caption_forms=True)
    assert table.shape[0] == len(caps) + 1 and (table[-1, 1:] == tok.pad_token_id).any()
    g = torch.Generator().manual_seed(3)
    _, o, s, _, f = dataset.sample_batch(64, g, forms="train")
    rows = lookup[o, s, f]
    assert (rows >= 0).all()
    for i in range(64):
        assert caps[int(rows[i])] == D.form_caption(int(o[i]), int(s[i]), int(f[i]))
    assert (lookup[:, :, list(D.HELDOUT_FORMS)][:, :len(D.STYLES)] == -1).all()   # held out: no row
    assert torch.equal(caption_table(make_tokenizer())[:-1].shape[0] * torch.ones(1),
                       torch.tensor([len(D.OBJECTS) * (len(D.STYLES) + 1.0)]))


def test_training_on_caption_forms_micro(tmp_path):
    kw = dict(config="micro", steps=4, batch_size=4, progress=False, save_every=2)
    pipe = train_model(tmp_path / "forms", caption_forms=True, **kw)
    vocab = pipe.tokenizer.get_vocab()
    assert {"please", "painted"} <= set(vocab) and pipe.text_encoder.config.vocab_size == len(vocab)
    info = json.loads((tmp_path / "forms" / "pipeline" / "minicanvas.json").read_text())
    assert info["hparams"]["caption_forms"] is True
    loaded = load_pipeline(tmp_path / "forms" / "pipeline")
    assert loaded.tokenizer.get_vocab() == vocab
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # a training form: no warning
        out = loaded(D.form_caption("star", "neon", 12), num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    with pytest.warns(UserWarning, match="held-out forms"):
        loaded(D.form_caption("star", "neon", 16), num_inference_steps=1)
    assert out.shape == (1, 3, 16, 16) and out.std() > 0
    # default off: the tokenizer and text encoder are those of build_pipeline (the shipped model's recipe)
    plain = train_model(tmp_path / "plain", **kw)
    assert plain.tokenizer.get_vocab() == build_pipeline("micro").tokenizer.get_vocab() != vocab
    # a state of one setting does not resume under the other
    with pytest.raises(ValueError, match="caption_forms: saved True, now False"):
        train_model(tmp_path / "forms", **{**kw, "steps": 6})
    with pytest.raises(ValueError, match="caption_forms must be True or False"):
        train_model(tmp_path / "x", caption_forms="yes", **kw)


def test_time_limited_sittings_then_the_build_resumes_the_finished_state(tmp_path, capsys):
    """The plan for the retrain: sittings of ``train_model(..., time_limit=...)`` in the build's work folder, then
    ``build --set 'model={"caption_forms": true}'`` picks the finished state up without training again."""
    from saeuron.minicanvas.build import BUILD_DEFAULTS, build_defaults

    work = tmp_path / "build.work"
    kw = dict(config="micro", seed=0, device="cpu", progress=False, caption_forms=True,
              **BUILD_DEFAULTS["micro"]["model"])
    sittings = 0
    while train_model(work / "model", time_limit=1e-9, **kw) is None:   # one step per "sitting"
        sittings += 1
        assert sittings < 100
    assert sittings == kw["steps"] - 1
    rec = build_defaults(tmp_path / "build", "micro", work_dir=work, progress=False, stages=("classifiers", "model"),
                         settings={"model": {"caption_forms": True}})
    assert rec["stages"]["model"]["steps"] == kw["steps"] and rec["settings"]["model"]["caption_forms"] is True
    pipe = load_pipeline(tmp_path / "build" / "model")
    assert "please" in pipe.tokenizer.get_vocab()
    info = json.loads((tmp_path / "build" / "model" / "minicanvas.json").read_text())
    assert info["hparams"]["caption_forms"] is True and info["steps"] == kw["steps"]


def test_collect_captions_cover_training_forms_and_never_heldout_ones():
    from saeuron.minicanvas.build import collect_captions, collect_forms, concept_prompts, training_prompts

    n = len(D.OBJECTS) * (len(D.STYLES) + 1)
    plain = collect_captions(2)
    assert [c for _, _, c in plain] == D.all_captions((0,), unstyled=True) * 2      # the shipped recipe, unchanged
    rows = collect_captions(3, forms=True)
    assert len(rows) == 3 * n and [c for _, _, c in rows[:n]] == D.all_captions((0,), unstyled=True)
    styled = {f: s for f, s in D.caption_forms("all").items()}
    used = {False: set(), True: set()}
    for o, s, cap in rows:
        forms = D.caption_forms("all", unstyled=s is None)
        f = [i for i in forms if D.form_caption(o, s, i) == cap]
        assert f, cap                                                    # each row is a caption of its own pair
        used[s is None].update(f)
    assert used[False] == set(D.TRAIN_FORMS) and used[True] == set(D.UNSTYLED_TRAIN_FORMS)
    assert not used[False] & set(D.HELDOUT_FORMS) and not used[True] & set(D.UNSTYLED_HELDOUT_FORMS)
    assert len(set(c for _, _, c in rows[n:])) == 2 * n                  # later repeats: new sentences each time
    assert training_prompts(3, True) == [c for _, _, c in rows] and len(styled) == len(D.CAPTION_FORMS)
    # concept prompts: exactly the collected prompts, each under its object and its style
    cp = concept_prompts(3, forms=True)
    assert set().union(*cp.values()) == {c for _, _, c in rows}
    for o, s, cap in rows:
        assert cap in cp[o] and (s is None or cap in cp[s])
        assert all(cap not in cp[c] for c in cp if c not in (o, s))
    assert concept_prompts() == concept_prompts(4)                        # form 0 alone: repeats change nothing
    # the build setting: null follows the model
    assert collect_forms({"model": {"caption_forms": True}, "collect_forms": None}) is True
    assert collect_forms({"model": {}, "collect_forms": None}) is False
    assert collect_forms({"model": {"caption_forms": True}, "collect_forms": False}) is False
    for bad, kw in ((0, dict()), (2, dict(forms="yes"))):
        with pytest.raises(ValueError, match="repeats|forms"):
            collect_captions(bad, **kw)
    with pytest.raises(ValueError, match="collect_forms='yes'"):
        collect_forms({"model": {}, "collect_forms": "yes"})


def test_build_collects_and_scores_over_the_training_forms(tmp_path):
    """A caption-forms build (micro) collects its second repeat in other training forms and scores concepts over
    exactly those prompts; a bad ``collect_forms`` fails before any stage runs."""
    from saeuron.concepts import ConceptTable
    from saeuron.minicanvas.build import build_defaults, training_prompts
    from saeuron.store import ActivationStore

    out, work = tmp_path / "b", tmp_path / "b.work"
    with pytest.raises(ValueError, match="collect_forms"):
        build_defaults(out, "micro", work_dir=work, progress=False, settings={"collect_forms": 1})
    assert not out.exists() or not (out / "BUILD.json").exists()
    settings = {"model": {"caption_forms": True}, "collect_repeats": 2, "attack_control": False}
    rec = build_defaults(out, "micro", work_dir=work, progress=False, settings=settings)
    assert rec["settings"]["collect_forms"] is None and rec["stages"]["concepts"]["done"]
    store = ActivationStore(work / "activations")
    assert store.prompts == training_prompts(2, forms=True) != training_prompts(2)
    table = ConceptTable.load(out / "checkpoint")
    assert set(table.names) == set(D.OBJECTS) | set(D.STYLES)
