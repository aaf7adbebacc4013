"""Perfusion (key-locked rank-1 editing) for Stable Diffusion: concept files, hooks, training, export.

Public API (pinned):
    load_concept(path) -> Concept          validated concept file
    save_concept(concept, path)            atomic write
    activate(unet, concepts, strength=1.0, beta=None, tau=None)   context manager
    PerfusionError                         every user-fixable problem (a ValueError)
    load_pipeline("toy" | DIR | FILE)      a diffusers StableDiffusionPipeline, offline
"""
from .concept import Concept, load_concept, save_concept, tensor_hash
from .errors import PerfusionError
from .hooks import activate


def load_pipeline(model="toy", device="cpu", dtype=None):
    """The embedded toy model, a diffusers folder or a single-file .safetensors checkpoint (lazy import)."""
    from .pipeline import load_pipeline as _load

    return _load(model, device=device, dtype=dtype)


__all__ = ["Concept", "PerfusionError", "activate", "load_concept", "load_pipeline", "save_concept", "tensor_hash"]
__version__ = "0.1.0"
