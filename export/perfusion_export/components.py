"""Export each pipeline component (UNet with concepts baked, text encoder with concept rows, VAE halves)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from perfusion_ext.core.layers import cross_attention_layers

from . import layouts, onnx_io
from .bake import SlotEntry, baked_weight, gate_parameters, gate_scales
from .modules import (
    GATE_BETA,
    GATE_BIAS,
    GATE_TAU,
    GATE_WEIGHT,
    GatedTextInput,
    TextEncoderForExport,
    UNetForExport,
    VaeDecoderForExport,
    VaeEncoderForExport,
    baked_name,
    extended_text_encoder,
    pooled_width,
    swapped_projections,
    vector_conditioning,
    vector_from,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@contextlib.contextmanager
def cast_parameters(module: torch.nn.Module, dtype: torch.dtype):
    """Run the block with the module's floating tensors in `dtype`; the originals come back bit for bit."""
    saved = []
    try:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point() and t.dtype != dtype:
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
        yield module
    finally:
        for t, data in saved:
            t.data = data


def latent_factor(unet) -> int:
    """Latent sizes must be multiples of this (2 ** number of downsamplers)."""
    channels = getattr(getattr(unet, "config", None), "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 8


def text_dim(unet) -> int:
    return next(iter(cross_attention_layers(unet).values())).in_dim


def unet_tensors(layers, entries: list[SlotEntry], n_slots: int, dtype,
                 competitive: bool = False) -> dict[str, torch.Tensor]:
    """Every concept-dependent initializer by its ONNX name: the gate (with competitive gates also every slot's
    τ and β) and each baked K/V weight.

    `layers` is `cross_attention_layers(unet)` (or the base K/V kept for refit). The gate stays fp32.
    """
    if n_slots == 0:
        return {}
    gate_w, gate_b = gate_parameters(entries, n_slots, next(iter(layers.values())).in_dim)
    out = {GATE_WEIGHT: gate_w.float(), GATE_BIAS: gate_b.float()}
    if competitive:
        tau, beta = gate_scales(entries, n_slots)
        out.update({GATE_TAU: tau.float(), GATE_BETA: beta.float()})
    for name, layer in layers.items():
        for proj, kind in (("to_k", "key"), ("to_v", "value")):
            w = getattr(layer, proj).weight
            out[baked_name(layer.module_path, proj)] = baked_weight(w, name, kind, entries, n_slots).to(dtype)
    return out


def text_time(unet) -> layouts.TextTime | None:
    """The UNet's added text/time conditioning (SDXL), or None."""
    cfg = getattr(unet, "config", None)
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        return None
    return layouts.TextTime(pooled_width(unet), 6, cfg.addition_time_embed_dim)


def added_kind(unet, layout: str) -> str | None:
    """How the exported UNet takes SDXL's added conditioning: optimum's two inputs, or sgm's `y` (a1111-trt)."""
    if text_time(unet) is None:
        return None
    return "vector" if layout == "a1111-trt" else "text_time"


def added_inputs(unet, layout: str, batch: int, height: int, width: int, seed: int = 0) -> tuple:
    """Example added inputs (SDXL) for latents of height × width: a random pooled projection and the image's
    own size as original and target size, crop (0, 0); as sgm's `y` for a1111-trt. () for other UNets."""
    kind = added_kind(unet, layout)
    if kind is None:
        return ()
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, text_time(unet).pooled_dim, generator=g)
    f = 8  # pixels per latent in every SD VAE; only the values of the sizes depend on it
    ids = torch.tensor([[height * f, width * f, 0.0, 0.0, height * f, width * f]] * batch)
    if kind == "text_time":
        return embeds, ids
    with torch.no_grad():
        return (vector_from(unet, embeds, ids).float(),)


def unet_contract(unet, layout: str) -> layouts.Contract:
    cfg = unet.config
    return layouts.unet_contract(layout, cfg.in_channels, cfg.out_channels, text_dim(unet), text_time(unet))


def export_unet(unet, entries, n_slots: int, layout: str, precision: str, opset: int, path: Path,
                competitive: bool = False) -> list[str]:
    """Export the UNet (`competitive`: with competitive gates); returns the names of its concept-dependent
    initializers (empty for the base)."""
    dtype = DTYPES[precision]
    tensors = unet_tensors(cross_attention_layers(unet), entries, n_slots, dtype, competitive)
    gate = GatedTextInput(tensors[GATE_WEIGHT], tensors[GATE_BIAS], competitive, tensors.get(GATE_TAU),
                          tensors.get(GATE_BETA)) if tensors else None
    lookup = {layer.module_path: layer for layer in cross_attention_layers(unet).values()}
    weights = {(path_, proj): tensors[baked_name(path_, proj)] for path_ in lookup for proj in ("to_k", "to_v")
               if baked_name(path_, proj) in tensors}
    f = latent_factor(unet)
    batch = 2
    args = (torch.randn(batch, unet.config.in_channels, 2 * f, 3 * f),
            torch.full((batch if layout == "a1111-trt" else 1,), 500.0),
            torch.randn(batch, 154, text_dim(unet))) + added_inputs(unet, layout, batch, 2 * f, 3 * f)
    contract = unet_contract(unet, layout)
    kind = added_kind(unet, layout)
    with swapped_projections(unet, weights), cast_parameters(unet, dtype), unet_inputs_as(unet, kind):
        onnx_io.export_module(UNetForExport(unet, gate, dtype, kind).eval(), args, contract, opset, path)
    return sorted(tensors)


@contextlib.contextmanager
def unet_inputs_as(unet, kind: str | None):
    """The UNet set up to take its added conditioning as `kind` (sgm's `y` needs vector_conditioning)."""
    if kind == "vector":
        with vector_conditioning(unet):
            yield unet
    else:
        yield unet


def text_encoder_contract(text_encoder, outputs: tuple[str, ...]) -> layouts.Contract:
    projection = getattr(text_encoder, "text_projection", None)
    return layouts.text_encoder_contract(text_encoder.config.hidden_size, outputs,
                                         projection.out_features if projection is not None else None)


def export_text_encoder(text_encoder, rows: torch.Tensor, eos_token_id: int, opset: int, path: Path,
                        outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")) -> None:
    contract = text_encoder_contract(text_encoder, outputs)
    ids = torch.randint(0, 1000, (2, 77), dtype=torch.int32)
    with extended_text_encoder(text_encoder, rows, eos_token_id):
        onnx_io.export_module(TextEncoderForExport(text_encoder, outputs).eval(), (ids,), contract, opset, path)


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def export_vae(vae, opset: int, folder: Path) -> None:
    cfg = vae.config
    f = vae_factor(vae)
    enc = layouts.vae_encoder_contract(cfg.in_channels, cfg.latent_channels)
    onnx_io.export_module(VaeEncoderForExport(vae).eval(), (torch.randn(2, cfg.in_channels, 8 * f, 12 * f),), enc,
                          opset, folder / "vae_encoder" / "model.onnx")
    export_vae_decoder(vae, opset, folder / "vae_decoder" / "model.onnx")


def export_vae_decoder(vae, opset: int, path: Path) -> None:
    cfg = vae.config
    dec = layouts.vae_decoder_contract(cfg.out_channels, cfg.latent_channels)
    onnx_io.export_module(VaeDecoderForExport(vae).eval(), (torch.randn(2, cfg.latent_channels, 8, 12),), dec,
                          opset, path)
