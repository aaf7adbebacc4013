"""What Perfusion does at each sampling step in the WebUI, free of WebUI imports (unit-tested in CI).

The WebUI calls `on_denoiser` before every denoiser call (its `cfg_denoiser` callback) with the step,
the number of steps of this pass and the conditioning it produced:
1. per-step β/τ schedules: the activator moves every gate to the values in effect at step / steps;
2. the gate inspector, once per pass (on its first step): each active concept's gate on every token of
   the first image's conditioning, s = (u·e)/(u·i*), g = sigmoid((s − β)/τ) (`core.gate_report`), as a
   compact "Perfusion gates" line in the generation info, and a warning when a concept's gate is higher
   on another token than on its own.
The conditioning is the WebUI's own (its tokenizer, chunks, emphasis); which positions hold a concept
comes from the WebUI's tokenization of the prompt (`env.token_layout`).
"""
from __future__ import annotations

import logging

import torch

from ..core.gate_report import gate_line, gate_report

log = logging.getLogger("perfusion")
GATES_KEY = "Perfusion gates"
HIRES_GATES_KEY = "Perfusion hires gates"


def first_conditioning(text_cond) -> torch.Tensor | None:
    """The first row of the WebUI's conditioning ([B, T, d], or SDXL's dict with 'crossattn')."""
    if isinstance(text_cond, dict):
        text_cond = text_cond.get("crossattn")
    if not isinstance(text_cond, torch.Tensor) or text_cond.ndim != 3 or text_cond.shape[0] == 0:
        return None
    return text_cond[0]


def on_denoiser(activator, step: int, total: int, text_cond) -> None:
    """Schedules, then (first call of a pass) the gate inspector. Never raises into sampling."""
    try:
        activator.on_step(int(step or 0), int(total or 0))
    except Exception:  # a schedule must never end a generation
        log.warning("Perfusion: could not apply the β/τ schedule at step %s", step, exc_info=True)
    if not activator.inspect_pending:
        return
    activator.inspect_pending = False
    enabled = getattr(activator.env, "inspector_enabled", None)
    if enabled is not None and not enabled():
        return
    try:
        inspect_pass(activator, text_cond)
    except Exception:  # the inspector is advice; the image matters more
        log.warning("Perfusion: gate inspector skipped", exc_info=True)


def inspect_pass(activator, text_cond) -> dict | None:
    """Write the gate line of this pass into the generation info and warn about leaks; returns the report."""
    p = activator.p
    hidden = first_conditioning(text_cond)
    if p is None or hidden is None or not activator.pass_concepts:
        return None
    prompts = getattr(p, "hr_prompts" if activator.hires else "prompts", None) or []
    if not prompts:
        return None
    texts, fixes = activator.env.token_layout(prompts[0])
    length = hidden.shape[0]
    positions = {name: [i for i in fixes.get(word, []) if i < length] for name, word in activator.pass_words.items()}
    concepts = [(name, entry.concept, *entry.gate_at(0.0)) for name, entry in activator.pass_concepts.items()
                if positions.get(name)]
    if not concepts:
        return None
    positions = {name: positions[name] for name, *_ in concepts}
    report = gate_report(hidden, concepts, texts, positions, activator.competitive)
    p.extra_generation_params[HIRES_GATES_KEY if activator.hires else GATES_KEY] = gate_line(report, positions)
    for warning in report["warnings"]:
        activator.env.warn(p, warning)
    return report
