"""The ``select`` stage: per-concept, per-timestep SAE feature statistics into a concept file.

For concept c, prompt p and timestep t (method.md section 4)::

    a[c,p,t] = mean over p's tokens at t of the dense code f (zeros included)
    mu[c,t]  = mean over c's prompts of a[c,p,t]

Prompts without a concept (a ``None`` label) belong to no concept and are ignored: they count neither in
``mu[c]`` nor in ``mu[~c]`` (the method defines ``mu[~c]`` over the other concepts only). A prompt may
belong to several concepts when ``concepts`` is given as a dict (e.g. an object and a style); its tokens
then count for each. Scores and feature selection on ``mu`` live in :class:`saeuron.concepts.ConceptTable`.

An SAE trained with concept supervision (:mod:`saeuron.supervision`) carries ``concept_latents`` in its cfg.json;
the statistics record them per hookpoint (``metadata["hookpoint_sae"][hp]["concept_latents"]``), and
``build_concept_file(..., reserved=True)`` (``saeuron select --reserved``) makes "select exactly the concept's
reserved latents" the default rule of every concept that has some (``defaults[c]["reserved"] = true``).
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import ops
from .concepts import DEFAULT_KEYS, DEFAULTS, ConceptTable, check_defaults, sae_record, unknown_name_error
from .hookpoints import normalize_hookpoint
from .utils import FolderLock


def concept_members(store, concepts) -> tuple:
    """``(names, [[prompt ids] per concept])`` from the store's labels (``concepts`` None) or a ``{concept: prompts}``
    dict (prompt ids or prompt strings; a prompt may belong to several concepts). Also used by concept-supervised
    training (:mod:`saeuron.supervision`)."""
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


def store_hookpoint(store, hookpoint: str) -> str:
    """The store's own name for ``hookpoint`` (any spelling :func:`normalize_hookpoint` accepts), else a clear error
    naming the store's hookpoints."""
    if hookpoint in store.hookpoints:
        return hookpoint
    match = [h for h in store.hookpoints if normalize_hookpoint(h) == normalize_hookpoint(hookpoint)]
    if not match:
        raise unknown_name_error("hookpoint", hookpoint, store.hookpoints, "not in the activation store")
    return match[0]


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

    hookpoint = store_hookpoint(store, hookpoint)
    d = store.d_in(hookpoint)
    if sae.d_in != d:
        raise ValueError(f"SAE width d_in={sae.d_in} does not match the store's width {d} at hookpoint {hookpoint!r}")
    sae.validate()
    names, members = concept_members(store, concepts)
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
    meta = {"store": str(getattr(store, "root", "")),
            "hookpoint_sae": {normalize_hookpoint(hookpoint): {**sae_record(sae), "dropped_rows": dropped[0]}}}
    if sae.cfg.concept_latents:  # concept-supervised SAE: its reservation, for the "reserved" selection rule
        meta["hookpoint_sae"][normalize_hookpoint(hookpoint)]["concept_latents"] = {
            str(c): [int(i) for i in ids] for c, ids in sae.cfg.concept_latents.items()}
    return ConceptTable(names, counts, ts[order], {normalize_hookpoint(hookpoint): mu}, metadata=meta)


def build_concept_file(store, saes, out_dir=None, hookpoints=None, concepts=None, *, multiplier: float = -1.0,
                       percentile: Optional[float] = 99.99, top_n: Optional[int] = None, defaults=None,
                       batch_size: int = 4096, device=None, progress: bool = True,
                       reserved: bool = False) -> ConceptTable:
    """The ``select`` stage: statistics for every hookpoint into one concept file saved in ``out_dir``.

    ``store``: an ActivationStore or its folder. ``saes``: a checkpoint folder (one SAE folder per
    hookpoint; ``out_dir`` defaults to it, so ``patch(checkpoint=DIR)`` finds everything), a dict
    ``{hookpoint: SparseAutoencoder}``, or one SAE (with one hookpoint). ``hookpoints`` defaults to every
    store hookpoint that has an SAE. ``multiplier``/``percentile``/``top_n`` become every concept's
    defaults; ``defaults`` may instead give a dict per concept.

    ``reserved=True`` (concept-supervised SAEs): every concept for which some SAE reserves latents gets the default
    rule ``reserved`` (its reserved latents, at every timestep at which they fire for it; the percentile/top_n stay
    as the explicit alternative), limited to the hookpoints whose SAE reserves latents for it when not all do; the
    other concepts keep the unsupervised rule. An error when no SAE reserves latents for any concept.
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
        have = {normalize_hookpoint(h) for h in available_hookpoint_dirs(root)}
        hps = hookpoints or [h for h in store.hookpoints if normalize_hookpoint(h) in have]
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
        saes = {h: saes[h] if h in saes else saes.get(normalize_hookpoint(h)) for h in hps}
        lacking = [h for h, s in saes.items() if s is None]
        if lacking:
            raise ValueError(f"no SAE given for hookpoints {lacking}; SAEs given for: {list(saes)}")
    else:
        raise TypeError(f"saes must be a checkpoint folder, a {{hookpoint: SAE}} dict or an SAE, got {type(saes).__name__}")
    if out_dir is None:
        raise ValueError("out_dir is required when saes are not given as a checkpoint folder")
    if not isinstance(reserved, bool):
        raise ValueError(f"reserved must be True or False, got {reserved!r}")
    if reserved and not any(getattr(s.cfg, "concept_latents", None) for s in saes.values()):
        raise ValueError(f"reserved=True selects the latents a concept-supervised SAE reserves, but none of the SAEs "
                         f"for {list(saes)} reserves any (no concept_latents in their cfg.json); train with "
                         "`saeuron train --concept-supervision W`, or leave reserved out")
    if defaults is None:  # checked before the (long) statistics pass, not after it
        defaults = check_defaults({**DEFAULTS, "multiplier": multiplier, "percentile": percentile, "top_n": top_n},
                                  "build_concept_file")
        defaults = {k: defaults[k] for k in ("multiplier", "percentile", "top_n")}
    with FolderLock(out_dir, "computing a concept file into"):
        tables = [compute_statistics(store, sae, h, concepts, batch_size=batch_size, device=device, progress=progress)
                  for h, sae in saes.items()]
        table = ConceptTable.merge(tables)
        if reserved:
            defaults = reserved_defaults(table, defaults)
        table.defaults = table.complete_defaults(defaults)
        table.save(out_dir)
    return table


def reserved_defaults(table: ConceptTable, defaults: dict) -> dict:
    """Per-concept defaults with ``reserved: true`` for every concept some hookpoint's SAE reserves latents for (its
    ``hookpoints`` narrowed to those hookpoints when not all of them do); ``defaults``: one dict for all concepts or
    one per concept. An error when no concept of the table has reserved latents."""
    per = dict(defaults) if set(defaults) - DEFAULT_KEYS else {n: dict(defaults) for n in table.names}
    where = {n: [h for h in table.hookpoints if table.reserved_latents(h, n) is not None] for n in table.names}
    if not any(where.values()):
        raise ValueError(f"no concept of {table.names} has latents reserved by the SAEs (their reservations name "
                         f"{sorted({c for h in table.hookpoints for c in table.reservation(h)})}): the concepts must "
                         "be named as in training")
    out = {}
    for n in table.names:
        d = {**per.get(n, {})}
        if where[n]:
            d["reserved"] = True
            if len(where[n]) < len(table.hookpoints) and d.get("hookpoints") is None:
                d["hookpoints"] = where[n]
        out[n] = d
    return out


select = build_concept_file  # the stage's name in the data path (saeuron.select)
