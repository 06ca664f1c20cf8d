"""MiniCanvas training data: random (object, style, seed) batches of a split, rendered, and a map-style dataset.

The splits own disjoint seed ranges (``SPLIT_SEEDS``), so held-out images never appear in training.
"""
from __future__ import annotations

from typing import Optional

import torch

from .data import OBJECTS, STYLES, caption, caption_forms, check_split, style_id
from .rendering import as_ids, check_size, render, render_batch

SPLIT_SEEDS = {"train": 0, "heldout": 1 << 40}   # seeds of a split: [base, base + 2**40)
SPLIT_RANGE = 1 << 40


def _split_base(split):
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]


def sample_forms(styles, generator: torch.Generator, split: str = "train") -> torch.Tensor:
    """A caption form per image, uniform over ``split``'s forms of its family: int64 form indices (into
    ``CAPTION_FORMS``, or ``UNSTYLED_CAPTION_FORMS`` where the style is unstyled)."""
    sid = as_ids(styles, style_id)
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
        check_split(forms)
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
        check_size(size)
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
