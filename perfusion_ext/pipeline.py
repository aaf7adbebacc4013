"""Load a diffusers StableDiffusionPipeline from `toy`, a diffusers folder, or a single-file checkpoint.

Everything loads offline: no hub access at build or run time. Nothing loads pickles (.ckpt/.pt are
refused with a conversion hint).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .errors import PerfusionError
from .toy import model as toy_model

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _finish(pipe: StableDiffusionPipeline, device, dtype) -> StableDiffusionPipeline:
    """On a CPU everything runs in fp32 (weights may be stored in fp16, as the toy model's are)."""
    pipe.set_progress_bar_config(disable=True)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def toy_is_trained() -> bool:
    return (toy_model.MODEL_DIR / "model_index.json").is_file()


def tiny_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The toy architecture with random weights: for tests, and the demo until the toy model exists."""
    from transformers import CLIPTokenizer

    from .toy.evaluate import make_pipeline

    torch.manual_seed(seed)
    return make_pipeline(
        vae=toy_model.build_vae(), text_encoder=toy_model.build_text_encoder(), unet=toy_model.build_unet(),
        tokenizer=CLIPTokenizer.from_pretrained(toy_model.MODEL_DIR / "tokenizer"),
    )


def load_pipeline(model: str | Path = "toy", device: str | torch.device = "cpu", dtype=None) -> StableDiffusionPipeline:
    """`toy` (the embedded toy model), a diffusers folder, or a single-file .safetensors checkpoint."""
    if str(model) == "toy":
        if not toy_is_trained():
            raise PerfusionError(
                f"The toy model is not in {toy_model.MODEL_DIR} yet: train it with "
                "`python -m perfusion_ext.toy.train_base --export`."
            )
        path = toy_model.MODEL_DIR
    else:
        path = Path(model).expanduser()
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
        raise PerfusionError(f"model {str(model)!r} not found: use `toy`, a diffusers folder or a .safetensors file.")
    from .single_file import load_single_file

    return _finish(load_single_file(path), device, dtype)
