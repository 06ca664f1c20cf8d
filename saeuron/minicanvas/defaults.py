"""The shipped MiniCanvas defaults: model, classifiers, SAE(s) and concept file inside the package.

They live in ``saeuron/minicanvas/assets/`` (package data), written by ``saeuron minicanvas build``::

    assets/model/          MiniCanvasPipeline (save_pretrained, fp16 safetensors)
    assets/classifiers/    object/ and style/ judges
    assets/checkpoint/     one SAE folder per hookpoint + concepts.json/concepts.safetensors (+ detectors.*)
    assets/gates.json      the classifier gates as measured
    assets/BUILD.json      seed, config, command, settings and versions of the build
"""
from __future__ import annotations

import json
import os
from pathlib import Path

BUILD_HINT = "run `saeuron minicanvas build` (see docs) to produce them"


def assets_dir() -> Path:
    """The folder of the shipped defaults: ``$SAEURON_MINICANVAS_ASSETS`` if set, else ``saeuron/minicanvas/assets``."""
    override = os.environ.get("SAEURON_MINICANVAS_ASSETS")
    return Path(override) if override else Path(__file__).resolve().parent / "assets"


def available() -> bool:
    """Whether the shipped defaults (model, classifiers, checkpoint) are all there."""
    root = assets_dir()
    return all((root / p).exists() for p in ("model/model_index.json", "classifiers", "checkpoint/concepts.json"))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"the MiniCanvas {what} is not built: {path} is missing; {BUILD_HINT}")
    return path


def model_dir() -> Path:
    """The shipped pipeline folder (clear error when the defaults are not built)."""
    return _require(assets_dir() / "model" / "model_index.json", "model").parent


def checkpoint_dir() -> Path:
    """The shipped SAE + concept-file folder, as ``saeuron.patch(pipe, concept, checkpoint=...)`` takes it."""
    return _require(assets_dir() / "checkpoint" / "concepts.json", "SAE checkpoint / concept file").parent


def load_pipeline(device=None, dtype=None):
    """The shipped MiniCanvasPipeline (fp32 unless ``dtype`` says otherwise; on ``device`` if given)."""
    import torch

    from .model import load_pipeline as _load

    return _load(model_dir(), device=device, dtype=dtype or torch.float32)


def load_classifiers(device="cpu") -> dict:
    """The shipped ``{"object": SmallCNN, "style": SmallCNN}`` judges."""
    from .classifiers import load_classifiers as _load

    return _load(_require(assets_dir() / "classifiers", "classifiers"), device)


def build_info() -> dict:
    """The shipped ``BUILD.json`` (seed, config, command, settings, stage times, gates)."""
    return json.loads(_require(assets_dir() / "BUILD.json", "build record").read_text())


def gates() -> dict:
    """The shipped ``gates.json``: held-out and generated-image accuracy of the classifiers, as measured."""
    return json.loads(_require(assets_dir() / "gates.json", "gate report").read_text())


__all__ = ["assets_dir", "available", "model_dir", "checkpoint_dir", "load_pipeline", "load_classifiers", "build_info", "gates"]
