"""The tab's composition preview: each concept of a prompt alone and all together, by the WebUI's txt2img.

The panels come from `core.composition`; each is a normal txt2img of its prompt at the same seed, so the
extra network activates the concepts exactly as in a generation the user runs.
"""
from __future__ import annotations

import contextlib

from modules import processing, shared

from ..core.composition import compose_prompts
from ..core.errors import PerfusionError
from ..core.tags import parse_prompt
from . import state


def render(prompt: str, negative: str, seed: int, steps: int, width: int, height: int) -> list[tuple]:
    """[(image, label)] for the gallery: each concept alone, then together."""
    store = state.store()
    concepts = {}
    for tag in parse_prompt(prompt).tags:
        if tag.name not in concepts:
            concepts[tag.name] = store.load(tag.name).concept  # PerfusionError names an unknown concept
    panels = []
    for label, text in compose_prompts(prompt, concepts):
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=text, negative_prompt=negative, seed=int(seed), sampler_name="Euler a",
            steps=int(steps), cfg_scale=7.0, width=int(width), height=int(height), batch_size=1, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True)
        with contextlib.closing(p):
            processed = processing.process_images(p)
        if not processed.images:
            raise PerfusionError(f"the WebUI returned no image for the {label!r} panel.")
        panels.append((processed.images[0], label))
    return panels
