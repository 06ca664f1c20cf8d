"""Find a UNet's ``Transformer2DModel`` blocks: the places an SAE can be hooked, with their widths."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def get_unet(pipe_or_unet) -> nn.Module:
    """The ``UNet2DConditionModel`` of a diffusers pipeline, or the argument itself if it is one."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected a diffusers pipeline with .unet or a UNet2DConditionModel, got {type(pipe_or_unet).__name__}")
    return unet


def _is_transformer_block(m: nn.Module) -> bool:
    return type(m).__name__ == "Transformer2DModel"


def _channels(m: nn.Module) -> int:
    for attr in ("in_channels", "inner_dim"):
        v = getattr(getattr(m, "config", m), attr, None)
        if isinstance(v, int):
            return v
    return m.proj_out.out_features if hasattr(m.proj_out, "out_features") else m.proj_out.out_channels


def list_hookpoints(pipe_or_unet) -> "OrderedDict[str, int]":
    """Every ``Transformer2DModel`` of the UNet by module name (e.g. ``up_blocks.1.attentions.1``) -> channels."""
    unet = get_unet(pipe_or_unet)
    return OrderedDict((name, _channels(m)) for name, m in unet.named_modules() if _is_transformer_block(m))


PREFIX = "unet."  # the published checkpoints name their hookpoint folders "unet.<module name>"


def normalize_hookpoint(name: str) -> str:
    """Accept ``unet.``-prefixed names (the published checkpoints' folder names) and return the module name."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def hookpoint_spellings(name: str) -> tuple:
    """Every name a hookpoint may be stored under (module name first, then the ``unet.``-prefixed one)."""
    base = normalize_hookpoint(name)
    return (base, PREFIX + base)


def resolve_hookpoints(pipe_or_unet, names) -> "OrderedDict[str, nn.Module]":
    """Module for each requested hookpoint; an unknown name raises with the list of valid ones."""
    unet = get_unet(pipe_or_unet)
    valid = list_hookpoints(unet)
    modules = dict(unet.named_modules())
    out = OrderedDict()
    for raw in ([names] if isinstance(names, str) else names):
        name = normalize_hookpoint(raw)
        if name not in valid:
            raise ValueError(f"unknown hookpoint {raw!r}; this UNet's Transformer2DModel blocks are: "
                             + ", ".join(f"{n} ({c} ch)" for n, c in valid.items()))
        out[name] = modules[name]
    return out


def block_output(output):
    """The feature map a hooked block returned: ``.sample``, the first element of a tuple, or the tensor itself."""
    if hasattr(output, "sample"):
        return output.sample
    return output[0] if isinstance(output, (tuple, list)) else output
