"""A diffusers pipeline's text side as its family builds it: the prompt encoder(s), the added conditioning.

A pipeline's text encoders are `text_encoder`, `text_encoder_2`, … with their tokenizers, in the order of
the family's `encoders` (core.families); the family says which hidden state the UNet reads and which
encoder's pooled output becomes `text_embeds`. UNets with size conditioning (SDXL) also read `time_ids`:
original size, crop top-left and target size, in pixels.
"""
from __future__ import annotations

import torch

from ..core import families
from ..core.fingerprint import base_hash
from ..core.layers import unet_family
from ..core.text import MultiPromptEncoder, PromptEncoder


def family_of(pipe) -> families.Family:
    return families.get(unet_family(pipe.unet))


def component_name(base: str, index: int) -> str:
    """`text_encoder`, `text_encoder_2`, … (diffusers' names for a pipeline's n-th encoder)."""
    return base if index == 0 else f"{base}_{index + 1}"


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [getattr(pipe, component_name("text_encoder", i)) for i in range(len(family_of(pipe).encoders))]


def model_hash(pipe) -> str:
    """The base hash concepts record (core.fingerprint): every text encoder and the attn2 K/V weights."""
    encoders = text_encoders(pipe)
    return base_hash(encoders[0] if len(encoders) == 1 else torch.nn.ModuleList(encoders), pipe.unet)


def prompt_encoder(pipe) -> PromptEncoder | MultiPromptEncoder:
    """The prompt encoder that gives this pipeline's UNet its context (and pooled output, where it reads one)."""
    family = family_of(pipe)
    parts = []
    for i, name in enumerate(family.encoder_names):
        tokenizer, encoder = getattr(pipe, component_name("tokenizer", i)), getattr(pipe, component_name("text_encoder", i))
        if tokenizer is None or encoder is None:
            raise ValueError(f"this {family.label} pipeline has no {component_name('text_encoder', i)}")
        parts.append(PromptEncoder(tokenizer, encoder, layer=family.encoder_layer, name=name,
                                   pooled=name == family.pooled_encoder))
    return parts[0] if len(parts) == 1 else MultiPromptEncoder(parts)


def time_ids(batch: int, height: int, width: int, original: tuple[int, int] | None = None,
             crop: tuple[int, int] = (0, 0), device=None, dtype=torch.float32) -> torch.Tensor:
    """[batch, 6] size/crop conditioning: original (h, w), crop (top, left), target (h, w), in pixels."""
    original = original or (height, width)
    row = torch.tensor([*original, *crop, height, width], dtype=dtype, device=device)
    return row.expand(batch, 6).clone()


def unet_kwargs(unet, pooled: torch.Tensor | None, ids: torch.Tensor | None) -> dict:
    """The `added_cond_kwargs` a UNet with text_time conditioning needs; empty for the others."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return {}
    if pooled is None or ids is None:
        raise ValueError("this UNet reads pooled text embeddings and time_ids (SDXL); none were given")
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
