"""Callbacks the entry script registers with the WebUI (kept here so scripts/ stays thin)."""
from __future__ import annotations

import logging

from modules import extra_networks, scripts, ui_extra_networks

from . import sampling, state, xyz
from .activation import INFOTEXT_KEY, drop_concept_words_from_ti, parse_hashes, remap_pasted

log = logging.getLogger("perfusion")


def before_ui() -> None:
    from .cards import ExtraNetworksPagePerfusion
    from .extra_network import ExtraNetworkPerfusion

    ui_extra_networks.register_page(ExtraNetworksPagePerfusion(state.store(), library=state.library, jobs=state.jobs))
    extra_networks.register_extra_network(ExtraNetworkPerfusion(state.activator()))
    module = xyz.find_module(scripts.scripts_data)
    if module is None:
        log.info("Perfusion: the X/Y/Z plot script is not loaded; no Perfusion axes")
    else:
        xyz.register(module)


def cfg_denoiser(params) -> None:
    """Before every denoiser call: per-step β/τ, and the gate inspector on a pass's first step."""
    denoiser = getattr(params, "denoiser", None)
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if step is None or not total:  # the denoiser's own count covers samplers that call it twice a step
        step, total = params.sampling_step, params.total_sampling_steps
    sampling.on_denoiser(state.activator(), step, total, params.text_cond)


def infotext_pasted(_infotext: str, params: dict) -> None:
    """PNG Info → Send to txt2img: a renamed concept file is found again by its tensor hash."""
    hashes = parse_hashes(params.get(INFOTEXT_KEY, ""))
    if not hashes:
        return
    store = state.store()
    for key in ("Prompt", "Negative prompt", "Hires prompt", "Hires negative prompt"):
        if isinstance(params.get(key), str):
            params[key] = remap_pasted(params[key], hashes, store.resolve_pasted)


class PerfusionScript(scripts.Script):
    """No UI; makes sure no Perfusion hook outlives a generation, whatever happened in the previous one."""

    def title(self):
        return "Perfusion"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def before_process(self, p, *args):
        state.release_hooks()

    def postprocess_batch(self, p, *args, **kwargs):
        # after sampling, before the infotexts are written: Forge's `TI:` entry names no concept word
        drop_concept_words_from_ti(p.extra_generation_params, getattr(p, "_perfusion_hashes", None) or {})

    def postprocess(self, p, processed, *args):
        state.release_hooks()
