"""Load a diffusers StableDiffusionPipeline: a family's named model (`toy`), a diffusers folder, or a
single-file checkpoint.

Everything loads offline: no hub access at build or run time. Nothing loads pickles (.ckpt/.pt are
refused with a conversion hint). Named models come from plug-ins (`core.families.register_plugin`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..core import families
from ..core.errors import PerfusionError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _finish(pipe: StableDiffusionPipeline, device, dtype) -> StableDiffusionPipeline:
    """On a CPU everything runs in fp32 (weights may be stored in fp16, as the toy model's are)."""
    pipe.set_progress_bar_config(disable=True)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def load_pipeline(model: str | os.PathLike = "toy", device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """A named model (`toy`), a diffusers folder, or a single-file .safetensors checkpoint."""
    named = families.named_model(str(model))
    path = named if named is not None else Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PerfusionError(f"{path} is a folder but not a diffusers pipeline (no model_index.json).")
        pipe = StableDiffusionPipeline.from_pretrained(
            path, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        return _finish(pipe, device, dtype)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PerfusionError(
            f"{path.name} is a pickle checkpoint; this tool never loads pickles (they can run code). "
            "Convert it to .safetensors first (e.g. with the WebUI's checkpoint merger or a trusted converter)."
        )
    if not path.is_file():
        named_models = "".join(f"`{n}`, " for n in families.names() if (p := families.plugin(n)) and p.model_dir)
        raise PerfusionError(f"model {str(model)!r} not found: use {named_models}a diffusers folder or a "
                             ".safetensors file.")
    from .single_file import load_single_file

    return _finish(load_single_file(path), device, dtype)
