"""MiniCanvas classifiers: small CNNs for the object and the style of an image, trained on fresh renders.

They play the role of UnlearnCanvas' ViT judges: UA/IRA/CRA read their predictions, and the Frechet
distance reads their penultimate features (``SmallCNN.features``). Training draws a new batch of
renders every step (the generator is cheap), so there is no fixed training set to overfit.
Augmentation follows the task: the object classifier sees colour changes (channel shuffles, gray,
inversion, brightness and contrast), mild blur and noise, and small scale/shift; the style classifier
sees only the 8 flips/rotations and whole-pixel shifts, because palette, grain and blur *are* styles.

A checkpoint is a folder with ``classifier.safetensors`` (the state dict) and ``config.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..utils import atomic_save_file, atomic_write_json
from . import data, dataset

KINDS = ("object", "style")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "classifier.safetensors"
FORMAT = "saeuron-minicanvas-classifier"


def labels_for(kind: str) -> tuple:
    """Class names of a classifier kind: ``OBJECTS`` or ``STYLE_LABELS`` (styles + unstyled)."""
    if kind not in KINDS:
        raise ValueError(f"unknown classifier kind {kind!r}; valid: {', '.join(KINDS)}")
    return data.OBJECTS if kind == "object" else data.STYLE_LABELS


def _block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Four stages of 3x3 conv + BatchNorm + ReLU (widths w, 2w, 4w, 8w), global average pool, linear head."""

    def __init__(self, num_classes: int, width: int = 16, kind: Optional[str] = None, labels=None, size: int = 32):
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not (isinstance(width, int) and width >= 1):
            raise ValueError(f"width must be a positive int, got {width!r}")
        w = width
        self.body = nn.Sequential(
            *_block(3, w), *_block(w, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), *_block(4 * w, 4 * w), nn.MaxPool2d(2),
            *_block(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * w, num_classes)
        self.num_classes, self.width, self.kind, self.size = num_classes, width, kind, size
        self.labels = tuple(labels) if labels is not None else tuple(str(i) for i in range(num_classes))
        self.history: dict = {}

    @property
    def feature_dim(self) -> int:
        """Width of the penultimate features (``8 * width``)."""
        return self.head.in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 8w] of images in [0, 1] (for a Frechet distance on classifier features)."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] of float images [B, 3, H, W] in [0, 1]."""
        return self.head(self.features(images))

    def config(self) -> dict:
        """The JSON-able description needed to rebuild this model."""
        return dict(format=FORMAT, version=1, kind=self.kind, num_classes=self.num_classes, width=self.width,
                    size=self.size, labels=list(self.labels), history=self.history)


def build_classifier(num_classes: int, width: int = 16, kind: Optional[str] = None, size: int = 32) -> SmallCNN:
    """A fresh SmallCNN (about 290k parameters at width 16) with class names taken from ``kind`` if given."""
    labels = labels_for(kind) if kind is not None else None
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"kind {kind!r} has {len(labels)} classes but num_classes={num_classes}")
    return SmallCNN(num_classes, width, kind, labels, size)


# ---------------------------------------------------------------- augmentation

def augment_batch(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Task-appropriate random augmentation of a batch in [0, 1] (see the module docstring)."""
    labels_for(kind)
    x, B, S = images, images.shape[0], images.shape[-1]
    r = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    flip = r(B, 3) < 0.5                                       # the 8 symmetries of the square
    x = torch.where(flip[:, 0, None, None, None], x.flip(-1), x)
    x = torch.where(flip[:, 1, None, None, None], x.flip(-2), x)
    x = torch.where(flip[:, 2, None, None, None], x.transpose(-1, -2), x)
    if kind == "style":                                        # whole-pixel shifts only: no resampling blur
        shift = (torch.randint(-S // 8, S // 8 + 1, (B, 2), generator=generator).to(x.device).float() * 2 / S)
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    scale = 0.85 + 0.3 * r(B)
    ang = (r(B) - 0.5) * math.radians(30)
    theta = torch.stack([torch.stack([torch.cos(ang) * scale, -torch.sin(ang) * scale, (r(B) - 0.5) * 0.3], -1),
                         torch.stack([torch.sin(ang) * scale, torch.cos(ang) * scale, (r(B) - 0.5) * 0.3], -1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                      padding_mode="border", align_corners=False)
    perm = torch.argsort(r(B, 3), 1)                           # channel shuffle
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gray = (r(B) < 0.2)[:, None, None, None]
    x = torch.where(gray, x.mean(1, keepdim=True).expand_as(x), x)
    inv = (r(B) < 0.2)[:, None, None, None]
    x = torch.where(inv, 1 - x, x)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.75 + 0.5 * r(B, 1, 1, 1)) + mean + 0.2 * (r(B, 1, 1, 1) - 0.5)
    blur = (r(B) < 0.15)[:, None, None, None]
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
    x = x + 0.04 * r(B, 1, 1, 1) * torch.randn(x.shape, generator=generator).to(x.device)
    return x.clamp(0, 1)


# ---------------------------------------------------------------- training and use

def _prepare(images: torch.Tensor, size: int, device) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor [B, 3, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    x = images.to(device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_classifier(kind: str, steps: int = 2000, batch_size: int = 128, size: int = 32, seed: int = 0,
                     device="cpu", progress: bool = True, augment: bool = True, width: int = 16,
                     lr: float = 3e-3) -> SmallCNN:
    """Train an object or style classifier on fresh train-split renders; returns it in eval mode.

    ``model.history["loss"]`` holds the loss of every step.
    """
    labels = labels_for(kind)
    if not (isinstance(steps, int) and steps >= 1 and isinstance(batch_size, int) and batch_size >= 2):
        raise ValueError(f"steps must be >= 1 and batch_size >= 2, got steps={steps!r}, batch_size={batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(len(labels), width, kind, size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=f"train {kind} classifier", disable=not progress):
        images, oid, sid, _ = dataset.sample_batch(batch_size, g, "train", size)
        y = (oid if kind == "object" else sid).to(device)
        x = images.to(device)
        if augment:
            x = augment_batch(x, kind, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 5))
    model.eval()
    model.history = dict(loss=losses, steps=steps, batch_size=batch_size, seed=seed, augment=augment)
    return model


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids [B] (eval mode, batched, on the model's device)."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(_prepare(images[i:i + batch_size], model.size, dev)).argmax(-1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def features(model: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features [B, feature_dim] of images (batched) for a Frechet distance."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model.features(_prepare(images[i:i + batch_size], model.size, dev)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.feature_dim)


def evaluate(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Accuracy (0..1) of a classifier on images with integer labels."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if len(labels) != len(images) or len(labels) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(labels)} and {len(images)}")
    return (predict(model, images, batch_size) == labels).float().mean().item()


def heldout_accuracy(model: SmallCNN, n: int = 2000, seed: int = 1234, size: Optional[int] = None) -> float:
    """Accuracy on ``n`` fresh renders from the held-out seed range (the >= 99 % gate)."""
    labels_for(model.kind)
    g = torch.Generator().manual_seed(seed)
    images, oid, sid, _ = dataset.sample_batch(n, g, "heldout", size or model.size)
    return evaluate(model, images, oid if model.kind == "object" else sid)


def classify(models: dict, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Predictions of several classifiers, e.g. ``{"object": m1, "style": m2}`` -> ``{kind: ids [B]}``."""
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict such as {'object': model, 'style': model}")
    return {k: predict(m, images, batch_size) for k, m in models.items()}


# ---------------------------------------------------------------- save / load

def save_classifier(model: SmallCNN, path) -> Path:
    """Write ``classifier.safetensors`` and ``config.json`` into the folder ``path`` (atomically)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save_file(state, path / WEIGHTS_FILE, metadata={"format": FORMAT})
    atomic_write_json(model.config(), path / CONFIG_FILE)
    return path


def load_classifier(path, device="cpu") -> SmallCNN:
    """Load a folder written by ``save_classifier``; clear errors for missing or corrupt files."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"classifier checkpoint {path} is missing {name} (expected {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        model = SmallCNN(cfg["num_classes"], cfg["width"], cfg.get("kind"), cfg.get("labels"), cfg.get("size", 32))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt classifier config {path / CONFIG_FILE}: {e!r}") from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a MiniCanvas classifier config (format={cfg.get('format')!r})")
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"corrupt classifier weights {path / WEIGHTS_FILE}: could not be read as safetensors "
                         f"({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"classifier weights {path / WEIGHTS_FILE} do not match {path / CONFIG_FILE}: {e}") from None
    model.history = cfg.get("history", {})
    return model.to(device).eval()


def load_classifiers(root, device="cpu") -> dict:
    """``{"object": model, "style": model}`` from ``root/object`` and ``root/style``."""
    return {k: load_classifier(Path(root) / k, device) for k in KINDS}
