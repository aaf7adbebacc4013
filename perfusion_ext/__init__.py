"""Perfusion (key-locked rank-1 editing) for Stable Diffusion: concept files, hooks, training, export.

Public API (pinned):
    load_concept(path) -> Concept          validated concept file
    save_concept(concept, path)            atomic write
    activate(unet, concepts, strength=1.0, beta=None, tau=None, competitive=False)   context manager
    PerfusionError                         every user-fixable problem (a ValueError)
    load_pipeline("toy" | DIR | FILE)      a diffusers StableDiffusionPipeline, offline

The package is layered (docs/design.md, "Layers of the code"): `core` (math and concept format) <
`training` < `pipelines` < the toy plug-in < `cli`, `webui` and the exporter (`perfusion_export`).
This module is the facade above them all; importing it registers the toy plug-in.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import toy as _toy  # noqa: F401  (registers the toy model with core.families)
from .core.concept import Concept, load_concept, save_concept, tensor_hash
from .core.errors import PerfusionError
from .core.hooks import activate
from .core.version import __version__

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

def load_pipeline(model: str | os.PathLike = "toy", device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """The embedded toy model, a diffusers folder or a single-file .safetensors checkpoint (lazy import)."""
    from .pipelines.loading import load_pipeline as _load

    return _load(model, device=device, dtype=dtype)


__all__ = ["Concept", "PerfusionError", "__version__", "activate", "load_concept", "load_pipeline", "save_concept",
           "tensor_hash"]
