"""Load a diffusers Stable Diffusion pipeline (StableDiffusionPipeline for SD1/SD2 and the toy model,
StableDiffusionXLPipeline for SDXL): a family's named model (`toy`), a diffusers folder, or a single-file
checkpoint.

Everything loads offline: no hub access at build or run time. Nothing loads pickles (.ckpt/.pt are
refused with a conversion hint). Named models come from plug-ins (`core.families.register_plugin`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline

from ..core import families
from ..core.errors import PerfusionError
from ..core.layers import unet_family

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def pipeline_class(folder: Path):
    """The diffusers pipeline class of a folder: its model_index's class when a family uses it, else the family
    pipeline its name belongs to (an SDXL img2img/inpaint folder loads as StableDiffusionXLPipeline)."""
    name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    ours = {f.pipeline_class for f in families.FAMILIES.values()}
    if name not in ours:
        name = max((c for c in ours if c.replace("Pipeline", "") in name), key=len, default="StableDiffusionPipeline")
    return getattr(diffusers, name)


def _load_folder(path: Path):
    cls = pipeline_class(path)
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    try:  # without use_safetensors, diffusers falls back to a component's pickled .bin weights
        pipe = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, **extra)
    except OSError as exc:
        pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if not pickles:
            raise
        raise PerfusionError(
            f"{path.name} stores weights as pickles ({', '.join(pickles[:3])}); this tool never loads pickles (they "
            "can run code). Convert them to .safetensors first (diffusers: save_pretrained(..., "
            "safe_serialization=True) in a trusted environment)."
        ) from exc
    unet_family(pipe.unet)  # refuses a model it names (the SDXL refiner) or one of no known family
    return pipe


def _finish(pipe, device, dtype):
    """On a CPU everything runs in fp32 (weights may be stored in fp16, as the toy model's are)."""
    pipe.set_progress_bar_config(disable=True)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def load_pipeline(model: str | os.PathLike = "toy", device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, prediction_type: str | None = None):
    """A named model (`toy`), a diffusers folder, or a single-file .safetensors checkpoint.

    `prediction_type` ("epsilon" or "v_prediction") overrides what a single file's model is taken to predict
    (see single_file.prediction_type for how it is found otherwise); diffusers folders say it themselves.
    """
    named = families.named_model(str(model))
    path = named if named is not None else Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PerfusionError(f"{path} is a folder but not a diffusers pipeline (no model_index.json).")
        return _finish(_load_folder(path), device, dtype)
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

    return _finish(load_single_file(path, prediction_type), device, dtype)
