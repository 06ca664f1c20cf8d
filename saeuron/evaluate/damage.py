"""An image-damage measure for MiniCanvas edits, in the spirit of PER's artifact rate ("Look But Don't Touch").

UA / IRA / CRA read only the judges' top class, so a damaged image can pass them: pixel noise over
stripes reads as "checker" (UA counts it as unlearned) although a person still sees the stripes under
the noise. This module asks instead: *is this image a clean picture of what it should still show?*

What an image should still show (``allowed`` pairs of object x style label):
  * a **kept** image (its prompt holds no target): exactly its prompt's (object, style);
  * a **target** image of a **style** edit: its prompt's object in *any* style label (the style may go,
    the object must stay);
  * a **target** image of an **object** edit: its prompt's style (or unstyled ground) with *any* object.

Two criteria, both in the judges' own spaces (``saeuron.evaluate.common.judge`` gives the features):

1. **Distance to clean renders.** The ground-truth renderer draws ``renders_per_pair`` fresh images of
   every (object, style label) pair (seeds of the held-out split, never seen by the judges in training).
   An image's feature vector is both judges' penultimate features, each block divided by its RMS over the
   renders, concatenated. Its distance to a pair is the mean Euclidean distance to its ``k`` nearest renders
   of that pair, divided by the pair's own scale (the median leave-one-out k-NN distance among its
   renders); its distance to what it should show is the smallest over the allowed pairs.
2. **Judge confidence.** The softmax confidence (top probability) of each judge whose domain the image
   must keep: both judges for a kept image, the object judge for a style-edit target image, the style
   judge for an object-edit target image.

Both are **calibrated on clean images** (:meth:`DamageMeasure.calibrate`): the unedited model's own images
of the evaluated prompts (what ``unlearn_eval`` has anyway), else fresh renders. The distance threshold is
the ``1 - alpha`` quantile of the clean images' distances and each confidence floor the ``conf_alpha``
quantile of their confidences, capped at ``conf_cap`` (0.5: a judge is unsure when its top class has less
than even odds; without the cap a judge that is near-certain on every clean image would flag any image it
is a little less sure of), so at most about ``alpha + 2 * conf_alpha`` (3 % by default) of the clean
images are flagged. An image is **damaged** when its distance exceeds the threshold or a required judge is
less confident than its floor.

Per run (:func:`saeuron.evaluate.metrics.target_metrics` with ``Record.damaged``): the damage rate of the
target images and of the kept images, and ``ua_undamaged``: the share of target images the judge no longer
reads as the target *and* that are undamaged (an image counts as unlearned only if it is undamaged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..minicanvas import data, dataset, rendering
from .common import check_classifiers, judge

DAMAGE_VERSION = 1
DAMAGE_SEED = 20260  # render seeds: SPLIT_SEEDS["heldout"] + DAMAGE_SEED * 1000 + i (held-out split)
ROLES = ("kept", "target")


def _check_fraction(name, v, hi=0.5):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= hi):
        raise ValueError(f"{name} must be a number in [0, {hi}], got {v!r}")


@dataclass
class DamageMeasure:
    """Clean-render references in the judges' feature spaces, and the calibrated thresholds (module docstring)."""

    classifiers: dict
    ref: torch.Tensor               # [n_objects, n_style_labels, m, d] normalised features of clean renders
    pair_scale: torch.Tensor        # [n_objects, n_style_labels] median leave-one-out k-NN distance
    block_scale: tuple              # (object RMS, style RMS) of the raw features over the renders
    k: int = 3
    threshold: float = math.inf     # distance (in pair scales) above which an image is damaged
    conf_floor: dict = field(default_factory=lambda: {"object": 0.0, "style": 0.0})
    calibration: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ building blocks

    def embed(self, judged: dict) -> torch.Tensor:
        """Normalised, concatenated judge features [N, d] of a :func:`judge` result."""
        fo, fs = judged["feat_object"].float(), judged["feat_style"].float()
        return torch.cat([fo / self.block_scale[0], fs / self.block_scale[1]], 1)

    def pair_distances(self, judged: dict, batch_size: int = 512) -> torch.Tensor:
        """[N, n_objects, n_style_labels]: each image's k-NN distance to every pair's renders, in pair scales."""
        x = self.embed(judged)
        n_o, n_s, m, d = self.ref.shape
        flat = self.ref.reshape(-1, d)
        out = []
        for i in range(0, len(x), batch_size):
            dist = torch.cdist(x[i:i + batch_size], flat).reshape(-1, n_o, n_s, m)
            out.append(dist.topk(min(self.k, m), dim=-1, largest=False).values.mean(-1))
        res = torch.cat(out) if out else torch.zeros(0, n_o, n_s)
        return res / self.pair_scale

    def confidences(self, judged: dict) -> dict:
        """``{"object": [N], "style": [N]}``: each judge's top softmax probability (from its head on the features)."""
        out = {}
        with torch.no_grad():
            for kind in ("object", "style"):
                head = self.classifiers[kind].head
                w = head.weight.detach().float().cpu()
                b = head.bias.detach().float().cpu()
                out[kind] = torch.softmax(judged[f"feat_{kind}"].float() @ w.T + b, -1).max(-1).values
        return out

    # ------------------------------------------------------------------ roles and scores

    @staticmethod
    def allowed_mask(objects, styles, targets=(), domain: str = "style") -> torch.Tensor:
        """[N, n_objects, n_style_labels] bool: the pairs each image may show (module docstring)."""
        oid, sid = _ids(objects, styles)
        tid = _target_ids(targets, domain)
        n_o, n_s = len(data.OBJECTS), len(data.STYLE_LABELS)
        mask = torch.zeros(len(oid), n_o, n_s, dtype=torch.bool)
        role = _roles(oid, sid, tid, domain)
        for i, (o, s, r) in enumerate(zip(oid.tolist(), sid.tolist(), role.tolist())):
            if not r:
                mask[i, o, s] = True
            elif domain == "style":
                mask[i, o, :] = True
            else:
                mask[i, :, s] = True
        return mask

    def distance(self, judged: dict, objects, styles, targets=(), domain: str = "style") -> torch.Tensor:
        """[N] distance (in pair scales) of each image to the nearest clean pair it may show."""
        d = self.pair_distances(judged)
        mask = self.allowed_mask(objects, styles, targets, domain)
        if len(mask) != len(d):
            raise ValueError(f"{len(d)} judged images but {len(mask)} objects/styles")
        return d.masked_fill(~mask, math.inf).flatten(1).min(1).values

    def score(self, judged: dict, objects, styles, targets=(), domain: str = "style") -> dict:
        """Per-image damage of a run: ``{"damaged", "distance", "far", "unsure", "conf_object", "conf_style",
        "target"}`` (bool / float tensors [N]); ``targets`` empty: every image is a kept image."""
        oid, sid = _ids(objects, styles)
        role = _roles(oid, sid, _target_ids(targets, domain), domain)
        dist = self.distance(judged, objects, styles, targets, domain)
        conf = self.confidences(judged)
        need_o = ~role | (domain == "style")          # the object must stay: kept images, style-edit targets
        need_s = ~role | (domain == "object")
        unsure = (need_o & (conf["object"] < self.conf_floor["object"])) | \
                 (need_s & (conf["style"] < self.conf_floor["style"]))
        far = dist > self.threshold
        return {"damaged": far | unsure, "distance": dist, "far": far, "unsure": unsure,
                "conf_object": conf["object"], "conf_style": conf["style"], "target": role}

    def calibrate(self, judged: dict, objects, styles, alpha: float = 0.02, conf_alpha: float = 0.005,
                  source: str = "given", conf_cap: float = 0.5) -> "DamageMeasure":
        """Set the threshold and confidence floors from clean images of (objects, styles) (module docstring);
        returns self."""
        _check_fraction("alpha", alpha)
        _check_fraction("conf_alpha", conf_alpha)
        _check_fraction("conf_cap", conf_cap, 1.0)
        dist = self.distance(judged, objects, styles)
        if len(dist) < 2:
            raise ValueError(f"need at least 2 clean images to calibrate the damage measure, got {len(dist)}")
        conf = self.confidences(judged)
        self.threshold = float(torch.quantile(dist.double(), 1 - alpha))
        self.conf_floor = {k: min(conf_cap, float(torch.quantile(v.double(), conf_alpha))) for k, v in conf.items()}
        flagged = self.score(judged, objects, styles)["damaged"].float().mean().item()
        self.calibration = {"source": source, "images": len(dist), "alpha": alpha, "conf_alpha": conf_alpha,
                            "conf_cap": conf_cap,
                            "threshold": self.threshold, "conf_floor": dict(self.conf_floor),
                            "flagged_clean": flagged}
        return self

    def config(self) -> dict:
        """A JSON-able description (for cache keys and reports)."""
        n_o, n_s, m, _ = self.ref.shape
        return {"version": DAMAGE_VERSION, "renders_per_pair": m, "k": self.k,
                "calibration": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.calibration.items()
                                if k != "conf_floor"},
                "conf_floor": {k: round(v, 6) for k, v in self.conf_floor.items()}}


# ---------------------------------------------------------------- helpers

def _ids(objects, styles) -> tuple:
    oid = torch.tensor([data.object_id(o) for o in _as_list(objects)], dtype=torch.int64)
    sid = torch.tensor([data.style_id(s) for s in _as_list(styles)], dtype=torch.int64)
    if len(oid) != len(sid):
        raise ValueError(f"objects and styles must have equal lengths, got {len(oid)} and {len(sid)}")
    return oid, sid


def _as_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _target_ids(targets, domain) -> set:
    if domain not in ("style", "object"):
        raise ValueError(f"unknown domain {domain!r}; valid: style, object")
    targets = (targets,) if isinstance(targets, (str, int)) else tuple(targets or ())
    conv = data.style_id if domain == "style" else data.object_id
    return {conv(t) for t in targets}


def _roles(oid, sid, tid: set, domain) -> torch.Tensor:
    own = sid if domain == "style" else oid
    return torch.tensor([int(v) in tid for v in own.tolist()], dtype=torch.bool)


def render_references(renders_per_pair: int = 24, size: int = 32, seed: int = DAMAGE_SEED) -> tuple:
    """Clean renders of every (object, style label) pair: ``(images [P*m, 3, size, size], objects, styles)``,
    pair-major (object, then style label), seeds from the held-out split."""
    if not (isinstance(renders_per_pair, int) and renders_per_pair >= 2):
        raise ValueError(f"renders_per_pair must be an int >= 2, got {renders_per_pair!r}")
    n_o, n_s = len(data.OBJECTS), len(data.STYLE_LABELS)
    objs = torch.arange(n_o).repeat_interleave(n_s * renders_per_pair)
    stys = torch.arange(n_s).repeat_interleave(renders_per_pair).repeat(n_o)
    base = dataset.SPLIT_SEEDS["heldout"] + seed * 1000 * n_o * n_s
    seeds = base + torch.arange(len(objs))
    return rendering.render_batch(objs, stys, seeds, size), objs, stys


def fit_damage_measure(classifiers: dict, calibration: Optional[dict] = None, *, renders_per_pair: int = 24,
                       k: int = 3, alpha: float = 0.02, conf_alpha: float = 0.005, conf_cap: float = 0.5,
                       seed: int = DAMAGE_SEED, batch_size: int = 512) -> DamageMeasure:
    """A calibrated :class:`DamageMeasure` for the judges ``classifiers``.

    ``calibration``: the clean images to calibrate on, as ``{"feat_object", "feat_style", "objects",
    "styles"}`` (a :func:`judge` result of the unedited model's images plus each image's prompt object and
    style; style None = unstyled) or ``{"images", "objects", "styles"}``; None calibrates on fresh renders
    (other seeds than the references), which suits judging renders, not a model's images.
    """
    check_classifiers(classifiers)
    if not (isinstance(k, int) and 1 <= k < renders_per_pair):
        raise ValueError(f"k must be an int in 1..renders_per_pair-1 ({renders_per_pair - 1}), got {k!r}")
    size = getattr(classifiers["style"], "size", 32) or 32
    images, objs, stys = render_references(renders_per_pair, size, seed)
    j = judge(classifiers, images, batch_size)
    fo, fs = j["feat_object"].float(), j["feat_style"].float()
    block = (max(float(fo.pow(2).mean().sqrt()), 1e-8), max(float(fs.pow(2).mean().sqrt()), 1e-8))
    x = torch.cat([fo / block[0], fs / block[1]], 1)
    n_o, n_s = len(data.OBJECTS), len(data.STYLE_LABELS)
    ref = x.reshape(n_o, n_s, renders_per_pair, -1)
    d = torch.cdist(ref.flatten(0, 1), ref.flatten(0, 1))                        # [P, m, m] within each pair
    d = d + torch.diag(torch.full((renders_per_pair,), math.inf))                # leave one out
    loo = d.topk(k, dim=-1, largest=False).values.mean(-1)                       # [P, m]
    scale = loo.median(-1).values.clamp_min(1e-6).reshape(n_o, n_s)
    m = DamageMeasure(dict(classifiers), ref, scale, block, k)
    if calibration is None:
        cal_images, cal_o, cal_s = render_references(max(4, renders_per_pair // 2), size, seed + 1)
        cal = judge(classifiers, cal_images, batch_size)
        return m.calibrate(cal, cal_o, cal_s, alpha, conf_alpha, source="renders", conf_cap=conf_cap)
    if not isinstance(calibration, dict) or not {"objects", "styles"} <= set(calibration):
        raise ValueError("calibration must be a dict with 'objects', 'styles' and either 'feat_object'/'feat_style' "
                         f"or 'images'; got {type(calibration).__name__}"
                         + (f" with keys {sorted(calibration)}" if isinstance(calibration, dict) else ""))
    cal = calibration if {"feat_object", "feat_style"} <= set(calibration) else \
        judge(classifiers, calibration["images"], batch_size)
    return m.calibrate(cal, calibration["objects"], calibration["styles"], alpha, conf_alpha,
                       source=str(calibration.get("source", "given")), conf_cap=conf_cap)


def damage_rates(damaged: Sequence[bool], is_target: Sequence[bool]) -> dict:
    """``{"damage_target", "damage_kept"}``: the damaged share of target and of kept images (None: no such image)."""
    dmg = [bool(x) for x in damaged]
    tgt = [bool(x) for x in is_target]
    if len(dmg) != len(tgt):
        raise ValueError(f"{len(dmg)} damage flags for {len(tgt)} images")
    t = [d for d, h in zip(dmg, tgt) if h]
    k = [d for d, h in zip(dmg, tgt) if not h]
    return {"damage_target": sum(t) / len(t) if t else None, "damage_kept": sum(k) / len(k) if k else None}


# ---------------------------------------------------------------- synthetic damage (tests, demonstrations)

def corrupt(images: torch.Tensor, kind: str, strength: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Synthetic damage of images in [0, 1]: "noise" (heavy pixel noise; the issue's stripes-under-noise),
    "blotches" (random opaque discs), "invert" (colour inversion), "shuffle" (pixels permuted in 4x4 tiles)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    g = torch.Generator().manual_seed(seed)
    x = images.float().clone()
    B, _, H, W = x.shape
    if kind == "noise":
        return (x + 0.45 * strength * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "invert":
        return 1 - x
    if kind == "blotches":
        yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
        for _ in range(max(1, round(4 * strength))):
            c = torch.rand(B, 2, generator=g) * torch.tensor([H, W])
            r = (0.12 + 0.1 * torch.rand(B, generator=g)) * min(H, W)
            col = torch.rand(B, 3, generator=g)
            inside = ((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) < r[:, None, None] ** 2
            x = torch.where(inside[:, None], col[:, :, None, None].expand_as(x), x)
        return x
    t = 4                                                        # shuffle
    h, w = H // t * t, W // t * t
    tiles = x[:, :, :h, :w].unfold(2, t, t).unfold(3, t, t)      # [B, 3, h/t, w/t, t, t]
    flat = tiles.reshape(*tiles.shape[:4], t * t)
    perm = torch.argsort(torch.rand(flat.shape[:4] + (t * t,), generator=g), -1)
    perm = perm[:, :1].expand_as(flat)                           # same permutation for the three channels
    flat = torch.gather(flat, -1, perm)
    x[:, :, :h, :w] = flat.reshape(tiles.shape).permute(0, 1, 2, 4, 3, 5).reshape(B, 3, h, w)
    return x


CORRUPTIONS = ("noise", "blotches", "invert", "shuffle")

__all__ = ["DamageMeasure", "fit_damage_measure", "render_references", "damage_rates", "corrupt", "CORRUPTIONS",
           "DAMAGE_VERSION", "ROLES"]
