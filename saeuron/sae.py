"""The TopK sparse autoencoder: config, encode/decode, save/load in the sparsify/SAeUron layout.

A checkpoint is one folder per hookpoint holding ``cfg.json`` (config fields + ``d_in``) and
``sae.safetensors`` with ``encoder.weight [M, d]``, ``encoder.bias [M]``, ``W_dec [M, d]`` and
``b_dec [d]``: the layout of EleutherAI's sparsify and of the published SAeUron checkpoints, so
those load unchanged.

Two optional parts of those layouts are implemented:

- ``skip_connection`` (sparsify): a linear skip ``W_skip [d, d]`` added to the reconstruction,
  ``x_hat = f W_dec + b_dec + x W_skip^T``. The edit ``x + decode(f') - decode(f)`` does not involve it.
- ``input_unit_norm`` (the published SAeUron code): each token is standardised before encoding,
  ``x_n = (x - mean(x)) / (std(x) + 1e-5)`` (mean and unbiased std over the d channels), the SAE runs on
  ``x_n``, and the reconstruction is mapped back, ``x_hat = x_hat_n * (std(x) + 1e-5) + mean(x)``.

One optional field records a training choice that does not change the math: ``concept_latents``
(``{concept: [latent ids]}``, written by concept-supervised training, :mod:`saeuron.supervision`), the latents
reserved for each concept; a checkpoint without it is unsupervised.

Any other cfg.json field that would change the math (sparsify's ``activation="groupmax"``,
``transcode``, SAeUron's ``sample_topk``, or a field saeuron does not know, set to a non-empty value)
is refused at load with an error naming it, rather than loaded and computed wrongly.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import ops
from .hookpoints import hookpoint_spellings
from .utils import atomic_save_file, atomic_write_json, looks_like_path, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
UNIT_NORM_EPS = 1e-5  # the published SAeUron code's: x_n = (x - mean) / (std + 1e-5)
# cfg.json fields that only steer training (the encode/decode math is the same): accepted with any value
TRAINING_ONLY_FIELDS = ("multi_topk", "batch_topk")
# fields whose math saeuron does not implement, and what they would need
UNSUPPORTED_FIELDS = {"activation": "only activation='topk' is implemented (sparsify's 'groupmax' is not)",
                      "transcode": "transcoders (predicting another module's output) are not implemented",
                      "sample_topk": "per-sample TopK (SAeUron's sample_topk) is not implemented; per-token TopK is"}


def _int_field(d: dict, name: str, lo: int) -> int:
    """``d[name]`` as an int >= ``lo``, else a clear error naming the cfg.json field."""
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"cfg.json field {name!r} must be an integer >= {lo}, got {v!r}")
    return v


def _check_fields(d: dict) -> None:
    """Refuse cfg.json fields whose math is not implemented, naming the field."""
    for name, value in d.items():
        if name in UNSUPPORTED_FIELDS:
            ok = value in (None, False, 0, "topk") if name == "activation" else not value
            if not ok:
                raise ValueError(f"cfg.json field {name}={value!r} is not supported: {UNSUPPORTED_FIELDS[name]}")
        elif name not in _KNOWN and name not in TRAINING_ONLY_FIELDS and value not in (None, False, 0, "", [], {}):
            raise ValueError(f"cfg.json field {name}={value!r} is unknown to saeuron, so the checkpoint's math cannot "
                             f"be reproduced; known fields: {', '.join(sorted(_KNOWN | set(TRAINING_ONLY_FIELDS)))}")


@dataclass
class SaeConfig:
    """SAE hyperparameters. ``num_latents`` wins over ``expansion_factor`` when non-zero."""

    d_in: int
    expansion_factor: int = 16
    num_latents: int = 0
    k: int = 32
    normalize_decoder: bool = True
    input_unit_norm: bool = False  # standardise each token before encoding (published SAeUron code)
    skip_connection: bool = False  # sparsify's linear skip W_skip [d, d]
    concept_latents: Optional[dict] = None  # {concept: [latent ids]} reserved by concept-supervised training
    extra: dict = field(default_factory=dict)  # other cfg.json fields (training-only or disabled), kept for round trips

    @property
    def latents(self) -> int:
        """Dictionary size M: ``num_latents`` if set, else ``d_in * expansion_factor``."""
        return self.num_latents or self.d_in * self.expansion_factor

    def to_json(self) -> dict:
        """The cfg.json fields (extra fields first, then the known ones)."""
        d = asdict(self)
        extra = d.pop("extra")
        if not d["concept_latents"]:  # unsupervised: cfg.json exactly as before the field existed
            del d["concept_latents"]
        return {**extra, **d}

    @classmethod
    def from_json(cls, d: dict) -> "SaeConfig":
        """Parse a cfg.json dict; missing or ill-typed fields and unimplemented features raise, naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"cfg.json must hold a JSON object, got {type(d).__name__}")
        for name in ("d_in", "k"):
            if name not in d:
                raise ValueError(f"cfg.json has no {name!r} field (fields found: {sorted(d)}); it is required: "
                                 "a default could silently differ from what the SAE was trained with")
        _int_field(d, "d_in", 1)
        _int_field(d, "k", 1)
        for name in ("expansion_factor", "num_latents"):
            if name in d:
                _int_field(d, name, 0)
        for name in ("normalize_decoder", "input_unit_norm", "skip_connection"):
            if name in d and not isinstance(d[name], bool):
                raise ValueError(f"cfg.json field {name!r} must be true or false, got {d[name]!r}")
        _check_fields(d)
        if d.get("concept_latents") is not None:
            check_concept_latents(d["concept_latents"])
        if not d.get("num_latents") and not d.get("expansion_factor", 16):
            raise ValueError("cfg.json needs num_latents > 0 or expansion_factor > 0")
        return cls(**{k: v for k, v in d.items() if k in _KNOWN}, extra={k: v for k, v in d.items() if k not in _KNOWN})


_KNOWN = {f.name for f in fields(SaeConfig)} - {"extra"}


def check_concept_latents(value, num_latents: Optional[int] = None) -> dict:
    """``value`` if it is a ``{concept: [distinct latent ids >= 0 (and < num_latents)]}`` dict whose concepts share
    no latent, else a ValueError naming the problem (the cfg.json field ``concept_latents``)."""
    if not isinstance(value, dict):
        raise ValueError(f"cfg.json field 'concept_latents' must be an object {{concept: [latent ids]}}, got {value!r}")
    seen: dict = {}
    for name, ids in value.items():
        ok = isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        if not ok:
            raise ValueError(f"cfg.json field 'concept_latents': concept {name!r} needs a non-empty list of latent ids "
                             f">= 0, got {ids!r}")
        for i in ids:
            if num_latents is not None and i >= num_latents:
                raise ValueError(f"cfg.json field 'concept_latents': latent {i} of concept {name!r} is outside the "
                                 f"SAE's {num_latents} latents")
            if i in seen:
                raise ValueError(f"cfg.json field 'concept_latents': latent {i} is reserved for both {seen[i]!r} "
                                 f"and {name!r}")
            seen[i] = name
    return value


class EncoderOutput(NamedTuple):
    values: torch.Tensor  # [N, k]
    indices: torch.Tensor  # [N, k] int64


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of x."""
    x = x.float()
    x = x[torch.isfinite(x).all(-1)]
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * (y.norm() + eps):
            y = y_new
            break
        y = y_new
    return y


class SparseAutoencoder(nn.Module):
    """TopK SAE (method.md section 2): ``f = TopK(ReLU(W_enc (x - b_dec) + b_enc))``, ``x_hat = f W_dec + b_dec``."""

    def __init__(self, cfg: SaeConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d_in, cfg.latents
        self.encoder = nn.Linear(d, m, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        if cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d, d, device=device, dtype=dtype)) if cfg.skip_connection else None
        self._cache: dict = {}

    # -- shapes
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.latents

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    def _check_width(self, x: torch.Tensor):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input width {x.shape[-1]} does not match this SAE's d_in={self.d_in}")

    # -- math
    def preprocess(self, x: torch.Tensor) -> tuple:
        """``(x_n, mean, scale)``: the SAE's input space. With ``input_unit_norm`` each token is standardised,
        ``x_n = (x - mean) / scale`` with ``scale = std + 1e-5``; otherwise ``(x, None, None)``."""
        if not self.cfg.input_unit_norm:
            return x, None, None
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        scale = xf.std(-1, keepdim=True) + UNIT_NORM_EPS
        return ((xf - mean) / scale).to(x.dtype), mean, scale

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense ReLU pre-activations ``[N, M]`` (fp32). For statistics and training selection."""
        self._check_width(x)
        xn = self.preprocess(x.to(self.dtype))[0]
        return torch.relu((xn - self.b_dec) @ self.encoder.weight.t() + self.encoder.bias).float()

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Per-token top-k codes of ``x [..., d]`` flattened to ``[N, k]``, through the fast ops."""
        self._check_width(x)
        x2 = self.preprocess(x.reshape(-1, self.d_in).to(self.dtype))[0]
        vals, idx = ops.topk_encode(x2, self.encoder.weight, self.encoder.bias, self.b_dec, self.cfg.k)
        return EncoderOutput(vals, idx)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_j values_j W_dec[indices_j] + b_dec`` (differentiable, sparse backward).

        This is the code's part of the reconstruction, in the SAE's input space: ``forward`` adds the
        skip connection and undoes ``input_unit_norm``, which need the input itself."""
        return ops.sparse_decode(values.to(self.dtype), indices, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Encode and reconstruct ``x [..., d]``: ``x_hat`` (skip connection and input_unit_norm included)."""
        self._check_width(x)
        x2 = x.reshape(-1, self.d_in).to(self.dtype)
        xn, mean, scale = self.preprocess(x2)
        vals, idx = ops.topk_encode(xn, self.encoder.weight, self.encoder.bias, self.b_dec, self.cfg.k)
        x_hat = self.decode(vals, idx)
        if self.W_skip is not None:
            x_hat = x_hat + xn @ self.W_skip.t()
        if mean is not None:
            x_hat = (x_hat.float() * scale + mean).to(x_hat.dtype)
        return ForwardOutput(x_hat.reshape(x.shape), vals, idx)

    @torch.no_grad()
    def fvu(self, x: torch.Tensor) -> float:
        """Fraction of variance unexplained on ``x`` (1 - R^2)."""
        x2 = x.reshape(-1, self.d_in).to(self.dtype).float()
        x_hat = self.forward(x2.to(self.dtype)).x_hat.float()
        return float((x_hat - x2).pow(2).sum() / (x2 - x2.mean(0)).pow(2).sum().clamp_min(1e-12))

    # -- training helpers
    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """``b_dec`` = geometric median of a first batch of activations (method.md section 2)."""
        self.b_dec.data.copy_(geometric_median(x.reshape(-1, self.d_in)).to(self.b_dec.dtype))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norm = self.W_dec.data.norm(dim=1, keepdim=True)
        self.W_dec.data /= norm.clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data

    # -- inference weights
    def weights_for(self, device, dtype) -> tuple:
        """``(W_enc, b_enc, b_dec, W_dec)`` on ``device``/``dtype``, cached (patch time, not per call)."""
        key = (torch.device(device), dtype, self.encoder.weight._version, self.W_dec._version)
        hit = self._cache.get("w")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                w = tuple(t.detach().to(device=device, dtype=dtype).contiguous()
                          for t in (self.encoder.weight, self.encoder.bias, self.b_dec, self.W_dec))
            self._cache["w"] = (key, w)
        return self._cache["w"][1]

    # -- checks
    def validate(self) -> "SparseAutoencoder":
        """Raise a clear error when this SAE cannot compute: weights on the meta device or holding NaN/Inf,
        or ``k`` not an integer in [1, num_latents]; returns self."""
        if self.device.type == "meta":
            raise ValueError("the SAE's weights are on the meta device (not loaded): load it with "
                             "SparseAutoencoder.load or move real weights in with load_state_dict/to_empty")
        k = self.cfg.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_latents:
            raise ValueError(f"the SAE's k={k!r} must be an integer in [1, {self.num_latents}]")
        bad = [n for n, t in self.state_for_disk().items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"the SAE's {', '.join(bad)} hold NaN or Inf: the weights are corrupt")
        return self

    def fingerprint(self, dtype: Optional[torch.dtype] = None) -> str:
        """SHA-256 (hex, 16 chars) of this SAE's math: k, its flags and its weights cast to ``dtype`` (default:
        its own). Concept files record it, so statistics are never used with another SAE."""
        dtype = dtype or self.dtype
        state = self.state_for_disk()
        key = (dtype, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in state.values()))
        hit = self._cache.get(("fp", dtype))
        if hit is not None and hit[0] == key:
            return hit[1]
        h = hashlib.sha256()
        h.update(json.dumps({"k": self.cfg.k, "input_unit_norm": self.cfg.input_unit_norm,
                             "skip_connection": self.cfg.skip_connection, "dtype": str(dtype)}).encode())
        for name, t in state.items():
            t = t.detach().to("cpu", dtype).contiguous().reshape(-1)
            h.update(name.encode() + b"\0" + str(tuple(state[name].shape)).encode() + b"\0")
            h.update(t.view(torch.uint8).numpy().tobytes())
        out = h.hexdigest()[:16]
        self._cache[("fp", dtype)] = (key, out)
        return out

    # -- persistence
    def state_for_disk(self) -> dict:
        """The checkpoint tensors by their sparsify names (``W_skip`` too with a skip connection)."""
        out = {"encoder.weight": self.encoder.weight.detach().contiguous(),
               "encoder.bias": self.encoder.bias.detach().contiguous(),
               "W_dec": self.W_dec.detach().contiguous(), "b_dec": self.b_dec.detach().contiguous()}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip.detach().contiguous()
        return out

    def save(self, path) -> Path:
        """Write ``path/cfg.json`` and ``path/sae.safetensors`` atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_file({k: v.cpu() for k, v in self.state_for_disk().items()}, path / WEIGHTS_FILE)
        atomic_write_json(self.cfg.to_json(), path / CFG_FILE)
        return path

    @classmethod
    def load(cls, path, device="cpu", dtype: Optional[torch.dtype] = None) -> "SparseAutoencoder":
        """Load one hookpoint folder (``cfg.json`` + ``sae.safetensors``) with clear errors."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
        if not path.is_dir():
            raise FileNotFoundError(f"SAE checkpoint folder {path} does not exist")
        for name in (CFG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"SAE checkpoint {path} is missing {name} (expected {CFG_FILE} and {WEIGHTS_FILE})")
        try:
            raw = read_json(path / CFG_FILE, "SAE config")
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint: {e}") from None
        try:
            cfg = SaeConfig.from_json(raw)
        except ValueError as e:
            raise ValueError(f"SAE checkpoint {path}: {e}") from None
        try:
            state = load_file(str(path / WEIGHTS_FILE), device=str(device) if device is not None else "cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"corrupt checkpoint: {path / WEIGHTS_FILE} could not be read as safetensors ({e})") from None
        names = TENSOR_NAMES + (("W_skip",) if cfg.skip_connection else ())
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"corrupt checkpoint: {path / WEIGHTS_FILE} lacks {missing}; found {sorted(state)}")
        unused = [n for n in state if n not in names]
        if unused:  # a tensor we would ignore changes the math we would not compute
            raise ValueError(f"checkpoint {path / WEIGHTS_FILE} holds tensors {unused} that cfg.json does not "
                             f"account for (expected {list(names)}); e.g. W_skip needs \"skip_connection\": true")
        for n in names:
            if not state[n].is_floating_point() or state[n].dim() != (1 if n in ("encoder.bias", "b_dec") else 2):
                raise ValueError(f"corrupt checkpoint: {n} is {state[n].dtype} {tuple(state[n].shape)}; "
                                 f"expected a floating point {'vector' if n in ('encoder.bias', 'b_dec') else 'matrix'}")
        m, d = state["encoder.weight"].shape
        if d != cfg.d_in:
            raise ValueError(f"corrupt checkpoint: encoder.weight is [{m}, {d}] but cfg.json says d_in={cfg.d_in}")
        expect = {"encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,), "W_skip": (d, d)}
        for n in names[1:]:
            if tuple(state[n].shape) != expect[n]:
                raise ValueError(f"corrupt checkpoint: {n} has shape {tuple(state[n].shape)}, expected {expect[n]}")
        bad = [n for n in names if not bool(torch.isfinite(state[n]).all())]
        if bad:
            raise ValueError(f"corrupt checkpoint: {path / WEIGHTS_FILE} holds NaN or Inf in {bad}")
        if cfg.num_latents and cfg.num_latents != m:
            raise ValueError(f"corrupt checkpoint {path}: cfg.json num_latents={cfg.num_latents} but the tensors "
                             f"hold {m} latents")
        if cfg.latents != m:  # sparsify stores expansion_factor; trust the tensors
            cfg.num_latents = m
        if cfg.k > m:
            raise ValueError(f"corrupt checkpoint {path}: cfg.json k={cfg.k} exceeds the {m} latents")
        if cfg.concept_latents is not None:
            try:
                check_concept_latents(cfg.concept_latents, m)
            except ValueError as e:
                raise ValueError(f"corrupt checkpoint {path}: {e}") from None
        dtype = dtype or state["encoder.weight"].dtype
        sae = cls(cfg, device="meta")
        sae.to_empty(device=device)
        with torch.no_grad():
            sae.encoder.weight.copy_(state["encoder.weight"])
            sae.encoder.bias.copy_(state["encoder.bias"])
            sae.W_dec.copy_(state["W_dec"])
            sae.b_dec.copy_(state["b_dec"])
            if sae.W_skip is not None:
                sae.W_skip.copy_(state["W_skip"])
        return sae.to(dtype)

    @classmethod
    def from_pretrained(cls, name_or_path, hookpoint: Optional[str] = None, device="cpu",
                        dtype: Optional[torch.dtype] = None) -> "SparseAutoencoder":
        """Load from a local folder (offline) or a Hugging Face hub repo id (downloads where a network exists).

        ``name_or_path`` may be a hookpoint folder itself, or a checkpoint folder/repo holding one
        folder per hookpoint, in which case ``hookpoint`` names it (``unet.``-prefixed names match too).
        """
        root = Path(name_or_path)
        if not root.exists():
            name = str(name_or_path)
            if name.count("/") != 1 or looks_like_path(name):  # not a hub id "owner/repo"
                raise FileNotFoundError(f"no SAE checkpoint at {name_or_path} (not a folder, nor a hub id 'owner/repo')")
            from huggingface_hub import snapshot_download

            patterns = None if hookpoint is None else [f"{n}/*" for n in hookpoint_spellings(hookpoint)]
            root = Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
        return cls.load(resolve_hookpoint_dir(root, hookpoint), device=device, dtype=dtype)


def resolve_hookpoint_dir(root: Path, hookpoint: Optional[str]) -> Path:
    """The folder of ``hookpoint`` under ``root`` (or ``root`` itself when it holds cfg.json)."""
    root = Path(root)
    if hookpoint is None:
        if (root / CFG_FILE).is_file():
            return root
        raise ValueError(f"{root} holds several hookpoints; name one of: {', '.join(available_hookpoint_dirs(root)) or '(none)'}")
    for cand in dict.fromkeys((hookpoint,) + hookpoint_spellings(hookpoint)):  # as given first, then each spelling
        if (root / cand / CFG_FILE).is_file():
            return root / cand
    raise ValueError(f"no SAE for hookpoint {hookpoint!r} in {root}; available: "
                     f"{', '.join(available_hookpoint_dirs(root)) or '(none)'}")


def available_hookpoint_dirs(root: Path) -> list:
    return sorted(p.name for p in Path(root).iterdir() if (p / CFG_FILE).is_file()) if Path(root).is_dir() else []
