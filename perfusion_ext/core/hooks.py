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

from . import families
from .concept import Concept
from .errors import PerfusionError
from .gated_edit import CoefficientCache, ProjectionEdit, stack_edit
from .layers import CrossAttentionLayer, cross_attention_layers, model_family
from .tags import Schedule, check_strength, value_at

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ResolvedConcept:
    """A concept as activated. `beta`/`tau` hold where no schedule point does (before the first one, or
    always without a schedule); a schedule ((fraction, value), ...) moves them during sampling."""

    concept: Concept
    strength: float
    beta: float
    tau: float
    beta_schedule: Schedule = ()
    tau_schedule: Schedule = ()

    def gate_at(self, fraction: float) -> tuple[float, float]:
        """(β, τ) in effect at `fraction` of the sampling steps."""
        return value_at(self.beta_schedule, fraction, self.beta), value_at(self.tau_schedule, fraction, self.tau)

    @property
    def scheduled(self) -> bool:
        return any(self.gate_at(f) != self.gate_at(0.0) for f, _ in self.beta_schedule + self.tau_schedule)


def gate_settings(schedule: Schedule, default: float) -> tuple[float, Schedule]:
    """(value, schedule) for a ResolvedConcept: a schedule that is one point at 0 is a plain value."""
    if len(schedule) == 1 and schedule[0][0] == 0.0:
        return float(schedule[0][1]), ()
    return float(default), tuple(schedule)


# An activation entry: a Concept, or (Concept, strength[, beta[, tau]]) with None meaning "the default";
# beta and tau may also be schedules ((fraction, value), ...) as core.tags parses them.
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
        w = _strength(strength if w is None else w, concept)
        b_schedule, t_schedule = (b if isinstance(b, tuple) else ()), (t if isinstance(t, tuple) else ())
        b = float(next(v for v in (None if b_schedule else b, beta, concept.beta) if v is not None))
        t = float(next(v for v in (None if t_schedule else t, tau, concept.tau) if v is not None))
        b, b_schedule = gate_settings(b_schedule, b)
        t, t_schedule = gate_settings(t_schedule, t)
        if t <= 0 or any(v <= 0 for _, v in t_schedule):
            raise PerfusionError(f"tau must be > 0, got {t} for concept {concept.name!r}")
        out.append(ResolvedConcept(concept, w, b, t, b_schedule, t_schedule))
    return out


def _strength(value, concept: Concept) -> float:
    """A strength checked as a tag's is (finite, within ±MAX_STRENGTH): a huge one overflows the edit."""
    try:
        return check_strength(float(value))
    except (TypeError, ValueError) as exc:
        reason = exc if str(exc).startswith("strength:") else f"strength: {value!r} is not a number"
        raise PerfusionError(f"{reason} (concept {concept.name!r})") from None


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
    if families.get(family).known_layouts and set(concept.layers) != set(layers):  # SDXL base vs SSD-1B, Vega…
        raise PerfusionError(
            f"Concept {concept.name!r} was trained on {families.layout_label(family, len(concept.layers))}; the "
            f"loaded model is {families.layout_label(family, len(layers))}. Their attn2 layers differ: retrain the "
            "concept on this model."
        )
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


@dataclasses.dataclass
class Edits:
    """The ProjectionEdits of one activation and which entries each holds, so that a per-step schedule can
    move every gate at once: `set_progress(fraction)` at each sampling step."""

    edits: dict[torch.nn.Linear, ProjectionEdit]
    entries: list[ResolvedConcept]
    members: dict[torch.nn.Linear, list[int]]  # module -> indices into entries, in the edit's concept order
    gates: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    @property
    def scheduled(self) -> bool:
        return any(entry.scheduled for entry in self.entries)

    def set_progress(self, fraction: float) -> bool:
        """Apply the (β, τ) in effect at `fraction` of the sampling steps; True when a gate moved."""
        gates = [entry.gate_at(float(fraction)) for entry in self.entries]
        if gates == self.gates:
            return False
        for module, edit in self.edits.items():
            indices = self.members[module]
            edit.set_gates([gates[i][0] for i in indices], [gates[i][1] for i in indices])
        self.gates = gates
        return True


def prepare_edits(unet: torch.nn.Module, entries: list[ResolvedConcept], competitive: bool = False) -> Edits:
    """Validate every concept against the UNet and stack one ProjectionEdit per edited Linear, with the
    gates of the first sampling step. `competitive`: each token keeps only its most similar concept's gate."""
    layers = cross_attention_layers(unet)
    family = model_family(layers)
    for entry in entries:
        check_fits(entry.concept, layers, family)
    edits, members = {}, {}
    cache = CoefficientCache()  # the text-side coefficients, computed once for every layer
    start = [entry.gate_at(0.0) for entry in entries]
    for name, layer in layers.items():
        indices = [i for i, e in enumerate(entries) if name in e.concept.key_targets]
        if not indices:
            continue
        present = [(entries[i].concept, entries[i].strength, *start[i]) for i in indices]
        for kind, module in (("key", layer.to_k), ("value", layer.to_v)):
            edits[module] = stack_edit(present, kind, name, cache=cache, concept_key=tuple(indices),
                                       competitive=competitive)
        members[layer.to_k] = members[layer.to_v] = indices
    return Edits(edits, list(entries), members, start)


def build_edits(unet: torch.nn.Module, entries: list[ResolvedConcept],
                competitive: bool = False) -> dict[torch.nn.Linear, ProjectionEdit]:
    """Validate every concept against the UNet and stack one ProjectionEdit per edited Linear."""
    return prepare_edits(unet, entries, competitive).edits


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
             beta: float | None = None, tau: float | None = None, competitive: bool = False) -> Iterator[torch.nn.Module]:
    """Within the block, the UNet's attn2 K/V carry the concepts' gated rank-1 edits.

    `concepts` holds Concept objects or (Concept, strength) pairs. Everything is validated before any
    hook is attached, so a concept that does not fit raises PerfusionError with the model untouched.
    `competitive`: with several concepts, each token keeps only its most similar concept's gate, so no concept's edit
    acts on another concept's word.
    """
    with activation(unet, concepts, strength, beta, tau, competitive):
        yield unet


@contextlib.contextmanager
def activation(unet: torch.nn.Module, concepts: Iterable[ConceptEntry], strength: float = 1.0,
               beta: float | None = None, tau: float | None = None, competitive: bool = False) -> Iterator[Edits]:
    """`activate`, yielding the Edits: call `.set_progress(fraction)` at each sampling step to follow
    per-step β/τ schedules (entries whose beta/tau are schedules)."""
    entries = resolve(concepts, strength, beta, tau)
    edits = prepare_edits(unet, entries, competitive) if entries else Edits({}, [], {})
    handles = attach(edits.edits)
    try:
        yield edits
    finally:
        detach(handles)
