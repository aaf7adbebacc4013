"""Attribute accuracy of a toy pipeline on held-out prompts, read back by the analytic checkers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from . import checkers, named, pairs, two_named, world
from . import model as toy_model
from .concepts import composite_fidelity

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


PAIR_ATTRIBUTES = ("pair_colours", "pair_shapes", "pair_relation", "pair_both", "pair_background", "pair_position")


def score_pairs(images: np.ndarray, scenes: list[pairs.PairScene], prompts: list[str]) -> dict[str, float]:
    """Share of two-object images with both colours, both shapes, the relation (with touching parts),
    all three ("both objects right"), the background and the pair's position read back as asked."""
    hits = dict.fromkeys(PAIR_ATTRIBUTES, 0)
    for img, scene, prompt in zip(images, scenes, prompts):
        accepted = ("left", "right") if f" {pairs.NEXT_TO} " in prompt else scene.relation
        r = checkers.read_pair(img, scene.colour_a, scene.shape_a, accepted, scene.colour_b, scene.shape_b)
        hits["pair_colours"] += r.colours_right
        hits["pair_shapes"] += r.shapes_right
        hits["pair_relation"] += r.relation_right
        hits["pair_both"] += r.both_right
        hits["pair_background"] += r.background == scene.background
        hits["pair_position"] += r.position == scene.position
    return {a: hits[a] / len(scenes) for a in PAIR_ATTRIBUTES}


def evaluate_pairs(pipe, n_prompts: int = 120, seed: int = 0, grid_path: Path | None = None) -> dict:
    """Two-object accuracy on held-out (A, relation, B) combinations in held-out phrasings."""
    found = pairs.held_out_prompts(n_prompts, seed=seed)
    prompts = [p for _, p in found]
    images = generate(pipe, prompts, seed=seed)
    if grid_path is not None:
        save_grid(images[:64], grid_path)
    result = score_pairs(images, [s for s, _ in found], prompts)
    result["pair_n_prompts"] = n_prompts
    return result


def score_named(images: np.ndarray, found: list[tuple[str, pairs.PairScene, str]]) -> dict[str, float]:
    """Share of images the strict composite judge reads as the named object (over all words, and over the
    first ten and the added words apart where the prompts have both), and background and position."""
    hits = {"named": 0, "named_background": 0, "named_position": 0}
    by_group = {"named_first_words": [], "named_added_words": []}
    for img, (word, scene, _) in zip(images, found):
        right = composite_fidelity(img, named.NAMED[word], word in named.MIRRORABLE).is_concept
        hits["named"] += right
        by_group["named_added_words" if word in named.ADDED_WORDS else "named_first_words"].append(right)
        background, position = checkers.read_alignment(img)
        hits["named_background"] += background == scene.background
        hits["named_position"] += position == scene.position
    result = {k: v / len(found) for k, v in hits.items()}
    if all(by_group.values()):
        result.update({k: float(np.mean(v)) for k, v in by_group.items()})
    return result


def evaluate_named(pipe, n_prompts: int = 60, seed: int = 0, grid_path: Path | None = None) -> dict:
    """Named composites ("a rocket on the left, green background") on held-out (word, position, background)
    combinations in held-out phrasings."""
    found = named.held_out_prompts(n_prompts, seed=seed)
    images = generate(pipe, [p for _, _, p in found], seed=seed)
    if grid_path is not None:
        save_grid(images[:64], grid_path)
    return {**score_named(images, found), "named_n_prompts": n_prompts}


def score_two_named(images: np.ndarray, found) -> dict[str, float]:
    """Share of images where each named object is judged right in its own half, and the background."""
    hits = {"two_named_both": 0, "two_named_background": 0}
    for img, (layout, a, b, scenes, _) in zip(images, found):
        first, second = two_named.halves(img, layout)
        hits["two_named_both"] += all(
            composite_fidelity(half, named.NAMED[w], w in named.MIRRORABLE).is_concept for half, w in ((first, a), (second, b)))
        hits["two_named_background"] += checkers.read_background(img)[0] == scenes[0].background
    return {k: v / len(found) for k, v in hits.items()}


def evaluate_two_named(pipe, n_prompts: int = 40, seed: int = 0, grid_path: Path | None = None) -> dict:
    """Two named objects in one scene ("a rocket on the left and a bell on the right") on held-out
    combinations in a held-out phrasing."""
    found = two_named.held_out_prompts(n_prompts, seed=seed)
    images = generate(pipe, [f[-1] for f in found], seed=seed)
    if grid_path is not None:
        save_grid(images[:64], grid_path)
    return {**score_two_named(images, found), "two_named_n_prompts": n_prompts}
