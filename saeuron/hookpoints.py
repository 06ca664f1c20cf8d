"""Where an SAE can be hooked in a diffusers denoiser, with the width of each place, and how to read a block's output.

Two kinds of denoiser:

- a UNet (``UNet2DConditionModel``): every ``Transformer2DModel`` (e.g. ``up_blocks.1.attentions.1``), whose
  output is a feature map ``[B, C, H, W]``;
- a diffusion transformer (DiT: ``SD3Transformer2DModel``, ``PixArtTransformer2DModel``,
  ``FluxTransformer2DModel``, any denoiser with a ``transformer_blocks`` list): every block of its
  ``transformer_blocks`` and ``single_transformer_blocks`` (e.g. ``transformer_blocks.3``,
  ``single_transformer_blocks.1``), whose image stream is tokens ``[B, L, C]``.

Joint blocks return a text and an image stream; :data:`IMAGE_STREAM` says which element of the returned tuple
is the image (checked against the diffusers source, 0.42: SD3's ``JointTransformerBlock``, Flux's
``FluxTransformerBlock`` and ``FluxSingleTransformerBlock`` all return ``(encoder_hidden_states,
hidden_states)``; PixArt's ``BasicTransformerBlock`` returns the image tokens alone). Only the image stream is
collected and edited.

Hookpoint names are module names of the denoiser. Names may also carry the denoiser's attribute as a prefix,
``unet.`` (the published SD1.5 checkpoints' folder names) or ``transformer.``; :func:`normalize_hookpoint`
drops it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import nn

DIT_LISTS = ("transformer_blocks", "single_transformer_blocks")  # a DiT's block lists, in forward order

# block class -> index of the image stream in the tuple it returns (diffusers 0.42; see the module docstring)
IMAGE_STREAM = {"JointTransformerBlock": 1, "FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}


def get_denoiser(pipe_or_model) -> nn.Module:
    """The denoiser of a diffusers pipeline (``pipe.unet``, else ``pipe.transformer``), or the argument itself."""
    model = getattr(pipe_or_model, "unet", None)
    if model is None:
        model = getattr(pipe_or_model, "transformer", None)
    if model is None:
        model = pipe_or_model
    if not isinstance(model, nn.Module):
        raise TypeError("expected a diffusers pipeline with .unet or .transformer, a UNet2DConditionModel or a "
                        f"diffusion transformer, got {type(pipe_or_model).__name__}")
    return model


get_unet = get_denoiser  # the name the UNet-only callers use; it returns a DiT's transformer just the same


def is_dit(model: nn.Module) -> bool:
    """Whether ``model`` (a denoiser) is a diffusion transformer: it holds a ``transformer_blocks`` list itself."""
    return isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList) and not _is_transformer_block(model)


def _is_transformer_block(m: nn.Module) -> bool:
    return type(m).__name__ == "Transformer2DModel"


def _channels(m: nn.Module) -> int:
    for attr in ("in_channels", "inner_dim"):
        v = getattr(getattr(m, "config", m), attr, None)
        if isinstance(v, int):
            return v
    return m.proj_out.out_features if hasattr(m.proj_out, "out_features") else m.proj_out.out_channels


def _dit_width(model: nn.Module, block: nn.Module) -> int:
    """Width of a DiT block's image tokens: its attention's query input (the denoiser's ``inner_dim`` else)."""
    for name in ("attn", "attn1"):
        q = getattr(getattr(block, name, None), "to_q", None)
        if isinstance(getattr(q, "in_features", None), int):
            return q.in_features
    return int(model.inner_dim)


def _dit_blocks(model: nn.Module):
    for lst in DIT_LISTS:
        blocks = getattr(model, lst, None)
        if isinstance(blocks, nn.ModuleList):
            for i, block in enumerate(blocks):
                yield f"{lst}.{i}", block


def list_hookpoints(pipe_or_model) -> "OrderedDict[str, int]":
    """Every hookpoint of a pipeline's denoiser (or of the denoiser given) by module name -> channels.

    UNet: each ``Transformer2DModel`` (e.g. ``up_blocks.1.attentions.1``); DiT: each block of
    ``transformer_blocks`` then ``single_transformer_blocks`` (e.g. ``transformer_blocks.0``).
    """
    model = get_denoiser(pipe_or_model)
    if is_dit(model):
        return OrderedDict((name, _dit_width(model, b)) for name, b in _dit_blocks(model))
    return OrderedDict((name, _channels(m)) for name, m in model.named_modules() if _is_transformer_block(m))


PREFIX = "unet."  # the published checkpoints name their hookpoint folders "unet.<module name>"
PREFIXES = (PREFIX, "transformer.")  # a hookpoint name may carry its denoiser's attribute name


def normalize_hookpoint(name: str) -> str:
    """Drop a ``unet.`` (the published checkpoints' folder names) or ``transformer.`` prefix: the module name."""
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def hookpoint_spellings(name: str) -> tuple:
    """Every name a hookpoint may be stored under: the module name first, then each prefixed spelling."""
    base = normalize_hookpoint(name)
    return (base,) + tuple(p + base for p in PREFIXES)


def resolve_hookpoints(pipe_or_model, names) -> "OrderedDict[str, nn.Module]":
    """Module for each requested hookpoint; an unknown name raises with the list of valid ones."""
    model = get_denoiser(pipe_or_model)
    valid = list_hookpoints(model)
    modules = dict(model.named_modules())
    out = OrderedDict()
    for raw in ([names] if isinstance(names, str) else names):
        name = normalize_hookpoint(raw)
        if name not in valid:
            what = (f"this {type(model).__name__}'s transformer blocks" if is_dit(model)
                    else "this UNet's Transformer2DModel blocks")
            raise ValueError(f"unknown hookpoint {raw!r}; {what} are: "
                             + ", ".join(f"{n} ({c} ch)" for n, c in valid.items()))
        out[name] = modules[name]
    return out


def image_stream(module: nn.Module) -> Optional[int]:
    """Index of the image stream in the tuple ``module`` returns (a joint DiT block), or None for the rest."""
    return IMAGE_STREAM.get(type(module).__name__)


def _check_stream(output, stream: int):
    if not isinstance(output, (tuple, list)) or len(output) <= stream:
        raise TypeError(f"expected a joint transformer block to return a tuple with the image stream at index "
                        f"{stream}, got {type(output).__name__}: this diffusers version's blocks differ from the "
                        "ones saeuron knows (see saeuron.hookpoints.IMAGE_STREAM)")


def block_output(output, stream: Optional[int] = None):
    """The activations a hooked block returned: the image stream ``output[stream]`` of a joint DiT block,
    else ``.sample``, the first element of a tuple, or the tensor itself."""
    if stream is not None:
        _check_stream(output, stream)
        return output[stream]
    if hasattr(output, "sample"):
        return output.sample
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output(output, x, stream: Optional[int] = None):
    """``output`` with the activations :func:`block_output` reads replaced by ``x`` (other streams kept)."""
    if stream is not None:
        _check_stream(output, stream)
        return type(output)([*output[:stream], x, *output[stream + 1:]])
    if hasattr(output, "sample"):
        output.sample = x
        return output
    if isinstance(output, (tuple, list)):
        return type(output)([x, *output[1:]])
    return x
