"""Perfusion (key-locked rank-1 editing) for Stable Diffusion: concept files, hooks, training, export.

Public API (pinned):
    load_concept(path) -> Concept          validated concept file
    save_concept(concept, path)            atomic write
    activate(unet, concepts, strength=1.0, beta=None, tau=None)   context manager
    PerfusionError                         every user-fixable problem (a ValueError)
"""
from .concept import Concept, load_concept, save_concept, tensor_hash
from .errors import PerfusionError
from .hooks import activate

__all__ = ["Concept", "PerfusionError", "activate", "load_concept", "save_concept", "tensor_hash"]
__version__ = "0.1.0"
