"""Folder layouts and the I/O contract of every exported component.

`optimum`: the folder optimum's ORTStableDiffusionPipeline (SDXL: ORTStableDiffusionXLPipeline) loads
(model_index.json, one folder per component with model.onnx + model.onnx_data + config.json). `a1111-trt`:
the UNet only, named and shaped as NVIDIA's WebUI TensorRT extension exports it (models/Unet-onnx/<name>.onnx;
it then builds its engine from that file). `unet-only`: unet/ alone, optimum's names. All I/O is fp32
whatever the precision inside.

SDXL's UNet reads two more inputs. optimum's names: `text_embeds` [batch, 1280] (bigG's pooled projection)
and `time_ids` [batch, 6] (original size, crop top-left, target size). NVIDIA's extension feeds sgm's
`y` [2B, 2816] instead: the pooled projection followed by the six sizes already Fourier-embedded (256
each), exactly diffusers' `add_embeds`. SDXL's text encoders export every hidden state
(`hidden_states.0` … `hidden_states.L`, the UNet reads the penultimate), as optimum's SDXL configs do.
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


@dataclasses.dataclass(frozen=True)
class TextTime:
    """A UNet's added text/time conditioning (SDXL): pooled width, number of time ids, their embedding width."""

    pooled_dim: int
    n_time_ids: int
    time_embed_dim: int

    @property
    def vector_dim(self) -> int:  # sgm's `y`: 1280 + 6 × 256 = 2816 for SDXL
        return self.pooled_dim + self.n_time_ids * self.time_embed_dim


def unet_contract(layout: str, in_channels: int, out_channels: int, text_dim: int,
                  added: TextTime | None = None) -> Contract:
    if layout == "a1111-trt":
        extra = (Port("y", "float32", ("2B", added.vector_dim)),) if added else ()
        return Contract(
            (Port("sample", "float32", ("2B", in_channels, "H", "W")), Port("timesteps", "float32", ("2B",)),
             Port("encoder_hidden_states", "float32", ("2B", "77N", text_dim))) + extra,
            (Port("latent", "float32", ("2B", out_channels, "H", "W")),),
        )
    extra = (Port("text_embeds", "float32", ("batch_size", added.pooled_dim)),
             Port("time_ids", "float32", ("batch_size", added.n_time_ids))) if added else ()
    return Contract(
        (Port("sample", "float32", ("batch_size", in_channels, "height", "width")),
         Port("timestep", "float32", (1,)),
         Port("encoder_hidden_states", "float32", ("batch_size", "sequence_length", text_dim))) + extra,
        (Port("out_sample", "float32", ("batch_size", out_channels, "height", "width")),),
    )


def text_encoder_outputs(hidden_layers: int | None = None, projection: bool = False) -> tuple[str, ...]:
    """Output names: (last_hidden_state, pooler_output) for SD1/SD2; optimum's SDXL encoders add every hidden
    state, and the one with a projection gives `text_embeds` in place of `pooler_output`, first."""
    if hidden_layers is None:
        return ("last_hidden_state", "pooler_output")
    states = tuple(f"hidden_states.{i}" for i in range(hidden_layers + 1))
    return (("text_embeds", "last_hidden_state") if projection else ("last_hidden_state", "pooler_output")) + states


def text_encoder_contract(text_dim: int, outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output"),
                          pooled_dim: int | None = None) -> Contract:
    def port(name):
        if name in ("pooler_output", "text_embeds"):
            return Port(name, "float32", ("batch_size", pooled_dim or text_dim))
        return Port(name, "float32", ("batch_size", "sequence_length", text_dim))

    return Contract((Port("input_ids", "int32", ("batch_size", "sequence_length")),), tuple(port(n) for n in outputs))


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
