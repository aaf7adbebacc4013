"""The one source of training settings: `TrainConfig` with its defaults, the per-family defaults from the
family registry, and the limits every front end enforces (the CLI, the REST API, the WebUI tab).

Front ends read `field_defaults(family)` and `LIMITS` instead of writing numbers of their own.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core import families
from ..core.concept import DEFAULT_BETA, DEFAULT_TAU
from ..core.errors import PerfusionError

MODES = ("perfusion", "textual_inversion", "no_key_lock")


@dataclasses.dataclass
class TrainConfig:
    name: str
    superclass: str
    steps: int | None = None  # None: the family's default (families.Family.train_steps)
    batch_size: int = 16
    micro_batch: int | None = None  # None: the whole batch on tiny models, 4 on a GPU, 1 on a CPU
    lr_value: float | None = None  # None: the family's default (families.Family.train_lr_value)
    lr_embedding: float = 0.006
    # The gate the edit is trained under. None: the concept's own inference gate (beta, tau), so the value
    # targets are fitted with the gate they will be sampled with, including how far it opens on other words.
    # The paper trains with a sharper gate (0.75, 0.1), which lost fidelity and alignment on the toy benchmark
    # (README, row paper_train_gate).
    train_beta: float | None = None
    train_tau: float | None = None
    beta: float = DEFAULT_BETA  # inference defaults written to the file
    tau: float = DEFAULT_TAU
    resolution: int | None = None  # None: the family's default (families.Family.train_resolution)
    seed: int = 0
    checkpoint_every: int = 50
    preview_every: int = 50
    preview_prompt: str = "a photo of a {}"
    masks_dir: str | None = None
    flip: bool = True  # mirror half the images; turn off for objects that are not left/right symmetric
    # Recipe fixes over the paper's (paper_recipe() turns them off; the quality benchmark has a row each):
    init_from_captions: bool = True  # i* and o*_V start from the training captions, not generic templates
    # Outside the subject mask, match the frozen base's superclass prediction. Off by default: no measured
    # gain on the toy benchmark (README, row with_background_distill) for ~35 % more time per step.
    background_distill: float = 0.0
    # Weight of ‖e − e_super‖²/‖e_super‖²: keeps the learned word near its superclass. Off by default: it costs
    # fidelity on the quality benchmark (README, row with_embedding_pull) with alignment as good without it; it
    # was added against backgrounds taken over by the learned word on a model that could not draw the concept.
    embedding_pull: float = 0.0
    # Weight of Σ relu(s − 0.3)² over the caption's other tokens: the learned word must not make the words
    # after it look like itself (the causal text encoder carries it into them, their gates open, and the
    # concept's look ends up spread over "on the left", which another object's words then inherit). Not applied
    # in textual_inversion mode, which has no gate. The default is chosen on the quality benchmark (README).
    leak_penalty: float = 0.1
    # Weight of relu(0.9 − s)² on the concept's own token in text-only captions where another object comes first:
    # the training captions always put the concept first, and after another object its gate nearly shuts, so in
    # a prompt with two concepts the second is hardly edited. Not applied in textual_inversion mode.
    context_gate: float = 0.0
    # Weight of the same floor in text-only captions with a size word or a style prefix before the concept
    # (trainer.PHRASING_CAPTIONS): "a large <concept>" otherwise shuts its gate. On by default: on the quality
    # benchmark, four training seeds, it raised fidelity on every seed and concept (README, Quality). Not applied
    # in textual_inversion mode.
    phrasing_gate: float = 1.0
    # Share of training captions that start with another object's clause (the superclass: "a {s} on the left, …"):
    # the concept is otherwise only ever learned as the first object, and after another object its encoding moves
    # away from what its edit was fitted on. The loss stays on the subject's mask.
    leading_object: float = 0.0
    # Number of two-object scenes added to the training images (training.pair_scenes): the subject, cut out by its
    # mask, pasted beside the base model's drawing of the superclass word, captioned "a {s} on the left and a {} on
    # the right" (or top and bottom), mostly in second place. A concept learned only alone is lost when it comes
    # second in a prompt with two concepts. Needs subject masks.
    pair_scenes: int = 0
    ema_momentum: float = 0.99
    mode: str = "perfusion"  # or the benchmark baselines: textual_inversion, no_key_lock
    description: str = ""
    init_from: str | None = None  # a concept file to continue training from (instead of the superclass)

    def resolved(self, family: str, device: torch.device) -> TrainConfig:
        """Family defaults filled in (steps, resolution, micro-batch for this device)."""
        fam = families.get(family)
        micro = self.micro_batch or (self.batch_size if fam.train_whole_batch else (4 if device.type == "cuda" else 1))
        return dataclasses.replace(
            self, steps=self.steps or fam.train_steps, resolution=self.resolution or fam.train_resolution,
            lr_value=self.lr_value or fam.train_lr_value, micro_batch=min(micro, self.batch_size),
            train_beta=self.beta if self.train_beta is None else self.train_beta,
            train_tau=self.tau if self.train_tau is None else self.train_tau,
        )

    def check(self) -> None:
        """Refuse settings outside LIMITS or an unknown mode, with the allowed range."""
        if self.mode not in MODES:
            raise PerfusionError(f"unknown training mode {self.mode!r}; one of {', '.join(MODES)}")
        for key, (_, lo, hi) in LIMITS.items():
            value = getattr(self, key)
            if value is not None and not lo <= value <= hi:
                raise PerfusionError(f"{key} must be between {lo:g} and {hi:g}, got {value:g}")
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise PerfusionError(f"micro_batch ({self.micro_batch}) must divide batch_size ({self.batch_size})")


# field -> (type, minimum, maximum): what the CLI, the REST API and the tab accept.
LIMITS: dict[str, tuple[type, float, float]] = {
    "steps": (int, 1, 100_000), "batch_size": (int, 1, 64), "micro_batch": (int, 1, 64),
    "lr_value": (float, 1e-7, 10.0), "lr_embedding": (float, 1e-7, 10.0), "beta": (float, -5.0, 5.0),
    "tau": (float, 1e-4, 10.0), "train_beta": (float, -5.0, 5.0), "train_tau": (float, 1e-4, 10.0),
    "resolution": (int, 8, 4096), "seed": (int, 0, 2**32 - 1),
    "checkpoint_every": (int, 1, 100_000), "preview_every": (int, 0, 100_000),
    "background_distill": (float, 0.0, 100.0), "embedding_pull": (float, 0.0, 100.0),
    "leak_penalty": (float, 0.0, 100.0), "context_gate": (float, 0.0, 100.0), "phrasing_gate": (float, 0.0, 100.0),
    "leading_object": (float, 0.0, 1.0), "pair_scenes": (int, 0, 256),
}
# The recipe of the paper and of the public re-implementations: every fix above off, flips on.
PAPER_RECIPE: dict[str, Any] = {"flip": True, "init_from_captions": False, "background_distill": 0.0,
                                "embedding_pull": 0.0, "leak_penalty": 0.0, "context_gate": 0.0, "phrasing_gate": 0.0,
                                "leading_object": 0.0, "pair_scenes": 0,
                                "train_beta": 0.75, "train_tau": 0.1}


def paper_recipe(config: TrainConfig) -> TrainConfig:
    """The config with the paper's recipe (PAPER_RECIPE) instead of ours."""
    return dataclasses.replace(config, **PAPER_RECIPE)
_FAMILY_FIELDS = {"steps": "train_steps", "resolution": "train_resolution", "lr_value": "train_lr_value"}


def field_defaults(family: str | None = None) -> dict[str, Any]:
    """Every TrainConfig default by field name; with a family, its steps and resolution filled in."""
    out = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    if family is not None:
        out.update({field: getattr(families.get(family), attr) for field, attr in _FAMILY_FIELDS.items()})
    return out


def family_default_help(field: str) -> str:
    """`default: 400 on SD1, SD2, SDXL; 150 on the toy model` for a per-family field, from the registry."""
    by_value: dict[float, list[str]] = {}
    for fam in families.FAMILIES.values():
        by_value.setdefault(getattr(fam, _FAMILY_FIELDS[field]), []).append(fam.label)
    return "default: " + "; ".join(f"{value} on {', '.join(labels)}" for value, labels in by_value.items())


@dataclasses.dataclass
class TrainProgress:
    step: int
    total: int
    loss: float
    eta_seconds: float


@dataclasses.dataclass
class TrainCallbacks:
    on_progress: Callable[[TrainProgress], None] | None = None
    on_preview: Callable[[int, object], None] | None = None
    should_stop: Callable[[], bool] | None = None
    # once the images are read, before step 1: the dataset's notes (files skipped or converted, with the reason),
    # so a front end can show them while the run goes on (they also go to the console and NAME.run/log.json)
    on_dataset: Callable[[list[str]], None] | None = None


@dataclasses.dataclass
class TrainResult:
    concept_path: Path | None
    run_dir: Path
    steps_done: int
    status: str  # finished | interrupted | nan
    message: str
