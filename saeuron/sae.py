"""The TopK sparse autoencoder: config, encode/decode, save/load in the sparsify/SAeUron layout.

A checkpoint is one folder per hookpoint holding ``cfg.json`` (config fields + ``d_in``) and
``sae.safetensors`` with ``encoder.weight [M, d]``, ``encoder.bias [M]``, ``W_dec [M, d]`` and
``b_dec [d]``: the layout of EleutherAI's sparsify and of the published SAeUron checkpoints, so
those load unchanged.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import ops
from .utils import atomic_write_json, atomic_save_file

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


@dataclass
class SaeConfig:
    """SAE hyperparameters. ``num_latents`` wins over ``expansion_factor`` when non-zero."""

    d_in: int
    expansion_factor: int = 16
    num_latents: int = 0
    k: int = 32
    normalize_decoder: bool = True
    extra: dict = field(default_factory=dict)  # unknown cfg.json fields, kept for round trips

    @property
    def latents(self) -> int:
        return self.num_latents or self.d_in * self.expansion_factor

    def to_json(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_json(cls, d: dict) -> "SaeConfig":
        if "d_in" not in d:
            raise ValueError(f"cfg.json has no 'd_in' field (fields found: {sorted(d)})")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})


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
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense ReLU pre-activations ``[N, M]`` (fp32). For statistics and training selection."""
        self._check_width(x)
        return torch.relu((x.to(self.dtype) - self.b_dec) @ self.encoder.weight.t() + self.encoder.bias).float()

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Per-token top-k codes of ``x [..., d]`` flattened to ``[N, k]``, through the fast ops."""
        self._check_width(x)
        x2 = x.reshape(-1, self.d_in).to(self.dtype)
        vals, idx = ops.topk_encode(x2, self.encoder.weight, self.encoder.bias, self.b_dec, self.cfg.k)
        return EncoderOutput(vals, idx)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``x_hat = sum_j values_j W_dec[indices_j] + b_dec`` (differentiable, sparse backward)."""
        return ops.sparse_decode(values.to(self.dtype), indices, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        vals, idx = self.encode(x)
        return ForwardOutput(self.decode(vals, idx).reshape(x.shape), vals, idx)

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

    # -- persistence
    def state_for_disk(self) -> dict:
        return {"encoder.weight": self.encoder.weight.detach().contiguous(),
                "encoder.bias": self.encoder.bias.detach().contiguous(),
                "W_dec": self.W_dec.detach().contiguous(), "b_dec": self.b_dec.detach().contiguous()}

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
        if not path.is_dir():
            raise FileNotFoundError(f"SAE checkpoint folder {path} does not exist")
        for name in (CFG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"SAE checkpoint {path} is missing {name} (expected {CFG_FILE} and {WEIGHTS_FILE})")
        try:
            cfg = SaeConfig.from_json(json.loads((path / CFG_FILE).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt checkpoint: {path / CFG_FILE} is not valid JSON ({e})") from None
        try:
            state = load_file(str(path / WEIGHTS_FILE), device=str(device) if device is not None else "cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"corrupt checkpoint: {path / WEIGHTS_FILE} could not be read as safetensors ({e})") from None
        missing = [n for n in TENSOR_NAMES if n not in state]
        if missing:
            raise ValueError(f"corrupt checkpoint: {path / WEIGHTS_FILE} lacks {missing}; found {sorted(state)}")
        m, d = state["encoder.weight"].shape
        if d != cfg.d_in:
            raise ValueError(f"corrupt checkpoint: encoder.weight is [{m}, {d}] but cfg.json says d_in={cfg.d_in}")
        expect = {"encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
        for n, shape in expect.items():
            if tuple(state[n].shape) != shape:
                raise ValueError(f"corrupt checkpoint: {n} has shape {tuple(state[n].shape)}, expected {shape}")
        if cfg.latents != m:  # sparsify stores expansion_factor; trust the tensors
            cfg.num_latents = m
        dtype = dtype or state["encoder.weight"].dtype
        sae = cls(cfg, device="meta")
        sae.to_empty(device=device)
        with torch.no_grad():
            sae.encoder.weight.copy_(state["encoder.weight"])
            sae.encoder.bias.copy_(state["encoder.bias"])
            sae.W_dec.copy_(state["W_dec"])
            sae.b_dec.copy_(state["b_dec"])
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
            if name.count("/") != 1 or name.startswith((".", "/", "~")):  # not a hub id "owner/repo"
                raise FileNotFoundError(f"no SAE checkpoint at {name_or_path} (not a folder, nor a hub id 'owner/repo')")
            from huggingface_hub import snapshot_download

            patterns = None if hookpoint is None else [f"{hookpoint}/*", f"unet.{hookpoint}/*"]
            root = Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
        return cls.load(resolve_hookpoint_dir(root, hookpoint), device=device, dtype=dtype)


def resolve_hookpoint_dir(root: Path, hookpoint: Optional[str]) -> Path:
    """The folder of ``hookpoint`` under ``root`` (or ``root`` itself when it holds cfg.json)."""
    root = Path(root)
    if hookpoint is None:
        if (root / CFG_FILE).is_file():
            return root
        raise ValueError(f"{root} holds several hookpoints; name one of: {', '.join(available_hookpoint_dirs(root)) or '(none)'}")
    for cand in (hookpoint, f"unet.{hookpoint}", hookpoint.removeprefix("unet.")):
        if (root / cand / CFG_FILE).is_file():
            return root / cand
    raise ValueError(f"no SAE for hookpoint {hookpoint!r} in {root}; available: "
                     f"{', '.join(available_hookpoint_dirs(root)) or '(none)'}")


def available_hookpoint_dirs(root: Path) -> list:
    return sorted(p.name for p in Path(root).iterdir() if (p / CFG_FILE).is_file()) if Path(root).is_dir() else []
