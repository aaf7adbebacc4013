"""Find every cross-attention (`attn2`) block of a UNet and name it canonically (ldm path).

Concept files name layers by their ldm path (`input_blocks.1.1.transformer_blocks.0.attn2`), the
names A1111's SD1/SD2 (ldm) and SDXL (sgm) UNets use. diffusers' `UNet2DConditionModel` names the
same blocks differently; the mapping is derived from the model's own structure (resnets per block,
downsamplers), so it holds for any topology, not just SD1.5's.

A projection is a `torch.nn.Linear` or a module that computes like one: Forge's UNet (same ldm names) is
built from `backend.operations.ForgeOperations.Linear`, a plain Module with `in_features`, `out_features`
and a float `weight` [out, in]. Quantized projections (Forge's GGUF / NF4 layers) are refused: the edit
needs W.
"""
from __future__ import annotations

import dataclasses

import torch

from . import families
from .errors import PerfusionError


@dataclasses.dataclass(frozen=True)
class CrossAttentionLayer:
    name: str  # canonical ldm path
    module_path: str  # the attn2 module's path inside this UNet
    to_k: torch.nn.Module  # torch.nn.Linear or linear-like (is_projection)
    to_v: torch.nn.Module

    @property
    def in_dim(self) -> int:
        return self.to_k.in_features

    @property
    def out_dim(self) -> int:
        return self.to_k.out_features


def is_projection(module) -> bool:
    """A torch.nn.Linear, or a module computing x Wᵀ + b with a float `weight` [out_features, in_features]."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(module, torch.nn.Module) and isinstance(weight, torch.Tensor) and weight.is_floating_point()
            and tuple(weight.shape) == (getattr(module, "out_features", None), getattr(module, "in_features", None)))


def is_diffusers_unet(unet: torch.nn.Module) -> bool:
    return hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")


def _diffusers_block_prefixes(unet) -> dict[str, str]:
    """Map diffusers attention-module prefixes (e.g. `down_blocks.1.attentions.0`) to ldm ones."""
    mapping = {}
    index = 0  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            index += 1
            if getattr(block, "attentions", None) is not None and j < len(block.attentions):
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if getattr(block, "downsamplers", None):
            index += 1
    if unet.mid_block is not None and getattr(unet.mid_block, "attentions", None) is not None:
        for j in range(len(unet.mid_block.attentions)):
            mapping[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    index = 0
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None) is not None and j < len(block.attentions):
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
    return mapping


def canonical_name(unet: torch.nn.Module, module_path: str) -> str:
    """ldm path of an attn2 module given its path inside `unet` (identity for ldm/sgm UNets)."""
    if not is_diffusers_unet(unet):
        return module_path
    prefixes = _diffusers_block_prefixes(unet)
    for prefix, ldm in prefixes.items():
        if module_path.startswith(prefix + "."):
            return ldm + module_path[len(prefix):]
    raise PerfusionError(f"cannot map diffusers module {module_path!r} to an ldm name")


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, CrossAttentionLayer]:
    """Every attn2 block with its to_k/to_v projection, keyed by canonical name, in model order."""
    layers, unusable = {}, set()
    for path, module in unet.named_modules():
        if path.split(".")[-1] != "attn2":
            continue
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if not is_projection(to_k) or not is_projection(to_v):
            unusable.update(type(m).__name__ for m in (to_k, to_v) if m is not None and not is_projection(m))
            continue
        name = canonical_name(unet, path)
        layers[name] = CrossAttentionLayer(name, path, to_k, to_v)
    if not layers and unusable:
        raise PerfusionError(
            f"The cross-attention projections of this model are {', '.join(sorted(unusable))} without a float "
            "weight matrix (a quantized model, e.g. GGUF or NF4?); Perfusion needs fp32/fp16/bf16/fp8 weights."
        )
    if not layers:
        raise PerfusionError(
            "This model has no cross-attention (attn2) blocks with to_k/to_v; Perfusion needs a Stable "
            "Diffusion UNet (SD1, SD2, SDXL)."
        )
    return layers


def model_family(layers: dict[str, CrossAttentionLayer]) -> str:
    """The family of a UNet with these attn2 layers, from the width of its text conditioning."""
    dims = {layer.in_dim for layer in layers.values()}
    if len(dims) != 1:
        raise PerfusionError(f"cross-attention layers disagree on the text width: {sorted(dims)}")
    return families.by_text_width(dims.pop()).name


def unet_family(unet: torch.nn.Module) -> str:
    """`model_family` of a UNet."""
    return model_family(cross_attention_layers(unet))
