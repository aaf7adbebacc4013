"""The uncentered covariance C = E[e eᵀ] of a text encoder's output tokens, estimated and cached.

Tokens counted per caption: BOS, the words and the first EOS (no padding), as the paper does.
C only enters training (u = C⁻¹ i*); inference needs no C. Cached per text-encoder hash as safetensors.
For SD1.5's CLIP ViT-L/14, the reference C of the perfusion-pytorch package (100K LAION captions)
is offered, converted once from its .pt file (loaded with weights_only=True) after a sha256 check.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import families
from .atomic import atomic_save_safetensors
from .captions import caption_corpus
from .errors import PerfusionError
from .fingerprint import module_hash

REFERENCE_SD15_SHA256 = "bae743eee378894d29eaf313740244e6fabc86623aa803c695eddac33f0d03a5"
REFERENCE_SD15_RELPATH = Path("data") / "covariance_CLIP_ViT-L-14.pt"


def cache_dir() -> Path:
    return Path(os.environ.get("PERFUSION_CACHE", Path.home() / ".cache" / "perfusion"))


@torch.no_grad()
def estimate_covariance(encode, token_ids: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """C from captions already tokenized to BOS + words + EOS (no padding), in float64.

    `encode(ids [B, L]) -> [B, L, d]` runs the text encoder; captions are padded per batch and the
    padding rows are excluded (causal CLIP attention leaves the real tokens unchanged).
    """
    total, count = None, 0
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        pad = chunk[0][-1]
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk])
        hidden = encode(ids).double()
        valid = torch.tensor([[i < len(ids_) for i in range(width)] for ids_ in chunk])
        tokens = hidden[valid]
        total = tokens.T @ tokens if total is None else total + tokens.T @ tokens
        count += tokens.shape[0]
    if total is None:
        raise PerfusionError("cannot estimate a covariance from an empty caption list")
    return total / count


def tokenize_for_covariance(tokenizer, captions: list[str]) -> list[list[int]]:
    """BOS + words + first EOS per caption, truncated to the tokenizer's context."""
    ids = tokenizer(captions, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [list(x) for x in ids]


def cached_covariance(text_encoder, tokenizer, captions: list[str] | None = None, encode=None,
                      variant: str = "") -> torch.Tensor:
    """C for this text encoder: from the cache when its hash is known, else estimated and cached.

    `text_encoder` may be a ModuleList of several encoders whose outputs `encode` concatenates (SDXL); `variant`
    names what `encode` reads when it is not the last layer ("penultimate"), so each reading is cached apart."""
    key = module_hash(text_encoder)
    if variant:
        key = hashlib.sha256(f"{key}:{variant}".encode()).hexdigest()
    path = cache_dir() / "covariance" / f"{key[:32]}.safetensors"
    if path.exists():
        return load_file(path)["covariance"].double()
    encode = encode or (lambda ids: text_encoder(ids.to(text_encoder.device)).last_hidden_state)
    cov = estimate_covariance(encode, tokenize_for_covariance(tokenizer, captions or caption_corpus())).float()
    atomic_save_safetensors({"covariance": cov.contiguous()}, path, metadata={"text_encoder_sha256": key})
    return cov.double()  # exactly what a later cache read returns, so runs do not depend on the cache


def reference_covariance_sd15() -> torch.Tensor:
    """The reference C for SD1.5's CLIP ViT-L/14 (768×768) from `pip install perfusion-pytorch==0.1.23`."""
    cached = cache_dir() / "covariance" / "reference_clip_vit_l14.safetensors"
    if cached.exists():
        return load_file(cached)["covariance"].double()
    spec = importlib.util.find_spec("perfusion_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PerfusionError(
            "The reference SD1.5 covariance ships in the perfusion-pytorch package: "
            "pip install --no-deps perfusion-pytorch==0.1.23"
        )
    source = Path(list(spec.submodule_search_locations)[0]) / REFERENCE_SD15_RELPATH
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != REFERENCE_SD15_SHA256:
        raise PerfusionError(f"{source} has sha256 {digest}, expected {REFERENCE_SD15_SHA256}; reinstall it.")
    cov = torch.load(source, map_location="cpu", weights_only=True)
    d = families.SD1.text_width  # CLIP ViT-L/14, SD1's text encoder
    if not isinstance(cov, torch.Tensor) or cov.shape != (d, d):
        raise PerfusionError(f"{source} does not hold a {d}×{d} tensor")
    atomic_save_safetensors({"covariance": cov.float().contiguous()}, cached,
                            metadata={"source_sha256": digest, "source": "perfusion-pytorch 0.1.23"})
    return cov.double()
