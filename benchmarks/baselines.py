"""Fidelity ceilings for the quality benchmark: methods that change the UNet's weights.

- **Custom Diffusion**: the token embedding plus every cross-attention K/V projection weight.
- **DreamBooth** (full UNet fine-tuning) with prior preservation: the embedding and every UNet weight,
  plus a loss on images the frozen base generated for the superclass prompt (the class prior).

Both reuse the concept trainer in textual-inversion mode (its data, captions, masks and noise) and add
weights to its optimizer; they train in place, so `trained_weights` restores the UNet afterwards. They
are benchmarks only: their result is a whole modified UNet, not a concept file.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from perfusion_ext.core.layers import cross_attention_layers
from perfusion_ext.training.config import TrainConfig
from perfusion_ext.training.dataset import load_images
from perfusion_ext.training.trainer import ConceptTrainer

WEIGHT_LR = {"custom_diffusion": 2e-4, "dreambooth": 5e-5}
PRIOR_IMAGES = 8
PRIOR_WEIGHT = 1.0


def _weights(unet, method: str) -> list[torch.nn.Parameter]:
    if method == "custom_diffusion":
        return [p for layer in cross_attention_layers(unet).values() for p in (layer.to_k.weight, layer.to_v.weight)]
    return list(unet.parameters())


class _PriorPreservingTrainer(ConceptTrainer):
    """DreamBooth's prior preservation: each step also denoises base-generated superclass images."""

    def __init__(self, backend, config, dataset, prior_latents: torch.Tensor, prior_prompt: str):
        super().__init__(backend, config, dataset)
        self.prior_latents, self.prior_prompt = prior_latents, prior_prompt

    def _micro_step(self, n: int, batch_size: int) -> float:
        loss = super()._micro_step(n, batch_size)
        index = torch.randint(0, len(self.prior_latents), (n,), generator=self.noise_gen)
        latents = self.prior_latents[index].to(self.backend.device)
        noise = torch.randn(latents.shape, generator=self.noise_gen).to(latents.device)
        t = torch.randint(0, self.backend.num_train_timesteps, (n,), generator=self.noise_gen).to(latents.device)
        hidden = self.backend.encode_prompts([[self.prior_prompt]] * n, {}).hidden
        pred = self.backend.predict(self.backend.add_noise(latents, noise, t), t, hidden)
        prior = F.mse_loss(pred.float(), self.backend.target(latents, noise, t).float())
        (PRIOR_WEIGHT * prior * n / batch_size).backward()
        return loss + PRIOR_WEIGHT * prior.item() * n / batch_size


@torch.no_grad()
def _prior_latents(pipe, backend, prompt: str, seed: int) -> torch.Tensor:
    """Latents of PRIOR_IMAGES images the frozen base draws for the superclass prompt."""
    from perfusion_ext.pipelines.generate import generate

    images, _ = generate(pipe, prompt, seed=seed, n=PRIOR_IMAGES)
    pixels = torch.from_numpy(np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images]))
    return backend.encode_images(pixels).float().cpu()


@contextlib.contextmanager
def trained_weights(pipe, backend, method: str, config: TrainConfig, images_dir, masks_dir):
    """Train `method` in place; yields the trainer (its `concept()` carries the learned embedding) and
    restores every UNet weight on exit."""
    unet = pipe.unet
    saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    weights = _weights(unet, method)
    cfg = dataclasses.replace(config, mode="textual_inversion", masks_dir=str(masks_dir)).resolved(
        backend.family, backend.device)
    dataset = load_images(images_dir, cfg.resolution, masks_dir=masks_dir)
    try:
        if method == "dreambooth":
            prompt = f"a photo of a {config.superclass}"
            trainer = _PriorPreservingTrainer(backend, cfg, dataset, _prior_latents(pipe, backend, prompt, cfg.seed),
                                              prompt)
        else:
            trainer = ConceptTrainer(backend, cfg, dataset)
        for p in weights:
            p.requires_grad_(True)
        trainer.optimizer.add_param_group({"params": weights, "lr": WEIGHT_LR[method]})
        for _ in range(cfg.steps):
            trainer.train_step()
        for p in weights:
            p.requires_grad_(False)
        unet.eval()
        yield trainer
    finally:
        for p in weights:
            p.requires_grad_(False)
        unet.load_state_dict(saved)
