"""Composition preview with a diffusers pipeline: the panels of `core.composition`, side by side at one seed."""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..core.composition import compose_prompts
from .generate import generate, prepare_prompt

LABEL_HEIGHT = 14


def compose(pipe, prompt: str, concepts_dir, seed: int = 0, **settings) -> tuple[Image.Image, list[str]]:
    """One strip of panels (each concept alone, then together) at one seed, and the warnings of the prompt."""
    prepared = prepare_prompt(prompt, concepts_dir)
    loaded = {tag.name: concept for tag, concept in prepared.concepts}
    panels, warnings = [], list(prepared.warnings)
    for label, text in compose_prompts(prompt, loaded):
        images, more = generate(pipe, text, concepts_dir=concepts_dir, seed=seed, loaded=loaded, **settings)
        warnings += [w for w in more if w not in warnings]
        panels.append((label, images[0]))
    return strip(panels), warnings


def strip(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Panels left to right with their labels above."""
    w, h = panels[0][1].size
    out = Image.new("RGB", (w * len(panels), h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, image) in enumerate(panels):
        out.paste(image.convert("RGB"), (i * w, LABEL_HEIGHT))
        draw.text((i * w + 2, 1), label[: max(1, w // 6)], fill="black")
    return out
