"""Run a diffusers pipeline over prompts and capture hookpoint outputs per timestep into an ActivationStore.

Forward hooks on the chosen ``Transformer2DModel`` blocks see ``[2B, C, H, W]`` under classifier-free
guidance (unconditional half first). Each captured UNet call adds ``B * H * W`` rows per hookpoint (the
conditional half by default), each row tagged with the timestep the UNet received and the index of its
prompt. A diffusion transformer (SD3, PixArt, Flux) works the same way: its hooked blocks' image tokens
``[2B, L, C]`` give ``B * L`` rows per call, and the timestep is the float the transformer receives
(Flux: sigma, i.e. the scheduler's timestep / 1000). Flux batches no CFG halves: every row is conditional.
One prompt batch is accumulated on the CPU and written as one shard per hookpoint, so memory is
bounded by one batch, and a killed run resumes at the first batch not marked done.

Under ``torch.distributed`` (``torchrun --nproc_per_node N -m saeuron collect ...``, or ``collect`` called on
every rank of an initialised process group) the prompt batches still to do are dealt round-robin to the
ranks. Rank 0 opens the store (or reopens it to resume) and tells the others which batches remain; all
ranks share the folder's lock (another run is refused), each writes only its own batches' shards plus a
marker per finished batch, and rank 0 merges the markers into ``store.json`` once everybody is done. The
rows of a batch do not depend on the rank that collects it, so the store equals a one-process run's.
"""
from __future__ import annotations

import math
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from .hookpoints import block_output, get_unet, image_stream, list_hookpoints, resolve_hookpoints
from .pipelines import resolve_sampling
from .store import ActivationStore, derive_seed
from .utils import FolderBusyError, check_finite_number, read_json

HALVES = ("cond", "uncond", "both")
_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _as_dtype(dtype):
    """``None``, a floating ``torch.dtype`` or one of the names in ``_DTYPES``."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"dtype must be None, a floating torch.dtype or one of {sorted(_DTYPES)}; got {dtype!r}")


def _flatten_prompts(prompts):
    """``(prompt list, labels or None)`` from a list of prompts or a ``{concept: [prompts]}`` dict."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings or a {concept: [prompts]} dict, not a single string")
    if isinstance(prompts, dict):
        flat = [(p, str(c)) for c, ps in prompts.items() for p in ([ps] if isinstance(ps, str) else ps)]
        out, labels = [p for p, _ in flat], [c for _, c in flat]
    else:
        out, labels = list(prompts), None
    if not out or not all(isinstance(p, str) for p in out):
        raise ValueError("prompts must be a non-empty list of strings (or a dict of concept -> non-empty lists)")
    return out, labels


def read_prompt_file(path):
    """Prompts from a .txt (one per line) or .json file (a list, or {concept: [prompts]}), with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    if p.suffix.lower() == ".json":
        data = read_json(p, "prompt file")
        if isinstance(data, dict) and data and all(
                isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v) for v in data.values()):
            return data
        if isinstance(data, list) and data and all(isinstance(v, str) and v.strip() for v in data):
            return data
        raise ValueError(f"prompt file {path}: expected a non-empty JSON list of prompts or an object "
                         "{concept: [prompts]} with non-empty lists of non-empty strings")
    try:
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({e})") from None
    if not lines:
        raise ValueError(f"prompt file {path} holds no prompts (one per line expected)")
    return lines


def _timesteps(args, kwargs):
    """The timestep argument of a UNet call (positional 1 or ``timestep=``) as a flat float32 CPU tensor."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise ValueError("the UNet was called without a timestep (positional argument 1 or timestep=...)")
    return torch.as_tensor(t).detach().float().cpu().reshape(-1)


def _rank_world(distributed):
    """``(rank, world size)`` of the collection: the process group's when ``distributed`` (None: if one is set up)."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = on and dist.get_world_size() > 1
    elif distributed and not on:
        raise ValueError("collect(distributed=True) needs an initialised torch.distributed process group: launch "
                         "with torchrun (the saeuron command line joins the group itself) or call "
                         "torch.distributed.init_process_group first; or pass distributed=None / False")
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def _collective_device():
    """Where small collective tensors live: the current GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (a collective: all ranks must call it)."""
    import torch.distributed as dist

    flag = torch.tensor([int(bool(ok))], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "FolderBusyError": FolderBusyError}


def _open_shared(out_dir, hookpoints, prompt_list, labels, config, n_batches, rank):
    """Rank 0 creates (or reopens) the store with a fresh run id and broadcasts it with the batches still to do;
    the other ranks join. Returns ``(store, todo)`` on every rank; an error on any rank raises on all."""
    import torch.distributed as dist

    box, err = [None], None
    if rank == 0:
        run_id = uuid.uuid4().hex
        try:
            store = ActivationStore.create(out_dir, hookpoints, prompt_list, labels, config, run_id=run_id)
            done = store.done_batches()
            box = [("ok", run_id, [b for b in range(n_batches) if b not in done])]
        except Exception as e:  # noqa: BLE001 - passed on to the other ranks, then raised here
            err, box = e, [("error", type(e).__name__, str(e))]
    dist.broadcast_object_list(box, src=0)
    status, a, b = box[0]
    if status == "error":
        if err is not None:
            raise err
        raise _ERRORS.get(a, RuntimeError)(f"rank 0 could not open the activation store: {b}")
    todo, store = b, (store if rank == 0 else None)
    if rank != 0:
        try:
            store = ActivationStore.join(out_dir, a)
        except Exception as e:  # noqa: BLE001 - every rank must reach the collective below
            err = e
    if not _all_ok(err is None):
        if store is not None:
            store.close()
        if err is not None:
            raise err
        raise RuntimeError(f"another rank could not open the activation store {out_dir} (see its error)")
    return store, todo


def collect(pipe, prompts, out_dir, hookpoints, *, batch_size=4, num_inference_steps=None, guidance_scale=None,
            every=1, halves="cond", tokens_per_map=None, seed=0, dtype=None, height=None, width=None,
            progress=True, max_batches=None, distributed=None) -> ActivationStore:
    """Generate from ``prompts`` with ``pipe`` and store every ``every``-th UNet call's hookpoint tokens in ``out_dir``.

    ``prompts`` is a list of strings or ``{concept: [prompts]}`` (then the store records a label per prompt).
    ``halves`` picks the CFG half ("cond", "uncond" or "both"; without CFG the whole batch is kept).
    ``tokens_per_map`` keeps a seeded random subset of that many tokens per feature map. Batches already
    in the store are skipped, so rerunning after a kill finishes the job without losing or duplicating rows;
    ``max_batches`` stops after that many new batches (over all ranks). Steps and guidance left at None are the
    pipeline's own defaults (the method's SD1.5 data used 50 DDIM steps at guidance 9.0); the store records the
    values used. ``distributed``: split the batches over the ranks of the torch.distributed process group
    (None: when one with more than one rank is initialised); every rank calls ``collect`` with the same
    arguments and gets the finished store (see the module docstring).
    """
    rank, world = _rank_world(distributed)
    sampling = resolve_sampling(pipe, num_inference_steps, guidance_scale)
    num_inference_steps = sampling.get("num_inference_steps", 50)
    guidance_scale = sampling.get("guidance_scale", 7.5)
    prompt_list, labels = _flatten_prompts(prompts)
    if halves not in HALVES:
        raise ValueError(f"halves must be one of {HALVES}, got {halves!r}")
    for name, v, lo in (("batch_size", batch_size, 1), ("num_inference_steps", num_inference_steps, 1),
                        ("every", every, 1), ("tokens_per_map", tokens_per_map, 1), ("max_batches", max_batches, 0)):
        if v is not None and (not isinstance(v, int) or v < lo):
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    dtype = _as_dtype(dtype)
    guidance_scale = check_finite_number(guidance_scale, "guidance_scale")
    unet = get_unet(pipe)
    modules = resolve_hookpoints(unet, hookpoints)
    widths = list_hookpoints(unet)
    config = dict(batch_size=batch_size, num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
                  every=every, halves=halves, tokens_per_map=tokens_per_map, seed=seed,
                  dtype=None if dtype is None else str(dtype).replace("torch.", ""), height=height, width=width,
                  scheduler=type(getattr(pipe, "scheduler", None)).__name__)
    n_batches = math.ceil(len(prompt_list) / batch_size)
    hps = {n: widths[n] for n in modules}
    if world == 1:
        store = ActivationStore.create(out_dir, hps, prompt_list, labels, config)
        todo = [b for b in range(n_batches) if b not in store.done_batches()]
    else:
        store, todo = _open_shared(out_dir, hps, prompt_list, labels, config, n_batches, rank)
    if max_batches is not None:
        todo = todo[:max_batches]
    loop = (store, pipe, prompt_list, modules, batch_size, num_inference_steps, guidance_scale, every, halves,
            tokens_per_map, seed, dtype, height, width)
    if world == 1:
        try:
            return _collect_into(*loop, todo, progress, len(store.done_batches()), n_batches, "collect")
        finally:
            store.close()  # the write lock goes; the store stays readable
    err = None
    try:
        _collect_into(*loop, todo[rank::world], progress and rank == 0, 0, len(todo[rank::world]),
                      f"collect (rank {rank} of {world})")
    except Exception as e:  # noqa: BLE001 - every rank must reach the collectives below, then it is raised
        err = e
    except BaseException:
        store.close()
        raise
    try:
        all_ok = _all_ok(err is None)  # every rank has finished writing
        if rank == 0:
            store.merge_pending()  # the one write of store.json: whatever finished counts, even after a failure
        _all_ok(True)  # the others read store.json only after rank 0 merged
        store.reload()
    finally:
        store.close()
    if err is not None:
        raise err
    if not all_ok:
        raise RuntimeError(f"collection into {out_dir} failed on another rank (see its error); the batches that "
                           "finished are recorded: rerun the same command to collect the rest")
    return store


def _collect_into(store, pipe, prompt_list, modules, batch_size, num_inference_steps, guidance_scale, every, halves,
                  tokens_per_map, seed, dtype, height, width, todo, progress, initial, total,
                  desc) -> ActivationStore:
    """The generation loop of :func:`collect` over the batches ``todo``, run while ``store``'s write lock is held."""
    unet = get_unet(pipe)
    st = SimpleNamespace(batch=0, ids=None, call=-1, capture=False, t=None, rows=None)

    def pre_hook(module, args, kwargs):
        st.call += 1
        st.capture = st.call % every == 0
        if st.capture:
            st.t = _timesteps(args, kwargs)

    def make_hook(name, hi, stream):
        def hook(module, args, output):
            if st.capture:
                st.rows[name].append(_rows(name, hi, block_output(output, stream).detach()))
        return hook

    def _rows(name, hi, out):
        if out.dim() == 3:  # DiT image tokens [n, L, C]
            n, HW, C = out.shape
        else:
            n, C, H, W = out.shape
            HW = H * W
        B = len(st.ids)
        t = st.t.expand(n) if st.t.numel() == 1 else st.t
        if t.numel() != n:
            raise RuntimeError(f"the UNet got {t.numel()} timesteps for a batch of {n}")
        if n == 2 * B:  # CFG: unconditional half first
            sel = {"cond": slice(B, n), "uncond": slice(0, B), "both": slice(0, n)}[halves]
            ids = torch.cat([st.ids, st.ids])[sel]
        elif n == B:
            sel, ids = slice(0, n), st.ids
        else:
            raise RuntimeError(f"hookpoint {name} output has batch {n}; expected {B} prompts (or {2 * B} with CFG)")
        m = len(ids)
        tok = out[sel].reshape(m, HW, C) if out.dim() == 3 else out[sel].permute(0, 2, 3, 1).reshape(m, HW, C)
        if tokens_per_map is not None and tokens_per_map < HW:
            g = torch.Generator().manual_seed(derive_seed(seed, st.batch, st.call, hi))
            idx = torch.rand(m, HW, generator=g).argsort(dim=1)[:, :tokens_per_map].sort(dim=1).values
            tok = tok.gather(1, idx.to(tok.device)[..., None].expand(-1, -1, C))
        k = tok.shape[1]
        return {"x": tok.reshape(m * k, C).to(dtype or tok.dtype).cpu(),
                "timestep": t[sel].repeat_interleave(k), "prompt_id": ids.repeat_interleave(k)}

    handles = [unet.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [mod.register_forward_hook(make_hook(name, hi, image_stream(mod)))
                for hi, (name, mod) in enumerate(modules.items())]
    had_bar_cfg = hasattr(pipe, "_progress_bar_config")
    old_bar_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**old_bar_cfg, "disable": True})  # one bar over batches, not one per batch
    written = 0
    try:
        bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", disable=not progress)
        with bar:
            for b in todo:
                ids = list(range(b * batch_size, min((b + 1) * batch_size, len(prompt_list))))
                st.batch, st.ids, st.call, st.capture = b, torch.tensor(ids, dtype=torch.long), -1, False
                st.rows = {name: [] for name in modules}
                gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in ids]
                with torch.no_grad():
                    pipe(prompt=[prompt_list[i] for i in ids], num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, generator=gens, height=height, width=width,
                         output_type="latent", return_dict=True)
                empty = [name for name, r in st.rows.items() if not r]
                if empty:
                    raise RuntimeError(f"hookpoints {empty} captured nothing in batch {b} (is every={every} larger "
                                       f"than the number of UNet calls?)")
                rows = {name: {k: torch.cat([r[k] for r in rs]) for k in ("x", "timestep", "prompt_id")}
                        for name, rs in st.rows.items()}
                st.rows = None
                bad = {name: int((~torch.isfinite(r["x"]).all(1)).sum()) for name, r in rows.items()}
                if any(bad.values()):  # kept (training and statistics skip them), but said
                    warnings.warn(f"batch {b}: rows holding NaN or Inf at {[n for n, v in bad.items() if v]} "
                                  f"({sum(bad.values())} rows; an fp16 overflow? collect with dtype='fp32' or "
                                  "'bf16'); training and concept statistics will skip them")
                store.write_batch(b, rows)
                written += sum(len(r["x"]) for r in rows.values())
                del rows
                bar.update(1)
                bar.set_postfix(rows=written)
    finally:
        for h in handles:
            h.remove()
        st.rows = None
        if had_bar_cfg:
            pipe._progress_bar_config = old_bar_cfg
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config
    return store
