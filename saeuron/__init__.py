"""saeuron: SAeUron concept unlearning for diffusers pipelines, with fused SAE kernels.

The data path is a straight line: prompts --collect--> activation shards --train--> SAE checkpoint
--select--> concept file --patch--> edited sampling.

The public names below are imported on first use, so ``import saeuron`` (and ``saeuron --help``) loads no
torch. Each lives in a module named for what it holds, and no name hides a module:
``saeuron.patch`` is the function, ``saeuron.patching`` its module.
"""
import importlib

__version__ = "0.1.0"

_HOME = {  # public name -> the module that defines it
    "ActivationStore": "store",
    "ConceptTable": "concepts",
    "SaeConfig": "sae",
    "SparseAutoencoder": "sae",
    "TrainConfig": "trainer",
    "build_concept_file": "selection",
    "collect": "collection",
    "compute_statistics": "selection",
    "list_hookpoints": "hookpoints",
    "load_concepts": "concepts",
    "patch": "patching",
    "patched": "patching",
    "train": "trainer",
    "unpatch": "patching",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562) and keep the name here from then on."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'saeuron' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
