"""UnlearnCanvas metrics (method.md section 6) as pure functions of classifier predictions, and a Frechet distance.

Every generated image becomes a :class:`Record`: the concept(s) unlearned while generating it and
their domain, what its prompt held (object id, style id or None for unstyled) and what the object and
style classifiers predicted. For one run (one target, or several unlearned at once):

- **UA** (unlearning accuracy) = 1 - accuracy of the target domain's classifier on the images whose
  prompt holds a target (any of them, for a multi-concept run);
- **IRA** (in-domain retain accuracy) = accuracy of the same classifier on the images whose prompt
  holds no target;
- **CRA** (cross-domain retain accuracy) = accuracy of the *other* domain's classifier (objects when
  unlearning a style, styles when unlearning an object) on **all** images of the run, target images
  included: erasing a style should leave the object of that very image intact. ``cra_rest`` is the
  same accuracy on the non-target images only, for comparison.

When every record carries a damage flag (``Record.damaged``, from :mod:`.damage`), a run also gets

- **damage_target** / **damage_kept**: the share of damaged images among the target / the kept images;
- **ua_undamaged**: the share of target images that the judge no longer reads as the target *and* that
  are undamaged: UA counting an image as unlearned only if it is undamaged (<= UA).

Values are fractions in [0, 1] (None where a run has no image of that kind); tables print percents.
The average over targets is the plain mean of the per-target values.

``frechet_distance`` is the Frechet distance between Gaussians fitted to two sets of classifier
penultimate features ("Frechet distance on classifier features"; not FID, which uses Inception).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..minicanvas import data

DOMAINS = ("style", "object")
METRICS = ("ua", "ira", "cra", "cra_rest")
DAMAGE_METRICS = ("damage_target", "damage_kept", "ua_undamaged")


@dataclass(frozen=True)
class Record:
    """One generated image: the unlearned target(s) and domain, the prompt's object/style ids, the predictions."""

    targets: tuple            # concept names or ids in ``domain`` (several for a multi-concept run)
    domain: str               # "style" or "object"
    object: int               # prompt object id
    style: Optional[int]      # prompt style id; None = unstyled
    pred_object: int          # object classifier's prediction
    pred_style: int           # style classifier's prediction (len(STYLES) = "unstyled")
    damaged: Optional[bool] = None  # the damage measure's verdict (saeuron.evaluate.damage); None: not measured


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return domain


def label_id_fn(domain: str, labels=None):
    """A name/id -> label id function for ``domain``, over MiniCanvas labels or ``labels`` (another benchmark's).

    ``labels``: None (MiniCanvas) or ``{"style": names, "object": names}``, e.g. UnlearnCanvas' classes in
    the order of the classifier heads; a style of None (unstyled) is then ``len(labels["style"])``.
    """
    if labels is None:
        return data.style_id if _check_domain(domain) == "style" else data.object_id
    names = list(labels[_check_domain(domain)])

    def conv(x):
        if x is None and domain == "style":
            return len(names)
        if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(names):
            return x
        if isinstance(x, str) and x in names:
            return names.index(x)
        raise ValueError(f"unknown {domain} {x!r}; valid: {', '.join(names)} (or 0..{len(names) - 1})")
    return conv


def target_ids(targets, domain: str, labels=None) -> tuple:
    """Label ids of target names/ids in ``domain`` (styles map ``None``/"unstyled" to ``len(STYLES)``)."""
    conv = label_id_fn(domain, labels)
    targets = (targets,) if isinstance(targets, (str, int)) else tuple(targets)
    if not targets:
        raise ValueError("a run needs at least one target")
    return tuple(conv(t) for t in targets)


def run_key(targets) -> str:
    """The name of a run: its target names joined by "+"."""
    targets = (targets,) if isinstance(targets, (str, int)) else tuple(targets)
    return "+".join(str(t) for t in targets)


def _acc(pred: list, true: list) -> Optional[float]:
    return sum(int(p == t) for p, t in zip(pred, true)) / len(true) if true else None


def target_metrics(records, targets=None, domain: Optional[str] = None, labels=None) -> dict:
    """UA, IRA, CRA and cra_rest (see the module docstring) of one run's records, plus the image counts
    (and damage_target, damage_kept, ua_undamaged when every record carries a damage flag).

    ``targets``/``domain`` default to those of the records, which must then all agree. ``labels``:
    None for MiniCanvas ids, or ``{"style": names, "object": names}`` (see :func:`label_id_fn`).
    """
    records = list(records)
    if targets is None or domain is None:
        runs = {(r.targets, r.domain) for r in records}
        if len(runs) != 1:
            raise ValueError(f"records of {len(runs)} runs given; pass targets= and domain= or one run's records")
        t0, d0 = next(iter(runs))
        targets, domain = t0 if targets is None else targets, d0 if domain is None else domain
    ids = set(target_ids(targets, domain, labels))
    same, other = ("style", "object") if domain == "style" else ("object", "style")
    sid = label_id_fn("style", labels)
    truth = {"object": lambda r: r.object, "style": lambda r: sid(r.style)}
    pred = {"object": lambda r: r.pred_object, "style": lambda r: r.pred_style}
    hit = [truth[same](r) in ids for r in records]
    tgt = [r for r, h in zip(records, hit) if h]
    rest = [r for r, h in zip(records, hit) if not h]
    acc_t = _acc([pred[same](r) for r in tgt], [truth[same](r) for r in tgt])
    out = dict(ua=None if acc_t is None else 1.0 - acc_t,
               ira=_acc([pred[same](r) for r in rest], [truth[same](r) for r in rest]),
               cra=_acc([pred[other](r) for r in records], [truth[other](r) for r in records]),
               cra_rest=_acc([pred[other](r) for r in rest], [truth[other](r) for r in rest]),
               n_target=len(tgt), n_rest=len(rest))
    if records and all(r.damaged is not None for r in records):
        share = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        out.update(damage_target=share([bool(r.damaged) for r in tgt]),
                   damage_kept=share([bool(r.damaged) for r in rest]),
                   ua_undamaged=share([pred[same](r) != truth[same](r) and not r.damaged for r in tgt]))
    return out


def kept_undamaged(records, targets, domain: str, labels=None) -> Optional[float]:
    """The share of a run's kept images (no target in their prompt) that the judge still reads right *and* that the
    damage measure passes (IRA counting a damaged kept image as lost); None without kept images."""
    ids = set(target_ids(targets, domain, labels))
    sid = label_id_fn("style", labels)
    truth = (lambda r: sid(r.style)) if domain == "style" else (lambda r: r.object)
    pred = (lambda r: r.pred_style) if domain == "style" else (lambda r: r.pred_object)
    rest = [r for r in records if truth(r) not in ids]
    if any(r.damaged is None for r in rest):
        raise ValueError("kept_undamaged needs records with damage flags (Record.damaged)")
    return sum(pred(r) == truth(r) and not r.damaged for r in rest) / len(rest) if rest else None


def mean_metrics(per_target: dict, keys=METRICS) -> dict:
    """Plain mean over runs of each metric (runs where a metric is None are left out of its mean)."""
    out = {}
    for k in keys:
        vals = [m[k] for m in per_target.values() if m.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def unlearning_metrics(records, labels=None) -> dict:
    """``{"per_target": {run key: metrics}, "mean": {metric: mean over runs}}`` of records of any number of runs."""
    groups: dict = {}
    for r in records:
        _check_domain(r.domain)
        groups.setdefault((tuple(r.targets), r.domain), []).append(r)
    per = {run_key(t): target_metrics(rs, t, d, labels) for (t, d), rs in groups.items()}
    return {"per_target": per, "mean": mean_metrics(per)}


# ---------------------------------------------------------------- Frechet distance

def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_gaussians(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))``; the middle matrix is
    symmetric PSD, so an eigendecomposition gives its square root (no scipy needed). Float64 throughout.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    c1, c2 = (torch.as_tensor(c, dtype=torch.float64) for c in (cov1, cov2))
    d = mu1.numel()
    if mu2.numel() != d or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(f"shapes do not match: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; covariances "
                         f"{tuple(c1.shape)}, {tuple(c2.shape)} (expected [d] and [d, d])")
    r1 = _psd_sqrt(c1)
    mid = r1 @ c2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    val = (mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * tr_sqrt
    return max(float(val), 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to feature rows ``[N, d]`` of two sets."""
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a, feats_b))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, d] with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows per set to fit a covariance, got {a.shape[0]} and {b.shape[0]}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("features contain NaN or inf")
    cov = lambda x: torch.atleast_2d(torch.cov(x.T))  # noqa: E731
    return frechet_distance_gaussians(a.mean(0), cov(a), b.mean(0), cov(b))
