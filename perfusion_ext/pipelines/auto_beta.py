"""Auto-β: pick a concept's default gate threshold after training.

β trades fidelity (a low β opens the gate wider on the concept's token) against alignment (a high β
keeps the edit off every other token). Two ways to choose it:

- **by quality**, where a judge exists (the toy world): sweep β, measure fidelity and alignment on
  held-out prompts, and keep the β with the highest fidelity whose alignment stays within `margin` of
  the base model's (:func:`choose_by_quality`);
- **by the gate alone**, anywhere (a documented proxy for real models, no images needed): sweep β and
  read, on varied prompts with the concept, its mean gate on its own token and its leak — the largest
  gate on any other token. Keep the lowest β (the most fidelity) whose mean leak stays under
  `max_leak` (:func:`gate_curve`, :func:`choose_by_gate`).

The chosen β and its curve go into the concept's metadata (`perfusion.beta`, `perfusion.beta_curve`).
"""
from __future__ import annotations

import json
import math

from ..core.concept import Concept
from .inspect import inspect_prompt

BETAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_LEAK = 0.05
QUALITY_MARGIN = 0.1

# Varied contexts for the gate proxy: the concept among other words, before and after them.
PROXY_TEMPLATES = (
    "a photo of a {} on a white background", "a {} on the beach at sunset", "a red {} next to a blue cup",
    "a painting of a {} in a forest, highly detailed", "two {} on a table", "a close-up photo of the {}",
    "a {} in the snow, 4k", "a small {} and a large dog", "an illustration of a {}, pastel colors",
)


def gate_curve(pipe, concept: Concept, betas=BETAS, templates=PROXY_TEMPLATES) -> list[dict]:
    """Per β: the concept's mean gate on its own token and its mean leak (largest gate elsewhere)."""
    similarities = []
    for template in templates:
        report = inspect_prompt(pipe, template.format(f"<perfusion:{concept.name}>"), loaded={concept.name: concept})
        own = [t["s"][concept.name] for t in report["tokens"] if t["text"] == f"<perfusion:{concept.name}>"]
        other = [t["s"][concept.name] for t in report["tokens"] if t["text"] != f"<perfusion:{concept.name}>"]
        similarities.append((max(own), max(other)))
    curve = []
    for beta in betas:
        def gate(s, beta=beta):
            return 1.0 / (1.0 + math.exp(-(s - beta) / concept.tau))

        curve.append({"beta": beta,
                      "own_gate": sum(gate(o) for o, _ in similarities) / len(similarities),
                      "leak": sum(gate(x) for _, x in similarities) / len(similarities)})
    return curve


def choose_by_gate(curve: list[dict], max_leak: float = MAX_LEAK) -> float:
    """The lowest β whose mean leak is at most `max_leak`; the highest β when none is."""
    ok = [p["beta"] for p in curve if p["leak"] <= max_leak]
    return min(ok) if ok else max(p["beta"] for p in curve)


def choose_by_quality(curve: list[dict], base_alignment: float, margin: float = QUALITY_MARGIN) -> float:
    """The β with the highest fidelity whose alignment is at least (1 − margin) × the base model's;
    ties go to the higher β (the safer gate). With none in the margin, the β of the best alignment."""
    bar = (1.0 - margin) * base_alignment
    ok = [p for p in curve if p["alignment"] >= bar]
    if not ok:
        return max(curve, key=lambda p: (p["alignment"], p["beta"]))["beta"]
    return max(ok, key=lambda p: (p["fidelity"], p["beta"]))["beta"]


def with_default_beta(concept: Concept, beta: float, curve: list[dict], method: str) -> Concept:
    """The concept with `beta` as its default and the curve in its metadata."""
    import dataclasses

    metadata = dict(concept.metadata, **{"perfusion.beta_curve": json.dumps({"method": method, "curve": curve})})
    return dataclasses.replace(concept, beta=float(beta), metadata=metadata)
