"""Activate concepts on a UNet with forward hooks on every attn2 `to_k`/`to_v`.

Hooks never touch weights: they add the gated rank-1 delta to the projection's output, so they
compose with anything that patches `Linear.forward` or the weights (A1111's Lora keeps its own
backups), work with every attention implementation (all call to_k/to_v), and removing them leaves
the model bit-identical. `activate` is a context manager that removes them even on exceptions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator

import torch

from .concept import Concept
from .errors import PerfusionError
from .gated_edit import ProjectionEdit, stack_edit
from .layers import CrossAttentionLayer, cross_attention_layers, model_family

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ResolvedConcept:
    concept: Concept
    strength: float
    beta: float
    tau: float


# An activation entry: a Concept, or (Concept, strength[, beta[, tau]]) with None meaning "the default".
ConceptEntry = Concept | tuple


def resolve(concepts: Iterable[ConceptEntry], strength: float = 1.0, beta: float | None = None,
            tau: float | None = None) -> list[ResolvedConcept]:
    """Normalise `[c, (c, 0.8), (c, 0.8, beta, tau), ...]` into ResolvedConcept entries.

    β/τ precedence: the entry's own (per-tag) value, then the call's, then the file's metadata.
    """
    out = []
    for item in concepts:
        concept, w, b, t = (tuple(item) + (None,) * (4 - len(item))) if isinstance(item, tuple) else (item, None, None, None)
        if not isinstance(concept, Concept):
            raise PerfusionError(f"activate() takes Concept objects (from load_concept), got {type(concept).__name__}")
        w = strength if w is None else w
        b = float(next(v for v in (b, beta, concept.beta) if v is not None))
        t = float(next(v for v in (t, tau, concept.tau) if v is not None))
        if t <= 0:
            raise PerfusionError(f"tau must be > 0, got {t} for concept {concept.name!r}")
        out.append(ResolvedConcept(concept, float(w), b, t))
    return out


def check_fits(concept: Concept, layers: dict[str, CrossAttentionLayer], family: str) -> None:
    """Refuse a concept that does not fit this UNet, with the reason and the fix."""
    if concept.base_family != family:
        raise PerfusionError(
            f"Concept {concept.name!r} was trained for {concept.base_family}; the loaded model is {family}. "
            f"Load a {concept.base_family} model or retrain the concept on this one."
        )
    d = next(iter(layers.values())).in_dim
    if concept.dim != d:
        raise PerfusionError(f"Concept {concept.name!r} has {concept.dim}-d targets; this model's text width is {d}.")
    unknown = [name for name in concept.layers if name not in layers]
    if unknown:
        raise PerfusionError(
            f"Concept {concept.name!r} edits layers this model does not have ({', '.join(unknown[:3])}"
            f"{', …' if len(unknown) > 3 else ''}); it was trained on a different UNet layout."
        )
    for name in concept.layers:
        out = layers[name].out_dim
        for kind in ("key", "value"):
            got = concept.targets(kind)[name].shape[0]
            if got != out:
                raise PerfusionError(
                    f"Concept {concept.name!r}: layer {name} {kind} target has {got} values, the model's "
                    f"projection outputs {out}. It was trained on a different model."
                )


def build_edits(unet: torch.nn.Module, entries: list[ResolvedConcept]) -> dict[torch.nn.Linear, ProjectionEdit]:
    """Validate every concept against the UNet and stack one ProjectionEdit per edited Linear."""
    layers = cross_attention_layers(unet)
    family = model_family(layers)
    for entry in entries:
        check_fits(entry.concept, layers, family)
    edits = {}
    for name, layer in layers.items():
        present = [(e.concept, e.strength, e.beta, e.tau) for e in entries if name in e.concept.key_targets]
        if not present:
            continue
        edits[layer.to_k] = stack_edit(present, "key", name)
        edits[layer.to_v] = stack_edit(present, "value", name)
    return edits


def _make_hook(edit: ProjectionEdit):
    def hook(module, inputs, output):
        return edit.apply(inputs[0], output, module.weight)

    return hook


def attach(edits: dict[torch.nn.Linear, ProjectionEdit]) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks; returns handles for `detach`."""
    return [module.register_forward_hook(_make_hook(edit)) for module, edit in edits.items()]


def detach(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


@contextlib.contextmanager
def activate(unet: torch.nn.Module, concepts: Iterable[ConceptEntry], strength: float = 1.0,
             beta: float | None = None, tau: float | None = None) -> Iterator[torch.nn.Module]:
    """Within the block, the UNet's attn2 K/V carry the concepts' gated rank-1 edits.

    `concepts` holds Concept objects or (Concept, strength) pairs. Everything is validated before any
    hook is attached, so a concept that does not fit raises PerfusionError with the model untouched.
    """
    entries = resolve(concepts, strength, beta, tau)
    handles = attach(build_edits(unet, entries)) if entries else []
    try:
        yield unet
    finally:
        detach(handles)
