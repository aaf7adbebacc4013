"""The sampling loop of both ONNX runtimes (an optimum export folder and the Triton library pipeline).

It mirrors diffusers' StableDiffusionPipeline step for step — latents from a CPU `torch.Generator`,
classifier-free guidance on the batch [negative; positive], guidance rescale, the folder's scheduler —
so a seed gives the same image as `perfusion generate` with the PyTorch model and the concept hooks.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def initial_latents(scheduler, steps: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Sets the scheduler's timesteps and draws the starting noise, as diffusers does for a CPU generator."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scheduler.init_noise_sigma


def denoise(scheduler, latents: torch.Tensor, predict: Callable[[np.ndarray, float, int], np.ndarray],
            guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Run the scheduler's timesteps. predict(model_input, t, step_index) returns the noise prediction for the
    batch [negative; positive] when guidance is on (guidance_scale > 1), else for the latents alone."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cfg = guidance_scale > 1.0
    for index, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([latents] * 2) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        noise = torch.from_numpy(np.ascontiguousarray(predict(model_in.numpy(), float(t), index)))
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance_scale * (text - uncond)
            if guidance_rescale > 0:
                noise = rescale_noise_cfg(noise, text, guidance_rescale=guidance_rescale)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], [B, 3, H, W] -> [B, H, W, 3] uint8, rounded as diffusers' numpy_to_pil."""
    images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)
