"""Joining the process group ``torchrun`` describes in the environment, for the commands that run under it."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch


@contextlib.contextmanager
def distributed_from_env(backend: Optional[str] = None):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join a process group for the block, using
    ``LOCAL_RANK``'s GPU when there is one; yields ``(rank, world size)``, ``(0, 1)`` when not launched so.

    ``backend`` defaults to gloo, which is all collection needs (a few small messages, any device) and what
    training on CPUs uses; training on GPUs wants ``"nccl"``.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)
        return
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend or "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
