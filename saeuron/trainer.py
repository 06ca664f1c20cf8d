"""The SAE trainer: BatchTopK/TopK with AuxK, unit-norm decoder, Adam with linear decay, resume, DDP.

One optimiser step (method.md section 2):

1. select latents without gradients: BatchTopK (one top-(k*N) over the batch's dense
   pre-activations) or per-token top-k (``ops.topk_encode``);
2. recompute the chosen latents' values differentiably with ``ops.gather_encode`` and reconstruct
   with ``ops.sparse_decode``: gradients only touch the chosen rows, no dense ``[N, M]`` gradient;
3. loss = FVU + ``auxk_alpha`` * AuxK, where the top-``d/2`` *dead* latents reconstruct the
   (detached) residual ``x - x_hat``;
4. renormalise decoder rows, remove the gradient parallel to them, clip to ``grad_clip``, Adam step,
   renormalise again.

Optional concept supervision (``TrainConfig.concept_supervision > 0``, off by default; :mod:`saeuron.supervision`):
latents ``0 .. C*n-1`` are reserved for the store's C concepts and ``concept_supervision * L_sup`` joins the loss,
pushing each labelled row's own concepts' latents into its top k and the other concepts' latents off. The
reservation is written into the SAE's ``cfg.json`` (``concept_latents``). With the weight 0 nothing of this runs
and training is exactly the unsupervised trainer's.

BatchTopK gives a variable number of latents per row; it is stored exactly as per-row top-``kmax``
indices (``kmax`` = most entries any row holds) with a 0/1 mask on the values.

Checkpoints go to ``out_dir/<hookpoint>/`` (sparsify layout, :meth:`SparseAutoencoder.save`) plus
``trainer_state.safetensors``: weights, Adam moments and dead-latent counters as tensors, the
position in the data (step, epoch, batch) as JSON metadata, all in one atomically written file, so
an interrupted run resumes to the same weights as an uninterrupted one. ``metrics.jsonl`` logs
FVU, AuxK loss, dead fraction, L0 and learning rate (and ``sup``, the mean ``L_sup``, with concept supervision).

Under ``torch.distributed`` (``torchrun``; gloo or nccl) each rank reads its own part of every
batch, gradients and dead-latent counters are all-reduced, and only rank 0 writes files.

A store is streamed, never loaded whole: each rank holds at most ``TrainConfig.max_resident_shards``
shards in memory (plus the batches in flight), so a store larger than memory trains as well.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import ops
from .sae import SaeConfig, SparseAutoencoder
from .supervision import check_supervision, membership, reserve_latents, row_thresholds, supervision_loss
from .utils import FolderLock, atomic_save_file, atomic_write_json

STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
PARAM_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
AMP_DTYPES = {None: None, "none": None, "fp32": None, "float32": None, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# a resumed run must agree with the saved one on these, or the continuation is a different run
RESUME_KEYS = ("k", "expansion_factor", "num_latents", "batch_size", "batch_topk", "seed")
SUPERVISION_KEYS = {"concept_supervision": 0.0, "latents_per_concept": 1}  # checked too, defaults for older checkpoints
STREAM_KEYS = ("max_resident_shards",)  # the order rows are read from a store in (checked when the checkpoint has it)


@dataclass
class TrainConfig:
    """Trainer hyperparameters; defaults are the SAeUron reference values (method.md section 2)."""

    k: int = 32
    expansion_factor: int = 16
    num_latents: int = 0  # wins over expansion_factor when non-zero
    batch_size: int = 4096  # tokens per optimiser step, summed over all ranks
    lr: float = 4e-4
    eps: float = 6.25e-10
    grad_clip: float = 1.0
    warmup_steps: int = 0
    auxk_alpha: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000  # a latent silent this many tokens is dead (0: no AuxK)
    batch_topk: bool = True
    max_tokens: Optional[int] = None  # stop after this many tokens (also sets the LR schedule length)
    max_steps: Optional[int] = None
    epochs: int = 1
    amp_dtype: Optional[str] = None  # "bf16" / "fp16" / None (fp32)
    save_every: int = 1000  # steps
    seed: int = 0
    log_every: int = 50
    # ActivationStore data: shards resident in memory at once (the shuffle buffer; memory is about this many
    # shards plus a few batches, so a store larger than memory streams); also sets how far rows are shuffled
    max_resident_shards: int = 4
    # concept supervision (saeuron.supervision; the SAEmnesia idea): the weight of the supervised term, 0 = off (the
    # unsupervised SAeUron trainer, the default), and how many latents each concept reserves
    concept_supervision: float = 0.0
    latents_per_concept: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("k", "expansion_factor", "num_latents", "batch_size", "warmup_steps", "dead_tokens_threshold",
                     "epochs", "save_every", "seed", "log_every", "max_tokens", "max_steps", "max_resident_shards"):
            v = getattr(self, name)
            if not (v is None and name in ("max_tokens", "max_steps")) and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"TrainConfig.{name} must be an integer, got {v!r}")
        for name in ("lr", "eps", "grad_clip", "auxk_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {v!r}")
        if not isinstance(self.batch_topk, bool):
            raise ValueError(f"TrainConfig.batch_topk must be True or False, got {self.batch_topk!r}")
        for name in ("k", "batch_size", "epochs", "save_every", "log_every", "max_resident_shards"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("expansion_factor", "num_latents", "warmup_steps", "dead_tokens_threshold"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if not self.num_latents and not self.expansion_factor:
            raise ValueError("TrainConfig needs num_latents > 0 or expansion_factor > 0")
        if not (self.lr > 0 and self.eps > 0 and self.grad_clip > 0 and self.auxk_alpha >= 0):
            raise ValueError(f"lr={self.lr}, eps={self.eps}, grad_clip={self.grad_clip} must be > 0 and "
                             f"auxk_alpha={self.auxk_alpha} >= 0")
        for name in ("max_tokens", "max_steps"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be None or >= 1")
        amp_dtype(self.amp_dtype)
        try:
            check_supervision(self.concept_supervision, self.latents_per_concept)
        except ValueError as e:
            raise ValueError(f"TrainConfig.{e}") from None


def amp_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The compute dtype for ``TrainConfig.amp_dtype`` (None = fp32), with a clear error for bad names."""
    key = name.lower() if isinstance(name, str) else name
    if key not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={name!r} is not supported; valid: 'bf16', 'fp16' or None")
    return AMP_DTYPES[key]


# --------------------------------------------------------------------------- data

class _TensorBatches:
    """In-memory tokens ``[N, d]`` behind the store's ``iter_batches`` interface (tests, small jobs)."""

    def __init__(self, x: torch.Tensor):
        if x.dim() != 2 or x.shape[0] == 0 or not x.is_floating_point():
            raise ValueError(f"training data must be a float tensor of tokens [N, d] with N > 0, got "
                             f"{x.dtype} {tuple(x.shape)}")
        self.x = x

    def d_in(self) -> int:
        return self.x.shape[1]

    def num_rows(self) -> int:
        return self.x.shape[0]

    def steps(self, batch_size, seed, epoch, world_size) -> int:
        """Optimiser steps in one epoch (every rank gets ``batch_size`` rows per step)."""
        return self.x.shape[0] // (batch_size * world_size)

    def iter(self, batch_size, seed, epoch, rank, world_size, start_batch, device) -> Iterator[torch.Tensor]:
        """Global batch ``b`` is ``perm[b*B*W : (b+1)*B*W]``; rank ``r`` takes its ``r``-th slice."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(self.x.shape[0], generator=g)
        gb = batch_size * world_size
        for b in range(start_batch, self.x.shape[0] // gb):
            rows = perm[b * gb + rank * batch_size: b * gb + (rank + 1) * batch_size]
            yield self.x[rows.to(self.x.device)].to(device, non_blocking=True)


class _StoreBatches:
    """An ``ActivationStore`` hookpoint (duck-typed: ``d_in``, ``num_rows``, ``iter_batches``), streamed with at
    most ``max_resident_shards`` shards in memory."""

    def __init__(self, store, hookpoint: Optional[str], max_resident_shards: int = 4):
        if hookpoint is None:
            raise ValueError("hookpoint is required when training from an ActivationStore (which hookpoint to read)")
        self.store, self.hookpoint, self.max_resident_shards = store, hookpoint, max_resident_shards

    def d_in(self) -> int:
        return int(self.store.d_in(self.hookpoint))

    def num_rows(self) -> int:
        return int(self.store.num_rows(self.hookpoint))

    def steps(self, batch_size, seed, epoch, world_size) -> int:
        """Optimiser steps in one epoch: the fewest batches any rank gets (ranks hold unequal shard shares)."""
        if not hasattr(self.store, "num_batches"):
            return self.num_rows() // (batch_size * world_size)
        return min(int(self.store.num_batches(self.hookpoint, batch_size, shuffle=True, seed=seed, epoch=epoch, rank=r,
                                              world_size=world_size, drop_last=True,
                                              buffer_shards=self.max_resident_shards)) for r in range(world_size))

    def iter(self, batch_size, seed, epoch, rank, world_size, start_batch, device,
             prompt_ids: bool = False) -> Iterator:
        """The batches' tokens ``x``, or ``(x, prompt_id)`` pairs with ``prompt_ids`` (concept supervision)."""
        for batch in self.store.iter_batches(self.hookpoint, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                             rank=rank, world_size=world_size, start_batch=start_batch,
                                             drop_last=True, device=device, buffer_shards=self.max_resident_shards):
            yield (batch["x"], batch["prompt_id"]) if prompt_ids else batch["x"]


def _batches(data, hookpoint, max_resident_shards=4):
    if isinstance(data, torch.Tensor):
        return _TensorBatches(data)
    if all(hasattr(data, a) for a in ("iter_batches", "d_in", "num_rows")):
        return _StoreBatches(data, hookpoint, max_resident_shards)
    raise TypeError(f"data must be an ActivationStore or a tensor of tokens [N, d], got {type(data).__name__}")


# --------------------------------------------------------------------------- one step

class StepOutput(NamedTuple):
    loss: torch.Tensor  # fvu + auxk_alpha * auxk (+ concept_supervision * sup), differentiable
    fvu: torch.Tensor  # detached scalars from here on
    auxk: torch.Tensor
    l0: torch.Tensor  # mean number of non-zero latents per token
    fired: torch.Tensor  # [M] bool: latents non-zero on some token of this batch
    sup: Optional[torch.Tensor] = None  # the concept-supervised term L_sup (None without supervision)


class Supervision(NamedTuple):
    """One batch's concept supervision for :func:`sae_step_loss` (see :mod:`saeuron.supervision`)."""

    weight: float  # concept_supervision
    latents: torch.Tensor  # [C*n] int64 reserved latent ids, concept-major
    targets: torch.Tensor  # [N, C] bool: the concepts of each row's prompt
    latents_per_concept: int


@torch.no_grad()
def batch_topk_select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK of dense pre-activations ``[N, M]``: the top ``k*N`` entries of the whole batch as
    per-row ``(indices [N, kmax], mask [N, kmax])``; padding slots have mask 0 (and index 0)."""
    n, m = pre.shape
    kk = min(k * n, n * m)
    flat = pre.reshape(-1).float().topk(kk, sorted=False).indices
    rows, cols = flat // m, flat % m
    order = torch.argsort(rows, stable=True)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=n)
    kmax = max(int(counts.max()), 1)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(kk, device=pre.device) - start[rows]
    idx = torch.zeros(n, kmax, dtype=torch.long, device=pre.device)
    mask = torch.zeros(n, kmax, dtype=torch.bool, device=pre.device)
    idx[rows, pos] = cols
    mask[rows, pos] = True
    return idx, mask


def _fvu(err: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return err.pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)


def sae_step_loss(sae: SparseAutoencoder, x: torch.Tensor, k: int, batch_topk: bool = True,
                  dead_mask: Optional[torch.Tensor] = None, auxk_alpha: float = 1 / 32,
                  dtype: Optional[torch.dtype] = None, supervision: Optional[Supervision] = None) -> StepOutput:
    """Training loss of one batch ``x [N, d]`` through the sparse ops (selection without grad, then
    ``gather_encode`` + ``sparse_decode``), with AuxK over the latents in ``dead_mask``; ``dtype``
    is the compute dtype (bf16/fp16 autocast; the parameters stay in their own dtype). ``supervision`` adds
    ``weight * L_sup`` over the reserved latents' dense pre-activations (:func:`saeuron.supervision.supervision_loss`)."""
    dtype = dtype or sae.dtype
    W_enc, b_enc, b_dec, W_dec = (p.to(dtype) for p in (sae.encoder.weight, sae.encoder.bias, sae.b_dec, sae.W_dec))
    xf = x.float()
    xa = x.to(dtype)
    with torch.no_grad():
        if batch_topk:
            pre = torch.relu((xa - b_dec) @ W_enc.t() + b_enc)
            idx, mask = batch_topk_select(pre, k)
            row_topk = pre.topk(k, dim=1, sorted=False).values if supervision is not None else None
            del pre
        else:
            row_topk, idx = ops.topk_encode(xa, W_enc.detach(), b_enc.detach(), b_dec.detach(), k)
            mask = None
    vals = ops.gather_encode(xa, W_enc, b_enc, b_dec, idx)
    if mask is not None:
        vals = vals * mask.to(vals.dtype)
    x_hat = ops.sparse_decode(vals, idx, W_dec, b_dec).float()
    fvu = _fvu(x_hat - xf, xf)
    loss, auxk = fvu, fvu.new_zeros(())
    num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
    if num_dead and auxk_alpha > 0:
        k_aux = x.shape[1] // 2
        scale = min(num_dead / k_aux, 1.0)
        dead = dead_mask.nonzero().squeeze(1)
        with torch.no_grad():  # dense pre-activations of the dead latents only
            pre_dead = torch.relu((xa - b_dec) @ W_enc[dead].t() + b_enc[dead])
            aux_idx = dead[pre_dead.topk(min(k_aux, num_dead), dim=1, sorted=False).indices]
            del pre_dead
        aux_vals = ops.gather_encode(xa, W_enc, b_enc, b_dec, aux_idx)
        e = (xf - x_hat).detach()
        e_hat = ops.sparse_decode(aux_vals, aux_idx, W_dec).float()
        auxk = scale * _fvu(e_hat - e, e)
        loss = fvu + auxk_alpha * auxk
    sup = None
    if supervision is not None:
        with torch.no_grad():
            thr = vals.detach()[mask].amin() if mask is not None else None  # BatchTopK's threshold
            theta = row_thresholds(row_topk, thr)
        R = supervision.latents
        z = (xa - b_dec.detach()) @ W_enc[R].t() + b_enc[R]  # [N, C*n] before the ReLU, differentiable
        sup = supervision_loss(z, supervision.targets, theta, supervision.latents_per_concept)
        loss = loss + supervision.weight * sup
        sup = sup.detach()
    with torch.no_grad():
        nz = vals.detach() > 0
        fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=x.device)
        fired[idx[nz]] = True
        l0 = nz.sum() / x.shape[0]
    return StepOutput(loss, fvu.detach(), auxk.detach(), l0, fired, sup)


def dead_fraction(tokens_since_fired: torch.Tensor, threshold: int) -> float:
    """Share of latents that have not fired for ``threshold`` tokens (0 when dead tracking is off)."""
    return (tokens_since_fired >= threshold).float().mean().item() if threshold > 0 else 0.0


def lr_at(step: int, total: int, lr: float, warmup: int = 0) -> float:
    """Learning rate of 0-based ``step``: linear warmup over ``warmup`` steps, linear decay to 0 at ``total``."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return lr * warm * max(0.0, 1.0 - step / max(total, 1))


# --------------------------------------------------------------------------- state

def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if _dist()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _params(sae) -> dict:
    return dict(zip(PARAM_NAMES, (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec)))


def _save_state(folder: Path, sae, opt, scaler, tokens_since_fired, meta: dict) -> None:
    """One atomic safetensors file (weights, Adam moments, counters; JSON metadata), then the SAE folder."""
    tensors = {f"sae.{n}": p.detach().cpu() for n, p in _params(sae).items()}
    for n, p in _params(sae).items():
        for key, v in opt.state.get(p, {}).items():
            tensors[f"adam.{n}.{key}"] = torch.as_tensor(v).detach().cpu()
    tensors["tokens_since_fired"] = tokens_since_fired.cpu()
    if scaler.is_enabled():
        sd = scaler.state_dict()
        meta = {**meta, "grad_scaler": {"scale": float(sd["scale"]), "growth_tracker": int(sd["_growth_tracker"])}}
    atomic_save_file(tensors, folder / STATE_FILE, metadata={"trainer_state": json.dumps(meta)})
    atomic_write_json(meta, folder / STATE_JSON)  # human-readable copy; resume reads the safetensors
    sae.save(folder)


def _load_state(folder: Path, sae, opt, device) -> tuple[dict, torch.Tensor]:
    """Restore weights and Adam state from ``folder/trainer_state.safetensors``; returns (meta, counters)."""
    from safetensors import safe_open

    path = folder / STATE_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["trainer_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"corrupt trainer state {path} ({type(e).__name__}: {e}); delete it or pass resume=False") from None
    with torch.no_grad():
        for n, p in _params(sae).items():
            p.copy_(tensors[f"sae.{n}"])
    state = {}
    for i, n in enumerate(PARAM_NAMES):
        if f"adam.{n}.exp_avg" in tensors:
            state[i] = {key.split(".")[-1]: v for key, v in tensors.items() if key.startswith(f"adam.{n}.")}
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)  # moves moments to the params' device, keeps `step` where Adam wants it
    return meta, tensors["tokens_since_fired"].to(device)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again).

    A line a kill or a full disk cut short (not valid JSON) is dropped with a warning, not fatal."""
    if not path.is_file():
        return
    keep, torn = [], []
    for i, ln in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            rec_step = rec.get("step", 0) if isinstance(rec, dict) else None
        except json.JSONDecodeError:
            rec_step = None
        if not isinstance(rec_step, int):
            torn.append(i)
        elif rec_step <= step:
            keep.append(ln)
    if torn:
        warnings.warn(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}), "
                      "e.g. cut short by a kill; the run resumes from its checkpoint")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


# --------------------------------------------------------------------------- the loop

def train(data, out_dir, hookpoint: Optional[str] = None, cfg: TrainConfig = TrainConfig(), *, device=None,
          progress: bool = True, resume: bool = True, concepts=None) -> SparseAutoencoder:
    """Train a TopK SAE on ``data`` (an ActivationStore hookpoint or a ``[N, d]`` tensor); checkpoints
    and resume state go to ``out_dir/<hookpoint>/`` (``out_dir`` itself when ``hookpoint`` is None).

    With ``cfg.concept_supervision > 0`` ``data`` must be an ActivationStore whose prompts carry concept labels, or
    ``concepts`` (``{concept: [prompt ids or prompts]}``, as for :func:`saeuron.selection.build_concept_file`) says
    which prompts belong to which concept; see :mod:`saeuron.supervision`."""
    cfg.validate()
    if concepts is not None and not cfg.concept_supervision:
        raise ValueError("concepts= only matters for concept-supervised training; set TrainConfig.concept_supervision "
                         "> 0 (e.g. 1.0), or leave concepts out")
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of ranks ({world})")
    local_bs = cfg.batch_size // world
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device() if world == 1 else rank % torch.cuda.device_count())
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    cdtype = amp_dtype(cfg.amp_dtype)
    batches = _batches(data, hookpoint, cfg.max_resident_shards)
    d_in, n_rows = batches.d_in(), batches.num_rows()
    epoch_steps = [batches.steps(local_bs, cfg.seed, e, world) for e in range(cfg.epochs)]
    if min(epoch_steps) < 1:
        raise ValueError(f"{n_rows} rows of data give fewer than one batch of {cfg.batch_size} tokens per epoch"
                         f"{f' over {world} ranks' if world > 1 else ''}; lower TrainConfig.batch_size")
    total = sum(epoch_steps)
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    if cfg.max_tokens is not None:
        total = min(total, max(int(cfg.max_tokens) // cfg.batch_size, 1))

    sae_cfg = SaeConfig(d_in=d_in, expansion_factor=cfg.expansion_factor, num_latents=cfg.num_latents, k=cfg.k)
    if not 1 <= cfg.k <= sae_cfg.latents:
        raise ValueError(f"k={cfg.k} must be between 1 and the number of latents {sae_cfg.latents}")
    member = None  # [P, C] prompt -> concepts, with concept supervision
    if cfg.concept_supervision:
        if not isinstance(batches, _StoreBatches):
            raise ValueError("concept supervision needs an ActivationStore (rows with prompt ids and concept labels), "
                             "not a tensor of tokens; or set TrainConfig.concept_supervision=0")
        names, member = membership(data, concepts)
        sae_cfg.concept_latents = reserve_latents(names, cfg.latents_per_concept, sae_cfg.latents, cfg.k)
    with torch.random.fork_rng(devices=[]):  # the init depends on cfg.seed only, not on global RNG state
        torch.manual_seed(cfg.seed)
        sae = SparseAutoencoder(sae_cfg)
    sae.to(device)
    params = list(_params(sae).values())
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, fused=device.type == "cuda" or None)
    tokens_since_fired = torch.zeros(sae_cfg.latents, dtype=torch.long, device=device)

    folder = Path(out_dir) / hookpoint if hookpoint is not None else Path(out_dir)
    lock = FolderLock(folder, "training an SAE in") if rank == 0 else None  # a second run into it fails clearly
    try:
        return _train_locked(batches, folder, hookpoint, cfg, device, progress, resume, rank, world, local_bs, cdtype,
                             d_in, epoch_steps, total, sae, opt, params, tokens_since_fired, sae_cfg, member)
    finally:
        if lock is not None:
            lock.release()


def _finite_rows(x: torch.Tensor, cdtype) -> torch.Tensor:
    """Rows of ``x`` that are finite, also after the cast to the compute dtype ``cdtype``."""
    ok = torch.isfinite(x).all(1)
    if cdtype is not None:
        ok &= torch.isfinite(x.to(cdtype)).all(1)
    return ok


def _train_locked(batches, folder, hookpoint, cfg, device, progress, resume, rank, world, local_bs, cdtype, d_in,
                  epoch_steps, total, sae, opt, params, tokens_since_fired, sae_cfg, member=None) -> SparseAutoencoder:
    """The training loop of :func:`train`, run while the output folder's lock is held."""
    step, epoch, pos, tokens = 0, 0, 0, 0
    skipped = 0  # rows dropped for NaN/Inf
    meta_fixed = {"d_in": d_in, "hookpoint": hookpoint, "world_size": world, "total_steps": total,
                  "epoch_steps": epoch_steps, "config": asdict(cfg)}
    supervised = member is not None
    if supervised:
        meta_fixed["concept_latents"] = sae_cfg.concept_latents
        reserved = torch.tensor([i for ids in sae_cfg.concept_latents.values() for i in ids], dtype=torch.long,
                                device=device)
        member = member.to(device)
    if resume and (folder / STATE_FILE).is_file():
        meta, tokens_since_fired = _load_state(folder, sae, opt, device)
        old = meta.get("config", {})
        keys = RESUME_KEYS + (STREAM_KEYS if isinstance(batches, _StoreBatches) else ())
        bad = [f"{k}: saved {old.get(k)!r}, now {getattr(cfg, k)!r}" for k in keys
               if old.get(k) != getattr(cfg, k) and (k in old or k in RESUME_KEYS)]
        for k, dflt in SUPERVISION_KEYS.items():  # absent in checkpoints of runs before the option: the default
            if (supervised or old.get("concept_supervision", 0.0)) and old.get(k, dflt) != getattr(cfg, k):
                bad.append(f"{k}: saved {old.get(k, dflt)!r}, now {getattr(cfg, k)!r}")
        if supervised and meta.get("concept_latents") != sae_cfg.concept_latents:
            bad.append(f"concept_latents: saved {meta.get('concept_latents')!r}, now {sae_cfg.concept_latents!r}")
        if meta.get("d_in") != d_in:
            bad.append(f"d_in: saved {meta.get('d_in')}, data has {d_in}")
        if bad:
            raise ValueError(f"cannot resume from {folder / STATE_FILE}: the run differs ({'; '.join(bad)}); "
                             f"use the same settings or pass resume=False")
        where = [k for k in ("step", "epoch", "batch_in_epoch", "tokens") if not isinstance(meta.get(k), int)
                 or isinstance(meta.get(k), bool) or meta.get(k) < 0]
        if where:
            raise ValueError(f"corrupt trainer state {folder / STATE_FILE}: {where} missing or not integers >= 0; "
                             "delete it or pass resume=False")
        step, epoch, pos, tokens = meta["step"], meta["epoch"], meta["batch_in_epoch"], meta["tokens"]
        skipped = int(meta.get("skipped_rows", 0))
        if rank == 0:
            _trim_metrics(folder / METRICS_FILE, step)
    resumed = step > 0
    scaler = torch.amp.GradScaler(device.type, enabled=cdtype == torch.float16)  # fp16 only: bf16 needs no scaling
    if resumed and scaler.is_enabled() and meta.get("grad_scaler"):
        gs = meta["grad_scaler"]
        scaler.load_state_dict({**scaler.state_dict(), "scale": gs["scale"], "_growth_tracker": gs["growth_tracker"]})
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not resumed and (folder / METRICS_FILE).exists():
            (folder / METRICS_FILE).unlink()

    def save():
        bad = [n for n, p in _params(sae).items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f"the SAE's {', '.join(bad)} hold NaN or Inf at step {step}: not saving it over "
                                     f"the last good checkpoint in {folder}; lower the learning rate or check the data")
        if rank == 0:
            _save_state(folder, sae, opt, scaler, tokens_since_fired,
                        {**meta_fixed, "step": step, "epoch": epoch, "batch_in_epoch": pos, "tokens": tokens,
                         "skipped_rows": skipped})

    bar = tqdm(total=total, initial=step, disable=not progress or rank != 0, desc=f"train {hookpoint or 'sae'}",
               dynamic_ncols=True)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # fvu, auxk, l0, steps since last log
    sup_sum = torch.zeros((), dtype=torch.float64, device=device)  # L_sup since last log (supervised runs)
    while step < total and epoch < cfg.epochs:
        if supervised:
            it = batches.iter(local_bs, cfg.seed, epoch, rank, world, pos, device, prompt_ids=True)
        else:
            it = batches.iter(local_bs, cfg.seed, epoch, rank, world, pos, device)
        while step < total:
            x = next(it, None) if pos < epoch_steps[epoch] else None
            pid = None
            if supervised and x is not None:
                x, pid = x
            if world > 1:  # ranks may hold unequal shares: all stop when one runs dry
                have = torch.tensor([x is not None], dtype=torch.int32, device=device)
                if int(_all_reduce_(have, dist.ReduceOp.MIN)) == 0:
                    x = None
            if x is None:
                break
            if x.dim() != 2 or x.shape[1] != d_in:
                raise ValueError(f"batch of shape {tuple(x.shape)} does not match d_in={d_in}")
            x = x.to(device)
            ok = _finite_rows(x, cdtype)
            if not bool(ok.all()):
                n_bad = int((~ok).sum())
                if n_bad == x.shape[0]:
                    raise ValueError(f"every row of training batch {pos} (epoch {epoch}) holds NaN or Inf"
                                     f"{' in ' + cdtype.__repr__() if cdtype is not None else ''}; the data at "
                                     f"{hookpoint or 'the given tensor'} is unusable: recollect it")
                if skipped == 0:
                    warnings.warn(f"training data holds rows with NaN or Inf (first seen: {n_bad} of {x.shape[0]} rows "
                                  f"of batch {pos}, epoch {epoch}); they are skipped and counted in "
                                  f"{METRICS_FILE} as 'skipped_rows'")
                skipped += n_bad
                x = x[ok]
                if pid is not None:
                    pid = pid[ok.to(pid.device)]
            if step == 0:  # b_dec = geometric median of the first batch; every rank starts from rank 0's weights
                sae.init_b_dec(x.float())
                if world > 1:
                    with torch.no_grad():
                        for p in params:
                            dist.broadcast(p.data, 0)

            dead = tokens_since_fired >= cfg.dead_tokens_threshold if cfg.dead_tokens_threshold else None
            sup = None
            if supervised:
                sup = Supervision(float(cfg.concept_supervision), reserved, member[pid.to(device)],
                                  cfg.latents_per_concept)
            out = sae_step_loss(sae, x, cfg.k, cfg.batch_topk, dead, cfg.auxk_alpha, cdtype, supervision=sup)
            scaler.scale(out.loss).backward()
            if world > 1:
                for p in params:
                    _all_reduce_(p.grad).div_(world)
            scaler.unscale_(opt)
            sae.set_decoder_norm_to_unit_norm()
            sae.remove_gradient_parallel_to_decoder_directions()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_steps)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sae.set_decoder_norm_to_unit_norm()

            fired = _all_reduce_(out.fired.to(torch.int32), dist.ReduceOp.MAX if world > 1 else None) > 0
            tokens_since_fired += x.shape[0] * world
            tokens_since_fired[fired] = 0
            step, pos, tokens = step + 1, pos + 1, tokens + x.shape[0] * world
            sums += torch.stack([out.fvu.double(), out.auxk.double(), out.l0.double(), sums.new_ones(())])
            if out.sup is not None:
                sup_sum += out.sup.double()
            if step % cfg.log_every == 0 or step == total:
                stats = _all_reduce_(sums.clone()) / world
                n = stats[3].item()
                rec = {"step": step, "tokens": tokens, "fvu": stats[0].item() / n, "auxk": stats[1].item() / n,
                       "l0": stats[2].item() / n,
                       "dead_frac": (dead_fraction(tokens_since_fired, cfg.dead_tokens_threshold)),
                       "lr": lr_at(step - 1, total, cfg.lr, cfg.warmup_steps), "skipped_rows": skipped}
                if supervised:
                    rec["sup"] = _all_reduce_(sup_sum.clone()).item() / world / n
                    sup_sum.zero_()
                sums.zero_()
                if not scaler.is_enabled() and not (math.isfinite(rec["fvu"]) and math.isfinite(rec["auxk"])):
                    # checked where the log already syncs (no extra host sync per step); every rank sees the same
                    # all-reduced numbers, so all stop together
                    raise FloatingPointError(f"the training loss became {rec['fvu']} at step {step} (fvu, logged "
                                             f"every {cfg.log_every} steps); nothing was saved past the last "
                                             f"checkpoint in {folder}: lower the learning rate or check the data")
                if rank == 0:
                    with open(folder / METRICS_FILE, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(fvu=f"{rec['fvu']:.4f}", auxk=f"{rec['auxk']:.4f}", dead=f"{rec['dead_frac']:.3f}")
            bar.update(1)
            if step % cfg.save_every == 0 and step < total:
                save()
        if hasattr(it, "close"):
            it.close()
        if step >= total:
            break
        epoch, pos = epoch + 1, 0
    bar.close()
    save()
    if world > 1:
        dist.barrier()
    return sae


__all__ = ["TrainConfig", "train", "sae_step_loss", "batch_topk_select", "lr_at", "StepOutput", "Supervision"]
