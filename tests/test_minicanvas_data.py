"""MiniCanvas data (renders, captions, dataset) and classifiers (training, save/load, augmentation)."""
import itertools
import re

import pytest
import torch

from saeuron.minicanvas import classifiers as C
from saeuron.minicanvas import data as D
from saeuron.minicanvas import dataset, rendering

ALL_STYLES = list(D.STYLES) + [None]


# ---------------------------------------------------------------- rendering

def test_sizes_and_counts():
    assert len(D.OBJECTS) >= 10 and len(D.STYLES) >= 10 and len(set(D.OBJECTS)) == len(D.OBJECTS)
    assert D.STYLE_LABELS[-1] == D.UNSTYLED_LABEL and D.style_id(None) == len(D.STYLES)
    for size in (32, 64):
        img = rendering.render("star", "neon", 7, size)
        assert img.shape == (3, size, size) and img.dtype == torch.float32
        assert 0 <= img.min() and img.max() <= 1
        assert rendering.to_uint8(img).dtype == torch.uint8
    b = rendering.render_batch(["ring", 3], ["dots", None], [1, 2], 64)
    assert b.shape == (2, 3, 64, 64)


def test_determinism_and_batch_independence():
    a = rendering.render("heart", "grain", 123)
    assert torch.equal(a, rendering.render("heart", "grain", 123))
    assert not torch.equal(a, rendering.render("heart", "grain", 124))          # the seed changes pose and noise
    objs, styles = [o for o in D.OBJECTS for _ in range(2)], (ALL_STYLES * 2)[:20]
    seeds = [5 + 1000 * i for i in range(20)] + [(1 << 40) + 3]
    batch = rendering.render_batch(objs + ["arrow"], styles + ["mosaic"], seeds)
    for i in (0, 7, 13, 20):                                           # same image alone or in any batch
        assert torch.equal(batch[i], rendering.render((objs + ["arrow"])[i], (styles + ["mosaic"])[i], seeds[i]))
    p1, p2 = rendering.pose([11, 12]), rendering.pose([11, 12])
    assert torch.equal(p1["rotation"], p2["rotation"]) and p1["rotation"][0] != p1["rotation"][1]


def test_every_object_and_style_is_visible():
    n = len(D.OBJECTS)
    for s in ALL_STYLES:
        img, cov = rendering.render_batch(list(D.OBJECTS) * 2, [s] * 2 * n, range(50, 50 + 2 * n), return_mask=True)
        frac = cov.mean((1, 2))
        assert frac.min() > 0.04 and frac.max() < 0.6, (s, frac)
        outside = cov == 0
        bg = (img * outside[:, None]).sum((2, 3)) / outside.sum((1, 2))[:, None]
        dist = (img - bg[:, :, None, None]).abs().sum(1)                # colour distance from the background
        visible = (dist * (cov > 0.05)).amax((1, 2))
        assert visible.min() > 0.3, (s, visible)
    # the whole object stays inside the frame: border pixels are at most grazed by the anti-aliased edge
    g = torch.Generator().manual_seed(0)
    _, cov = rendering.render_batch(torch.arange(500) % n, [0] * 500, torch.randint(1 << 40, (500,), generator=g),
                            return_mask=True)
    border = torch.cat([cov[:, 0], cov[:, -1], cov[:, :, 0], cov[:, :, -1]], 1)
    assert border.max() < 0.5 and cov.mean((1, 2)).min() > 0.04


def test_styles_differ_in_colour_or_texture():
    n = len(D.OBJECTS)

    def stats(s):
        img, cov = rendering.render_batch(list(D.OBJECTS) * 3, [s] * 3 * n, range(900, 900 + 3 * n), return_mask=True)
        fg = (img * (cov > 0.99)[:, None]).sum((0, 2, 3)) / (cov > 0.99).sum()
        bg = (img * (cov == 0)[:, None]).sum((0, 2, 3)) / (cov == 0).sum()
        return fg, bg, (img[..., 1:] - img[..., :-1]).abs().mean()

    st = {s: stats(s) for s in ALL_STYLES}
    for a, b in itertools.combinations(ALL_STYLES, 2):
        if {a, b} == {"stripes", "checker"}:
            continue                                                   # documented shared palette, below
        (fa, ba, ha), (fb, bb, hb) = st[a], st[b]
        assert (fa - fb).abs().sum() + (ba - bb).abs().sum() > 0.25 or (ha - hb).abs() > 0.03, (a, b)
    # near neighbours: stripes/checker share the palette (same background), differ on the object only
    img1, cov = rendering.render_batch(["square"] * 4, ["stripes"] * 4, range(4), return_mask=True)
    img2 = rendering.render_batch(["square"] * 4, ["checker"] * 4, range(4))
    out, inside = (cov == 0)[:, None].expand_as(img1), (cov > 0.99)[:, None].expand_as(img1)
    assert torch.allclose(img1[out], img2[out]) and (img1[inside] - img2[inside]).abs().mean() > 0.05
    # dots/pastel share the texture: the white dots sit at the same pixels, the palettes differ
    img3, img4 = rendering.render_batch(["circle"] * 4, ["dots"] * 4, range(4)), rendering.render_batch(["circle"] * 4, ["pastel"] * 4, range(4))
    white3, white4 = img3.amin(1) > 0.9, img4.amin(1) > 0.9
    assert white3.any() and white3.eq(white4).float().mean() > 0.97
    assert (img3 - img4).abs().mean() > 0.1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown object 'dog'.*circle"):
        rendering.render("dog", "neon", 0)
    with pytest.raises(ValueError, match="unknown style 'vangogh'.*stripes"):
        rendering.render("ring", "vangogh", 0)
    with pytest.raises(ValueError, match="size must be a multiple of 16"):
        rendering.render("ring", "neon", 0, size=30)
    with pytest.raises(ValueError, match="non-negative"):
        rendering.render("ring", "neon", -1)
    with pytest.raises(ValueError, match="equal lengths"):
        rendering.render_batch(["ring"], ["neon", "dots"], [0])
    with pytest.raises(ValueError, match="unknown split"):
        dataset.MiniCanvasDataset("test")


# ---------------------------------------------------------------- captions

def test_captions_and_paraphrases():
    assert D.caption("ring", "stripes") == "An image of ring in stripes style."
    assert D.caption("ring", None) == "An image of ring."
    assert D.TEMPLATES[0] == D.TRAIN_TEMPLATES[0] and len(D.EVAL_TEMPLATES) >= 2
    for t in range(1, len(D.TEMPLATES)):                               # evaluation-only paraphrases
        c = D.caption("heart", "mosaic", t)
        assert c != D.caption("heart", "mosaic") and "heart" in c.lower() and "mosaic" in c
        u = D.caption("heart", None, t)
        assert "heart" in u.lower() and u != D.caption("heart", None) and not any(s in u for s in D.STYLES)
    train = set(D.all_captions((0,)))
    assert len(train) == len(D.OBJECTS) * (len(D.STYLES) + 1)
    assert not train & set(D.all_captions(range(1, len(D.TEMPLATES))))  # paraphrases never seen in training
    with pytest.raises(ValueError, match="template must be"):
        D.caption("ring", "neon", len(D.TEMPLATES))


def test_vocabulary_covers_every_caption():
    from saeuron.toy import word_tokenizer

    vocab = set(D.vocabulary())
    assert set(D.OBJECTS) | set(D.STYLES) <= vocab
    caps = D.all_captions(range(len(D.TEMPLATES)))
    for c in caps:
        assert {w.lower() for w in re.findall(r"[A-Za-z0-9']+", c)} <= vocab, c
    tok = word_tokenizer(D.vocabulary())
    ids = tok(caps)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)


# ---------------------------------------------------------------- dataset

def test_dataset_items_batches_and_splits():
    ds = dataset.MiniCanvasDataset("train", length=300)
    assert len(ds) == 300
    img, o, s, cap = ds[113]
    assert img.shape == (3, 32, 32) and cap == D.caption(o, s)
    assert torch.equal(img, dataset.MiniCanvasDataset("train", length=300)[113][0])
    imgs, oid, sid, caps = ds.batch([0, 113, 299])
    assert torch.equal(imgs[1], img) and oid[1] == o and sid[1] == s and caps[1] == cap
    pairs = {(ds.item(i)[0], ds.item(i)[1]) for i in range(len(ds.pairs))}
    assert len(pairs) == len(D.OBJECTS) * (len(D.STYLES) + 1)           # every pair once per cycle
    held = dataset.MiniCanvasDataset("heldout", length=300)
    assert held.item(113)[2] - ds.item(113)[2] == dataset.SPLIT_RANGE and not torch.equal(held[113][0], img)
    assert dataset.MiniCanvasDataset("train", template=2, length=5)[0][3] == D.caption(*ds.item(0)[:2], 2)
    with pytest.raises(IndexError):
        ds[300]
    g = torch.Generator().manual_seed(0)
    x, oid, sid, seeds = dataset.sample_batch(8, g, "heldout", 64)
    assert x.shape == (8, 3, 64, 64) and (seeds >= dataset.SPLIT_SEEDS["heldout"]).all()
    assert torch.equal(x[3], rendering.render(int(oid[3]), int(sid[3]), int(seeds[3]), 64))


# ---------------------------------------------------------------- classifiers

def test_augmentation_respects_the_task():
    g = torch.Generator().manual_seed(1)
    x = dataset.sample_batch(6, g)[0]
    xs = C.augment_batch(x, "style", g)
    assert xs.shape == x.shape
    for a, b in zip(x, xs):                                           # style: pixels moved, colours untouched
        ca, cb = set(map(tuple, a.flatten(1).T.tolist())), set(map(tuple, b.flatten(1).T.tolist()))
        assert cb <= ca
    xo = C.augment_batch(x, "object", g)
    assert xo.shape == x.shape and 0 <= xo.min() and xo.max() <= 1
    assert (xo.mean((2, 3)) - x.mean((2, 3))).abs().max() > 0.05      # object: colours do change
    with pytest.raises(ValueError, match="unknown classifier kind"):
        C.augment_batch(x, "colour", g)


def test_tiny_training_lowers_the_loss():
    torch.manual_seed(0)
    m = C.train_classifier("style", steps=40, batch_size=16, width=4, seed=0, progress=False)
    loss = m.history["loss"]
    assert len(loss) == 40 and sum(loss[-8:]) / 8 < sum(loss[:8]) / 8 - 0.2, loss
    assert not m.training and m.labels == D.STYLE_LABELS
    with pytest.raises(ValueError, match="unknown classifier kind"):
        C.train_classifier("colour", steps=1)


def test_save_load_round_trip_and_use(tmp_path):
    torch.manual_seed(3)
    m = C.build_classifier(len(D.OBJECTS), width=4, kind="object")
    with torch.no_grad():                                             # non-trivial BatchNorm statistics
        m.train()
        m(torch.rand(8, 3, 32, 32))
    m.eval()
    x = dataset.sample_batch(12, torch.Generator().manual_seed(4))[0]
    C.save_classifier(m, tmp_path / "object")
    m2 = C.load_classifier(tmp_path / "object")
    assert torch.equal(m(x), m2(x)) and m2.labels == D.OBJECTS and m2.kind == "object"
    feats = C.features(m2, x)
    assert feats.shape == (12, m2.feature_dim) and torch.equal(feats, m.features(x))
    out = C.classify({"object": m, "object2": m2}, x)
    assert torch.equal(out["object"], out["object2"]) and out["object"].shape == (12,)
    assert C.evaluate(m, x, out["object"]) == 1.0
    x64 = torch.nn.functional.interpolate(x, size=64, mode="nearest")    # other sizes are resized to 32
    assert C.predict(m, x64).shape == (12,)
    assert torch.equal(C.predict(m, rendering.to_uint8(x)), C.predict(m, rendering.to_uint8(x).float() / 255))


def test_corrupt_or_missing_checkpoint(tmp_path):
    m = C.build_classifier(len(D.STYLE_LABELS), width=4, kind="style")
    C.save_classifier(m, tmp_path / "s")
    w = tmp_path / "s" / C.WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt classifier weights"):
        C.load_classifier(tmp_path / "s")
    C.save_classifier(m, tmp_path / "s")
    (tmp_path / "s" / C.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt classifier config"):
        C.load_classifier(tmp_path / "s")
    w.unlink()
    with pytest.raises(FileNotFoundError, match="missing classifier.safetensors"):
        C.load_classifier(tmp_path / "s")
    C.save_classifier(m, tmp_path / "s")                              # width-4 weights under a width-8 config
    C.save_classifier(C.build_classifier(len(D.STYLE_LABELS), width=8, kind="style"), tmp_path / "t")
    (tmp_path / "t" / C.WEIGHTS_FILE).write_bytes(w.read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        C.load_classifier(tmp_path / "t")
    with pytest.raises(ValueError, match="num_classes"):
        C.build_classifier(5, kind="object")
