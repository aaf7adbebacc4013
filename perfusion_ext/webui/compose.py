"""The tab's composition preview: each concept of a prompt alone and all together, by the WebUI's txt2img.

The panels come from `core.composition`; each is a normal txt2img of its prompt at the same seed, so the
extra network activates the concepts exactly as in a generation the user runs. The caller holds the
WebUI's queue lock; the panels run as one WebUI job (progress, the Interrupt button), as txt2img does.
"""
from __future__ import annotations

import contextlib
import dataclasses

from modules import processing, shared

from ..core.composition import compose_prompts
from ..core.errors import PerfusionError
from ..core.tags import parse_prompt
from . import state
from .concepts import mismatch_reason


def _model_family() -> str | None:
    try:
        from .cards import current_family

        return current_family()
    except Exception:  # noqa: BLE001 - no model, an unknown architecture: the activation says so per panel
        return None


def _txt2img(**kwargs):
    cls = processing.StableDiffusionProcessingTxt2Img
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if "scheduler" in fields:  # A1111 >= 1.9 / Forge: set, as the txt2img tab does (no "autocorrection" warning)
        kwargs["scheduler"] = "Automatic"
    return cls(**kwargs)


def render(prompt: str, negative: str, seed: int, steps: int, width: int, height: int) -> tuple[list[tuple], int]:
    """([(image, label)] for the gallery: each concept alone, then together; the seed used by every panel).

    Seed -1 is drawn once here: the WebUI would draw one per panel, and the panels would not compare."""
    store = state.store()
    family = _model_family()
    concepts = {}
    for tag in parse_prompt(prompt).tags:
        if tag.name not in concepts:
            concept = store.load(tag.name).concept  # PerfusionError names an unknown concept
            reason = mismatch_reason(concept.base_family, family)
            if reason:  # the activation would skip it: its "alone" panel would show only the superclass
                raise PerfusionError(f"<perfusion:{tag.name}> cannot be used here: {reason}.")
            concepts[tag.name] = concept
    prompts = compose_prompts(prompt, concepts)
    seed = int(processing.get_fixed_seed(int(seed)))
    panels = []
    shared.state.begin(job="perfusion_compose")
    shared.state.job_count = len(prompts)
    try:
        for label, text in prompts:
            p = _txt2img(
                sd_model=shared.sd_model, prompt=text, negative_prompt=negative, seed=seed, sampler_name="Euler a",
                steps=int(steps), cfg_scale=7.0, width=int(width), height=int(height), batch_size=1, n_iter=1,
                do_not_save_samples=True, do_not_save_grid=True)
            with contextlib.closing(p):
                processed = processing.process_images(p)
            if not processed.images:
                raise PerfusionError(f"the WebUI returned no image for the {label!r} panel"
                                     + (" (interrupted)." if shared.state.interrupted else "."))
            panels.append((processed.images[0], label))
    finally:
        total = getattr(shared, "total_tqdm", None)
        if total is not None:
            total.clear()
        shared.state.end()
    return panels, seed
