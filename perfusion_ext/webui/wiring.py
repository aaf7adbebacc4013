"""Callbacks the entry script registers with the WebUI (kept here so scripts/ stays thin)."""
from __future__ import annotations

from modules import extra_networks, scripts, ui_extra_networks

from . import state
from .activation import INFOTEXT_KEY, parse_hashes, remap_pasted


def before_ui() -> None:
    from .cards import ExtraNetworksPagePerfusion
    from .extra_network import ExtraNetworkPerfusion

    ui_extra_networks.register_page(ExtraNetworksPagePerfusion(state.store()))
    extra_networks.register_extra_network(ExtraNetworkPerfusion(state.activator()))


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

    def postprocess(self, p, processed, *args):
        state.release_hooks()
