"""The concept table and its file format: ``mu`` per concept, timestep and hookpoint, scores, feature
selection, edit tables, the per-concept defaults and their validation, and ``concepts.safetensors`` +
``concepts.json``.

For concept c at timestep t (method.md section 4; ``mu`` comes from :func:`saeuron.selection.compute_statistics`)::

    score_t(i, c) = mu[c,t][i] / (sum_j mu[c,t][j] + 1e-8) - mu[~c,t][i] / (sum_j mu[~c,t][j] + 1e-8)

``mu[~c,t]`` is the prompt-count-weighted mean over all *other concepts'* prompts. For an SAE trained with concept
supervision a concept's default may instead be the ``reserved`` rule: exactly the latents the SAE reserves for it. A
:class:`ConceptTable` keeps ``mu`` for every concept, timestep and hookpoint, so any subset of the
concepts can be unlearned later, with any selection rule, without recomputing anything. It is saved as
``concepts.safetensors`` + ``concepts.json`` next to the SAE folders of a checkpoint.
"""
from __future__ import annotations

import difflib
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import replace
from .hookpoints import normalize_hookpoint
from .utils import FolderLock, atomic_save_file, atomic_write_json, check_finite_number, read_json

TENSORS_FILE = "concepts.safetensors"
JSON_FILE = "concepts.json"
FORMAT = "saeuron.concepts"
VERSION = 1
DEFAULTS = {"multiplier": -1.0, "percentile": 99.99, "top_n": None, "hookpoints": None, "threshold": 1.0}
# defaults a concept file holds only when set: "reserved": true selects the latents a concept-supervised SAE reserves
# for the concept (saeuron.supervision) instead of the percentile/top_n rule; absent (false) in every other file.
# "mode" (and its "gate"; for "probe_anchor" its "anchor" prompt): the edit mode the concept is unlearned with when
# ``patch`` is given no mode (saeuron.replace.MODES); absent = "scale", the method's edit, so files without it stay
# as before
OPTIONAL_DEFAULTS = {"reserved": False, "mode": "scale", "gate": None, "anchor": None}
DEFAULT_KEYS = frozenset(DEFAULTS) | frozenset(OPTIONAL_DEFAULTS)
EPS = 1e-8


def unknown_name_error(kind: str, name, known, note: str = "") -> ValueError:
    """A ValueError naming the unknown ``name``, a close match and the valid choices."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    note = f" ({note})" if note else ""
    return ValueError(f"unknown {kind} {name!r}{note}{hint}; known: {', '.join(map(str, known)) or '(none)'}")


def check_threshold(value, where: str) -> float:
    """``value`` as a float if it is a finite number > 0 (a factor on tau), else a clear error."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not (v > 0 and v != float("inf")):
        raise ValueError(f"threshold in {where} must be a finite number > 0 (a factor on the edit threshold tau; "
                         f"1 = the method's), got {value!r}")
    return v


def check_multiplier(value, where: str) -> float:
    """``value`` as a float if it is a finite number (gamma; the method uses gamma < 0), else a clear error."""
    return check_finite_number(value, f"multiplier in {where} (gamma, e.g. -1)")


def check_percentile(value, where: str) -> float:
    """``value`` as a float if it lies in (0, 100], else a clear error."""
    v = check_finite_number(value, f"percentile in {where}")
    if not 0 < v <= 100:
        raise ValueError(f"percentile in {where} must lie in (0, 100] (e.g. 99.99), got {value!r}")
    return v


def check_top_n(value, where: str) -> int:
    """``value`` as an int if it is a whole number >= 0, else a clear error."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value and value >= 0 \
        and float(value).is_integer()
    if not ok:
        raise ValueError(f"top_n in {where} must be a whole number >= 0, got {value!r}")
    return int(value)


def check_concepts(concepts, known=None) -> list:
    """``concepts`` (one name or an iterable of names) as a non-empty list of strings, else a clear error."""
    listing = f"; known: {', '.join(map(str, known))}" if known else ""
    if isinstance(concepts, str):
        concepts = [concepts]
    elif concepts is None or isinstance(concepts, (bytes, dict)) or not hasattr(concepts, "__iter__"):
        raise TypeError(f"concepts must be a concept name or a list of names, got {concepts!r}{listing}")
    concepts = list(concepts)
    bad = [c for c in concepts if not isinstance(c, str) or not c]
    if bad:
        raise TypeError(f"concept names must be non-empty strings, got {bad[0]!r}{listing}")
    if not concepts:
        raise ValueError(f"no concepts to unlearn{listing}")
    return concepts


def check_defaults(d: dict, where: str) -> dict:
    """Validate one concept's defaults (multiplier, percentile, top_n) where they enter; returns ``d``."""
    d["multiplier"] = check_multiplier(d["multiplier"], where)
    if d["percentile"] is not None:
        d["percentile"] = check_percentile(d["percentile"], where)
    if d["top_n"] is not None:
        d["top_n"] = check_top_n(d["top_n"], where)
    if d["percentile"] is None and d["top_n"] is None:
        raise ValueError(f"{where}: give a percentile or a top_n (both are None)")
    return d


def _per_concept(value, concept):
    """``value`` if it is a scalar or None, else ``value[concept]`` (None when absent)."""
    if isinstance(value, dict):
        return value.get(concept)
    return value


class ConceptTable:
    """``mu[hookpoint]`` ``[C, T, M]`` for concepts ``names`` at ``timesteps``, plus per-concept defaults.

    ``counts[c]`` is the number of prompts the mean of concept c runs over (the weights of ``mu[~c]``).
    ``defaults[c]`` holds ``multiplier`` (gamma < 0), ``percentile`` and ``top_n`` (top_n wins when set),
    ``hookpoints``: where c is edited when ``patch`` is not told (None: every hookpoint of the table;
    a sweep may pick, e.g., a coarser block for objects than for styles), and ``threshold``: a factor on
    the edit threshold ``tau`` (1 = the method's; larger edits only where a feature fires strongly, which
    spares other concepts on whose tokens it fires weakly). Optionally ``reserved: true`` (only present when
    set): select the latents the hookpoint's concept-supervised SAE reserves for c (recorded in
    ``metadata["hookpoint_sae"][hp]["concept_latents"]``) instead of the percentile/top_n rule, which explicit
    ``percentile``/``top_n`` arguments still pick.
    """

    def __init__(self, names, counts, timesteps, mu: dict, defaults=None, metadata=None):
        self.names = [str(n) for n in names]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"concept names must be unique, got {self.names}")
        if not self.names:
            raise ValueError("a concept table needs at least one concept")
        self.counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1).cpu()
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).cpu()
        C, T = len(self.names), len(self.timesteps)
        if self.counts.shape != (C,):
            raise ValueError(f"counts has {self.counts.numel()} entries for {C} concepts")
        if (self.counts <= 0).any():
            bad = [n for n, k in zip(self.names, self.counts.tolist()) if k <= 0]
            raise ValueError(f"concepts without prompts: {bad}")
        if T == 0:
            raise ValueError("a concept table needs at least one timestep")
        if not bool(torch.isfinite(self.timesteps).all()) or self.timesteps.unique().numel() != T:
            raise ValueError(f"timesteps must be finite and distinct, got {self.timesteps.tolist()}")
        self.mu = {}
        for hp, m in mu.items():
            m = torch.as_tensor(m).detach().float().cpu()
            if m.dim() != 3 or m.shape[:2] != (C, T):
                raise ValueError(f"mu[{hp!r}] has shape {tuple(m.shape)}; expected [C={C}, T={T}, M]")
            bad = ~torch.isfinite(m).all(-1).all(-1) | (m < 0).any(-1).any(-1)
            if bool(bad.any()):  # a NaN mean would silently switch the edit off; codes are ReLU outputs, >= 0
                raise ValueError(f"mu[{hp!r}] holds NaN, Inf or negative means for concepts "
                                 f"{[n for n, b in zip(self.names, bad.tolist()) if b]}: the statistics are corrupt; "
                                 "recompute them (saeuron select)")
            self.mu[normalize_hookpoint(hp)] = m.contiguous()
        if not self.mu:
            raise ValueError("a concept table needs statistics for at least one hookpoint")
        self.metadata = dict(metadata or {})  # before the defaults: a "reserved" default is checked against it
        self.defaults = self.complete_defaults(defaults)

    def complete_defaults(self, defaults) -> dict:
        """Every concept's defaults (one dict for all concepts, or one per concept) completed and validated."""
        defaults = dict(defaults or {})
        if set(defaults) <= DEFAULT_KEYS:  # one dict for all concepts
            out = {n: {**DEFAULTS, **defaults} for n in self.names}
        else:
            unknown = [k for k in defaults if k not in self.names]
            if unknown:
                raise ValueError(f"defaults for unknown concepts {unknown}; concepts: {self.names} "
                                 f"(or give one dict with keys {list(DEFAULTS)} for all)")
            out = {n: {**DEFAULTS, **defaults.get(n, {})} for n in self.names}
        for n, d in out.items():
            extra = [k for k in d if k not in DEFAULT_KEYS]
            if extra:
                raise ValueError(f"defaults of {n!r} have unknown keys {extra}; valid: {', '.join(sorted(DEFAULT_KEYS))}")
            if d["hookpoints"] is not None:
                hps = [d["hookpoints"]] if isinstance(d["hookpoints"], str) else list(d["hookpoints"])
                for h in hps:
                    if normalize_hookpoint(h) not in self.mu:
                        raise unknown_name_error(f"hookpoint in the defaults of {n!r}", h, list(self.mu))
                if not hps:
                    raise ValueError(f"defaults of {n!r}: hookpoints is empty; give None (every hookpoint) or a list")
                d["hookpoints"] = [normalize_hookpoint(h) for h in hps]
            d["threshold"] = check_threshold(d["threshold"], f"the defaults of {n!r}")
            check_defaults(d, f"the defaults of {n!r}")
            if d.get("reserved") not in (None, False):
                if d["reserved"] is not True:
                    raise ValueError(f"defaults of {n!r}: reserved must be true or false, got {d['reserved']!r}")
                hps = d["hookpoints"] if d["hookpoints"] is not None else list(self.mu)
                lacking = [h for h in hps if self.reserved_latents(h, n) is None]
                if lacking:
                    raise ValueError(f"defaults of {n!r}: reserved=true, but the SAE at {lacking} reserves no latents "
                                     f"for {n!r} (its reservation names: {sorted(self.reservation(lacking[0]))}); "
                                     "train that SAE with concept supervision, or limit the concept's hookpoints")
            else:
                d.pop("reserved", None)  # absent = false: files without reserved selection stay as before
            mode, gate, anchor = d.pop("mode", None) or "scale", d.pop("gate", None), d.pop("anchor", None)
            try:
                replace.check_mode(mode, "both", gate)
            except ValueError as e:
                raise ValueError(f"defaults of {n!r}: {e}") from None
            if anchor is not None and (mode != "probe_anchor" or not isinstance(anchor, str) or not anchor.strip()):
                raise ValueError(f"defaults of {n!r}: anchor={anchor!r} must be a non-empty prompt, and belongs to "
                                 f"mode 'probe_anchor' (the default mode is {mode!r})")
            if mode != "scale":  # absent = the method's scale edit
                d["mode"] = mode
                if gate is not None:
                    d["gate"] = float(gate)
                if anchor is not None:
                    d["anchor"] = anchor
        return out

    def edit_mode(self, concept: str) -> tuple:
        """``(mode, gate)`` ``concept`` is unlearned with by default (``("scale", None)`` unless its defaults say)."""
        d = self.defaults[self.names[self.index(concept)]]
        return d.get("mode", "scale"), d.get("gate")

    def default_anchor(self, concept: str):
        """The anchor prompt ``concept``'s default ``probe_anchor`` edit uses, or None (chosen automatically)."""
        return self.defaults[self.names[self.index(concept)]].get("anchor")

    def reservation(self, hp: str) -> dict:
        """``{concept: [latent ids]}`` the SAE at ``hp`` reserves (concept-supervised training), ``{}`` if none."""
        rec = (self.metadata.get("hookpoint_sae") or {}).get(self.stored_hookpoint(hp))
        res = rec.get("concept_latents") if isinstance(rec, dict) else None
        return dict(res) if isinstance(res, dict) else {}

    def reserved_latents(self, hp: str, concept: str):
        """The latent ids (a sorted LongTensor) the SAE at ``hp`` reserves for ``concept``, or None."""
        ids = self.reservation(hp).get(concept)
        if not ids:
            return None
        ids = torch.tensor(sorted(int(i) for i in ids), dtype=torch.int64)
        if int(ids.max()) >= self.num_latents(hp) or int(ids.min()) < 0:
            raise ValueError(f"the concept file's reservation for {concept!r} at {hp!r} names latents {ids.tolist()} "
                             f"outside [0, {self.num_latents(hp)}): it is corrupt; rerun select")
        return ids

    def check_sae(self, hp: str, sae) -> None:
        """Raise if ``sae`` is not the SAE this table's statistics at ``hp`` were computed with (see
        :func:`check_sae_record`)."""
        hp = self.stored_hookpoint(hp)
        if sae.num_latents != self.num_latents(hp):
            raise ValueError(f"the SAE at {hp!r} has {sae.num_latents} latents but the concept file's statistics "
                             f"have {self.num_latents(hp)}: they come from different SAEs")
        rec = (self.metadata.get("hookpoint_sae") or {}).get(hp)
        if rec is None:  # a table built by hand, not by compute_statistics: nothing recorded to check
            return
        check_sae_record(rec, hp, sae, "the concept file's statistics", "rerun `saeuron select` with this SAE")

    # -- lookup
    @property
    def hookpoints(self) -> list:
        """Hookpoints with statistics (module names, without a ``unet.`` prefix)."""
        return list(self.mu)

    def num_latents(self, hp: str) -> int:
        """Dictionary size M of the SAE whose statistics ``hp`` holds."""
        return self.mu[self.stored_hookpoint(hp)].shape[-1]

    def concept_hookpoints(self, concept: str) -> list:
        """The hookpoints ``concept`` is edited at by default: its ``defaults["hookpoints"]``, else all of them."""
        self.index(concept)
        hps = self.defaults[concept]["hookpoints"]
        return list(self.hookpoints) if hps is None else list(hps)

    def stored_hookpoint(self, hp: str) -> str:
        """The name ``hp`` has in this file's statistics; an unknown hookpoint raises, naming the known ones."""
        name = normalize_hookpoint(hp)
        if name not in self.mu:
            raise unknown_name_error("hookpoint", hp, self.hookpoints, "no statistics for it in this concept file")
        return name

    def index(self, concept: str) -> int:
        """Row of ``concept``; an unknown name raises with the known ones and a close match."""
        try:
            return self.names.index(concept)
        except ValueError:
            raise unknown_name_error("concept", concept, self.names) from None

    def __repr__(self):
        hps = ", ".join(f"{h}: M={m.shape[-1]}" for h, m in self.mu.items())
        return f"ConceptTable(concepts={self.names}, timesteps={len(self.timesteps)}, {hps})"

    # -- the method
    def scores(self, hp: str, concept: str) -> Tensor:
        """``score_t(i, c)`` ``[T, M]``: c's normalised mean activation minus that of the other concepts."""
        mu = self.mu[self.stored_hookpoint(hp)].double()
        c = self.index(concept)
        mc = mu[c]
        others = [j for j in range(len(self.names)) if j != c]
        if others:
            w = self.counts[others].double()
            mn = (w[:, None, None] * mu[others]).sum(0) / w.sum()
        else:  # a single concept: nothing to contrast with
            mn = torch.zeros_like(mc)
        s = mc / (mc.sum(-1, keepdim=True) + EPS) - mn / (mn.sum(-1, keepdim=True) + EPS)
        return s.float()

    def tau(self, hp: str) -> Tensor:
        """Edit thresholds ``tau_t[i]`` ``[T, M]``: the mean over all concepts of ``mu[c, t][i]``."""
        return self.mu[self.stored_hookpoint(hp)].mean(0)

    def threshold(self, concept: str, threshold=None) -> float:
        """The factor on ``tau`` for ``concept``: ``threshold`` if given, else its default (validated)."""
        self.index(concept)
        if threshold is None:
            return self.defaults[concept]["threshold"]
        return check_threshold(threshold, f"the edit of {concept!r}")

    def rule(self, concept: str, percentile=None, top_n=None, reserved=None) -> tuple:
        """``("top_n", n)``, ``("percentile", p)`` or ``("reserved", True)`` for ``concept``: explicit arguments beat
        its defaults (``reserved=False`` asks for its percentile/top_n default even when ``reserved`` is its default)."""
        self.index(concept)
        if percentile is not None and top_n is not None:
            raise ValueError(f"give percentile or top_n for {concept!r}, not both")
        if reserved is not None and not isinstance(reserved, bool):
            raise ValueError(f"reserved for {concept!r} must be True, False or None, got {reserved!r}")
        if reserved and (percentile is not None or top_n is not None):
            raise ValueError(f"give reserved=True or a percentile/top_n for {concept!r}, not both")
        if reserved or (reserved is None and top_n is None and percentile is None
                        and self.defaults[concept].get("reserved", False)):
            return "reserved", True
        if top_n is None and percentile is None:
            d = self.defaults[concept]
            top_n, percentile = d["top_n"], d["percentile"]
            if top_n is None and percentile is None:
                raise ValueError(f"concept {concept!r} has neither a default percentile nor top_n; pass one")
        if top_n is not None:
            return "top_n", check_top_n(top_n, f"the selection of {concept!r}")
        return "percentile", check_percentile(percentile, f"the selection of {concept!r}")

    def select(self, hp: str, concept: str, percentile=None, top_n=None, reserved=None) -> list:
        """Selected feature ids per timestep (a list of T sorted LongTensors).

        ``percentile``: features whose score exceeds that quantile of ``score_t``; ``top_n``: the n
        highest-scoring features per timestep. Either way a feature is only selected when it fires for
        the concept (``mu[c,t][i] > 0``) and its score is positive (more typical of c than of the rest).
        ``reserved`` (or a ``reserved`` default): the latents the SAE at ``hp`` reserves for the concept, at every
        timestep at which they fire for it (``mu[c,t][i] > 0``), whatever their score.
        """
        kind, val = self.rule(concept, percentile, top_n, reserved)
        if kind == "reserved":
            ids = self.reserved_latents(hp, concept)
            if ids is None:
                raise ValueError(f"the reserved rule for {concept!r} at {hp!r}: the SAE there reserves no latents for "
                                 f"it (its reservation names: {sorted(self.reservation(hp)) or 'none'})")
            fires = self.mu[self.stored_hookpoint(hp)][self.index(concept)][:, ids] > 0  # [T, n]
            return [ids[row] for row in fires]
        s = self.scores(hp, concept).double()
        ok = (self.mu[self.stored_hookpoint(hp)][self.index(concept)] > 0) & (s > 0)
        if kind == "percentile":
            keep = ok & (s > torch.quantile(s, val / 100.0, dim=-1, keepdim=True))
        else:
            keep = torch.zeros_like(ok)
            n = min(val, s.shape[-1])
            if n:
                top = s.masked_fill(~ok, float("-inf")).topk(n, dim=-1).indices
                keep.scatter_(1, top, True)
                keep &= ok
        return [row.nonzero().flatten() for row in keep]

    def edit_tables(self, hp: str, concepts, multipliers=None, percentiles=None, top_ns=None,
                    thresholds=None, reserved=None) -> tuple:
        """Per-timestep edit tables for unlearning ``concepts`` at ``hp``: ``(timesteps, feat_idx, tau, scale)``.

        ``feat_idx [T, F]`` int64 holds the union of the concepts' selected features at each timestep,
        ``tau [T, F] = threshold_c * tau_t[i]`` their thresholds and ``scale [T, F] = multiplier_c * mu[c,t][i]``
        (the edit sets ``f_i <- scale * f_i`` where ``f_i > tau``). A feature selected by several concepts
        keeps the smallest (most negative) scale and the smallest threshold, i.e. the strongest
        suppression, whatever the order of ``concepts`` (the reference code applies one concept after the
        other, so there the result depends on the order; ``error_term="reference"`` therefore reproduces
        the reference only when the concepts share no feature). Rows are padded to a common F with ``(0, +inf, 1.0)``, which never edits; F is 0
        when nothing is selected. ``multipliers``/``percentiles``/``top_ns``/``thresholds``/``reserved``: a value for
        all concepts or a dict per concept; unset values fall back to each concept's defaults (``reserved``: see
        :meth:`select`; the reserved latents enter the same tables, with the same tau and scale as any feature).
        """
        hp = self.stored_hookpoint(hp)
        concepts = check_concepts(concepts, self.names)
        for d, what in ((multipliers, "multipliers"), (percentiles, "percentiles"), (top_ns, "top_ns"),
                        (thresholds, "thresholds"), (reserved, "reserved")):
            if isinstance(d, dict):
                extra = [k for k in d if k not in self.names]
                if extra:
                    raise unknown_name_error(f"concept in {what}", extra[0], self.names)
        mu = self.mu[hp]
        T, M = mu.shape[1:]
        union = torch.zeros(T, M, dtype=torch.bool)
        scale = torch.full((T, M), float("inf"))
        factor = torch.full((T, M), float("inf"))
        for c in concepts:
            ci = self.index(c)
            mult = _per_concept(multipliers, c)
            mult = self.defaults[c]["multiplier"] if mult is None else check_multiplier(mult, f"the edit of {c!r}")
            sel = self.select(hp, c, _per_concept(percentiles, c), _per_concept(top_ns, c), _per_concept(reserved, c))
            mask = torch.zeros(T, M, dtype=torch.bool)
            for t, idx in enumerate(sel):
                mask[t, idx] = True
            if bool(mask.any()) and not bool(torch.isfinite(mult * mu[ci][mask]).all()):
                raise ValueError(f"multiplier {mult} times the statistics of {c!r} at {hp!r} overflows float32; "
                                 "the statistics are corrupt or the multiplier is far too large")
            scale = torch.where(mask, torch.minimum(scale, mult * mu[ci]), scale)
            factor = torch.where(mask, factor.clamp(max=self.threshold(c, _per_concept(thresholds, c))), factor)
            union |= mask
        tau_all = self.tau(hp) * torch.where(union, factor, torch.ones_like(factor))
        F = int(union.sum(-1).max()) if T else 0
        feat_idx = torch.zeros(T, F, dtype=torch.int64)
        tau = torch.full((T, F), float("inf"))
        sc = torch.ones(T, F)
        for t in range(T):
            idx = union[t].nonzero().flatten()
            n = idx.numel()
            feat_idx[t, :n], tau[t, :n], sc[t, :n] = idx, tau_all[t, idx], scale[t, idx]
        return self.timesteps.clone(), feat_idx, tau, sc

    # -- combining and persistence
    @classmethod
    def merge(cls, tables: list) -> "ConceptTable":
        """One table holding the hookpoints of several (same concepts, counts and timesteps)."""
        first = tables[0]
        mu = {}
        for t in tables:
            if t.names != first.names or not torch.equal(t.counts, first.counts) \
                    or not torch.equal(t.timesteps, first.timesteps):
                raise ValueError("cannot merge concept tables with different concepts, counts or timesteps "
                                 f"({first!r} vs {t!r})")
            dup = set(mu) & set(t.mu)
            if dup:
                raise ValueError(f"hookpoints {sorted(dup)} appear in several tables")
            mu.update(t.mu)
        meta, per_hp = {}, {}
        for t in tables:
            meta.update(t.metadata)
            per_hp.update(t.metadata.get("hookpoint_sae") or {})  # every hookpoint's SAE record, not the last one
        if per_hp:
            meta["hookpoint_sae"] = per_hp
        return cls(first.names, first.counts, first.timesteps, mu, first.defaults, meta)

    def save(self, out_dir) -> Path:
        """Write ``out_dir/concepts.safetensors`` and ``out_dir/concepts.json`` atomically; returns out_dir."""
        out_dir = Path(out_dir)
        write_id = uuid.uuid4().hex  # ties the two files of one save together
        tensors = {"timesteps": self.timesteps, "counts": self.counts, **{f"mu.{h}": m for h, m in self.mu.items()}}
        with FolderLock(out_dir, "writing a concept file into"):  # two saves cannot interleave their two files
            atomic_save_file(tensors, out_dir / TENSORS_FILE, metadata={"format": FORMAT, "write_id": write_id})
            atomic_write_json({"format": FORMAT, "version": VERSION, "write_id": write_id, "names": self.names,
                               "hookpoints": self.hookpoints, "defaults": self.defaults, "metadata": self.metadata},
                              out_dir / JSON_FILE)
        return out_dir

    @classmethod
    def load(cls, in_dir) -> "ConceptTable":
        """Read a concept file written by :meth:`save`, with clear errors for missing or corrupt files."""
        from safetensors import safe_open

        in_dir = Path(in_dir)
        for name in (JSON_FILE, TENSORS_FILE):
            if not (in_dir / name).is_file():
                raise FileNotFoundError(f"no concept file in {in_dir}: {name} is missing (expected {JSON_FILE} and "
                                        f"{TENSORS_FILE}; write them with `saeuron select` or build_concept_file)")
        try:
            meta = read_json(in_dir / JSON_FILE, "concept file")
        except ValueError as e:
            raise ValueError(f"corrupt concept file: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{in_dir / JSON_FILE} is not a saeuron concept file (format {FORMAT!r} expected)")
        if meta.get("version") != VERSION:
            raise ValueError(f"{in_dir / JSON_FILE} has version {meta.get('version')!r}; this saeuron reads {VERSION}")
        try:
            with safe_open(str(in_dir / TENSORS_FILE), framework="pt") as f:
                st_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"corrupt concept file: {in_dir / TENSORS_FILE} could not be read as safetensors ({e})") from None
        if st_meta.get("write_id") != meta.get("write_id"):
            raise ValueError(f"{in_dir / JSON_FILE} and {in_dir / TENSORS_FILE} come from different saves; "
                             "rebuild the concept file")
        if not isinstance(meta.get("hookpoints"), list) or not isinstance(meta.get("names"), list) \
                or not isinstance(meta.get("defaults", {}), (dict, type(None))) \
                or not isinstance(meta.get("metadata", {}), (dict, type(None))):
            raise ValueError(f"corrupt concept file: {in_dir / JSON_FILE} needs lists 'names' and 'hookpoints' "
                             "and objects 'defaults' and 'metadata'")
        missing = [k for k in ["timesteps", "counts"] + [f"mu.{h}" for h in meta["hookpoints"]] if k not in tensors]
        if missing:
            raise ValueError(f"corrupt concept file: {in_dir / TENSORS_FILE} lacks {missing}; found {sorted(tensors)}")
        mu = {h: tensors[f"mu.{h}"] for h in meta["hookpoints"]}
        try:
            return cls(meta["names"], tensors["counts"], tensors["timesteps"], mu, meta.get("defaults"),
                       meta.get("metadata"))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"corrupt concept file in {in_dir}: {e}") from None


def sae_record(sae) -> dict:
    """What a file computed with ``sae`` records of it: width, latents, k, dtype and the weights fingerprints (in
    float32, float16 and bfloat16 for a float32 SAE, else in its own dtype), for :func:`check_sae_record`."""
    prints = {str(dt).replace("torch.", ""): sae.fingerprint(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)
              if sae.dtype == torch.float32 or dt == sae.dtype}
    return {"d_in": sae.d_in, "num_latents": sae.num_latents, "k": sae.cfg.k,
            "dtype": str(sae.dtype).replace("torch.", ""), "fingerprints": prints}


def check_sae_record(rec: dict, hp: str, sae, what: str, fix: str) -> None:
    """Raise if ``sae`` is not the SAE described by ``rec`` (:func:`sae_record`) for ``what`` at ``hp``.

    Compares the weights fingerprint in the dtype of the less precise of the two SAEs; a record without one (older
    saeuron) is accepted with a warning. ``fix`` says what to do about a mismatch."""
    prints = rec.get("fingerprints") if isinstance(rec, dict) else None
    if not isinstance(prints, dict) or not prints:
        warnings.warn(f"{what} at {hp!r} record no SAE fingerprint (written by an older saeuron): cannot check they "
                      f"were computed with this SAE; {fix} to record one")
        return
    if rec.get("d_in") not in (None, sae.d_in) or rec.get("k") not in (None, sae.cfg.k) \
            or rec.get("num_latents") not in (None, sae.num_latents):
        raise ValueError(f"{what} at {hp!r} were computed with an SAE of d_in={rec.get('d_in')}, k={rec.get('k')}, "
                         f"{rec.get('num_latents')} latents; this SAE has d_in={sae.d_in}, k={sae.cfg.k}, "
                         f"{sae.num_latents} latents: {fix}")
    mine = str(sae.dtype).replace("torch.", "")
    theirs = rec.get("dtype", "float32")
    low = [d for d in (mine, theirs) if d != "float32"]
    if len(set(low)) > 1:  # float16 vs bfloat16: no common exact rounding
        warnings.warn(f"cannot check the SAE at {hp!r} against {what} exactly ({mine} vs {theirs} weights)")
        return
    cmp = low[0] if low else "float32"
    if cmp not in prints:
        raise ValueError(f"{what} at {hp!r} record no fingerprint for {cmp} weights: {fix}")
    got = sae.fingerprint(getattr(torch, cmp))
    if got != prints[cmp]:
        raise ValueError(f"{what} at {hp!r} were computed with another SAE (weights fingerprint {prints[cmp]}, this "
                         f"SAE's is {got}): the result would be wrong; {fix}, or use the SAE they were made with")


def check_sae_for_edit(table: ConceptTable, hp: str, sae, error_term: str = "correct") -> None:
    """Refuse, at patch time, an SAE that cannot edit ``hp`` correctly: not loaded (meta device), NaN/Inf
    weights, a bad ``k``, another SAE than the concept file's, or a feature the edit hook does not implement."""
    if not hasattr(sae, "validate") or not hasattr(sae, "cfg"):
        raise TypeError(f"the SAE for {hp!r} must be a saeuron SparseAutoencoder, got {type(sae).__name__}")
    sae.validate()
    if sae.cfg.input_unit_norm and error_term == "reference":
        raise ValueError(f"the SAE at {hp!r} has input_unit_norm=true, which error_term='reference' does not model; "
                         "use error_term='correct' (the edit standardises each token, x + scale_x * delta(x_n))")
    if sae.cfg.skip_connection and error_term == "reference":
        raise ValueError(f"the SAE at {hp!r} has skip_connection=true, which error_term='reference' does not model; "
                         "use error_term='correct' (the skip connection cancels out of that edit)")
    table.check_sae(hp, sae)


def warn_shared_features(table: ConceptTable, hp: str, concepts, percentiles=None, top_ns=None) -> list:
    """Warn (and return them) when several ``concepts`` select the same feature at some timestep of ``hp``.

    For ``error_term="reference"``: saeuron gives a shared feature the most negative scale, while the reference
    code applies concepts one after the other (its result depends on their order), so the compatibility mode
    reproduces the reference only when the concepts share no feature."""
    concepts = check_concepts(concepts, table.names)
    owners: dict = {}
    for c in concepts:
        for t, idx in enumerate(table.select(hp, c, _per_concept(percentiles, c), _per_concept(top_ns, c))):
            for i in idx.tolist():
                owners.setdefault(i, set()).add(c)
    shared = sorted(i for i, cs in owners.items() if len(cs) > 1)
    if shared:
        warnings.warn(f"concepts {concepts} share features {shared[:8]}{' ...' if len(shared) > 8 else ''} at {hp!r}: "
                      "each gets the most negative scale here, whereas the reference code's result depends on the "
                      "order of the concepts, so error_term='reference' does not reproduce it exactly")
    return shared


def load_concepts(in_dir) -> ConceptTable:
    """Load the concept file of a checkpoint folder (same as :meth:`ConceptTable.load`)."""
    return ConceptTable.load(in_dir)
