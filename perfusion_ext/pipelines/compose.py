"""Composition preview: a prompt with several concepts rendered as each concept alone and all together.

"Alone" keeps the prompt and replaces every other concept's tag by that concept's superclass word, so
the only difference between the panels is which edits are active; all panels share one seed. Put side by
side, they show whether a concept keeps its look next to another (the joint projection at work) or
bleeds into it.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..core.concept import Concept
from ..core.errors import PerfusionError
from ..core.tags import parse_prompt
from .generate import generate, prepare_prompt

LABEL_HEIGHT = 14


def compose_prompts(prompt: str, concepts: dict[str, Concept]) -> list[tuple[str, str]]:
    """(label, prompt) per concept alone, then ("together", prompt); `concepts` maps tag names to their files."""
    parsed = parse_prompt(prompt)
    names = list(dict.fromkeys(t.name for t in parsed.tags if t.name in concepts))
    if len(names) < 2:
        raise PerfusionError("a composition preview needs at least two known concepts in the prompt, got "
                             f"{names or 'none'}.")

    def alone(keep: str) -> str:
        return parsed.text_with(lambda tag: prompt[tag.start:tag.end] if tag.name == keep else concepts[tag.name].superclass)

    return [(name, alone(name)) for name in names] + [("together", prompt)]


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
