"""`DiffusersBackend`: the trainer's Backend over a diffusers Stable Diffusion pipeline (SD1, SD2, SDXL, toy).

The denoiser loss is the trainer's own (training.trainer): this backend adds noise with the model's
training schedule, gives the ε or v target and calls the UNet with whatever conditioning its family
reads: the context, and for SDXL the pooled `text_embeds` and the size/crop `time_ids`.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..core import families
from ..core.covariance import cached_covariance
from ..core.tags import format_tag
from ..training.backend import Backend
from ..training.dataset import pixels_of
from .encoding import model_hash, prompt_encoder, text_encoders, time_ids, unet_kwargs
from .generate import generate


class DiffusersBackend(Backend):
    """Backend over a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline (and the toy model)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.device = pipe.unet.device
        self.prompt_encoder = prompt_encoder(pipe)
        # Noise is added with the training schedule: a sampler's add_noise (Euler: x + σ·ε) is not q(x_t | x_0).
        scheduler = pipe.scheduler
        self.noise_scheduler = (scheduler if isinstance(scheduler, (DDPMScheduler, DDIMScheduler))
                                else DDPMScheduler.from_config(scheduler.config))
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self):
        return [self.pipe.unet, self.pipe.vae, *text_encoders(self.pipe)]

    def encode_images(self, images):
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows fp16
        if upcast:
            vae.to(torch.float32)
        try:
            latents = vae.encode(images.to(self.device, vae.dtype)).latent_dist.sample()
        finally:
            if upcast:
                vae.to(torch.float16)
        return latents * vae.config.scaling_factor

    def add_noise(self, latents, noise, t):
        return self.noise_scheduler.add_noise(latents, noise, t)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def target(self, latents, noise, t):
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return noise

    def predict(self, noisy, t, context, pooled=None, time_ids=None):
        if time_ids is None and pooled is not None:  # the whole latent is the image: no crop, no resize
            scale = self.pipe.vae_scale_factor
            time_ids = self._time_ids(noisy.shape[0], noisy.shape[-2] * scale, noisy.shape[-1] * scale)
        dtype = self.unet.dtype
        kwargs = unet_kwargs(self.unet, None if pooled is None else pooled.to(dtype),
                             None if time_ids is None else time_ids.to(self.device, dtype))
        return self.unet(noisy.to(dtype), t, encoder_hidden_states=context.to(dtype), **kwargs).sample

    def _time_ids(self, n, height, width):
        return time_ids(n, height, width, device=self.device)

    @property
    def num_train_timesteps(self):
        return self.noise_scheduler.config.num_train_timesteps

    def text_covariance(self):
        # a plug-in's text encoder may only know its own words (the toy's): its captions, else the generic corpus
        captions = families.caption_corpus(self.family)
        encoders = text_encoders(self.pipe)
        family = families.get(self.family)
        if len(encoders) == 1 and family.encoder_layer == "last":
            return cached_covariance(self.pipe.text_encoder, self.pipe.tokenizer, captions)
        # over what the UNet reads: several encoders' chosen layers, concatenated (SDXL: 2048 wide)
        parts = self.prompt_encoder.parts

        def encode(ids):
            outs = []
            for part in parts:
                out = part.text_encoder(ids.to(part.text_encoder.device), output_hidden_states=True)
                outs.append(out.last_hidden_state if part.layer == "last" else out.hidden_states[-2])
            return torch.cat(outs, dim=-1)

        return cached_covariance(torch.nn.ModuleList(encoders), self.pipe.tokenizer, captions, encode=encode,
                                 variant=family.encoder_layer)

    @property
    def base_hash(self) -> str:
        return model_hash(self.pipe)

    def sample(self, prompt: str, seed: int, size: int):
        images, _ = generate(self.pipe, prompt, seed=seed)
        return pixels_of(images[0], size)

    def preview(self, prompt_template: str, concept, seed: int = 0):
        images, _ = generate(self.pipe, prompt_template.format(format_tag(concept.name)), seed=seed,
                             loaded={concept.name: concept})
        image = images[0]
        return image.resize((128, 128), resample=0) if image.width < 128 else image
