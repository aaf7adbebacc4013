"""Shared fixtures: tiny random UNets of SD1.5 topology (diffusers and ldm) and random concepts."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("PERFUSION_TEST_THREADS", "1")))

from perfusion_ext.core.concept import Concept  # noqa: E402
from perfusion_ext.core.layers import cross_attention_layers  # noqa: E402

SD1_CONTEXT = 768


def tiny_diffusers_unet(context_dim: int = SD1_CONTEXT, channels=(32, 64, 64, 64), seed: int = 0):
    """SD1.5 topology (4 levels, 2 layers per block, 16 attn2 blocks) at toy widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=channels, layers_per_block=2, cross_attention_dim=context_dim,
        attention_head_dim=2, norm_num_groups=32,
    ).eval()


def tiny_ldm_unet(context_dim: int = SD1_CONTEXT, seed: int = 0):
    """A1111's ldm UNetModel with SD1.5's config at toy widths."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True,
        transformer_depth=1, context_dim=context_dim, legacy=False,
    ).eval()
    _randomize_zero_init(unet)
    return unet


def _randomize_zero_init(model):
    """ldm zero-initialises output convs and attention projections; a random model must not be inert."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)


@pytest.fixture(scope="session")
def diffusers_unet():
    return tiny_diffusers_unet()


@pytest.fixture(scope="session")
def ldm_unet():
    return tiny_ldm_unet()


@pytest.fixture(params=["diffusers", "ldm"])
def unet(request):
    return request.getfixturevalue(f"{request.param}_unet")


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def make_concept(unet, name="teddy", seed=1, covariance=None, family="sd1", superclass="bear") -> Concept:
    """A random concept that fits `unet`: key targets locked to W_k i_super, value targets random."""
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    d = next(iter(layers.values())).in_dim
    covariance = random_spd(d) if covariance is None else covariance
    i_star = torch.randn(d, generator=g, dtype=torch.float64)
    i_super = torch.randn(d, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(covariance, i_star)
    keys, values = {}, {}
    for lname, layer in layers.items():
        keys[lname] = (layer.to_k.weight.detach().double() @ i_super).float()
        values[lname] = torch.randn(layer.out_dim, generator=g)
    return Concept(
        name=name, token=name, superclass=superclass, base_family=family,
        embeddings={"clip_l": torch.randn(1, d, generator=g)},
        target_input=i_star.float(), target_input_cinv=u.float(), key_targets=keys, value_targets=values,
    )


def unet_inputs(unet, batch=2, tokens=77, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    d = next(iter(layers.values())).in_dim
    x = torch.randn(batch, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([10] * batch)
    ctx = torch.randn(batch, tokens, d, generator=g).to(dtype)
    return x, t, ctx


def run_unet(unet, x, t, ctx):
    with torch.no_grad():
        if hasattr(unet, "down_blocks"):
            return unet(x, t, encoder_hidden_states=ctx).sample
        return unet(x, timesteps=t, context=ctx)
