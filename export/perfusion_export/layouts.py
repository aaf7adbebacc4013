"""Folder layouts and the I/O contract of every exported component.

`optimum`: the folder optimum's ORTStableDiffusionPipeline loads (model_index.json, one folder per
component with model.onnx + model.onnx_data + config.json). `a1111-trt`: the UNet only, named and shaped
as NVIDIA's WebUI TensorRT extension exports it (models/Unet-onnx/<name>.onnx; it then builds its
engine from that file). `unet-only`: unet/ alone, optimum's names. All I/O is fp32 whatever the
precision inside.
"""
from __future__ import annotations

import dataclasses

LAYOUTS = ("optimum", "a1111-trt", "unet-only")
PRECISIONS = ("fp32", "fp16")  # weights and activations inside; I/O stays fp32


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple  # int (static), str (named dynamic axis), None (a channel count known at export)


@dataclasses.dataclass(frozen=True)
class Contract:
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]

    def as_table(self) -> dict:
        def row(p):
            return {"name": p.name, "dtype": p.dtype, "dims": list(p.dims)}
        return {"inputs": [row(p) for p in self.inputs], "outputs": [row(p) for p in self.outputs]}


def unet_contract(layout: str, in_channels: int, out_channels: int, text_dim: int) -> Contract:
    if layout == "a1111-trt":
        return Contract(
            (Port("sample", "float32", ("2B", in_channels, "H", "W")), Port("timesteps", "float32", ("2B",)),
             Port("encoder_hidden_states", "float32", ("2B", "77N", text_dim))),
            (Port("latent", "float32", ("2B", out_channels, "H", "W")),),
        )
    return Contract(
        (Port("sample", "float32", ("batch_size", in_channels, "height", "width")),
         Port("timestep", "float32", (1,)),
         Port("encoder_hidden_states", "float32", ("batch_size", "sequence_length", text_dim))),
        (Port("out_sample", "float32", ("batch_size", out_channels, "height", "width")),),
    )


def text_encoder_contract(text_dim: int) -> Contract:
    return Contract(
        (Port("input_ids", "int32", ("batch_size", "sequence_length")),),
        (Port("last_hidden_state", "float32", ("batch_size", "sequence_length", text_dim)),
         Port("pooler_output", "float32", ("batch_size", text_dim))),
    )


def vae_encoder_contract(image_channels: int, latent_channels: int) -> Contract:
    return Contract(
        (Port("sample", "float32", ("batch_size", image_channels, "height", "width")),),
        (Port("latent_parameters", "float32", ("batch_size", 2 * latent_channels, "height_latent", "width_latent")),),
    )


def vae_decoder_contract(image_channels: int, latent_channels: int) -> Contract:
    return Contract(
        (Port("latent_sample", "float32", ("batch_size", latent_channels, "height_latent", "width_latent")),),
        (Port("sample", "float32", ("batch_size", image_channels, "height", "width")),),
    )


def unet_path(layout: str, model_name: str) -> str:
    """Where the UNet's .onnx goes inside the export folder."""
    if layout == "a1111-trt":
        return f"models/Unet-onnx/{model_name}.onnx"
    return "unet/model.onnx"
