"""Attribute accuracy of a toy pipeline on held-out prompts, read back by the analytic checkers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from . import checkers, world
from . import model as toy_model

ATTRIBUTES = ("background", "colour", "shape", "position")


def make_pipeline(vae, text_encoder, unet, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=toy_model.build_sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, batch: int = 128, **overrides) -> np.ndarray:
    settings = dict(toy_model.SAMPLING, **overrides)
    out = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        res = pipe(prompts[i:i + batch], generator=gen, output_type="np", height=32, width=32, **settings)
        out.append(to_uint8(res.images))
    return np.concatenate(out)


def score(images: np.ndarray, scenes: list[world.Scene]) -> dict[str, float]:
    hits = {a: 0 for a in ATTRIBUTES}
    for img, scene in zip(images, scenes):
        r = checkers.read(img)
        hits["background"] += r.background == scene.background
        hits["colour"] += r.colour == scene.colour
        hits["shape"] += r.shape == scene.shape
        hits["position"] += r.position == scene.position
    return {a: hits[a] / len(scenes) for a in ATTRIBUTES}


def save_grid(images: np.ndarray, path: Path, columns: int = 16, scale: int = 2) -> None:
    n = len(images)
    rows = (n + columns - 1) // columns
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def evaluate_pipeline(pipe, n_prompts: int = 219, seed: int = 0, grid_path: Path | None = None) -> dict:
    pairs = world.held_out_prompts(n_prompts, seed=seed)
    images = generate(pipe, [p for _, p in pairs], seed=seed)
    if grid_path is not None:
        save_grid(images[:64], grid_path)
    result = score(images, [s for s, _ in pairs])
    result["n_prompts"] = n_prompts
    return result
