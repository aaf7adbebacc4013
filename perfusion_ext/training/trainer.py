"""Train a Perfusion concept (docs/design.md, "The math") against any `Backend`.

Trained: the concept token embedding (lr 0.006) and one value target o*_V per attn2 layer (lr 0.03; 0.06 on
the toy model).
Locked: the key target o*_K = W_k i_super, where i_super is the superclass word's encoding at the
concept position (EMA over batches). The target input i* is the EMA (momentum 0.99) of the concept
token's encoding, initialised from the superclass encoding; u = C⁻¹ i* follows it. The train-time gate
is the concept's inference gate (β 0.7, τ 0.15) unless the config sets one. Batch via gradient
accumulation; latents cached once; optional subject masks; optional two-object pair scenes (pair_scenes).

Runs are robust: checkpoints (state + a loadable concept) every N steps, written atomically; resume
continues to the same result as an uninterrupted run; Ctrl-C / should_stop save and return; a
non-finite loss stops and keeps the last good concept; failing previews are skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..core import families
from ..core.concept import Concept, load_concept
from ..core.errors import PerfusionError
from ..core.gated_edit import ema_update
from ..core.hooks import ResolvedConcept, attach, build_edits, detach
from ..core.layers import cross_attention_layers
from ..core.tags import ConceptTag
from ..core.text import EncodedPrompts
from . import pair_scenes
from .backend import Backend
from .config import TrainConfig
from .dataset import Dataset
from .state import load_state, save_state

log = logging.getLogger(__name__)

TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a picture of the {}", "a close-up photo of a {}",
    "a photo of the {}", "a good photo of a {}", "a bright photo of the {}", "an image of a {}",
    "a drawing of a {}", "a photo of a small {}", "a photo of a large {}", "a {}",
)


COVARIANCE_RIDGE = 1e-5
LEAK_MARGIN = 0.3  # s below this keeps a gate (β 0.7, τ 0.15) under 0.07: no penalty there
# Text-only captions for the leak penalty: another object's word after the concept's ({s}: the superclass).
LEAK_CAPTIONS = ("a {} and a {s}", "a {} on the left and a {s} on the right", "a {} next to a {s}",
                 "a {} at the top and a {s} at the bottom")
CONTEXT_FLOOR = 0.9  # s at least this on the concept's own token keeps its gate (β 0.7, τ 0.15) above 0.79
# Text-only captions for the context gate: another object's word *before* the concept's ({s}: the superclass).
CONTEXT_CAPTIONS = ("a {s} and a {}", "a {s} on the left and a {} on the right", "a {s} next to a {}",
                    "a {s} at the top and a {} at the bottom")
# Clauses put before a training caption (TrainConfig.leading_object): another object first, as in a prompt with
# two concepts ({s}: the superclass).
LEADING_CLAUSES = ("a {s} on the left, ", "a {s} at the top, ", "a {s} and ", "a {s}, ")
# Text-only captions for the phrasing gate: size words and style prefixes just before the concept's word, which
# training captions rarely have (after "a large" the toy house's gate fell to 0.33 and it was never drawn).
PHRASING_CAPTIONS = ("a small {}", "a large {}", "a large {} and nothing else", "sketch of a {}",
                     "illustration, a small {}", "a picture of a large {} against a red background",
                     "digital art, a tiny {}", "a big {} in the corner")


def regularized(cov: torch.Tensor) -> torch.Tensor:
    """C + 1e-5·mean(diag C)·I in float64. A final LayerNorm can make C (nearly) singular — e.g. the
    all-ones direction when its bias is zero — and fp32 storage can tip that below zero; the ridge keeps
    C⁻¹ defined while changing u = C⁻¹i* only along directions text encodings never take."""
    cov = cov.double()
    return cov + COVARIANCE_RIDGE * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=torch.float64)


class ConceptTrainer:
    """One training run: parameters, EMA targets, optimizer, data order and RNG, all checkpointable."""

    def __init__(self, backend: Backend, config: TrainConfig, dataset: Dataset):
        config = config.resolved(backend.family, backend.device)  # the family's defaults where a field is None
        config.check()
        self.backend, self.cfg, self.dataset = backend, config, dataset
        self.layers = cross_attention_layers(backend.unet)
        self.family = backend.family
        super_ids = backend.word_token_ids(config.superclass)
        if len(super_ids) != 1:
            raise PerfusionError(
                f"superclass {config.superclass!r} is {len(super_ids)} tokens for this tokenizer; it must be exactly "
                "one (e.g. 'dog', 'bear', 'toy', 'circle'). Pick a single common word."
            )
        if config.pair_scenes:  # two-object scenes with the subject in them, built once (deterministic on resume)
            scenes = pair_scenes.compose(backend, dataset, config.superclass, config.pair_scenes, config.resolution,
                                         config.seed)
            self.dataset = dataset = dataclasses.replace(dataset, images=dataset.images + scenes)
        self.embedding = {k: torch.nn.Parameter(v.clone()) for k, v in backend.token_embedding(super_ids[0]).items()}
        # detached: the pull must not differentiate through its own anchor (which pushed the embedding away)
        self.superclass_embedding = {k: v.detach().clone() for k, v in self.embedding.items()}
        self.cov_cholesky = torch.linalg.cholesky(regularized(backend.text_covariance()))
        self.rng = np.random.default_rng(config.seed)
        self.noise_gen = torch.Generator().manual_seed(config.seed)
        self.order: list[int] = []
        self.latents = self._cache_latents()
        with torch.no_grad():
            i_super = self._superclass_encoding_mean()
        self.i_star = i_super.clone()
        self.i_super = i_super.clone()
        value_weights = {name: layer.to_v.weight for name, layer in self.layers.items()}
        self.value_targets = {name: torch.nn.Parameter((w.detach().double() @ i_super).float())
                              for name, w in value_weights.items()}
        self.key_params = ({name: torch.nn.Parameter((layer.to_k.weight.detach().double() @ i_super).float())
                            for name, layer in self.layers.items()} if config.mode == "no_key_lock" else {})
        groups = [{"params": list(self.embedding.values()), "lr": config.lr_embedding}]
        if config.mode != "textual_inversion":
            groups.append({"params": list(self.value_targets.values()) + list(self.key_params.values()),
                           "lr": config.lr_value})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if config.init_from:  # continue training an existing concept (a fresh optimizer, the same settings)
            self.start_from(load_concept(config.init_from))
        self.step = 0
        self.losses: list[float] = []
        self.gradient_checkpointing = False
        self.cache_superclass = backend.device.type == "cuda"  # see _superclass_encoding
        self._superclass_cache: dict[str, EncodedPrompts] = {}
        self.autocast = None
        if backend.device.type == "cuda":  # mixed precision: bf16 where the GPU has it (no loss scaling needed)
            self.autocast = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
            if families.get(self.family).gradient_checkpointing:  # SDXL at 1024 px: activations, not weights, fill memory
                self._enable_gradient_checkpointing()

    # ---- data ------------------------------------------------------------------------------
    @torch.no_grad()
    def _cache_latents(self) -> torch.Tensor:
        """Latents of every image and its mirror, encoded once: [n_images, 2, C, h, w]."""
        pixels = torch.from_numpy(np.stack([im.pixels for im in self.dataset.images]))
        both = torch.stack([pixels, pixels.flip(-1)], 1).flatten(0, 1)
        with torch.random.fork_rng(devices=[]):  # the posterior sample is seeded: resume re-encodes identically
            torch.manual_seed(self.cfg.seed)
            lat = torch.cat([self.backend.encode_images(both[i:i + 8]).float().cpu() for i in range(0, len(both), 8)])
        return lat.view(len(pixels), 2, *lat.shape[1:])

    def _next_indices(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = [int(i) for i in self.rng.permutation(len(self.dataset.images))]
            out.append(self.order.pop(0))
        return out

    def _flips(self, idx: list[int]) -> np.ndarray:
        """1 for the images to mirror: half at random when the run flips, never a scene whose caption says where
        its objects are (pair scenes)."""
        flips = (self.rng.random(len(idx)) < 0.5).astype(int) if self.cfg.flip else np.zeros(len(idx), int)
        return flips * np.array([self.dataset.images[i].mirrorable for i in idx], dtype=int)

    def _segments(self, template: str, tag: ConceptTag) -> list:
        before, _, after = template.partition("{}")
        return [s for s in (before, tag, after) if s != ""]

    def _template(self, index: int) -> str:
        caption = self.dataset.images[index].caption
        if caption and "{}" in caption:
            return caption
        return TEMPLATES[int(self.rng.integers(len(TEMPLATES)))]

    def _caption(self, index: int) -> str:
        """The image's training caption, with another object's clause before it in a `leading_object` share."""
        template = self._template(index)
        if self.cfg.leading_object > 0 and self.rng.random() < self.cfg.leading_object:
            clause = LEADING_CLAUSES[int(self.rng.integers(len(LEADING_CLAUSES)))]
            template = clause.replace("{s}", self.cfg.superclass) + template
        return template

    def _initial_templates(self) -> list[str]:
        """Captions i* and o*_V start from: the training captions (with "{}"), else generic templates."""
        captions = [im.caption for im in self.dataset.images if im.caption and "{}" in im.caption]
        return captions if self.cfg.init_from_captions and captions else list(TEMPLATES)

    def _superclass_encoding_mean(self) -> torch.Tensor:
        tag = ConceptTag(self.cfg.name)
        prompts = [self._segments(t, tag) for t in self._initial_templates()]
        enc = self.backend.encode_prompts(prompts, {self.cfg.name: self.superclass_embedding})
        return torch.stack([enc.hidden[b, p[self.cfg.name][-1]] for b, p in enumerate(enc.concept_positions)]
                           ).double().mean(0).cpu()

    # ---- the concept -------------------------------------------------------------------------
    def target_input_cinv(self) -> torch.Tensor:
        return torch.cholesky_solve(self.i_star[:, None], self.cov_cholesky)[:, 0]

    def concept(self, detach_values: bool = True) -> Concept:
        def value(t):
            return t.detach().clone() if detach_values else t

        keys = ({n: value(p) for n, p in self.key_params.items()} if self.key_params else
                {n: (layer.to_k.weight.detach().double() @ self.i_super).float() for n, layer in self.layers.items()})
        training = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("name", "description")}
        return Concept(
            name=self.cfg.name, token=self.cfg.name, superclass=self.cfg.superclass, base_family=self.family,
            embeddings={k: v.detach().clone() for k, v in self.embedding.items()},
            target_input=self.i_star.float(), target_input_cinv=self.target_input_cinv().float(),
            key_targets=keys, value_targets={n: value(p) for n, p in self.value_targets.items()},
            beta=self.cfg.beta, tau=self.cfg.tau, base_hash=getattr(self.backend, "base_hash", ""),
            metadata={
                "perfusion.steps": str(self.step), "perfusion.training": json.dumps(training, sort_keys=True),
                "perfusion.mode": self.cfg.mode, "perfusion.images": str(len(self.dataset.images)),
                "modelspec.description": self.cfg.description or
                f"Perfusion concept '{self.cfg.name}' ({self.cfg.superclass}), {self.step} steps",
                "modelspec.date": time.strftime("%Y-%m-%d"),
                **self._v_architecture(),
            },
        )

    def _v_architecture(self) -> dict[str, str]:
        """modelspec.architecture of a concept trained on a v-prediction model of a family that names them (SD2)."""
        v_name = families.get(self.family).v_architecture
        if v_name is None or getattr(self.backend, "prediction_type", "epsilon") != "v_prediction":
            return {}
        return {"modelspec.architecture": f"{v_name}/perfusion"}

    # ---- one optimisation step -------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over `batch_size` images; on out-of-memory, retry with less memory."""
        while True:
            try:
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(self.cfg.batch_size // self.cfg.micro_batch):
                    total += self._micro_step(self.cfg.micro_batch, self.cfg.batch_size)
                break
            except torch.OutOfMemoryError:
                self._reduce_memory()
        self.optimizer.step()
        self.step += 1
        return total

    def _reduce_memory(self) -> None:
        """Halve the micro-batch (keeping the batch via more accumulation), then turn on checkpointing."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.cfg.micro_batch > 1:
            smaller = max(d for d in range(1, self.cfg.micro_batch // 2 + 1) if self.cfg.batch_size % d == 0)
            log.warning("out of memory: micro-batch %d -> %d (same batch via accumulation)", self.cfg.micro_batch, smaller)
            self.cfg = dataclasses.replace(self.cfg, micro_batch=smaller)
        elif not self.gradient_checkpointing and hasattr(self.backend.unet, "enable_gradient_checkpointing"):
            log.warning("out of memory at micro-batch 1: enabling gradient checkpointing")
            self._enable_gradient_checkpointing()
        else:
            raise PerfusionError("out of memory even at micro-batch 1 with gradient checkpointing: lower the "
                                 "resolution, close other GPU programs, or train on a larger GPU.")

    def _enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in the backward pass. The attn2 hooks stay attached until backward ends
        (`_micro_step`), so the recomputed forward carries the same edit."""
        if hasattr(self.backend.unet, "enable_gradient_checkpointing"):
            self.backend.unet.enable_gradient_checkpointing()
            self.gradient_checkpointing = True

    def _time_ids(self, idx: list[int], latent_size) -> torch.Tensor | None:
        """SDXL's size conditioning per image: original (h, w), crop (top, left), target (h, w); None for others."""
        if not families.get(self.family).size_conditioning:
            return None
        side = self.cfg.resolution
        rows = [[*(self.dataset.images[i].original_size or (side, side)), *self.dataset.images[i].crop_top_left,
                 side, side] for i in idx]
        return torch.tensor(rows, dtype=torch.float32, device=self.backend.device)

    def _micro_step(self, n: int, batch_size: int) -> float:
        cfg, tag = self.cfg, ConceptTag(self.cfg.name)
        idx = self._next_indices(n)
        flips = self._flips(idx)
        prompts = [self._segments(self._caption(i), tag) for i in idx]
        latents = self.latents[idx, flips].to(self.backend.device)
        noise = torch.randn(latents.shape, generator=self.noise_gen).to(latents.device)
        t = torch.randint(0, self.backend.num_train_timesteps, (n,), generator=self.noise_gen).to(latents.device)
        noisy = self.backend.add_noise(latents, noise, t)
        target = self.backend.target(latents, noise, t)
        enc = self.backend.encode_prompts(prompts, {cfg.name: self.embedding})
        positions = [p[cfg.name][-1] for p in enc.concept_positions]
        with torch.no_grad():
            sup = self._superclass_encoding(prompts)
            rows = torch.arange(n)
            self.i_super = ema_update(self.i_super, sup.hidden[rows, positions].double().mean(0).cpu(), cfg.ema_momentum)
            self.i_star = ema_update(self.i_star, enc.hidden[rows, positions].detach().double().mean(0).cpu(),
                                     cfg.ema_momentum)
        weights = self._mask_weights(idx, flips, latents.shape[-2:])
        time_ids = self._time_ids(idx, latents.shape[-2:])
        prior = None
        if cfg.background_distill > 0 and weights is not None:
            with torch.no_grad():  # the frozen base with the superclass word, before any hook is attached
                prior = self.backend.predict(noisy, t, sup.hidden, **self._added(sup.pooled, time_ids)).float()
        handles = []
        if cfg.mode != "textual_inversion":
            entry = ResolvedConcept(self.concept(detach_values=False), 1.0, cfg.train_beta, cfg.train_tau)
            handles = attach(build_edits(self.backend.unet, [entry]))
        try:  # the hooks stay until backward ends: gradient checkpointing re-runs the forward inside it
            if self.autocast is not None:  # mixed precision on GPUs; the gate still runs in fp32
                with self.autocast:
                    pred = self.backend.predict(noisy, t, enc.hidden, **self._added(enc.pooled, time_ids))
            else:
                pred = self.backend.predict(noisy, t, enc.hidden, **self._added(enc.pooled, time_ids))
            pred = pred.float()
            loss = _weighted_mse(pred, target.float(), weights)
            if prior is not None:  # background protection: outside the subject, predict what the superclass would
                loss = loss + cfg.background_distill * _weighted_mse(pred, prior, 1.0 - weights)
            if cfg.embedding_pull > 0:
                loss = loss + cfg.embedding_pull * sum(
                    (e - self.superclass_embedding[k]).pow(2).sum() / self.superclass_embedding[k].pow(2).sum()
                    for k, e in self.embedding.items())
            if cfg.mode != "textual_inversion" and max(cfg.leak_penalty, cfg.context_gate, cfg.phrasing_gate) > 0:
                direction = self._gate_direction()  # the gate terms
                if cfg.leak_penalty > 0:
                    loss = loss + cfg.leak_penalty * self._neighbour_leak(enc, direction)
                if cfg.context_gate > 0:
                    loss = loss + cfg.context_gate * self._own_gate_floor(self.context_templates(), direction)
                if cfg.phrasing_gate > 0:
                    loss = loss + cfg.phrasing_gate * self._own_gate_floor(list(PHRASING_CAPTIONS), direction)
            (loss * n / batch_size).backward()
        finally:
            detach(handles)
        return loss.item() * n / batch_size

    def leak_templates(self) -> list[str]:
        """LEAK_CAPTIONS with the superclass as the second object ("{}" stays the concept's place)."""
        return self._with_superclass(LEAK_CAPTIONS)

    def context_templates(self) -> list[str]:
        """CONTEXT_CAPTIONS with the superclass as the first object."""
        return self._with_superclass(CONTEXT_CAPTIONS)

    def _with_superclass(self, templates: tuple[str, ...]) -> list[str]:
        return [t.replace("{s}", self.cfg.superclass) for t in templates]

    def _gate_direction(self) -> torch.Tensor:
        """u / (u · i*) with today's i*: s = e · direction is the gate's similarity (one solve per step)."""
        u = self.target_input_cinv()
        return (u / float(u @ self.i_star)).float()

    def _similarity(self, encoded: EncodedPrompts, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s of every token, mask of the concept's own tokens)."""
        s = encoded.hidden.float() @ direction.to(encoded.hidden.device)
        own = torch.zeros_like(s, dtype=torch.bool)
        for row, positions in enumerate(encoded.concept_positions):
            own[row, positions[self.cfg.name]] = True
        return s, own

    def _encode_text_only(self, templates: list[str]) -> EncodedPrompts:
        tag = ConceptTag(self.cfg.name)
        return self.backend.encode_prompts([self._segments(t, tag) for t in templates], {self.cfg.name: self.embedding})

    def _neighbour_leak(self, enc: EncodedPrompts, direction: torch.Tensor) -> torch.Tensor:
        """Per caption, Σ relu(s − LEAK_MARGIN)² over every token that is not the concept's own: how far the
        gate (s with today's i*) would open on other words. Over the batch's captions and, text only, over
        LEAK_CAPTIONS: the causal text encoder carries the learned word into every later token, including a
        second object's word ("a <house> and a rocket"), which the training captions never show."""
        total = []
        for encoded in (enc, self._encode_text_only(self.leak_templates())):
            s, own = self._similarity(encoded, direction)
            total.append(torch.relu(s - LEAK_MARGIN).pow(2).masked_fill(own, 0.0).sum(-1))
        return torch.cat(total).mean()

    def _own_gate_floor(self, templates: list[str], direction: torch.Tensor) -> torch.Tensor:
        """Mean over text-only captions of relu(CONTEXT_FLOOR − s)² on the concept's own token: keeps its gate
        open where the words before it move its encoding away from i*. The context gate uses captions with
        another object first (after "a rocket on the left," the lollipop's s was 0.57, gate 0.29, so a second
        concept is hardly edited); the phrasing gate, PHRASING_CAPTIONS (size words, style prefixes)."""
        s, own = self._similarity(self._encode_text_only(templates), direction)
        return torch.relu(CONTEXT_FLOOR - s[own]).pow(2).mean()

    def _superclass_encoding(self, prompts: list) -> EncodedPrompts:
        """The prompts with the superclass word. They never change (frozen encoders, fixed vectors), so with
        `cache_superclass` (on GPUs) each caption is encoded once, on its own, and reused."""
        embeddings = {self.cfg.name: self.superclass_embedding}
        if not self.cache_superclass:
            return self.backend.encode_prompts(prompts, embeddings)
        encoded = []
        for segments in prompts:
            key = repr(segments)
            if key not in self._superclass_cache:
                self._superclass_cache[key] = self.backend.encode_prompts([segments], embeddings)
            encoded.append(self._superclass_cache[key])
        if len({e.hidden.shape[1] for e in encoded}) != 1:  # captions of different lengths: encode them together
            return self.backend.encode_prompts(prompts, embeddings)
        pooled = None if encoded[0].pooled is None else torch.cat([e.pooled for e in encoded])
        return EncodedPrompts(torch.cat([e.hidden for e in encoded]), [e.concept_positions[0] for e in encoded],
                              None, pooled)

    @staticmethod
    def _added(pooled, time_ids) -> dict:
        """predict()'s added conditioning, only for models that read it (keeps other backends' calls unchanged)."""
        return {} if pooled is None else {"pooled": pooled, "time_ids": time_ids}

    def _mask_weights(self, idx, flips, size) -> torch.Tensor | None:
        """Subject masks at latent size [n, h, w] (mirrored with their image); None when no image has one."""
        masks = [self.dataset.images[i].mask for i in idx]
        if all(m is None for m in masks):
            return None
        h, w = size
        weights = []
        for m, f in zip(masks, flips):
            m = torch.ones(h, w) if m is None else F.interpolate(torch.from_numpy(m)[None, None], (h, w), mode="area")[0, 0]
            weights.append(m.flip(-1) if f else m)
        return torch.stack(weights).to(self.backend.device)

    # ---- checkpointable state --------------------------------------------------------------
    def params(self) -> dict[str, torch.nn.Parameter]:
        out = {f"embedding.{k}": v for k, v in self.embedding.items()}
        out.update({f"value.{k}": v for k, v in self.value_targets.items()})
        out.update({f"key.{k}": v for k, v in self.key_params.items()})
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return save_state(self)

    def restore(self, tensors, meta) -> None:
        load_state(self, tensors, meta)

    @torch.no_grad()
    def start_from(self, concept: Concept) -> None:
        """Start from a trained concept instead of the superclass: its embedding, value targets (and key
        targets where they are trained) and i*. Its superclass must be this run's: the keys stay locked to it."""
        if concept.base_family != self.family:
            raise PerfusionError(f"cannot continue {concept.name!r}: it was trained for {concept.base_family}, the "
                                 f"model is {self.family}")
        if concept.superclass != self.cfg.superclass:
            raise PerfusionError(f"cannot continue {concept.name!r} with superclass {self.cfg.superclass!r}: it was "
                                 f"trained as a {concept.superclass!r} (its keys are locked to that word)")
        if set(concept.layers) != set(self.layers) or sorted(concept.embeddings) != sorted(self.embedding):
            raise PerfusionError(f"cannot continue {concept.name!r}: it was trained on a model with other layers")
        for key, param in self.embedding.items():
            if concept.embeddings[key].shape != param.shape:
                raise PerfusionError(f"cannot continue {concept.name!r}: its embedding has another shape")
            param.copy_(concept.embeddings[key].to(param))
        for name, param in self.value_targets.items():
            param.copy_(concept.value_targets[name].to(param))
        for name, param in self.key_params.items():
            param.copy_(concept.key_targets[name].to(param))
        self.i_star = concept.target_input.double().cpu().clone()



def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over channels, weighted per latent pixel ([n, h, w]); plain mean without weights."""
    err = (pred - target).pow(2).mean(1)
    if weights is None:
        return err.mean()
    return (err * weights).sum() / weights.sum().clamp(min=1e-6)
