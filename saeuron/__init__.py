"""saeuron: SAeUron concept unlearning for diffusers pipelines, with fused SAE kernels.

The data path is a straight line: prompts --collect--> activation shards --train--> SAE checkpoint
--select--> concept file --patch--> edited sampling.
"""
# Functions share names with their modules (saeuron.patch, saeuron.train, saeuron.collect): importing
# them here, eagerly, keeps `saeuron.patch` the function whatever is imported later. None of these
# modules imports diffusers at import time.
from .collection import collect
from .concepts import ConceptTable, load_concepts
from .hookpoints import list_hookpoints
from .patch import patch, patched, unpatch
from .sae import SaeConfig, SparseAutoencoder
from .selection import build_concept_file, compute_statistics
from .store import ActivationStore
from .trainer import TrainConfig, train

__version__ = "0.1.0"

__all__ = ["ActivationStore", "ConceptTable", "SaeConfig", "SparseAutoencoder", "TrainConfig", "build_concept_file",
           "collect", "compute_statistics", "list_hookpoints", "load_concepts", "patch", "patched", "train", "unpatch"]
