"""saeuron: SAeUron concept unlearning for diffusers pipelines, with fused SAE kernels.

The data path is a straight line: prompts --collect--> activation shards --train--> SAE checkpoint
--select--> concept file --patch--> edited sampling.
"""
from .hookpoints import list_hookpoints
from .sae import SaeConfig, SparseAutoencoder

__version__ = "0.1.0"


def __getattr__(name):  # lazy: keep `import saeuron` light (no diffusers import until needed)
    lazy = {
        "patch": ("patch", "patch"), "unpatch": ("patch", "unpatch"), "patched": ("patch", "patched"),
        "collect": ("collect", "collect"), "ActivationStore": ("store", "ActivationStore"),
        "train": ("train", "train"), "TrainConfig": ("train", "TrainConfig"),
        "select": ("concepts", "select"), "ConceptTable": ("concepts", "ConceptTable"),
        "compute_statistics": ("concepts", "compute_statistics"),
    }
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'saeuron' has no attribute {name!r}")


__all__ = ["SaeConfig", "SparseAutoencoder", "list_hookpoints", "patch", "unpatch", "patched", "collect",
           "ActivationStore", "train", "TrainConfig", "select", "ConceptTable", "compute_statistics"]
