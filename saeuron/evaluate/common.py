"""Shared pieces of the evaluation layer: the SAEs and concept table to patch with, batched sampling, judging."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import pipelines, replace
from ..concepts import ConceptTable
from .protocol import EVAL_SEEDS  # noqa: F401  (re-exported: the evaluation modules read it here)
from ..hookpoints import normalize_hookpoint
from ..sae import SparseAutoencoder, available_hookpoint_dirs, resolve_hookpoint_dir



PATCH_KEYS = ("multiplier", "percentile", "top_n", "threshold", "hookpoints", "halves", "error_term", "mode", "gate",
              "detectors", "anchor")


def check_patch_kwargs(kwargs: dict, exclude=()) -> dict:
    """``kwargs`` if every key is a :func:`saeuron.patching.patch` option (minus ``exclude``), else a clear error."""
    valid = [k for k in PATCH_KEYS if k not in exclude]
    bad = [k for k in kwargs if k not in valid]
    if bad:
        raise TypeError(f"unexpected keyword arguments {bad}; patch options accepted here: {', '.join(valid)}")
    return kwargs


def slug(text: str, n: int = 60) -> str:
    """A file-name-safe lower-case version of ``text``."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:n] or "x"


def resolve_assets(checkpoint=None, saes=None, table=None) -> tuple:
    """``(saes {hookpoint: SAE}, table)`` from a checkpoint folder and/or in-memory objects (given objects win).

    SAEs are loaded once here so that patching per target does not reread them from disk.
    """
    if table is None:
        if checkpoint is None:
            raise ValueError("pass checkpoint=DIR (SAE folders + concept file) or saes={hookpoint: SAE} and table=")
        table = ConceptTable.load(checkpoint)
    saes = {normalize_hookpoint(h): s for h, s in (saes or {}).items()}
    if checkpoint is not None:
        root = Path(checkpoint)
        for hp in available_hookpoint_dirs(root):
            hp = normalize_hookpoint(hp)
            if hp in table.hookpoints and hp not in saes:
                saes[hp] = SparseAutoencoder.load(resolve_hookpoint_dir(root, hp))
    saes = {h: s for h, s in saes.items() if h in table.hookpoints}
    if not saes:
        raise ValueError(f"no SAE for any hookpoint of the concept file ({', '.join(table.hookpoints)})")
    return saes, table


def with_detectors(patch_kwargs: dict, checkpoint=None, table=None) -> dict:
    """``patch_kwargs`` plus the checkpoint's fitted detectors when a detector mode needs them and none were given
    (loaded once here, not per patched run): ``mode`` names one, or (no ``mode``) a concept of ``table`` has one as
    its default mode."""
    mode = patch_kwargs.get("mode")
    modes = set(mode.values()) if isinstance(mode, dict) else {mode} if mode is not None else (
        {table.edit_mode(c)[0] for c in table.names} if table is not None else set())
    need = sorted(modes & set(replace.PROBE_MODES))
    if not need or patch_kwargs.get("detectors") is not None:
        return patch_kwargs
    if checkpoint is None:
        raise ValueError(f"mode {need[0]!r} needs fitted detectors: pass detectors= or a checkpoint folder that holds "
                         "them (`saeuron detectors`)")
    from ..detectors import Detectors

    return {**patch_kwargs, "detectors": Detectors.load(checkpoint)}


def as_image_tensor(images) -> torch.Tensor:
    """Pipeline output images (a tensor, a numpy array [B,H,W,3] or PIL images) -> float [B, 3, H, W] in [0, 1] on CPU."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        return x.permute(0, 3, 1, 2) if x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3 else x
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).float()
        return (x / 255 if images.dtype == np.uint8 else x).permute(0, 3, 1, 2)
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
        return torch.from_numpy(arr).float().permute(0, 3, 1, 2) / 255
    raise TypeError(f"cannot read pipeline images of type {type(images).__name__}; expected a tensor, an array or PIL")


def resolve_sampling(pipe, num_inference_steps=None, guidance_scale=None) -> tuple:
    """``(steps, guidance)``: each ``None`` replaced by the pipeline's own default (its ``__call__``'s; diffusers'
    usual 50 and 7.5 where it does not say), so cache keys and reports record what ran, not "default"."""
    got = pipelines.resolve_sampling(pipe, num_inference_steps, guidance_scale)
    return int(got.get("num_inference_steps", 50)), float(got.get("guidance_scale", 7.5))


def sample_images(pipe, prompts, seeds, *, num_inference_steps=None, guidance_scale=None, batch_size: int = 16,
                  bar=None, **kwargs) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for (prompt, seed) pairs, several prompts per pipeline call.

    One CPU generator per image, so batching never changes an image. ``None`` sampling arguments are
    left out, so the pipeline's own defaults apply.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    kw = {k: v for k, v in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale))
          if v is not None}
    kw.update(kwargs)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(x)) for x in s]
        with torch.no_grad():
            res = pipe(prompt=p, generator=gens, output_type="pt", **kw)
        imgs = as_image_tensor(res.images if hasattr(res, "images") else res[0])
        if imgs.shape[0] != len(p):
            raise RuntimeError(f"the pipeline returned {imgs.shape[0]} images for {len(p)} prompts")
        out.append(imgs)
        if bar is not None:
            bar.update(len(p))
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1)


def check_classifiers(classifiers) -> dict:
    """``classifiers`` if it is ``{"object": model, "style": model}``, else a clear error."""
    if not isinstance(classifiers, dict) or not {"object", "style"} <= set(classifiers):
        raise ValueError("classifiers must be a dict {'object': SmallCNN, 'style': SmallCNN} "
                         f"(see saeuron.minicanvas.load_classifiers), got {type(classifiers).__name__}"
                         + (f" with keys {sorted(classifiers)}" if isinstance(classifiers, dict) else ""))
    return classifiers


def judge(classifiers: dict, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Both classifiers' predictions and penultimate features: ``{"pred_object", "pred_style", "feat_object", "feat_style"}``."""
    from ..minicanvas import classifiers as clf

    check_classifiers(classifiers)
    out = {}
    for kind in ("object", "style"):
        out[f"pred_{kind}"] = clf.predict(classifiers[kind], images, batch_size)
        out[f"feat_{kind}"] = clf.features(classifiers[kind], images, batch_size).float()
    return out


def to_pil(image: torch.Tensor, min_size: int = 0):
    """A float [3, H, W] image in [0, 1] -> PIL, upscaled (nearest) to at least ``min_size`` pixels."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    if min_size and min(im.size) < min_size:
        f = -(-min_size // min(im.size))
        im = im.resize((im.width * f, im.height * f), Image.NEAREST)
    return im
