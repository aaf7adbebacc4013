"""The "Perfusion" settings section."""
from __future__ import annotations

import gradio as gr
from modules import shared

from ..training.config import field_defaults
from .train_request import WEBUI_FAMILY

SECTION = ("perfusion", "Perfusion")


def add_settings() -> None:
    options = {
        "perfusion_default_strength": shared.OptionInfo(
            1.0, "Strength written by a card click", gr.Slider, {"minimum": 0.0, "maximum": 2.0, "step": 0.05}),
        "perfusion_default_beta": shared.OptionInfo(
            0.0, "Default β for tags without beta= (0: the value stored in the concept file)", gr.Slider,
            {"minimum": 0.0, "maximum": 1.5, "step": 0.01}),
        "perfusion_default_tau": shared.OptionInfo(
            0.0, "Default τ for tags without tau= (0: the value stored in the concept file)", gr.Slider,
            {"minimum": 0.0, "maximum": 1.0, "step": 0.01}),
        "perfusion_competitive_gates": shared.OptionInfo(
            False, "Competitive gates: with several concepts in a prompt, each word keeps only the gate of the concept "
                   "it is most similar to (one concept's edit never acts on another's word)"),
        "perfusion_clause_encoding": shared.OptionInfo(
            False, "Clause-wise encoding: with several concepts in a prompt, read each further concept's clause as if "
                   "the concepts before it were their superclass words (one more text-encoder pass per concept; "
                   "helps the second concept appear)"),
        "perfusion_default_steps": shared.OptionInfo(
            field_defaults(WEBUI_FAMILY)["steps"], "Default training steps", gr.Number, {"precision": 0}),
        "perfusion_save_previews": shared.OptionInfo(True, "Render and save preview images while training"),
        "perfusion_warning_popup": shared.OptionInfo(True, "Show Perfusion warnings (unknown concepts, bad tags) as popups"),
        "perfusion_gate_info": shared.OptionInfo(
            True, "Gate inspector: each concept's per-token gates in the generation info, and a warning when a "
                  "concept's gate is higher on another word than on its own"),
    }
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info)
