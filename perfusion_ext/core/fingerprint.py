"""Fingerprints of model weights: a text encoder's hash (the covariance cache key) and a base model's hash.

A concept records the base hash of the model it was trained on (`perfusion.base_hash`): the text encoder
and every attn2 K/V weight, the only weights a concept depends on. A different base hash only warns.
"""
from __future__ import annotations

import hashlib
import weakref

import torch

from .layers import cross_attention_layers

_BASE_HASHES: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's parameter names and bytes: identifies a text encoder's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        # reshape(-1): 0-dim tensors (OpenCLIP's logit_scale) cannot be viewed as bytes; same bytes otherwise
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_hash(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> str:
    """sha256 of the text encoder and every attn2 K/V weight: what a concept depends on (cached per UNet)."""
    if unet not in _BASE_HASHES:
        digest = hashlib.sha256(module_hash(text_encoder).encode())
        for layer in cross_attention_layers(unet).values():
            for proj in (layer.to_k, layer.to_v):
                digest.update(proj.weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        _BASE_HASHES[unet] = digest.hexdigest()
    return _BASE_HASHES[unet]
