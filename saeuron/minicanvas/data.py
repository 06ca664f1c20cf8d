"""MiniCanvas data: procedural objects x styles, rendered in pure torch, deterministic from a seed.

An offline miniature of UnlearnCanvas. Every image is a function of ``(object, style, seed, size)``
only: the pose (rotation, scale, position), the colour jitter and every noise field come from a
counter-based integer hash of the seed, so an image is the same alone or in any batch, on any machine.

Objects are signed-distance shapes in local units (bounding radius <= 1). A style combines a palette
(``fg``/``fg2`` on the object, ``bg``/``bg2`` behind it), a texture on the object, a background, a
stroke and a post effect. ``style=None`` is the unstyled variant: a flat object of a random hue on a
light grey ground, captioned "An image of {object}." and classified as ``"unstyled"`` (the last style
label, id ``len(STYLES)``).

Near neighbours, on purpose, so that retention can fail:
  * objects: ``ring``/``circle`` (a ring is a circle with a hole), ``hexagon``/``circle`` (same size,
    six flat sides), ``arrow``/``triangle`` (an arrow head is a triangle);
  * styles sharing a palette: ``stripes``/``checker`` (orange on navy, differ only in the texture);
  * styles sharing a texture: ``dots``/``pastel`` (white polka dots, differ only in the palette);
  * styles sharing a stroke: ``sketch``/``neon`` (outlines only, differ in palette and effect).

Captions use the UnlearnCanvas form for training ("An image of {object} in {style} style.") and two
paraphrases kept for evaluation only (``TEMPLATES``, ``caption``: the shipped model's captions).

Caption forms (for a model that reads words, not one sentence): ``CAPTION_FORMS`` (styled) and
``UNSTYLED_CAPTION_FORMS`` are families of sentences over the same words in other orders, with articles,
"drawn"/"painted"/"picture"/"image", and neutral words before ("Here is", "Please draw", "Look at this:",
and five-word prefixes that shift the description as the prefix attack's 5 tokens do) or after (", please",
", here it is") the description. Each family is split, by a fixed hand-made list
(no randomness), into training forms (``TRAIN_FORMS``, ``UNSTYLED_TRAIN_FORMS``) and held-out forms
(``HELDOUT_FORMS``, ``UNSTYLED_HELDOUT_FORMS``). The split keeps form 0 (the training form above) a
training form and the two evaluation paraphrases (forms 1 and 2, = ``TEMPLATES[1:]``) held out, so
evaluation numbers measured on templates 0-2 keep their meaning; every word of a held-out form occurs in
some training form, so a held-out form tests new word orders and combinations, never unknown words.
``form_caption(object, style, form)`` writes a caption in a form; ``caption_forms(split)`` lists them.
Training draws forms only when asked (``sample_batch(..., forms="train")``; ``train_model(...,
caption_forms=True)``); the default trains on form 0 alone, as the shipped model was.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

OBJECTS = ("circle", "ring", "square", "triangle", "star", "cross", "heart", "crescent", "hexagon", "arrow")


@dataclass(frozen=True)
class Style:
    """One style: palette (RGB 0-255), texture on the object, background, stroke and post effect."""

    name: str
    fg: tuple          # object colour
    fg2: tuple         # second object colour (texture, gradient end, hatching, glow core)
    bg: tuple          # background colour
    bg2: tuple         # background gradient end (== bg for a flat ground)
    texture: str = "flat"      # flat | stripes | checker | dots | gradient
    stroke: str = "fill"       # fill | sketch | glow
    effect: str = "none"       # none | grain | blur | mosaic


_ORANGE_NAVY = dict(fg=(240, 140, 40), fg2=(140, 55, 15), bg=(25, 35, 90), bg2=(25, 35, 90))

STYLE_SPECS = (
    Style("stripes", **_ORANGE_NAVY, texture="stripes"),
    Style("checker", **_ORANGE_NAVY, texture="checker"),                       # shares the palette
    Style("dots", fg=(200, 30, 50), fg2=(255, 248, 240), bg=(250, 238, 205), bg2=(250, 238, 205), texture="dots"),
    Style("pastel", fg=(185, 155, 230), fg2=(255, 255, 255), bg=(185, 235, 210), bg2=(185, 235, 210),
          texture="dots"),                                                      # shares the texture
    Style("grain", fg=(115, 70, 35), fg2=(115, 70, 35), bg=(225, 205, 165), bg2=(200, 175, 135), effect="grain"),
    Style("gradient", fg=(130, 40, 200), fg2=(255, 210, 40), bg=(235, 235, 245), bg2=(170, 185, 220),
          texture="gradient"),
    Style("sketch", fg=(50, 50, 60), fg2=(140, 140, 150), bg=(246, 241, 228), bg2=(246, 241, 228), stroke="sketch"),
    Style("mosaic", fg=(30, 150, 140), fg2=(30, 150, 140), bg=(240, 120, 90), bg2=(240, 120, 90), effect="mosaic"),
    Style("blur", fg=(40, 80, 220), fg2=(40, 80, 220), bg=(250, 235, 150), bg2=(250, 235, 150), effect="blur"),
    Style("neon", fg=(255, 50, 200), fg2=(200, 255, 255), bg=(10, 5, 30), bg2=(20, 5, 45), stroke="glow"),
)
STYLES = tuple(s.name for s in STYLE_SPECS)
UNSTYLED = None                      # the style value of the unstyled variant
UNSTYLED_LABEL = "unstyled"          # its label for the style classifier
STYLE_LABELS = STYLES + (UNSTYLED_LABEL,)

TRAIN_TEMPLATES = ("An image of {object} in {style} style.",)
EVAL_TEMPLATES = ("A {style} style picture of a {object}.", "{Object} drawn in the {style} style.")
UNSTYLED_TRAIN_TEMPLATES = ("An image of {object}.",)
UNSTYLED_EVAL_TEMPLATES = ("A plain picture of a {object}.", "{Object} drawn plainly.")
TEMPLATES = TRAIN_TEMPLATES + EVAL_TEMPLATES                      # index 0: training, 1..: evaluation only
UNSTYLED_TEMPLATES = UNSTYLED_TRAIN_TEMPLATES + UNSTYLED_EVAL_TEMPLATES

# Caption forms: index 0-2 are TEMPLATES / UNSTYLED_TEMPLATES (same index, same sentence). "{Object}"/"{Style}"
# are the capitalised names. The split below is fixed by hand; see the module docstring for its rules.
CAPTION_FORMS = TEMPLATES + (
    "A picture of a {object} in {style} style.",              # 3  train
    "A {object} drawn in {style} style.",                     # 4  train
    "A {object} painted in the {style} style.",               # 5  train
    "{Style} style: an image of a {object}.",                 # 6  train: style first
    "The {object}, {style} style.",                           # 7  train
    "A {style} style image of the {object}.",                 # 8  train
    "Here is a picture of a {object} in {style} style.",      # 9  train: neutral prefix
    "Please draw a {object} in the {style} style.",           # 10 train: neutral prefix
    "An image of {object} in {style} style, please.",         # 11 train: neutral suffix
    "Look at this: a {object} painted in {style} style.",     # 12 train: neutral prefix
    "A {object} in {style} style, here it is.",               # 13 train: neutral suffix
    "A painted {object} in {style} style.",                   # 14 held out: verb before the object
    "Here is the {object}, drawn in {style} style.",          # 15 held out: prefix + other article and verb
    "This is an image of a {object} in the {style} style.",   # 16 held out: another prefix
    "{Style} style: the {object}, please.",                   # 17 held out: style first + suffix
    "Look at this here, please: an image of {object} in {style} style.",  # 18 train: 5 neutral words first
    "Please look at it here: a {object} drawn in {style} style.",         # 19 train: 5 neutral words first
)
UNSTYLED_CAPTION_FORMS = UNSTYLED_TEMPLATES + (
    "A picture of a {object}.",                               # 3  train
    "A plain {object}.",                                      # 4  train
    "The {object}, painted plainly.",                         # 5  train
    "Here is an image of a {object}.",                        # 6  train: neutral prefix
    "Please draw a plain {object}.",                          # 7  train: neutral prefix
    "An image of {object}, please.",                          # 8  train: neutral suffix
    "Look at this: a {object}, plain.",                       # 9  train: neutral prefix
    "This is a plain {object}.",                              # 10 held out
    "Here is the {object}, drawn plainly.",                   # 11 held out
    "Look at this here, please: an image of {object}.",       # 12 train: 5 neutral words first
)
# Forms 18/19 (unstyled 12) shift the description by 5 positions, as the attack's 5-token prefix does.
TRAIN_FORMS = (0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 18, 19)
HELDOUT_FORMS = (1, 2, 14, 15, 16, 17)
UNSTYLED_TRAIN_FORMS = (0, 3, 4, 5, 6, 7, 8, 9, 12)
UNSTYLED_HELDOUT_FORMS = (1, 2, 10, 11)
FORM_SPLITS = ("train", "heldout", "all")
assert CAPTION_FORMS[:len(TEMPLATES)] == TEMPLATES and UNSTYLED_CAPTION_FORMS[:len(TEMPLATES)] == UNSTYLED_TEMPLATES
assert sorted(TRAIN_FORMS + HELDOUT_FORMS) == list(range(len(CAPTION_FORMS)))
assert sorted(UNSTYLED_TRAIN_FORMS + UNSTYLED_HELDOUT_FORMS) == list(range(len(UNSTYLED_CAPTION_FORMS)))

SPLIT_SEEDS = {"train": 0, "heldout": 1 << 40}   # seeds of a split: [base, base + 2**40)
SPLIT_RANGE = 1 << 40

ROTATION = math.radians(40)          # pose: rotation in [-40, 40] degrees
SCALE = (0.5, 0.8)                   # bounding radius as a fraction of the half image
MARGIN = 0.95                        # the bounding circle stays inside [-MARGIN, MARGIN]^2
_NPARAM = 16


# ---------------------------------------------------------------- names, ids, captions

def object_id(obj) -> int:
    """Index of an object name (or a valid index) in ``OBJECTS``; clear error otherwise."""
    if isinstance(obj, int) and not isinstance(obj, bool) and 0 <= obj < len(OBJECTS):
        return obj
    if isinstance(obj, str) and obj in OBJECTS:
        return OBJECTS.index(obj)
    raise ValueError(f"unknown object {obj!r}; valid: {', '.join(OBJECTS)} (or 0..{len(OBJECTS) - 1})")


def style_id(style) -> int:
    """Index of a style in ``STYLE_LABELS``: a name, ``None``/"unstyled" (-> ``len(STYLES)``) or an index."""
    if style is None or style == UNSTYLED_LABEL:
        return len(STYLES)
    if isinstance(style, int) and not isinstance(style, bool) and 0 <= style <= len(STYLES):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES.index(style)
    raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}, None (unstyled) (or 0..{len(STYLES)})")


def style_spec(style) -> Optional[Style]:
    """The ``Style`` record of a style name or index (``None`` for the unstyled variant)."""
    k = style_id(style)
    return None if k == len(STYLES) else STYLE_SPECS[k]


def caption(obj, style=None, template: int = 0) -> str:
    """The prompt for (object, style): template 0 is the training form, 1.. are evaluation-only paraphrases."""
    if not (isinstance(template, int) and 0 <= template < len(TEMPLATES)):
        raise ValueError(f"template must be an int in 0..{len(TEMPLATES) - 1} (0 = training form), got {template!r}")
    o, s = OBJECTS[object_id(obj)], style_id(style)
    if s == len(STYLES):
        return UNSTYLED_TEMPLATES[template].format(object=o, Object=o.capitalize())
    return TEMPLATES[template].format(object=o, Object=o.capitalize(), style=STYLES[s])


def all_captions(templates: Sequence[int] = (0,), unstyled: bool = True) -> list:
    """Every caption for every object x style (+ unstyled) under the given template indices."""
    styles = list(STYLES) + ([None] if unstyled else [])
    return [caption(o, s, t) for t in templates for s in styles for o in OBJECTS]


def _check_split(split: str) -> str:
    if split not in FORM_SPLITS:
        raise ValueError(f"unknown caption-form split {split!r}; valid: {', '.join(FORM_SPLITS)}")
    return split


def caption_forms(split: str = "all", unstyled: bool = False) -> dict:
    """``{form index: sentence}`` of the styled (or, with ``unstyled``, the unstyled) caption forms of a split
    ("train", "heldout" or "all"), in index order."""
    forms = UNSTYLED_CAPTION_FORMS if unstyled else CAPTION_FORMS
    keep = {"train": UNSTYLED_TRAIN_FORMS if unstyled else TRAIN_FORMS,
            "heldout": UNSTYLED_HELDOUT_FORMS if unstyled else HELDOUT_FORMS,
            "all": range(len(forms))}[_check_split(split)]
    return {i: forms[i] for i in sorted(keep)}


def form_caption(obj, style=None, form: int = 0) -> str:
    """The prompt for (object, style) in caption form ``form`` (an index of ``CAPTION_FORMS``, or of
    ``UNSTYLED_CAPTION_FORMS`` when ``style`` is None); forms 0-2 give ``caption(obj, style, form)``."""
    o, s = OBJECTS[object_id(obj)], style_id(style)
    forms = UNSTYLED_CAPTION_FORMS if s == len(STYLES) else CAPTION_FORMS
    if not (isinstance(form, int) and not isinstance(form, bool) and 0 <= form < len(forms)):
        kind = "an unstyled" if s == len(STYLES) else "a styled"
        raise ValueError(f"form must be an int in 0..{len(forms) - 1} for {kind} caption (training forms "
                         f"{list(UNSTYLED_TRAIN_FORMS if s == len(STYLES) else TRAIN_FORMS)}), got {form!r}")
    name = STYLES[s] if s < len(STYLES) else ""
    return forms[form].format(object=o, Object=o.capitalize(), style=name, Style=name.capitalize())


def all_form_captions(split: str = "all", unstyled: bool = True) -> list:
    """Every caption for every object x style (+ unstyled) in every caption form of ``split``."""
    out = [form_caption(o, s, f) for f in caption_forms(split) for s in STYLES for o in OBJECTS]
    if unstyled:
        out += [form_caption(o, None, f) for f in caption_forms(split, unstyled=True) for o in OBJECTS]
    return out


def caption_words(text: str) -> list:
    """The lower-case words of a caption as the MiniCanvas tokenizer splits them (punctuation dropped)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def vocabulary(with_forms: bool = False) -> list:
    """Sorted lower-case words of every caption under every template (for ``toy.word_tokenizer``); with
    ``with_forms``, of every caption form as well (the vocabulary of a model trained on the forms).

    The default is the shipped model's vocabulary: a larger one changes the text encoder's shape and
    initialisation, so the default build would no longer reproduce the shipped model.
    """
    caps = all_captions(range(len(TEMPLATES)))
    if with_forms:
        caps += all_form_captions("all")
    return sorted({w for c in caps for w in caption_words(c)})


def _normal(p: str) -> str:
    return " ".join(p.lower().split())


def prompt_warnings(prompts: Sequence[str], known_words, forms: Optional[str] = None) -> list:
    """Why a MiniCanvas model may not draw ``prompts`` as asked: words it cannot read, caption forms it never saw.

    ``known_words`` is the model's tokenizer vocabulary. ``forms`` says what the model was trained on:
    "templates" (form 0 only: ``TRAIN_TEMPLATES``, ``UNSTYLED_TRAIN_TEMPLATES``, the shipped model) or "train"
    (every training caption form, ``train_model(..., caption_forms=True)``); None reads it from the vocabulary
    (a model trained on the forms has ``vocabulary(with_forms=True)``). Other words are read as an unknown
    token; prompts in forms the model never saw are drawn less reliably. Empty prompts (the CFG negative) pass.
    """
    known = {w.lower() for w in known_words}
    if forms is None:
        forms = "train" if set(vocabulary(with_forms=True)) <= known else "templates"
    if forms not in ("templates", "train"):
        raise ValueError(f"forms={forms!r}; valid: 'templates' (form 0 only), 'train' (the training caption forms), "
                         "None (read from the vocabulary)")
    if forms == "templates":
        desc = "captions of the form " + " or ".join(repr(t) for t in TRAIN_TEMPLATES + UNSTYLED_TRAIN_TEMPLATES)
        trained = {_normal(c) for c in all_captions((0,))}
        other = "prompts in other forms (other word orders or extra words) are drawn far less reliably"
    else:
        desc = (f"captions in {len(TRAIN_FORMS)} styled and {len(UNSTYLED_TRAIN_FORMS)} unstyled caption forms "
                "(data.caption_forms('train'), e.g. " + repr(CAPTION_FORMS[0]) + ")")
        trained = {_normal(c) for c in all_form_captions("train")}
        other = ("prompts in other forms (held-out forms, other word orders or extra words) may be drawn less "
                 "reliably")
    vocab = f"objects: {', '.join(OBJECTS)}; styles: {', '.join(STYLES)}"
    unknown = sorted({w for p in prompts for w in re.findall(r"[A-Za-z0-9']+", p.lower()) if w not in known})
    out = []
    if unknown:
        out.append(f"MiniCanvas does not know the word(s) {', '.join(repr(w) for w in unknown)} (read as an unknown "
                   f"token); it was trained on {desc} with {vocab}")
    if any(p.strip() and _normal(p) not in trained for p in prompts):
        out.append(f"MiniCanvas was trained on {desc} only; {other}")
    return out


# ---------------------------------------------------------------- counter-based randomness

_M32 = 0xFFFFFFFF


def _hash(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing hash on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _uniform(seeds: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """[B, n] floats in [0, 1): a pure function of (seed, stream, position), independent of the batch."""
    key = _hash(_hash(seeds & _M32) ^ (seeds >> 32))
    key = _hash(key ^ ((stream * 0x9E3779B1 + 0x7F4A7C15) & _M32))
    idx = torch.arange(n, dtype=torch.int64, device=seeds.device)
    h = _hash(_hash((key[:, None] ^ idx) & _M32) ^ key[:, None])
    return (h >> 8).float() / float(1 << 24)


# ---------------------------------------------------------------- shapes (SDFs in local units)

def _poly(*pts):
    return torch.tensor(pts, dtype=torch.float32)


def _regular(n, r, phase=math.pi / 2):
    return _poly(*[(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n))
                   for i in range(n)])


def _star(n=5, r_out=1.0, r_in=0.45):
    a = [math.pi / 2 + math.pi * i / n for i in range(2 * n)]
    return _poly(*[((r_out if i % 2 == 0 else r_in) * math.cos(t), (r_out if i % 2 == 0 else r_in) * math.sin(t))
                   for i, t in enumerate(a)])


def _polygon_sdf(x, y, verts):
    """Exact signed distance to a simple (possibly non-convex) polygon; negative inside."""
    d, sign = None, torch.ones_like(x)
    n = len(verts)
    for i in range(n):
        (xi, yi), (xj, yj) = verts[i].tolist(), verts[i - 1].tolist()
        ex, ey, wx, wy = xj - xi, yj - yi, x - xi, y - yi
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        bx, by = wx - ex * t, wy - ey * t
        dd = bx * bx + by * by
        d = dd if d is None else torch.minimum(d, dd)
        c1, c2, c3 = y >= yi, y < yj, ex * wy > ey * wx
        sign = torch.where((c1 & c2 & c3) | (~c1 & ~c2 & ~c3), -sign, sign)
    return sign * d.sqrt()


def _heart(x, y, k=1.4, cy=0.55):
    # the classic exact heart SDF (tip at the origin, lobes up), recentred and scaled to radius ~0.9
    x, y = x.abs() / k, y / k + cy
    upper = ((x - 0.25) ** 2 + (y - 0.75) ** 2).sqrt() - math.sqrt(2) / 4
    m = (x + y).clamp(min=0) * 0.5
    lower = torch.minimum(x ** 2 + (y - 1) ** 2, (x - m) ** 2 + (y - m) ** 2).sqrt() * torch.sign(x - y)
    return torch.where(x + y > 1, upper, lower) * k


_SQUARE = _regular(4, 0.92, math.pi / 4)
_TRIANGLE = _poly((0.0, 0.95), (-0.823, -0.475), (0.823, -0.475))
_STAR = _star()
_CROSS = _poly((-0.27, 0.85), (0.27, 0.85), (0.27, 0.27), (0.85, 0.27), (0.85, -0.27), (0.27, -0.27),
               (0.27, -0.85), (-0.27, -0.85), (-0.27, -0.27), (-0.85, -0.27), (-0.85, 0.27), (-0.27, 0.27))
_HEXAGON = _regular(6, 0.95, 0.0)
_ARROW = _poly((-0.92, -0.2), (0.12, -0.2), (0.12, -0.58), (0.95, 0.0), (0.12, 0.58), (0.12, 0.2), (-0.92, 0.2))


def _circle_len(x, y):
    return (x * x + y * y).sqrt()


SHAPES = {
    "circle": lambda x, y: _circle_len(x, y) - 0.82,
    "ring": lambda x, y: (_circle_len(x, y) - 0.66).abs() - 0.24,
    "square": lambda x, y: _polygon_sdf(x, y, _SQUARE),
    "triangle": lambda x, y: _polygon_sdf(x, y, _TRIANGLE),
    "star": lambda x, y: _polygon_sdf(x, y, _STAR),
    "cross": lambda x, y: _polygon_sdf(x, y, _CROSS),
    "heart": _heart,
    "crescent": lambda x, y: torch.maximum(_circle_len(x, y) - 0.9, -(_circle_len(x - 0.4, y - 0.12) - 0.72)),
    "hexagon": lambda x, y: _polygon_sdf(x, y, _HEXAGON),
    "arrow": lambda x, y: _polygon_sdf(x, y, _ARROW),
}
assert tuple(SHAPES) == OBJECTS


# ---------------------------------------------------------------- painting

def _fract(z):
    return z - torch.floor(z)                                  # torch.frac keeps the sign: wrong for z < 0


def _stripes(z, period, px):
    """Anti-aliased 50 % stripes of a coordinate field: 1 on the stripe, 0 between."""
    tri = (_fract(z / period) - 0.5).abs()                     # 0 on a stripe centre line (fract = 0.5), 0.5 between
    return (0.5 + (0.25 - tri) * period / px).clamp(0, 1)


def _hsv(h, s, v):
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _gauss_blur(img, sigma_px):
    r = max(1, math.ceil(2.5 * sigma_px))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=img.dtype, device=img.device) ** 2 / (2 * sigma_px ** 2))
    k = (k / k.sum()).repeat(3, 1)
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=3)
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=3)


def _paint(spec: Optional[Style], sdf, u, v, X, Y, P, seeds, size):
    """Colour one group of samples that share a style: [b, H, W] fields -> [b, 3, H, W] in [0, 1]."""
    b, H, W = sdf.shape
    px = 2.0 / size
    aa = lambda d: (0.5 - d / px).clamp(0, 1)                 # noqa: E731  coverage of a pixel by {d < 0}
    fill = aa(sdf)[:, None]
    if spec is None:                                          # unstyled: flat random hue on light grey
        fg = _hsv(P[:, 12], 0.45 + 0.5 * P[:, 13], 0.45 + 0.5 * P[:, 14])[:, :, None, None]
        bg = (0.86 + 0.12 * P[:, 15])[:, None, None, None].expand(b, 3, 1, 1)
        return torch.lerp(bg, fg, fill)

    bright = (1 + 0.12 * (P[:, 4] - 0.5))[:, None]
    shift = 0.06 * (P[:, 5:8] - 0.5)
    col = lambda c: (torch.tensor(c, dtype=sdf.dtype, device=sdf.device) / 255 * bright + shift  # noqa: E731
                     ).clamp(0, 1)[:, :, None, None]
    fg, fg2, bg, bg2 = col(spec.fg), col(spec.fg2), col(spec.bg), col(spec.bg2)
    ph1, ph2 = P[:, 8, None, None] * 10, P[:, 9, None, None] * 10
    ang = (math.pi / 4 + (P[:, 10] - 0.5) * math.radians(30))[:, None, None]

    if spec.texture == "stripes":
        t = _stripes(X * torch.cos(ang) + Y * torch.sin(ang) + ph1, 0.28, px)
    elif spec.texture == "checker":
        a, c = _stripes(X + ph1, 0.44, px), _stripes(Y + ph2, 0.44, px)
        t = a + c - 2 * a * c
    elif spec.texture == "dots":
        p = 0.36
        dx, dy = (_fract((X + ph1) / p) - 0.5) * p, (_fract((Y + ph2) / p) - 0.5) * p
        t = aa((dx * dx + dy * dy).sqrt() - 0.1)
    elif spec.texture == "gradient":
        g = 2 * math.pi * P[:, 11, None, None]
        t = ((u * torch.cos(g) + v * torch.sin(g)) * 0.55 + 0.5).clamp(0, 1)
    elif spec.texture == "flat":
        t = torch.zeros_like(sdf)
    else:
        raise ValueError(f"style {spec.name!r}: unknown texture {spec.texture!r} (valid: flat, stripes, checker, "
                         f"dots, gradient)")
    fgf = torch.lerp(fg, fg2, t[:, None])
    bgf = torch.lerp(bg, bg2, ((1 - Y) / 2).expand(b, 1, H, W))

    if spec.stroke == "fill":
        img = torch.lerp(bgf, fgf, fill)
    elif spec.stroke == "sketch":                             # wobbly double outline + hatching, paper grain
        wob = sdf + 0.015 * torch.sin(7 * u + ph1) * torch.cos(6 * v + ph2)
        line = torch.maximum(aa(wob.abs() - 0.035), 0.6 * aa((sdf + 0.03 * torch.sin(5 * v + ph2)).abs() - 0.025))
        hatch = _stripes(X - Y + ph1, 0.2, px) * aa(sdf)
        img = torch.lerp(bgf, fg2, 0.5 * hatch[:, None])
        img = torch.lerp(img, fgf, line[:, None])
        img = img + 0.06 * (_uniform(seeds, 1, H * W).view(b, 1, H, W) - 0.5)
    elif spec.stroke == "glow":                               # thin bright core with a coloured halo
        glow = 0.85 * torch.exp(-sdf.abs() / 0.12)
        img = torch.lerp(torch.lerp(bgf, fgf, glow[:, None]), fg2, aa(sdf.abs() - 0.03)[:, None])
    else:
        raise ValueError(f"style {spec.name!r}: unknown stroke {spec.stroke!r} (valid: fill, sketch, glow)")

    if spec.effect == "grain":
        n = _uniform(seeds, 2, H * W).view(b, 1, H, W) + _uniform(seeds, 3, H * W).view(b, 1, H, W)
        img = img + 0.32 * (n - 1)
    elif spec.effect == "blur":
        img = _gauss_blur(img, 1.1 * size / 32)
    elif spec.effect == "mosaic":                             # tiles of size/16 px, each with its own tint
        tile = max(1, size // 16)
        img = F.avg_pool2d(img, tile)
        h, w = img.shape[-2:]
        j = _uniform(seeds, 4, h * w * 2).view(b, 2, 1, h, w)
        img = img * (1 + 0.3 * (j[:, 0] - 0.5)) + 0.08 * (j[:, 1] - 0.5)
        img = img.repeat_interleave(tile, -2).repeat_interleave(tile, -1)
    elif spec.effect != "none":
        raise ValueError(f"style {spec.name!r}: unknown effect {spec.effect!r} (valid: none, grain, blur, mosaic)")
    return img.clamp(0, 1)


def _as_ids(items, convert):
    if isinstance(items, torch.Tensor):
        items = items.tolist()
    return torch.tensor([convert(i) for i in items], dtype=torch.int64)


def _check_size(size):
    if not (isinstance(size, int) and 16 <= size <= 512 and size % 16 == 0):
        raise ValueError(f"size must be a multiple of 16 in 16..512 (32 by default, 64 as an option), got {size!r}")


def pose(seeds) -> dict:
    """The random pose of each seed: rotation (radians), scale (bounding radius) and centre (x, y up)."""
    seeds = _seeds(seeds)
    P = _uniform(seeds, 0, _NPARAM)
    s = SCALE[0] + (SCALE[1] - SCALE[0]) * P[:, 1]
    return dict(rotation=(P[:, 0] - 0.5) * 2 * ROTATION, scale=s,
                x=(P[:, 2] - 0.5) * 2 * (MARGIN - s), y=(P[:, 3] - 0.5) * 2 * (MARGIN - s), params=P)


def _seeds(seeds) -> torch.Tensor:
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).cpu()
    if (seeds < 0).any():
        raise ValueError(f"seeds must be non-negative integers, got min {int(seeds.min())}")
    return seeds


def render_batch(objects, styles, seeds, size: int = 32, return_mask: bool = False):
    """Render a batch: float32 [B, 3, size, size] in [0, 1] (and the object coverage [B, size, size])."""
    _check_size(size)
    oid, sid, seeds = _as_ids(objects, object_id), _as_ids(styles, style_id), _seeds(seeds)
    if not (len(oid) == len(sid) == len(seeds)):
        raise ValueError(f"objects, styles and seeds must have equal lengths, got {len(oid)}, {len(sid)}, {len(seeds)}")
    B = len(seeds)
    if B == 0:
        return torch.zeros(0, 3, size, size)
    pz = pose(seeds)
    c = (torch.arange(size, dtype=torch.float32) + 0.5) * 2 / size - 1
    X, Y = c[None, None, :], -c[None, :, None]                # x right, y up
    dx, dy = X - pz["x"][:, None, None], Y - pz["y"][:, None, None]
    rot, s = pz["rotation"][:, None, None], pz["scale"][:, None, None]
    cs, sn = torch.cos(rot), torch.sin(rot)
    u, v = (cs * dx + sn * dy) / s, (-sn * dx + cs * dy) / s  # local (object) coordinates
    sdf = torch.empty(B, size, size)
    for k in oid.unique().tolist():
        m = oid == k
        sdf[m] = SHAPES[OBJECTS[k]](u[m], v[m]) * s[m]
    img = torch.empty(B, 3, size, size)
    for k in sid.unique().tolist():
        m = sid == k
        img[m] = _paint(style_spec(k), sdf[m], u[m], v[m], X, Y, pz["params"][m], seeds[m], size)
    if return_mask:
        return img, (0.5 - sdf * size / 2).clamp(0, 1)
    return img


def render(obj, style=None, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Render one image: float32 [3, size, size] in [0, 1], a pure function of its arguments."""
    return render_batch([obj], [style], [seed], size)[0]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 with the same layout (for saving or PIL)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- dataset

def _split_base(split):
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]


def sample_forms(styles, generator: torch.Generator, split: str = "train") -> torch.Tensor:
    """A caption form per image, uniform over ``split``'s forms of its family: int64 form indices (into
    ``CAPTION_FORMS``, or ``UNSTYLED_CAPTION_FORMS`` where the style is unstyled)."""
    sid = _as_ids(styles, style_id)
    styled = torch.tensor(list(caption_forms(split)), dtype=torch.int64)
    plain = torch.tensor(list(caption_forms(split, unstyled=True)), dtype=torch.int64)
    u = torch.rand(len(sid), generator=generator)
    pick_s = styled[(u * len(styled)).long().clamp(max=len(styled) - 1)]
    pick_u = plain[(u * len(plain)).long().clamp(max=len(plain) - 1)]
    return torch.where(sid == len(STYLES), pick_u, pick_s)


def sample_batch(batch_size: int, generator: torch.Generator, split: str = "train", size: int = 32,
                 unstyled: bool = True, forms: Optional[str] = None):
    """Random (object, style, seed) triples from a split, rendered: (images, object_ids, style_ids, seeds).

    ``forms`` ("train", "heldout" or "all") also draws a caption form per image from that split of the
    forms (:func:`sample_forms`, after everything else, so the first four values do not change) and returns
    (images, object_ids, style_ids, seeds, form_ids); the captions are ``form_caption(o, s, f)``.
    """
    base = _split_base(split)
    if forms is not None:
        _check_split(forms)
    ns = len(STYLES) + (1 if unstyled else 0)
    oid = torch.randint(len(OBJECTS), (batch_size,), generator=generator)
    sid = torch.randint(ns, (batch_size,), generator=generator)
    seeds = base + torch.randint(SPLIT_RANGE, (batch_size,), generator=generator)
    images = render_batch(oid, sid, seeds, size)
    if forms is None:
        return images, oid, sid, seeds
    return images, oid, sid, seeds, sample_forms(sid, generator, forms)


class MiniCanvasDataset(torch.utils.data.Dataset):
    """Index i -> (image [3,H,W], object_id, style_id, caption); the pair cycles over every
    object x style (+ unstyled) and the render seed is ``SPLIT_SEEDS[split] + i``."""

    def __init__(self, split: str = "train", size: int = 32, length: Optional[int] = None,
                 unstyled: bool = True, template: int = 0):
        _check_size(size)
        caption(OBJECTS[0], STYLES[0], template)               # validates the template
        self.base, self.size, self.template = _split_base(split), size, template
        self.split = split
        self.pairs = [(o, s) for s in range(len(STYLES) + (1 if unstyled else 0)) for o in range(len(OBJECTS))]
        self.length = len(self.pairs) * 10 if length is None else int(length)
        if self.length < 0 or self.length > SPLIT_RANGE:
            raise ValueError(f"length must be in 0..2**40, got {length!r}")

    def __len__(self):
        return self.length

    def item(self, i: int):
        """(object_id, style_id, seed, caption) of index i without rendering."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a MiniCanvasDataset of length {self.length}")
        o, s = self.pairs[i % len(self.pairs)]
        return o, s, self.base + i, caption(o, s, self.template)

    def __getitem__(self, i):
        o, s, seed, cap = self.item(int(i))
        return render(o, s, seed, self.size), o, s, cap

    def batch(self, indices):
        """Render many indices at once (vectorised): (images, object_ids, style_ids, captions)."""
        items = [self.item(int(i)) for i in indices]
        o, s, seeds, caps = zip(*items) if items else ((), (), (), ())
        return (render_batch(list(o), list(s), list(seeds), self.size), torch.tensor(o, dtype=torch.int64),
                torch.tensor(s, dtype=torch.int64), list(caps))
