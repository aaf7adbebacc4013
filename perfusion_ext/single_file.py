"""Load a single-file SD1/SD2 checkpoint (.safetensors, ldm layout) offline.

diffusers' single-file loader fetches component configs from the hub unless it is given a local
diffusers-layout folder; we write that folder once (configs for the family + the CLIP tokenizer
files shipped with the toy model) into the cache and point the loader at it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from .covariance import cache_dir
from .errors import PerfusionError
from .toy.model import MODEL_DIR

_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "center_input_sample": False,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "sample_size": 64,
}
_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}
_TEXT_COMMON = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    "layer_norm_eps": 1e-5, "initializer_range": 0.02, "initializer_factor": 1.0, "attention_dropout": 0.0,
}
FAMILY_CONFIGS = {
    "sd1": {
        "unet": dict(_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768),
        "text_encoder": dict(_TEXT_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    },
    "sd2": {
        "unet": dict(_UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True),
        # SD2 conditions on OpenCLIP-H's penultimate layer: diffusers keeps 23 of its 24 layers.
        "text_encoder": dict(_TEXT_COMMON, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=512),
    },
}


def detect_family(path: Path) -> str:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # noqa: BLE001 - any safetensors failure means an unusable file
        raise PerfusionError(f"{path.name} is not a readable safetensors checkpoint ({exc}).") from exc
    if any(k.startswith("conditioner.embedders") for k in keys):
        raise PerfusionError(f"{path.name} is an SDXL checkpoint; single-file SDXL loading is not supported yet. "
                             "Convert it to a diffusers folder and pass that folder.")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise PerfusionError(f"{path.name} does not look like an SD1/SD2 checkpoint in the original (ldm) layout.")


def config_folder(family: str) -> Path:
    """A diffusers-layout config folder for `family`, written once into the cache."""
    folder = cache_dir() / "configs" / family
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        (tmp / component).mkdir(parents=True)
    configs = FAMILY_CONFIGS[family]
    (tmp / "unet" / "config.json").write_text(json.dumps(configs["unet"]))
    (tmp / "vae" / "config.json").write_text(json.dumps(_VAE))
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(configs["text_encoder"]))
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER))
    shutil.copytree(MODEL_DIR / "tokenizer", tmp / "tokenizer")
    if family == "sd2":  # OpenCLIP pads with "!" (id 0), not with EOS
        tok_config = json.loads((tmp / "tokenizer" / "tokenizer_config.json").read_text())
        (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(dict(tok_config, pad_token="!")))
    index = {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (tmp / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_single_file(path: Path) -> StableDiffusionPipeline:
    family = detect_family(path)
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder(family)), local_files_only=True,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
