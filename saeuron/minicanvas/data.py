"""MiniCanvas data: the objects, the styles and the captions of the procedural world (names, ids, caption forms).

Rendering lives in :mod:`.rendering`, random training batches and the dataset in :mod:`.dataset`.

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

import re
from dataclasses import dataclass
from typing import Optional, Sequence

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


def check_split(split: str) -> str:
    """``split`` if it names a caption-form split (train, heldout, all), else a clear error."""
    if split not in FORM_SPLITS:
        raise ValueError(f"unknown caption-form split {split!r}; valid: {', '.join(FORM_SPLITS)}")
    return split


def caption_forms(split: str = "all", unstyled: bool = False) -> dict:
    """``{form index: sentence}`` of the styled (or, with ``unstyled``, the unstyled) caption forms of a split
    ("train", "heldout" or "all"), in index order."""
    forms = UNSTYLED_CAPTION_FORMS if unstyled else CAPTION_FORMS
    keep = {"train": UNSTYLED_TRAIN_FORMS if unstyled else TRAIN_FORMS,
            "heldout": UNSTYLED_HELDOUT_FORMS if unstyled else HELDOUT_FORMS,
            "all": range(len(forms))}[check_split(split)]
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
