"""The small model interface the trainer is written against, and what every implementation shares.

A backend encodes prompts (with concept vectors at tag positions), encodes images to latents, adds
noise, gives the training target, predicts with the UNet and exposes the UNet for the attn2 hooks.
Implementations: `perfusion_ext.pipelines.backend.DiffusersBackend` (CLI, toy model, tests) and
`perfusion_ext.webui.backend.WebuiLdmBackend` / `perfusion_ext.webui.sgm_backend.WebuiSgmBackend` (the SD1/SD2
or SDXL model AUTOMATIC1111 has loaded). Prompt encoding, token lookup, the family and its encoder names are
shared here; a backend provides `prompt_encoder` (a PromptEncoder over its tokenizer and text encoder, or a
MultiPromptEncoder over several) and the model-specific steps.
"""
from __future__ import annotations

import abc

import numpy as np
import torch

from ..core import families
from ..core.errors import PerfusionError
from ..core.layers import unet_family
from ..core.text import EncodedPrompts, PromptEncoder


class Backend(abc.ABC):
    unet: torch.nn.Module
    device: torch.device
    prompt_encoder: PromptEncoder
    base_hash: str = ""  # the model's fingerprint.base_hash, recorded in concepts ("" when unknown)
    _family: str | None = None

    @property
    def family(self) -> str:
        """The base family of the loaded model (from its UNet's text width)."""
        if self._family is None:
            self._family = unet_family(self.unet)
        return self._family

    @property
    def encoder_names(self) -> tuple[str, ...]:
        """The embedding tensors a concept of this family carries (`clip_l`, `clip_h`, …)."""
        return families.get(self.family).encoder_names

    def encode_prompts(self, prompts: list[list], embeddings: dict[str, dict[str, torch.Tensor]]) -> EncodedPrompts:
        """prompts: segment lists (str / ConceptTag). embeddings: concept -> encoder name -> [n, d_tok].

        With several text encoders (SDXL) the hidden states are concatenated and `pooled` is set."""
        return self.prompt_encoder.encode(prompts, embeddings)

    def word_token_ids(self, word: str) -> list[int]:
        """Token ids of a word (no BOS/EOS); a superclass must be exactly one token."""
        return list(self.prompt_encoder.tokenizer(word, add_special_tokens=False).input_ids)

    def token_embedding(self, token_id: int) -> dict[str, torch.Tensor]:
        """The input embedding row of a token per text encoder, [1, d_tok] each (detached copies)."""
        parts = getattr(self.prompt_encoder, "parts", [self.prompt_encoder])
        return {name: part.text_encoder.get_input_embeddings().weight[token_id].detach().float().clone()[None]
                for name, part in zip(self.encoder_names, parts)}

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module whose weights must never receive gradients during concept training."""
        return [self.unet]

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents (a sample of the posterior)."""

    @abc.abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet predicts: ε or v, per the model's parameterisation."""

    @abc.abstractmethod
    def predict(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction. `pooled` and `time_ids` ([n, 6]: original h, w, crop top, left, target h, w)
        are the added conditioning of UNets that read them (SDXL); others ignore them."""

    @property
    @abc.abstractmethod
    def num_train_timesteps(self) -> int: ...

    def sample(self, prompt: str, seed: int, size: int) -> np.ndarray:
        """The base model's own picture of a plain prompt, float32 [3, size, size] in [-1, 1] (for pair scenes)."""
        raise PerfusionError(f"{type(self).__name__} cannot draw pictures, so it cannot build pair scenes; train "
                             "without them")

    @abc.abstractmethod
    def text_covariance(self) -> torch.Tensor:
        """C = E[e eᵀ] of the text encoder's output tokens, [d, d] float64."""
