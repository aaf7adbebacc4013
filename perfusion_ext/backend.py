"""The small model interface the trainer is written against, and its diffusers implementation.

A backend encodes prompts (with concept vectors at tag positions), encodes images to latents, adds
noise, gives the training target, predicts with the UNet and exposes the UNet for the attn2 hooks.
`DiffusersBackend` serves the CLI, the toy model and the tests; the WebUI has its own over the
loaded ldm/sgm model (perfusion_ext/webui/).
"""
from __future__ import annotations

import abc
import hashlib
import weakref

import torch

from .covariance import cached_covariance, module_hash
from .layers import cross_attention_layers, model_family
from .text import EncodedPrompts, PromptEncoder


_BASE_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def base_hash(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> str:
    """sha256 of the text encoder and every attn2 K/V weight: what a concept depends on (cached per UNet)."""
    if unet not in _BASE_HASHES:
        digest = hashlib.sha256(module_hash(text_encoder).encode())
        for layer in cross_attention_layers(unet).values():
            for proj in (layer.to_k, layer.to_v):
                digest.update(proj.weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        _BASE_HASHES[unet] = digest.hexdigest()
    return _BASE_HASHES[unet]


class Backend(abc.ABC):
    unet: torch.nn.Module
    device: torch.device
    encoder_names: tuple[str, ...] = ("clip_l",)  # embedding tensors a concept carries

    @property
    def family(self) -> str:
        return model_family(cross_attention_layers(self.unet))

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[list], embeddings: dict[str, dict[str, torch.Tensor]]) -> EncodedPrompts:
        """prompts: segment lists (str / ConceptTag). embeddings: concept -> encoder name -> [n, d_tok]."""

    @abc.abstractmethod
    def word_token_ids(self, word: str) -> list[int]:
        """Token ids of a word (no BOS/EOS); a superclass must be exactly one token."""

    @abc.abstractmethod
    def token_embedding(self, token_id: int) -> dict[str, torch.Tensor]:
        """The input embedding row of a token per text encoder, [1, d_tok] each (detached copies)."""

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents (a sample of the posterior)."""

    @abc.abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet predicts: ε or v, per the model's parameterisation."""

    @abc.abstractmethod
    def predict(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...

    @property
    @abc.abstractmethod
    def num_train_timesteps(self) -> int: ...

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module whose weights must never receive gradients during concept training."""
        return [self.unet]

    @abc.abstractmethod
    def text_covariance(self) -> torch.Tensor:
        """C = E[e eᵀ] of the text encoder's output tokens, [d, d] float64."""


class DiffusersBackend(Backend):
    """Backend over a diffusers StableDiffusionPipeline (SD1/SD2 layout, including the toy model)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.device = pipe.unet.device
        self.prompt_encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
        self.noise_scheduler = pipe.scheduler
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self):
        return [self.pipe.unet, self.pipe.vae, self.pipe.text_encoder]

    def encode_prompts(self, prompts, embeddings):
        per_concept = {name: emb[self.encoder_names[0]] for name, emb in embeddings.items()}
        return self.prompt_encoder.encode(prompts, per_concept)

    def word_token_ids(self, word):
        return self.pipe.tokenizer(word, add_special_tokens=False).input_ids

    def token_embedding(self, token_id):
        row = self.pipe.text_encoder.get_input_embeddings().weight[token_id]
        return {self.encoder_names[0]: row.detach().float().clone()[None]}

    def encode_images(self, images):
        vae = self.pipe.vae
        latents = vae.encode(images.to(self.device, vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def add_noise(self, latents, noise, t):
        return self.noise_scheduler.add_noise(latents, noise, t)

    def target(self, latents, noise, t):
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return noise

    def predict(self, noisy, t, context):
        return self.unet(noisy, t, encoder_hidden_states=context).sample

    @property
    def num_train_timesteps(self):
        return self.noise_scheduler.config.num_train_timesteps

    def text_covariance(self):
        captions = None
        if self.family == "toy":  # the toy text encoder only knows the toy world's words
            from .toy.world import corpus

            captions = corpus(2000)
        return cached_covariance(self.pipe.text_encoder, self.pipe.tokenizer, captions)

    @property
    def base_hash(self) -> str:
        return base_hash(self.pipe.text_encoder, self.unet)

    def preview(self, prompt_template: str, concept, seed: int = 0):
        from .generate import generate
        from .tags import format_tag

        images, _ = generate(self.pipe, prompt_template.format(format_tag(concept.name)), seed=seed,
                             loaded={concept.name: concept})
        image = images[0]
        return image.resize((128, 128), resample=0) if image.width < 128 else image
