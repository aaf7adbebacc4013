"""`DiffusersBackend`: the trainer's Backend over a diffusers StableDiffusionPipeline (SD1/SD2 layout)."""
from __future__ import annotations

from ..core import families
from ..core.covariance import cached_covariance
from ..core.fingerprint import base_hash
from ..core.tags import format_tag
from ..core.text import PromptEncoder
from ..training.backend import Backend
from .generate import generate


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
        # a plug-in's text encoder may only know its own words (the toy's): its captions, else the generic corpus
        captions = families.caption_corpus(self.family)
        return cached_covariance(self.pipe.text_encoder, self.pipe.tokenizer, captions)

    @property
    def base_hash(self) -> str:
        return base_hash(self.pipe.text_encoder, self.unet)

    def preview(self, prompt_template: str, concept, seed: int = 0):
        images, _ = generate(self.pipe, prompt_template.format(format_tag(concept.name)), seed=seed,
                             loaded={concept.name: concept})
        image = images[0]
        return image.resize((128, 128), resample=0) if image.width < 128 else image
