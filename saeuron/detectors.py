"""Image-level concept detectors fitted on SAE codes: which images hold a concept (``mode="probe_uncond"``).

The method's firing rule (a selected feature above ``tau``) decides per token; on MiniCanvas the object word spreads
over every token of the image through cross-attention, so near concepts (circle vs ring) fire on the same share of
tokens and cannot be told apart that way (benchmarks/RESULTS.md, issue 22). A detector reads the whole image's code
instead. For prompt p at timestep t it takes the image's mean dense top-k code (zeros included)::

    a[p,t] = mean over p's tokens at t of f(x)          (the per-prompt means the statistics are made of)

and, per timestep, a multinomial logistic regression over a group of mutually exclusive concepts (latents
standardised over the prompts)::

    P(c | a) = softmax_{c' in group(c)} ( w[t,c'] . (a - m[t]) / s[t] + b[t,c'] )

Groups come from the collected prompts' concept labels (:func:`exclusive_groups`): concepts that never share a prompt
go in one group (MiniCanvas: the 10 objects in one, the 10 styles in another), and a group gets a "none of them"
class when some prompts hold none of its concepts (the unstyled prompts). A softmax over the group, rather than one
yes/no detector per concept, makes near concepts compete for the same image: on the v2 MiniCanvas model one-vs-rest
detectors flag 12-15 % of the other objects' images at some step, the grouped ones none (RESULTS.md, issue 22). The
weights read as linear scores over SAE latents, as the statistics do. Fitted by :func:`fit_detectors` on the store
the statistics come from, saved beside the concept file as ``detectors.safetensors`` + ``detectors.json`` (with the
SAEs' fingerprints and timesteps, checked at patch time); :mod:`saeuron.patching` uses them to flag images.

**Sparse detectors (the default).** The code above needs every token's top-k, i.e. the whole encoder GEMM, at every
denoiser call, whatever fires: about 1.45x the GEMM (benchmarks/RESULTS.md), against the fire-first edit's 0.01x
where nothing fires. So by default (``fit_detectors(..., latents=48)``) a detector reads only ``L`` latents, the same
for every timestep, and their plain ReLU pre-activations instead of top-k codes::

    a[p,t,j] = mean over p's tokens at t of ReLU((x - b_dec) . W_enc[j] + b_enc[j])      for j in the L latents

one gathered GEMM over ``L`` encoder rows (``L / M`` of the encoder GEMM; 48 of 1024 latents: 0.047x). The ``L``
latents are chosen by a first fit on every latent's ReLU mean: those with the largest summed absolute weight (the
weights are per standardised latent, so comparable) over timesteps and classes; the detector is then refitted on
them. ``latents=0`` fits the detector on every latent's mean top-k code (what every version-1 detectors file holds).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from . import ops, reference
from .concepts import check_sae_record, sae_record, unknown_name_error
from .hookpoints import normalize_hookpoint
from .utils import FolderLock, atomic_save_file, atomic_write_json, read_json

TENSORS_FILE = "detectors.safetensors"
JSON_FILE = "detectors.json"
FORMAT = "saeuron.detectors"
VERSION = 2  # 2: optional "latents" per hookpoint (sparse detectors); version-1 files (no latents) still read
READS = (1, 2)
PARTS = ("weight", "bias", "mean", "std")  # per hookpoint: [T, C, M], [T, C], [T, M], [T, M]
LATENTS = "latents"  # optional per hookpoint: [M] int64 SAE latents the detector reads (their ReLU pre-activations)
DEFAULT_LATENTS = 48


def image_codes(sae, x: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` float32: each image's mean dense top-k code over its tokens (zeros included), for a block output
    map ``[B, C, H, W]`` or DiT tokens ``[B, L, C]``; the SAE's input transform is applied as in its training."""
    with torch.no_grad():
        tok = reference.as_tokens(x) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
        tok = sae.preprocess(tok)[0]  # the SAE's input space (identity unless input_unit_norm)
        return mean_codes(tok, sae.weights_for(x.device, x.dtype)[:3], sae.cfg.k, x.shape[0])


def mean_codes(tok: torch.Tensor, weights: tuple, k: int, images: int) -> torch.Tensor:
    """``[images, M]`` float32: the mean dense top-k code of each of ``images`` equal runs of rows of ``tok [N, d]``
    (``weights`` = ``(W_enc, b_enc, b_dec)``); one top-k encode (:func:`saeuron.ops.topk_encode`), no ``[N, M]``."""
    W_enc, b_enc, b_dec = weights
    vals, idx = ops.topk_encode(tok.to(W_enc.dtype).contiguous(), W_enc, b_enc, b_dec, k)
    per = tok.shape[0] // images
    M = W_enc.shape[0]
    out = torch.zeros(images * M, dtype=torch.float32, device=tok.device)
    key = (torch.arange(tok.shape[0], device=tok.device) // per * M)[:, None] + idx  # [N, k] flat (image, latent)
    out.index_add_(0, key.reshape(-1), torch.nan_to_num(vals.float()).reshape(-1))
    return out.view(images, M) / per


def relu_means(tok: torch.Tensor, W_rows: torch.Tensor, b_rows: torch.Tensor, b_dec: torch.Tensor,
               images: int) -> torch.Tensor:
    """``[images, L]`` float32: the mean over each of ``images`` equal runs of rows of ``tok [N, d]`` of the ReLU
    pre-activations of ``L`` latents (``W_rows [L, d]``, ``b_rows [L]``: those latents' encoder rows): one GEMM
    over ``L`` rows, no top-k (a sparse detector's input; ``b_dec`` is folded into the bias, so the tokens are read
    once). Non-finite values count as 0."""
    bias = (b_rows.float() - W_rows.float() @ b_dec.float()).to(W_rows.dtype)
    pre = torch.nn.functional.linear(tok.to(W_rows.dtype), W_rows, bias)
    pre = torch.nan_to_num(torch.relu(pre).float(), nan=0.0, posinf=0.0, neginf=0.0)
    return pre.view(images, tok.shape[0] // images, -1).mean(1)


def image_relu_means(sae, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` float32: :func:`relu_means` of each image of a block output map ``[B, C, H, W]`` or DiT tokens
    ``[B, L, C]``, over the SAE latents ``latents`` (in the SAE's input space, as :func:`image_codes`)."""
    with torch.no_grad():
        tok = reference.as_tokens(x) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
        tok = sae.preprocess(tok)[0]
        W_enc, b_enc, b_dec = sae.weights_for(x.device, x.dtype)[:3]
        lat = latents.to(x.device)
        return relu_means(tok, W_enc.index_select(0, lat), b_enc.index_select(0, lat), b_dec, x.shape[0])


def prompt_codes(store, sae, hookpoint: str, *, batch_size: int = 4096, progress: bool = True,
                 kind: str = "topk") -> tuple:
    """``(timesteps [T] descending, codes [T, P, M], present [T, P])``: every stored prompt's mean dense code per
    timestep at ``hookpoint`` (``present``: the prompt has rows at that timestep). ``kind="relu"``: the mean ReLU
    pre-activations of every latent instead of the top-k code (what a sparse detector reads)."""
    if kind not in ("topk", "relu"):
        raise ValueError(f"kind must be 'topk' or 'relu', got {kind!r}")
    from tqdm.auto import tqdm

    from .selection import store_hookpoint

    hp = store_hookpoint(store, hookpoint)
    if sae.d_in != store.d_in(hp):
        raise ValueError(f"SAE width d_in={sae.d_in} does not match the store's width {store.d_in(hp)} at {hp!r}")
    P, M = len(store.prompts), sae.num_latents
    W_enc, b_enc, b_dec, _ = sae.weights_for(sae.device, sae.dtype)
    sums: dict = {}  # timestep value -> ([P, M] float64 sums, [P] token counts)
    bar = tqdm(total=store.num_rows(hp), unit="rows", desc=f"detector codes {hp}", disable=not progress)
    for b in store.iter_batches(hp, batch_size, shuffle=False, drop_last=False):
        bar.update(b["x"].shape[0])
        x = b["x"].to(sae.device)
        ok = torch.isfinite(x).all(1) & torch.isfinite(b["timestep"].to(sae.device))
        x, pid, ts = x[ok], b["prompt_id"].to(sae.device)[ok], b["timestep"].to(sae.device)[ok]
        x = sae.preprocess(x.to(W_enc.dtype))[0]
        with torch.no_grad():
            if kind == "topk":
                vals, idx = ops.topk_encode(x.contiguous(), W_enc, b_enc, b_dec, sae.cfg.k)
                vals = torch.nan_to_num(vals.double())
            else:
                dense = torch.relu(torch.nn.functional.linear(x - b_dec, W_enc, b_enc))  # x is preprocessed
                dense = torch.nan_to_num(dense.double(), nan=0.0, posinf=0.0, neginf=0.0)
        for u in torch.unique(ts).tolist():
            sel = ts == u
            s, n = sums.setdefault(u, (torch.zeros(P, M, dtype=torch.float64, device=sae.device),
                                       torch.zeros(P, dtype=torch.int64, device=sae.device)))
            p = pid[sel]
            if kind == "topk":
                s.index_put_((p[:, None].expand_as(idx[sel]), idx[sel]), vals[sel], accumulate=True)
            else:
                s.index_add_(0, p, dense[sel])
            n.index_add_(0, p, torch.ones_like(p))
    bar.close()
    if not sums:
        raise ValueError(f"the store holds no finite rows for hookpoint {hp!r}")
    order = sorted(sums, reverse=True)  # sampling order: noisiest first, as the concept file
    codes = torch.stack([sums[t][0] / sums[t][1].clamp_min(1)[:, None] for t in order]).float().cpu()
    present = torch.stack([sums[t][1] > 0 for t in order]).cpu()
    return torch.tensor(order, dtype=torch.float32), codes, present


def exclusive_groups(targets: torch.Tensor) -> list:
    """A group id per concept (``targets [P, C]`` bools: prompt p holds concept c) such that no prompt holds two
    concepts of one group: each concept, in order, joins the first group none of whose concepts shares a prompt with
    it, else starts a new one."""
    co = (targets.T.float() @ targets.float()) > 0  # [C, C]: the two concepts share a prompt
    groups, members = [], []
    for c in range(targets.shape[1]):
        g = next((i for i, m in enumerate(members) if not bool(co[c, m].any())), None)
        if g is None:
            g = len(members)
            members.append([])
        members[g].append(c)
        groups.append(g)
    return groups


def group_classes(targets: torch.Tensor, groups: list) -> tuple:
    """``(class group ids, labels [P, G])``: the classes are the concepts (in order) then one "none of the group"
    class per group that has prompts holding none of its concepts; ``labels[p, g]`` is prompt p's class in group g."""
    P, C = targets.shape
    G = max(groups) + 1 if groups else 0
    cls_group = list(groups)
    labels = torch.empty(P, G, dtype=torch.long)
    for g in range(G):
        cols = [c for c in range(C) if groups[c] == g]
        held = targets[:, cols]
        lab = torch.tensor(cols)[held.long().argmax(1)]
        if not bool(held.any(1).all()):  # some prompts hold none of the group's concepts: a "none" class
            cls_group.append(g)
            lab = torch.where(held.any(1), lab, torch.tensor(len(cls_group) - 1))
        labels[:, g] = lab
    return cls_group, labels


def fit_softmax(codes: torch.Tensor, targets: torch.Tensor, present: Optional[torch.Tensor] = None, *,
                steps: int = 300, lr: float = 0.01, weight_decay: float = 1e-3) -> dict:
    """Multinomial logistic regressions per timestep and exclusive group: ``codes [T, P, M]``, ``targets [P, C]``
    bools, ``present [T, P]`` (default all). Returns ``{"weight" [T, K, M], "bias" [T, K], "mean" [T, M], "std"
    [T, M], "accuracy" [T, G], "groups": [K] group id per class}`` with the K classes of :func:`group_classes`
    (training accuracy: the most probable class is the prompt's). Deterministic (zero initialisation, full batch)."""
    T, P, M = codes.shape
    if targets.dim() != 2 or targets.shape[0] != P:
        raise ValueError(f"targets must be [prompts={P}, concepts] bools, got shape {tuple(targets.shape)}")
    pos = targets.sum(0)
    if bool((pos == 0).any()):
        raise ValueError(f"concepts at columns {[i for i in range(len(pos)) if pos[i] == 0]} have no prompts: a "
                         "detector needs prompts of every concept")
    groups = exclusive_groups(targets)
    cls_group, labels = group_classes(targets, groups)
    lonely = [g for g in set(cls_group) if cls_group.count(g) < 2]
    if lonely:
        raise ValueError(f"concept(s) {[c for c in range(len(groups)) if groups[c] in lonely]} hold every prompt of "
                         "the store: a detector needs prompts without the concept")
    present = torch.ones(T, P, dtype=torch.bool) if present is None else present.bool()
    K, G = len(cls_group), labels.shape[1]
    cg = torch.tensor(cls_group)
    out = {k: [] for k in ("weight", "bias", "mean", "std", "accuracy")}
    for t in range(T):
        X, y = codes[t][present[t]].double(), labels[present[t]]
        mu, sd = X.mean(0), X.std(0, unbiased=False) + 1e-3
        Xs = (X - mu) / sd
        per_group = [(cg == g, _local(y[:, g], cg, g)) for g in range(G)]  # (its classes, labels among them)
        W = torch.zeros(M, K, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            opt.zero_grad()
            z = Xs @ W + b
            loss = sum(torch.nn.functional.cross_entropy(z[:, m], lab) for m, lab in per_group)
            loss.backward()
            opt.step()
        with torch.no_grad():
            z = Xs @ W + b
            acc = torch.stack([(z[:, m].argmax(1) == lab).double().mean() for m, lab in per_group])
        out["weight"].append(W.detach().t().float())
        out["bias"].append(b.detach().float())
        out["mean"].append(mu.float())
        out["std"].append(sd.float())
        out["accuracy"].append(acc.float())
    return {**{k: torch.stack(v) for k, v in out.items()}, "groups": cls_group}


def _local(labels: torch.Tensor, cls_group: torch.Tensor, g: int) -> torch.Tensor:
    """Class ids -> positions among group ``g``'s classes."""
    pos = torch.full((len(cls_group),), -1, dtype=torch.long)
    idx = (cls_group == g).nonzero().flatten()
    pos[idx] = torch.arange(len(idx))
    return pos[labels]


class Detectors:
    """Fitted detectors of ``names`` at one or more hookpoints, per timestep (``timesteps``, descending).

    ``groups``: the exclusive group of each class (:func:`group_classes`): the first ``len(names)`` classes are the
    concepts, any further one is the "none" class of its group (default: one group of the concepts, no "none").
    ``parts``: ``{hookpoint: {"weight" [T, K, M], "bias" [T, K], "mean" [T, M], "std" [T, M]}}`` over the K classes,
    and optionally ``"latents" [M]``: the SAE latents a sparse detector reads (their mean ReLU pre-activations,
    :func:`image_relu_means`); without it the detector reads every latent's mean top-k code (:func:`image_codes`).
    ``metadata``: what they were fitted on (``hookpoint_sae``: the SAE records, training accuracy, the fit settings)."""

    def __init__(self, names, timesteps, parts: dict, groups=None, metadata=None):
        self.names = [str(n) for n in names]
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
        self.groups = [0] * len(self.names) if groups is None else [int(g) for g in groups]
        if len(self.groups) < len(self.names):
            raise ValueError(f"groups has {len(self.groups)} entries for {len(self.names)} concepts (one per class)")
        self.parts = {}
        for h, p in parts.items():
            part = {k: v.float().contiguous() for k, v in p.items() if k in PARTS}
            lat = p.get(LATENTS)
            if lat is not None:
                lat = torch.as_tensor(lat)
                if lat.dim() != 1 or lat.is_floating_point() or lat.numel() == 0:
                    raise ValueError(f"detectors at {h!r}: latents must be a non-empty 1-D integer tensor, got "
                                     f"{lat.dtype} of shape {tuple(lat.shape)}")
                if bool((lat < 0).any()) or torch.unique(lat).numel() != lat.numel():
                    raise ValueError(f"detectors at {h!r}: latents must be distinct non-negative SAE latent indices")
                part[LATENTS] = lat.long().contiguous()
            self.parts[normalize_hookpoint(h)] = part
        self.metadata = dict(metadata or {})
        T, C = len(self.timesteps), len(self.groups)
        for h, p in self.parts.items():
            missing = [k for k in PARTS if k not in p]
            if missing:
                raise ValueError(f"detectors at {h!r} lack {missing}")
            M = p["weight"].shape[-1]
            want = {"weight": (T, C, M), "bias": (T, C), "mean": (T, M), "std": (T, M)}
            for k, shape in want.items():
                if tuple(p[k].shape) != shape:
                    raise ValueError(f"detectors at {h!r}: {k} has shape {tuple(p[k].shape)}, expected {shape} "
                                     f"({T} timesteps, {C} classes, {M} latents)")
                if not bool(torch.isfinite(p[k]).all()):
                    raise ValueError(f"detectors at {h!r}: {k} holds NaN or Inf")
            if LATENTS in p and p[LATENTS].numel() != M:
                raise ValueError(f"detectors at {h!r}: {p[LATENTS].numel()} latents for weights over {M}")
        self._on: dict = {}
        # per concept: the classes of its exclusive group (its softmax) and its place among them
        self._cols = []
        for i in range(len(self.names)):
            cols = [j for j, g in enumerate(self.groups) if g == self.groups[i]]
            self._cols.append((cols, cols.index(i)))

    def __repr__(self):  # with the weights' fingerprint: cached evaluation runs key on it
        return (f"Detectors(names={self.names}, hookpoints={list(self.parts)}, timesteps={len(self.timesteps)}, "
                f"fingerprint={self.fingerprint()})")

    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of the timesteps, names and every tensor."""
        h = hashlib.sha256(json.dumps([self.names, self.groups]).encode())
        for name, t in [("timesteps", self.timesteps)] + [(f"{hp}/{k}", v) for hp, p in self.parts.items()
                                                           for k, v in p.items()]:
            h.update(name.encode() + b"\0" + t.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def hookpoints(self) -> list:
        return list(self.parts)

    def index(self, concept: str) -> int:
        if concept not in self.names:
            raise unknown_name_error("concept", concept, self.names, "no detector was fitted for it")
        return self.names.index(concept)

    def check(self, hp: str, sae, timesteps) -> None:
        """Raise unless a detector exists at ``hp`` for ``sae`` (the SAE it was fitted on) and its timesteps are
        ``timesteps`` (the concept file's, whose nearest-timestep index the patch uses)."""
        hp = normalize_hookpoint(hp)
        if hp not in self.parts:
            raise ValueError(f"no detector at hookpoint {hp!r}; detectors exist at: {', '.join(self.parts) or '(none)'}"
                             "; fit them there with `saeuron detectors`")
        lat = self.parts[hp].get(LATENTS)
        if lat is not None:
            if int(lat.max()) >= sae.num_latents:
                raise ValueError(f"the detectors at {hp!r} read latent {int(lat.max())} but the SAE has "
                                 f"{sae.num_latents}: they come from different SAEs")
        elif self.parts[hp]["weight"].shape[-1] != sae.num_latents:
            raise ValueError(f"the detectors at {hp!r} read {self.parts[hp]['weight'].shape[-1]} latents but the SAE "
                             f"has {sae.num_latents}: they come from different SAEs")
        rec = (self.metadata.get("hookpoint_sae") or {}).get(hp)
        if rec is not None:
            check_sae_record(rec, hp, sae, "the detectors", "refit them with `saeuron detectors`")
        ts = torch.as_tensor(timesteps, dtype=torch.float32)
        if ts.shape != self.timesteps.shape or not torch.allclose(ts, self.timesteps):
            raise ValueError(f"the detectors were fitted at {len(self.timesteps)} timesteps "
                             f"{self.timesteps.tolist()[:3]}..., the concept file has {len(ts)} {ts.tolist()[:3]}...: "
                             "fit both on the same activation store")

    def image_features(self, hp: str, sae, x: torch.Tensor) -> torch.Tensor:
        """``[B, M]``: what the detector at ``hp`` reads of each image of the block output ``x`` (``sae``: the SAE it
        was fitted on): the chosen latents' mean ReLU pre-activations for a sparse detector (one GEMM over those
        latents' encoder rows), else every latent's mean top-k code (a full encode)."""
        lat = self._parts_on(hp, x.device).get(LATENTS)
        return image_codes(sae, x) if lat is None else image_relu_means(sae, x, lat)

    def _parts_on(self, hp: str, device) -> dict:
        """The tensors of the detector at ``hp`` on ``device`` (copied once per device)."""
        key = (normalize_hookpoint(hp), torch.device(device))
        p = self._on.get(key)
        if p is None:
            p = self._on[key] = {k: v.to(device) for k, v in self.parts[key[0]].items()}
        return p

    def probability(self, hp: str, codes: torch.Tensor, t_index: torch.Tensor, concepts) -> torch.Tensor:
        """``[B, len(concepts)]``: the probability that each image (``codes [B, M]``, :meth:`image_features`) holds
        each concept, at timestep indices ``t_index`` (``[1]`` or ``[B]``, into :attr:`timesteps`)."""
        p = self._parts_on(hp, codes.device)
        t = t_index.reshape(-1).to(codes.device)
        z = (codes.float() - p["mean"][t]) / p["std"][t]  # [B, M] (t broadcast when one index)
        logits = torch.einsum("bm,bkm->bk", z, p["weight"][t].expand(codes.shape[0], -1, -1)) + p["bias"][t]
        out = []
        for c in concepts:  # a softmax over the concept's exclusive group
            cols, at = self._cols[self.index(c)]
            out.append(torch.softmax(logits[:, cols], -1)[:, at])
        return torch.stack(out, 1)

    # -- persistence
    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"timesteps": self.timesteps}
        for h, p in self.parts.items():
            tensors.update({f"{h}/{k}": v.clone() for k, v in p.items()})  # own storage each (safetensors)
        with FolderLock(out, "writing detectors into"):
            atomic_save_file(tensors, out / TENSORS_FILE)
            atomic_write_json({"format": FORMAT, "version": VERSION, "names": self.names, "groups": self.groups,
                               "hookpoints": list(self.parts), "metadata": self.metadata}, out / JSON_FILE)
        return out

    @classmethod
    def load(cls, in_dir) -> "Detectors":
        from safetensors.torch import load_file

        root = Path(in_dir)
        meta_path, tensor_path = root / JSON_FILE, root / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"no detectors in {root} (expected {JSON_FILE} and {TENSORS_FILE}); fit them with "
                                    f"`saeuron detectors --store STORE --checkpoint {root}`")
        meta = read_json(meta_path, "detectors file")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a saeuron detectors file (format {FORMAT!r})")
        if meta.get("version") not in READS:
            raise ValueError(f"{meta_path} has version {meta.get('version')!r}; this saeuron reads versions "
                             f"{', '.join(map(str, READS))}")
        tensors = load_file(str(tensor_path))
        if "timesteps" not in tensors:
            raise ValueError(f"{tensor_path} holds no timesteps")
        parts = {h: {k: tensors.get(f"{h}/{k}") for k in PARTS} for h in meta.get("hookpoints") or []}
        for h, p in parts.items():
            missing = [k for k, v in p.items() if v is None]
            if missing:
                raise ValueError(f"{tensor_path} lacks {[f'{h}/{k}' for k in missing]}")
            if f"{h}/{LATENTS}" in tensors:
                p[LATENTS] = tensors[f"{h}/{LATENTS}"]
        return cls(meta["names"], tensors["timesteps"], parts, meta.get("groups"), meta.get("metadata"))


def pick_anchor(detectors: Detectors, table, concept: str, hp: str, exclude=()) -> str:
    """The anchor of ``concept`` for ``mode="probe_anchor"``: the concept of its exclusive detector group, not in
    ``exclude``, whose mean code at ``hp`` (the concept file's ``mu``, averaged over timesteps) is least like its own
    (cosine), i.e. the most different drawable alternative (MiniCanvas: circle -> arrow)."""
    i = detectors.index(concept)
    group = [n for j, n in enumerate(detectors.names) if detectors.groups[j] == detectors.groups[i]
             and n != concept and n not in exclude and n in table.names]
    if not group:
        raise ValueError(f"no anchor for {concept!r}: every other concept of its group is being unlearned too or "
                         "unknown to the concept file; pass anchor= with a prompt")
    mu = torch.nn.functional.normalize(table.mu[table.stored_hookpoint(hp)].mean(1), dim=1)
    me = mu[table.index(concept)]
    return min(group, key=lambda n: float(mu[table.index(n)] @ me))


def pick_latents(weight: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` latents (sorted) with the largest summed absolute weight over timesteps and classes (``weight
    [T, K, M]``, per standardised latent), ties to the lower index; every latent when ``n >= M``."""
    M = weight.shape[-1]
    if n >= M:
        return torch.arange(M)
    score = weight.abs().double().sum((0, 1))
    order = sorted(range(M), key=lambda j: (-float(score[j]), j))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


def fit_detectors(store, checkpoint, hookpoints=None, concepts=None, *, latents: int = DEFAULT_LATENTS,
                  steps: int = 300, lr: float = 0.01, weight_decay: float = 1e-3, batch_size: int = 4096,
                  progress: bool = True) -> Detectors:
    """Fit every concept's detector at ``hookpoints`` (default: every store hookpoint with an SAE in ``checkpoint``)
    on the store's prompts, and save them into ``checkpoint`` beside the concept file.

    ``latents``: how many SAE latents each sparse detector reads (their mean ReLU pre-activations, chosen by a first
    fit over all of them, :func:`pick_latents`; see the module docstring); 0: every latent's mean top-k code.
    ``concepts``: None uses the store's labels, or ``{concept: [prompt ids or prompts]}`` (as ``select``; a prompt may
    belong to several concepts, then of different exclusive groups, :func:`exclusive_groups`)."""
    if isinstance(latents, bool) or not isinstance(latents, int) or latents < 0:
        raise ValueError(f"latents must be a whole number >= 0 (0: every latent's top-k code), got {latents!r}")
    from .sae import SparseAutoencoder, available_hookpoint_dirs, resolve_hookpoint_dir
    from .selection import concept_members

    if not hasattr(store, "iter_batches"):
        from .store import ActivationStore

        store = ActivationStore(store)
    root = Path(checkpoint)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist")
    have = {normalize_hookpoint(h) for h in available_hookpoint_dirs(root)}
    hps = [hookpoints] if isinstance(hookpoints, str) else hookpoints
    hps = [h for h in store.hookpoints if normalize_hookpoint(h) in have] if hps is None else list(hps)
    if not hps:
        raise ValueError(f"no SAE in {root} for the store's hookpoints {store.hookpoints}")
    for h in hps:
        if normalize_hookpoint(h) not in have:
            raise unknown_name_error("hookpoint", h, sorted(have), f"no SAE for it in {root}")
    names, members = concept_members(store, concepts)
    targets = torch.zeros(len(store.prompts), len(names), dtype=torch.bool)
    for c, ids in enumerate(members):
        targets[ids, c] = True
    single = targets.sum(1) == 1  # a concept's representative prompt holds no other concept (e.g. unstyled)
    prompts = {n: store.prompts[int(((targets[:, c] & single) if bool((targets[:, c] & single).any())
                                     else targets[:, c]).nonzero()[0])] for c, n in enumerate(names)}
    parts, records, accuracy, full_accuracy, timesteps = {}, {}, {}, {}, None
    with FolderLock(root, "fitting detectors into"):
        for h in hps:
            sae = SparseAutoencoder.load(resolve_hookpoint_dir(root, h))
            ts, codes, present = prompt_codes(store, sae, h, batch_size=batch_size, progress=progress,
                                              kind="relu" if latents else "topk")
            if timesteps is not None and not torch.equal(ts, timesteps):
                raise ValueError(f"the store holds other timesteps at {h!r} than at {hps[0]!r}")
            timesteps = ts
            fit = fit_softmax(codes, targets, present, steps=steps, lr=lr, weight_decay=weight_decay)
            hp = normalize_hookpoint(h)
            if latents:
                chosen = pick_latents(fit["weight"], latents)
                full_accuracy[hp] = round(float(fit["accuracy"].min()), 4)
                fit = fit_softmax(codes[:, :, chosen], targets, present, steps=steps, lr=lr, weight_decay=weight_decay)
            parts[hp] = {k: fit[k] for k in PARTS}
            if latents:
                parts[hp][LATENTS] = chosen
            records[hp] = sae_record(sae)
            groups = fit["groups"]
            accuracy[hp] = {"+".join(n for n, g2 in zip(names, groups) if g2 == g): round(float(fit["accuracy"][:, g].min()), 4)
                            for g in range(fit["accuracy"].shape[1])}
        meta = {"store": str(getattr(store, "root", "")), "hookpoint_sae": records, "prompts": prompts,
                "train_accuracy_min_over_timesteps": accuracy, "store_prompts": len(store.prompts),
                "fit": {"steps": steps, "lr": lr, "weight_decay": weight_decay, "kind": "softmax per exclusive group",
                        "latents": latents,
                        "features": (f"mean ReLU pre-activations of {latents} latents" if latents
                                     else "mean top-k code of every latent")}}
        if latents:  # the first fit's (every latent's ReLU mean) lowest training accuracy, beside the sparse one's
            meta["all_latents_train_accuracy_min"] = full_accuracy
        det = Detectors(names, timesteps, parts, groups, meta)
        det.save(root)
    return det
