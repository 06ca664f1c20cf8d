"""Pipelines as the commands see them: load one from a folder, the shipped MiniCanvas model or a hub id,
and read its own sampling defaults (so no command imposes steps or guidance the pipeline was not made for)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from .utils import looks_like_path

SHIPPED = "minicanvas"


def load_pipeline(model: str, device=None, dtype=None):
    """A pipeline from a local folder, ``minicanvas`` (the shipped MiniCanvas model) or a hub id.

    ``device`` defaults to CUDA when available; ``dtype`` to what the folder holds (MiniCanvas: fp32).
    A path that does not exist, or a folder that is not a pipeline, is reported as such before any loading.
    """
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model in (None, SHIPPED):
        from .minicanvas import defaults

        return defaults.load_pipeline(device, dtype)
    path = Path(model).expanduser()
    if not path.exists() and looks_like_path(model):
        raise FileNotFoundError(f"model folder {model} does not exist (give a diffusers pipeline folder, "
                                f"'{SHIPPED}' for the shipped model, or a hub id such as org/name)")
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline folder (it has no model_index.json)")
    index = path / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "MiniCanvasPipeline":
        from .minicanvas.model import load_pipeline as load_minicanvas  # not a diffusers class: load it ourselves

        return load_minicanvas(path, device, **({"dtype": dtype} if dtype is not None else {}))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model,
                                             **({"torch_dtype": dtype} if dtype is not None else {}))
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe.to(device)


def sampling_defaults(pipe) -> dict:
    """``{"num_inference_steps", "guidance_scale"}`` as the pipeline's own ``__call__`` defaults them.

    (StableDiffusionPipeline: 50 and 7.5; the MiniCanvas pipeline: 25 and 1.5.) Values a pipeline does not
    declare are left out, so the caller's own fallback applies.
    """
    params = inspect.signature(type(pipe).__call__).parameters
    out = {}
    for name in ("num_inference_steps", "guidance_scale"):
        p = params.get(name)
        if p is not None and p.default is not inspect.Parameter.empty and p.default is not None:
            out[name] = p.default
    return out


def resolve_sampling(pipe, num_inference_steps=None, guidance_scale=None) -> dict:
    """The sampling settings to use: the given ones, else the pipeline's own (see :func:`sampling_defaults`)."""
    out = sampling_defaults(pipe)
    if num_inference_steps is not None:
        out["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        out["guidance_scale"] = guidance_scale
    return out


def encode_text(pipe, prompts: list):
    """The denoiser's ``encoder_hidden_states [n, L, D]`` for ``prompts`` as ``pipe`` computes them (its text encoder,
    no classifier-free guidance pair): the MiniCanvas pipeline's ``encode_prompt(prompts)``, or diffusers'
    ``encode_prompt(prompt, device, 1, False)`` (Stable Diffusion). Anything else is a clear error."""
    import torch

    enc = getattr(pipe, "encode_prompt", None)
    if enc is None:
        raise ValueError(f"{type(pipe).__name__} has no encode_prompt: cannot turn an anchor prompt into text "
                         "embeddings (give a text-to-image pipeline, not a bare denoiser)")
    with torch.no_grad():
        if type(pipe).__name__ == "MiniCanvasPipeline":
            return enc(list(prompts))
        out = enc(list(prompts), pipe._execution_device, 1, False)
    return out[0] if isinstance(out, (tuple, list)) else out
