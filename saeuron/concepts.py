"""Per-concept, per-timestep SAE feature statistics, scores, feature selection and the concept file.

For concept c, prompt p and timestep t (method.md section 4)::

    a[c,p,t] = mean over p's tokens at t of the dense code f (zeros included)
    mu[c,t]  = mean over c's prompts of a[c,p,t]
    score_t(i, c) = mu[c,t][i] / (sum_j mu[c,t][j] + 1e-8) - mu[~c,t][i] / (sum_j mu[~c,t][j] + 1e-8)

``mu[~c,t]`` is the prompt-count-weighted mean over all *other concepts'* prompts. Prompts without a
concept (a ``None`` label) belong to no concept and are ignored: they count neither in ``mu[c]`` nor in
``mu[~c]`` (the method defines ``mu[~c]`` over the other concepts only). A prompt may belong to several
concepts when ``concepts`` is given as a dict (e.g. an object and a style); its tokens then count for each.

A :class:`ConceptTable` keeps ``mu`` for every concept, timestep and hookpoint, so any subset of the
concepts can be unlearned later, with any selection rule, without recomputing anything. It is saved as
``concepts.safetensors`` + ``concepts.json`` next to the SAE folders of a checkpoint.
"""
from __future__ import annotations

import difflib
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .utils import FolderLock, atomic_save_file, atomic_write_json, check_finite_number, read_json

TENSORS_FILE = "concepts.safetensors"
JSON_FILE = "concepts.json"
FORMAT = "saeuron.concepts"
VERSION = 1
DEFAULTS = {"multiplier": -1.0, "percentile": 99.99, "top_n": None, "hookpoints": None, "threshold": 1.0}
EPS = 1e-8


def _unknown(kind: str, name, known, note: str = "") -> ValueError:
    """A ValueError naming the unknown ``name``, a close match and the valid choices."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    note = f" ({note})" if note else ""
    return ValueError(f"unknown {kind} {name!r}{note}{hint}; known: {', '.join(map(str, known)) or '(none)'}")


def _norm_hp(name: str) -> str:
    return name[len("unet."):] if name.startswith("unet.") else name


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


def parse_per_concept(values, what: str):
    """``["-1"]`` -> -1.0 and ``["Cat=-5", "Dog=-1"]`` -> ``{"Cat": -5.0, "Dog": -1.0}`` (CLI values; None if empty).

    Each value must be a finite number; a clear ValueError names the bad item and the valid forms."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]

    def num(text, item):
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"--{what} {item!r}: {text!r} is not a finite number; give one number (--{what} -5) or "
                             f"NAME=NUMBER pairs (--{what} Cat=-5 Dog=-1)")
        return v

    if len(values) == 1 and "=" not in values[0]:
        return num(values[0], values[0])
    out = {}
    for item in values:
        if "=" not in item:
            raise ValueError(f"--{what}: with several values each must look like NAME=NUMBER, got {item!r}")
        name, text = item.rsplit("=", 1)
        if not name:
            raise ValueError(f"--{what} {item!r}: the concept name before '=' is empty")
        if name in out:
            raise ValueError(f"--{what}: concept {name!r} is given twice")
        out[name] = num(text, item)
    return out


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
    spares other concepts on whose tokens it fires weakly).
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
            self.mu[_norm_hp(hp)] = m.contiguous()
        if not self.mu:
            raise ValueError("a concept table needs statistics for at least one hookpoint")
        self.defaults = self._full_defaults(defaults)
        self.metadata = dict(metadata or {})

    def _full_defaults(self, defaults) -> dict:
        defaults = dict(defaults or {})
        if set(defaults) <= set(DEFAULTS):  # one dict for all concepts
            out = {n: {**DEFAULTS, **defaults} for n in self.names}
        else:
            unknown = [k for k in defaults if k not in self.names]
            if unknown:
                raise ValueError(f"defaults for unknown concepts {unknown}; concepts: {self.names} "
                                 f"(or give one dict with keys {list(DEFAULTS)} for all)")
            out = {n: {**DEFAULTS, **defaults.get(n, {})} for n in self.names}
        for n, d in out.items():
            extra = [k for k in d if k not in DEFAULTS]
            if extra:
                raise ValueError(f"defaults of {n!r} have unknown keys {extra}; valid: {', '.join(DEFAULTS)}")
            if d["hookpoints"] is not None:
                hps = [d["hookpoints"]] if isinstance(d["hookpoints"], str) else list(d["hookpoints"])
                for h in hps:
                    if _norm_hp(h) not in self.mu:
                        raise _unknown(f"hookpoint in the defaults of {n!r}", h, list(self.mu))
                if not hps:
                    raise ValueError(f"defaults of {n!r}: hookpoints is empty; give None (every hookpoint) or a list")
                d["hookpoints"] = [_norm_hp(h) for h in hps]
            d["threshold"] = check_threshold(d["threshold"], f"the defaults of {n!r}")
            check_defaults(d, f"the defaults of {n!r}")
        return out

    def check_sae(self, hp: str, sae) -> None:
        """Raise if ``sae`` is not the SAE this table's statistics at ``hp`` were computed with.

        Compares the weights fingerprint recorded by :func:`compute_statistics` (in the dtype of the less
        precise of the two SAEs); a file without one (older saeuron) is accepted with a warning."""
        hp = self._hp(hp)
        if sae.num_latents != self.num_latents(hp):
            raise ValueError(f"the SAE at {hp!r} has {sae.num_latents} latents but the concept file's statistics "
                             f"have {self.num_latents(hp)}: they come from different SAEs")
        rec = (self.metadata.get("hookpoint_sae") or {}).get(hp)
        if rec is None:  # a table built by hand, not by compute_statistics: nothing recorded to check
            return
        prints = rec.get("fingerprints") if isinstance(rec, dict) else None
        if not isinstance(prints, dict) or not prints:
            warnings.warn(f"the concept file's statistics at {hp!r} record no SAE fingerprint (written by an older "
                          "saeuron): cannot check they were computed with this SAE; rerun select to record one")
            return
        if rec.get("d_in") not in (None, sae.d_in) or rec.get("k") not in (None, sae.cfg.k):
            raise ValueError(f"the concept file's statistics at {hp!r} were computed with an SAE of d_in={rec.get('d_in')}, "
                             f"k={rec.get('k')}; this SAE has d_in={sae.d_in}, k={sae.cfg.k}: rerun select with it")
        mine = str(sae.dtype).replace("torch.", "")
        theirs = rec.get("dtype", "float32")
        low = [d for d in (mine, theirs) if d != "float32"]
        if len(set(low)) > 1:  # float16 vs bfloat16: no common exact rounding
            warnings.warn(f"cannot check the SAE at {hp!r} against the concept file exactly ({mine} vs {theirs} weights)")
            return
        cmp = low[0] if low else "float32"
        if cmp not in prints:
            raise ValueError(f"the concept file at {hp!r} records no fingerprint for {cmp} weights: rerun select")
        got = sae.fingerprint(getattr(torch, cmp))
        if got != prints[cmp]:
            raise ValueError(f"the concept file's statistics at {hp!r} were computed with another SAE (weights "
                             f"fingerprint {prints[cmp]}, this SAE's is {got}): the selected features would be "
                             "wrong; rerun `saeuron select` with this SAE, or use the SAE the file was made with")

    # -- lookup
    @property
    def hookpoints(self) -> list:
        """Hookpoints with statistics (module names, without a ``unet.`` prefix)."""
        return list(self.mu)

    def num_latents(self, hp: str) -> int:
        """Dictionary size M of the SAE whose statistics ``hp`` holds."""
        return self.mu[self._hp(hp)].shape[-1]

    def concept_hookpoints(self, concept: str) -> list:
        """The hookpoints ``concept`` is edited at by default: its ``defaults["hookpoints"]``, else all of them."""
        self.index(concept)
        hps = self.defaults[concept]["hookpoints"]
        return list(self.hookpoints) if hps is None else list(hps)

    def _hp(self, hp: str) -> str:
        name = _norm_hp(hp)
        if name not in self.mu:
            raise _unknown("hookpoint", hp, self.hookpoints, "no statistics for it in this concept file")
        return name

    def index(self, concept: str) -> int:
        """Row of ``concept``; an unknown name raises with the known ones and a close match."""
        try:
            return self.names.index(concept)
        except ValueError:
            raise _unknown("concept", concept, self.names) from None

    def __repr__(self):
        hps = ", ".join(f"{h}: M={m.shape[-1]}" for h, m in self.mu.items())
        return f"ConceptTable(concepts={self.names}, timesteps={len(self.timesteps)}, {hps})"

    # -- the method
    def scores(self, hp: str, concept: str) -> Tensor:
        """``score_t(i, c)`` ``[T, M]``: c's normalised mean activation minus that of the other concepts."""
        mu = self.mu[self._hp(hp)].double()
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
        return self.mu[self._hp(hp)].mean(0)

    def threshold(self, concept: str, threshold=None) -> float:
        """The factor on ``tau`` for ``concept``: ``threshold`` if given, else its default (validated)."""
        self.index(concept)
        if threshold is None:
            return self.defaults[concept]["threshold"]
        return check_threshold(threshold, f"the edit of {concept!r}")

    def rule(self, concept: str, percentile=None, top_n=None) -> tuple:
        """``("top_n", n)`` or ``("percentile", p)`` for ``concept``: explicit arguments beat its defaults."""
        self.index(concept)
        if percentile is not None and top_n is not None:
            raise ValueError(f"give percentile or top_n for {concept!r}, not both")
        if top_n is None and percentile is None:
            d = self.defaults[concept]
            top_n, percentile = d["top_n"], d["percentile"]
            if top_n is None and percentile is None:
                raise ValueError(f"concept {concept!r} has neither a default percentile nor top_n; pass one")
        if top_n is not None:
            return "top_n", check_top_n(top_n, f"the selection of {concept!r}")
        return "percentile", check_percentile(percentile, f"the selection of {concept!r}")

    def select(self, hp: str, concept: str, percentile=None, top_n=None) -> list:
        """Selected feature ids per timestep (a list of T sorted LongTensors).

        ``percentile``: features whose score exceeds that quantile of ``score_t``; ``top_n``: the n
        highest-scoring features per timestep. Either way a feature is only selected when it fires for
        the concept (``mu[c,t][i] > 0``) and its score is positive (more typical of c than of the rest).
        """
        kind, val = self.rule(concept, percentile, top_n)
        s = self.scores(hp, concept).double()
        ok = (self.mu[self._hp(hp)][self.index(concept)] > 0) & (s > 0)
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
                    thresholds=None) -> tuple:
        """Per-timestep edit tables for unlearning ``concepts`` at ``hp``: ``(timesteps, feat_idx, tau, scale)``.

        ``feat_idx [T, F]`` int64 holds the union of the concepts' selected features at each timestep,
        ``tau [T, F] = threshold_c * tau_t[i]`` their thresholds and ``scale [T, F] = multiplier_c * mu[c,t][i]``
        (the edit sets ``f_i <- scale * f_i`` where ``f_i > tau``). A feature selected by several concepts
        keeps the smallest (most negative) scale and the smallest threshold, i.e. the strongest
        suppression, whatever the order of ``concepts`` (the reference code applies one concept after the
        other, so there the result depends on the order; ``error_term="reference"`` therefore reproduces
        the reference only when the concepts share no feature). Rows are padded to a common F with ``(0, +inf, 1.0)``, which never edits; F is 0
        when nothing is selected. ``multipliers``/``percentiles``/``top_ns``/``thresholds``: a number for
        all concepts or a dict per concept; unset values fall back to each concept's defaults.
        """
        hp = self._hp(hp)
        concepts = check_concepts(concepts, self.names)
        for d, what in ((multipliers, "multipliers"), (percentiles, "percentiles"), (top_ns, "top_ns"),
                        (thresholds, "thresholds")):
            if isinstance(d, dict):
                extra = [k for k in d if k not in self.names]
                if extra:
                    raise _unknown(f"concept in {what}", extra[0], self.names)
        mu = self.mu[hp]
        T, M = mu.shape[1:]
        union = torch.zeros(T, M, dtype=torch.bool)
        scale = torch.full((T, M), float("inf"))
        factor = torch.full((T, M), float("inf"))
        for c in concepts:
            ci = self.index(c)
            mult = _per_concept(multipliers, c)
            mult = self.defaults[c]["multiplier"] if mult is None else check_multiplier(mult, f"the edit of {c!r}")
            sel = self.select(hp, c, _per_concept(percentiles, c), _per_concept(top_ns, c))
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


def check_sae_for_edit(table: ConceptTable, hp: str, sae, error_term: str = "correct") -> None:
    """Refuse, at patch time, an SAE that cannot edit ``hp`` correctly: not loaded (meta device), NaN/Inf
    weights, a bad ``k``, another SAE than the concept file's, or a feature the edit hook does not implement."""
    if not hasattr(sae, "validate") or not hasattr(sae, "cfg"):
        raise TypeError(f"the SAE for {hp!r} must be a saeuron SparseAutoencoder, got {type(sae).__name__}")
    sae.validate()
    if sae.cfg.input_unit_norm:
        raise ValueError(f"the SAE at {hp!r} has input_unit_norm=true: encode/forward/statistics support it, but the "
                         "patch hook does not standardise tokens yet, so editing with it would be wrong")
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


# --------------------------------------------------------------------------- statistics

def _concept_members(store, concepts) -> tuple:
    """``(names, [[prompt ids] per concept])`` from the store's labels or a ``{concept: prompts}`` dict."""
    prompts = store.prompts
    if concepts is None:
        labels = store.labels
        if labels is None:
            raise ValueError(f"the store at {store.root} has no concept labels; pass concepts={{name: [prompts]}}")
        names = list(dict.fromkeys(lab for lab in labels if lab is not None))
        if not names:
            raise ValueError(f"every prompt of the store at {store.root} is unlabelled; pass concepts=")
        return names, [[p for p, lab in enumerate(labels) if lab == n] for n in names]
    if not isinstance(concepts, dict):
        raise TypeError(f"concepts must be None or a dict {{concept: [prompt ids or prompts]}}, got {type(concepts).__name__}")
    by_text: dict = {}
    for i, p in enumerate(prompts):
        by_text.setdefault(p, []).append(i)
    names, members = [], []
    for name, items in concepts.items():
        if isinstance(items, (str, int)):
            items = [items]
        ids = []
        for it in items:
            if isinstance(it, str):
                if it not in by_text:
                    close = difflib.get_close_matches(it, list(by_text), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"concept {name!r}: prompt {it!r} is not in the store{hint}; the store has "
                                     f"{len(prompts)} prompts, e.g. {prompts[:3]}")
                ids += by_text[it]
            elif isinstance(it, int) and not isinstance(it, bool) and 0 <= it < len(prompts):
                ids.append(it)
            else:
                raise ValueError(f"concept {name!r}: {it!r} is neither a prompt of the store nor a prompt id in [0, {len(prompts)})")
        if not ids:
            raise ValueError(f"concept {name!r} has no prompts")
        names.append(str(name))
        members.append(sorted(set(ids)))
    if not names:
        raise ValueError("concepts is empty; give at least one {concept: [prompts]}")
    return names, members


def compute_statistics(store, sae, hookpoint, concepts=None, *, batch_size: int = 4096, device=None,
                       progress: bool = True) -> ConceptTable:
    """Stream ``hookpoint``'s rows through ``sae`` and return a one-hookpoint :class:`ConceptTable` of ``mu``.

    ``concepts``: None uses the store's labels (unlabelled prompts are ignored), or a dict
    ``{concept: [prompt ids or prompt strings]}``. Codes are scattered into ``[T, C, M]`` sums with
    ``index_add_``; no ``[rows, M]`` tensor is ever built. When every prompt of a concept has the same
    number of tokens at a timestep (the normal case) one pass suffices; otherwise a second pass weights each
    token by ``1 / tokens(p, t)`` so the result is exactly the mean of per-prompt means.
    """
    from tqdm.auto import tqdm

    if hookpoint not in store.hookpoints:
        hp_n = _norm_hp(hookpoint)
        match = [h for h in store.hookpoints if _norm_hp(h) == hp_n]
        if not match:
            raise _unknown("hookpoint", hookpoint, store.hookpoints, "not in the activation store")
        hookpoint = match[0]
    d = store.d_in(hookpoint)
    if sae.d_in != d:
        raise ValueError(f"SAE width d_in={sae.d_in} does not match the store's width {d} at hookpoint {hookpoint!r}")
    sae.validate()
    names, members = _concept_members(store, concepts)
    C, P, M = len(names), len(store.prompts), sae.num_latents
    device = torch.device(device) if device is not None else sae.device
    W_enc, b_enc, b_dec, _ = sae.weights_for(device, sae.dtype)  # the SAE itself stays where it is

    # prompt -> concept slots (CSR), so a prompt in several concepts counts for each
    n_mem = torch.zeros(P, dtype=torch.int64)
    pairs = sorted((p, c) for c, ids in enumerate(members) for p in ids)
    for p, _ in pairs:
        n_mem[p] += 1
    start = torch.cumsum(n_mem, 0) - n_mem
    flat = torch.tensor([c for _, c in pairs], dtype=torch.int64)
    n_mem, start, flat = n_mem.to(device), start.to(device), flat.to(device)

    t_index: dict = {}
    dropped = [0]  # rows with NaN/Inf, skipped (first pass)

    def run(weight=None):
        sums = torch.zeros(max(len(t_index), 1), C, M, dtype=torch.float64, device=device)
        ntok = torch.zeros(P, max(len(t_index), 1), dtype=torch.int64, device=device)
        total = store.num_rows(hookpoint)
        bar = tqdm(total=total, unit="rows", desc=f"statistics {hookpoint}", disable=not progress)
        for b in store.iter_batches(hookpoint, batch_size, shuffle=False, drop_last=False):
            bar.update(b["x"].shape[0])
            pid = b["prompt_id"].to(device)
            keep = n_mem[pid] > 0
            if not bool(keep.any()):
                continue
            x = b["x"].to(device)
            finite = torch.isfinite(x).all(1) & torch.isfinite(x.to(W_enc.dtype)).all(1) \
                & torch.isfinite(b["timestep"].to(device))
            if weight is None:
                dropped[0] += int((keep & ~finite).sum())
            keep &= finite  # a NaN row would poison (or, zeroed, silently dilute) the means
            x, pid, ts = x[keep], pid[keep], b["timestep"].to(device)[keep]
            x = sae.preprocess(x.to(W_enc.dtype))[0]  # input_unit_norm SAEs standardise each token first
            uniq, inv = torch.unique(ts, return_inverse=True)
            for u in uniq.tolist():
                t_index.setdefault(u, len(t_index))
            tid = torch.tensor([t_index[u] for u in uniq.tolist()], device=device)[inv]
            if len(t_index) > sums.shape[0]:  # a new timestep: grow the accumulators (doubling)
                grow = max(len(t_index), 2 * sums.shape[0]) - sums.shape[0]
                sums = torch.cat([sums, sums.new_zeros(grow, C, M)])
                ntok = torch.cat([ntok, ntok.new_zeros(P, grow)], 1)
            ntok.index_put_((pid, tid), torch.ones_like(pid), accumulate=True)
            with torch.no_grad():
                vals, idx = ops.topk_encode(x.to(W_enc.dtype), W_enc, b_enc, b_dec, sae.cfg.k)
            vals = torch.nan_to_num(vals.double(), nan=0.0, posinf=0.0, neginf=0.0)
            if weight is not None:
                vals = vals * weight[pid, tid][:, None]
            # expand rows over their concepts
            rep = n_mem[pid]
            rows = torch.repeat_interleave(torch.arange(len(pid), device=device), rep)
            offs = torch.arange(len(rows), device=device) - torch.repeat_interleave(torch.cumsum(rep, 0) - rep, rep)
            slot = flat[start[pid[rows]] + offs]
            key = (tid[rows] * C + slot) * M  # [R]
            sums.view(-1).index_add_(0, (key[:, None] + idx[rows]).reshape(-1), vals[rows].reshape(-1))
        bar.close()
        return sums, ntok

    sums, ntok = run()
    if dropped[0]:
        warnings.warn(f"{dropped[0]} rows of the store at {hookpoint!r} hold NaN or Inf (values or timestep); they "
                      "are left out of the concept statistics")
    T = len(t_index)
    if T == 0:
        raise ValueError(f"the store holds no rows of the concepts' prompts for hookpoint {hookpoint!r}")
    sums, ntok = sums[:T], ntok[:, :T]
    mem = torch.zeros(C, P, dtype=torch.bool)
    for c, ids in enumerate(members):
        mem[c, ids] = True
    mem = mem.to(device)
    present = mem[:, :, None] & (ntok[None] > 0)  # [C, P, T] prompt p of c has rows at t
    n_prompts = present.sum(1)  # [C, T]
    big = torch.iinfo(torch.int64).max
    nmax = torch.where(present, ntok[None], 0).amax(1)
    nmin = torch.where(present, ntok[None], big).amin(1)
    if bool(((nmax != nmin) & (n_prompts > 0)).any()):  # unequal token counts: exact weighted pass
        weight = torch.where(ntok > 0, 1.0 / ntok.double().clamp_min(1), torch.zeros((), dtype=torch.float64, device=device))
        sums = run(weight)[0][:T]
        mu = sums.permute(1, 0, 2) / n_prompts[..., None].clamp_min(1)
    else:
        mu = sums.permute(1, 0, 2) / (nmax * n_prompts)[..., None].clamp_min(1)
    counts = (present.any(2)).sum(1).cpu()  # prompts with rows, per concept
    empty = [n for n, k in zip(names, counts.tolist()) if k == 0]
    if empty:
        raise ValueError(f"concepts {empty} have no rows in the store for hookpoint {hookpoint!r}")
    missing = [n for n, ids, k in zip(names, members, counts.tolist()) if k < len(ids)]
    if missing:
        warnings.warn(f"some prompts of concepts {missing} have no rows at {hookpoint!r}; their means use the prompts present")
    ts = torch.tensor(sorted(t_index, key=t_index.get), dtype=torch.float32)
    order = torch.argsort(ts, descending=True)  # sampling order: noisiest first
    mu = mu.float().cpu()[:, order]
    prints = {str(dt).replace("torch.", ""): sae.fingerprint(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)
              if sae.dtype == torch.float32 or dt == sae.dtype}
    meta = {"store": str(getattr(store, "root", "")), "hookpoint_sae": {_norm_hp(hookpoint): {"d_in": sae.d_in,
            "num_latents": M, "k": sae.cfg.k, "dtype": str(sae.dtype).replace("torch.", ""), "fingerprints": prints,
            "dropped_rows": dropped[0]}}}
    return ConceptTable(names, counts, ts[order], {_norm_hp(hookpoint): mu}, metadata=meta)


def build_concept_file(store, saes, out_dir=None, hookpoints=None, concepts=None, *, multiplier: float = -1.0,
                       percentile: Optional[float] = 99.99, top_n: Optional[int] = None, defaults=None,
                       batch_size: int = 4096, device=None, progress: bool = True) -> ConceptTable:
    """The ``select`` stage: statistics for every hookpoint into one concept file saved in ``out_dir``.

    ``store``: an ActivationStore or its folder. ``saes``: a checkpoint folder (one SAE folder per
    hookpoint; ``out_dir`` defaults to it, so ``patch(checkpoint=DIR)`` finds everything), a dict
    ``{hookpoint: SparseAutoencoder}``, or one SAE (with one hookpoint). ``hookpoints`` defaults to every
    store hookpoint that has an SAE. ``multiplier``/``percentile``/``top_n`` become every concept's
    defaults; ``defaults`` may instead give a dict per concept.
    """
    from .sae import SparseAutoencoder, available_hookpoint_dirs, resolve_hookpoint_dir

    if not hasattr(store, "iter_batches"):
        from .store import ActivationStore

        store = ActivationStore(store)
    if isinstance(saes, SparseAutoencoder):
        hps = hookpoints or store.hookpoints
        if isinstance(hps, str):
            hps = [hps]
        if len(hps) != 1:
            raise ValueError(f"one SAE was given but hookpoints are {hps}; pass a dict {{hookpoint: SAE}} instead")
        saes = {hps[0]: saes}
    if isinstance(saes, (str, Path)):
        root = Path(saes)
        out_dir = root if out_dir is None else out_dir
        have = {_norm_hp(h) for h in available_hookpoint_dirs(root)}
        hps = hookpoints or [h for h in store.hookpoints if _norm_hp(h) in have]
        if isinstance(hps, str):
            hps = [hps]
        if not hps:
            raise ValueError(f"no SAE in {root} for the store's hookpoints {store.hookpoints}; "
                             f"SAE folders there: {sorted(have) or '(none)'}")
        saes = {h: SparseAutoencoder.load(resolve_hookpoint_dir(root, h)) for h in hps}
    elif isinstance(saes, dict):
        hps = hookpoints or list(saes)
        if isinstance(hps, str):
            hps = [hps]
        saes = {h: saes[h] if h in saes else saes.get(_norm_hp(h)) for h in hps}
        lacking = [h for h, s in saes.items() if s is None]
        if lacking:
            raise ValueError(f"no SAE given for hookpoints {lacking}; SAEs given for: {list(saes)}")
    else:
        raise TypeError(f"saes must be a checkpoint folder, a {{hookpoint: SAE}} dict or an SAE, got {type(saes).__name__}")
    if out_dir is None:
        raise ValueError("out_dir is required when saes are not given as a checkpoint folder")
    if defaults is None:  # checked before the (long) statistics pass, not after it
        defaults = check_defaults({**DEFAULTS, "multiplier": multiplier, "percentile": percentile, "top_n": top_n},
                                  "build_concept_file")
        defaults = {k: defaults[k] for k in ("multiplier", "percentile", "top_n")}
    with FolderLock(out_dir, "computing a concept file into"):
        tables = [compute_statistics(store, sae, h, concepts, batch_size=batch_size, device=device, progress=progress)
                  for h, sae in saes.items()]
        table = ConceptTable.merge(tables)
        table.defaults = table._full_defaults(defaults)
        table.save(out_dir)
    return table


select = build_concept_file  # the stage's name in the data path (saeuron.select)
