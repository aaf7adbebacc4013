"""The model-family registry: every fact about SD1, SD2, SDXL and the toy model, in one place.

A family is what a concept file names in `perfusion.base_family` and what a loaded UNet is recognised as
(by the width of its text conditioning). Its record holds the text encoders a concept carries
embeddings for (A1111's names and widths), the modelspec architecture, how its single-file checkpoints
are recognised and which diffusers configs load them offline, sampling and training defaults, and what
the WebUI backend and the exporter support. Adding a family is one record here plus what is truly new.

A plug-in that ships a model of its own (the toy world does) adds it with `register_plugin`: the model
folder that `--model NAME` loads, its sampling defaults, the captions its text encoder understands
(for the covariance) and a random-weights builder for tests. Nothing in this package imports a plug-in.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import PerfusionError

_STANDARD_SAMPLING = MappingProxyType({"num_inference_steps": 30, "guidance_scale": 7.5})


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # `perfusion.base_family` in concept files
    label: str  # for people: "SD1", "the toy model"
    text_width: int  # d, the width of the cross-attention conditioning: identifies a UNet's family
    encoders: tuple[tuple[str, int], ...]  # (A1111's embedding name, token width) per text encoder
    architecture: str  # modelspec.architecture of the base model; concepts add "/perfusion"
    checkpoint_prefix: str | None = None  # a state-dict key prefix only its single-file (ldm/sgm) checkpoints have
    diffusers_configs: MappingProxyType | None = None  # component configs that load its single files offline
    # generation defaults (a plug-in may provide its own)
    sampling: MappingProxyType = dataclasses.field(default_factory=lambda: _STANDARD_SAMPLING)
    train_steps: int = 400
    train_resolution: int = 512
    # Adam's step on the value targets o*_V is in their own units, so it depends on the model's scale. The toy
    # model's is measured (docs/design.md, quality); the real families keep the rate the recipe started with.
    train_lr_value: float = 0.03
    resolution_step: int = 64  # training images: a multiple of this many pixels (VAE × UNet downsampling)
    train_whole_batch: bool = False  # micro-batch = the whole batch (tiny models); else 4 on a GPU, 1 on a CPU
    webui_trainable: bool = False  # the WebUI's training backends support it (ldm: SD1/SD2, sgm: SDXL)
    reference_covariance: bool = False  # perfusion-pytorch ships a LAION covariance of its text encoder
    exportable: bool = False  # the ONNX exporter supports it
    # how its text conditioning is built (one entry of `encoders` per text encoder, concatenated in order)
    encoder_layer: str = "last"  # the hidden state the UNet reads: "last" (after the final LayerNorm) or "penultimate"
    pooled_encoder: str | None = None  # the encoder whose projected pooled output is the UNet's `text_embeds`
    size_conditioning: bool = False  # the UNet also reads `time_ids`: original size, crop top-left, target size
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers pipeline of its diffusers folders
    v_architecture: str | None = None  # modelspec.architecture of its v-prediction models
    v_resolution: int | None = None  # native image size of its v-prediction models
    known_layouts: tuple[tuple[str, int], ...] = ()  # (label, attn2 count) of known UNets, named in messages
    gradient_checkpointing: bool = False  # trained with gradient checkpointing on a GPU by default (memory)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.encoders)

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """The concept file's embedding tensors for this family."""
        return tuple(f"embedding.{name}" for name in self.encoder_names)

    @property
    def concept_architecture(self) -> str:
        return f"{self.architecture}/perfusion"


@dataclasses.dataclass(frozen=True)
class Plugin:
    """What a plug-in adds to its family. Callables are called on use, so registering stays cheap."""

    model_dir: Path | None = None  # a diffusers folder: `--model <family name>` loads it
    model_hint: str = ""  # how to create `model_dir` when it is not there yet
    sampling: Callable[[], dict[str, Any]] | None = None  # generation defaults for its model
    captions: Callable[[], list[str]] | None = None  # a covariance corpus its text encoder understands
    random_pipeline: Callable[..., Any] | None = None  # its architecture with random weights (tests, demo)
    tokenizer_dir: Path | None = None  # CLIP BPE tokenizer files it ships (single-file loading reuses them)
    # (object word, setting) pairs its model draws well that fit a layout ("horizontal": side by side, "vertical":
    # one above the other): the other object of pair scenes (training.pair_scenes) and words appended to its prompt
    # and caption (the toy model draws clean scenes only when told the background: "blue background")
    pair_objects: Callable[[str], tuple[tuple[str, str], ...]] | None = None

    def model_ready(self) -> bool:
        return self.model_dir is not None and (self.model_dir / "model_index.json").is_file()


# ---- diffusers configs for single-file SD1/SD2 checkpoints (ldm layout) -------------------------------
_SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
_SD_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "center_input_sample": False,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "sample_size": 64,
}
_SD_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}
_CLIP_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    "layer_norm_eps": 1e-5, "initializer_range": 0.02, "initializer_factor": 1.0, "attention_dropout": 0.0,
}


def _configs(unet: dict, text_encoder: dict, tokenizer: dict | None = None) -> MappingProxyType:
    return MappingProxyType({"unet": dict(_SD_UNET, **unet), "text_encoder": dict(_CLIP_TEXT, **text_encoder),
                             "vae": _SD_VAE, "scheduler": _SD_SCHEDULER, "tokenizer": tokenizer or {}})


# ---- diffusers configs for single-file SDXL checkpoints (sgm layout) --------------------------------------
_SDXL_CONFIGS = MappingProxyType({
    "unet": dict(_SD_UNET, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128),
    "vae": dict(_SD_VAE, scaling_factor=0.13025, sample_size=1024, force_upcast=True),
    "text_encoder": dict(_CLIP_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    "text_encoder_2": dict(_CLIP_TEXT, architectures=["CLIPTextModelWithProjection"], hidden_size=1280,
                           intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
                           projection_dim=1280),
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear"},
    "tokenizer": {}, "tokenizer_2": {"pad_token": "!"},
})

# ---- the records ----------------------------------------------------------------------------------------
SD1 = Family(
    name="sd1", label="SD1", text_width=768, encoders=(("clip_l", 768),), architecture="stable-diffusion-v1",
    checkpoint_prefix="cond_stage_model.transformer.",
    diffusers_configs=_configs(
        unet={"attention_head_dim": 8, "cross_attention_dim": 768},
        text_encoder={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}),
    webui_trainable=True, exportable=True, reference_covariance=True,
)
SD2 = Family(
    name="sd2", label="SD2", text_width=1024, encoders=(("clip_h", 1024),), architecture="stable-diffusion-v2-512",
    checkpoint_prefix="cond_stage_model.model.",
    diffusers_configs=_configs(
        unet={"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True},
        # SD2 conditions on OpenCLIP-H's penultimate layer: diffusers keeps 23 of its 24 layers.
        text_encoder={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                      "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512},
        tokenizer={"pad_token": "!"}),  # OpenCLIP pads with "!" (id 0), not with EOS
    webui_trainable=True, exportable=True, v_architecture="stable-diffusion-v2-768-v", v_resolution=768,
)
SDXL = Family(  # CLIP-L ‖ OpenCLIP-bigG penultimate layers (768 + 1280), bigG's pooled output, size/crop time_ids
    name="sdxl", label="SDXL", text_width=2048, encoders=(("clip_l", 768), ("clip_g", 1280)),
    architecture="stable-diffusion-xl-v1-base", checkpoint_prefix="conditioner.embedders.1.model.",
    diffusers_configs=_SDXL_CONFIGS, train_resolution=1024, encoder_layer="penultimate", pooled_encoder="clip_g",
    size_conditioning=True, pipeline_class="StableDiffusionXLPipeline", known_layouts=(("SDXL base", 70),),
    gradient_checkpointing=True, exportable=True, webui_trainable=True,
)
TOY = Family(  # the toy world's model; the toy plug-in registers its model folder, sampling and captions
    name="toy", label="the toy model", text_width=128, encoders=(("clip_l", 128),), architecture="perfusion-toy",
    train_steps=150, train_resolution=32, train_lr_value=0.06, resolution_step=8, train_whole_batch=True, exportable=True,
)

FAMILIES: MappingProxyType[str, Family] = MappingProxyType({f.name: f for f in (SD1, SD2, SDXL, TOY)})
DEFAULT_FAMILY = SD1.name  # what front ends assume before a model is loaded (SD1 and SD2 train alike)
_PLUGINS: dict[str, Plugin] = {}


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise PerfusionError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}.") from None


def label(name: str | None) -> str:
    """A family's label, or the name itself for a family we do not know."""
    family = FAMILIES.get(name or "")
    return family.label if family else str(name)


# Models that look like a family's but cannot carry concepts: refused with their name (by text width, or by
# a state-dict prefix of their single files).
_REFINER = ("the SDXL refiner: it reads OpenCLIP-bigG alone (1280 wide) and only refines the last steps of the "
            "SDXL base's images. Train and use Perfusion concepts on the SDXL base (or a fine-tune of it) and run the "
            "refiner after it without concepts.")
REFUSED_WIDTHS: MappingProxyType[int, str] = MappingProxyType({1280: _REFINER})
REFUSED_CHECKPOINT_PREFIXES: MappingProxyType[str, str] = MappingProxyType({"conditioner.embedders.0.model.": _REFINER})


def by_text_width(width: int) -> Family:
    for family in FAMILIES.values():
        if family.text_width == width:
            return family
    if width in REFUSED_WIDTHS:
        raise PerfusionError(f"This model is {REFUSED_WIDTHS[width]}")
    known = ", ".join(f"{f.label} {f.text_width}" for f in FAMILIES.values())
    raise PerfusionError(f"unsupported text-conditioning width {width} (known: {known})")


def by_checkpoint_keys(keys) -> Family | None:
    """The family whose single-file checkpoints carry these state-dict keys, or None."""
    for prefix, reason in REFUSED_CHECKPOINT_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            raise PerfusionError(f"This checkpoint is {reason}")
    for family in FAMILIES.values():
        prefix = family.checkpoint_prefix
        if prefix and any(k.startswith(prefix) for k in keys):
            return family
    return None


# ---- plug-ins --------------------------------------------------------------------------------------------
def layout_label(name: str, n_layers: int) -> str:
    """Names a UNet of family `name` by its number of attn2 layers (`SDXL base`), for messages."""
    family = get(name)
    for label_, count in family.known_layouts:
        if count == n_layers:
            return label_
    if family.known_layouts and n_layers < max(count for _, count in family.known_layouts):
        return f"a distilled {family.label} UNet with {n_layers} attn2 layers (SSD-1B, Segmind Vega or similar)"
    return f"a {family.label} UNet with {n_layers} attn2 layers"


def register_plugin(name: str, plugin: Plugin) -> None:
    """Called by a plug-in package when it is imported (the toy world: `perfusion_ext.toy`)."""
    get(name)
    _PLUGINS[name] = plugin


def plugin(name: str) -> Plugin | None:
    return _PLUGINS.get(name)


def sampling_defaults(name: str) -> dict[str, Any]:
    """Steps and guidance (and CFG rescale where the model wants it) for generating with this family."""
    extra = plugin(name)
    if extra is not None and extra.sampling is not None:
        return dict(extra.sampling())
    return dict(get(name).sampling)


def caption_corpus(name: str) -> list[str] | None:
    """Captions for this family's covariance when its text encoder only knows its own words, else None."""
    extra = plugin(name)
    return extra.captions() if extra is not None and extra.captions is not None else None


# Words every Stable Diffusion draws, for the other object of pair scenes (a plug-in's model may know others).
COMMON_OBJECTS = ("dog", "cat", "car", "chair", "vase", "lamp", "bicycle", "teapot", "backpack", "clock")


def pair_objects(name: str, layout: str) -> tuple[tuple[str, str], ...]:
    """(object word, setting) pairs this family's model draws that fit `layout` (training.pair_scenes)."""
    extra = plugin(name)
    if extra is not None and extra.pair_objects is not None:
        return extra.pair_objects(layout)
    return tuple((word, "") for word in COMMON_OBJECTS)


def named_model(spec: str) -> Path | None:
    """The model folder a plug-in registered under `spec` (`--model toy`), or None when `spec` names none.

    Raises PerfusionError when the plug-in's model is not there yet, with how to create it."""
    extra = plugin(spec) if spec in FAMILIES else None
    if extra is None or extra.model_dir is None:
        return None
    if not extra.model_ready():
        name = get(spec).label
        raise PerfusionError(f"{name[:1].upper()}{name[1:]} is not in {extra.model_dir} yet: {extra.model_hint}")
    return extra.model_dir


def clip_tokenizer_dir() -> Path:
    """A folder with CLIP's BPE tokenizer files (shipped by a plug-in's model), for offline single-file loading."""
    for extra in _PLUGINS.values():
        if extra.tokenizer_dir is not None and (extra.tokenizer_dir / "vocab.json").is_file():
            return extra.tokenizer_dir
    raise PerfusionError("no CLIP tokenizer files are available offline (they ship with the toy model); "
                         "pass a diffusers folder instead of a single-file checkpoint.")
