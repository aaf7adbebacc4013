"""Load a single-file SD1/SD2 checkpoint (.safetensors, ldm layout) offline.

diffusers' single-file loader fetches component configs from the hub unless it is given a local
diffusers-layout folder; we write that folder once into the cache, from the family registry's configs
and the CLIP tokenizer files available offline (`core.families.clip_tokenizer_dir`), and point the
loader at it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ..core import families
from ..core.covariance import cache_dir
from ..core.errors import PerfusionError


def detect_family(path: Path) -> str:
    """The family of a single-file checkpoint, from its state-dict keys; only those we can load."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # any safetensors failure means an unusable file
        raise PerfusionError(f"{path.name} is not a readable safetensors checkpoint ({exc}).") from exc
    family = families.by_checkpoint_keys(keys)
    if family is not None and family.diffusers_configs is None:
        raise PerfusionError(f"{path.name} is an {family.label} checkpoint; single-file {family.label} loading is not "
                             "supported yet. Convert it to a diffusers folder and pass that folder.")
    if family is None:
        loadable = "/".join(f.label for f in families.FAMILIES.values() if f.diffusers_configs is not None)
        raise PerfusionError(f"{path.name} does not look like an {loadable} checkpoint in the original (ldm) layout.")
    return family.name


def config_folder(family: str) -> Path:
    """A diffusers-layout config folder for `family`, written once into the cache."""
    folder = cache_dir() / "configs" / family
    if (folder / "model_index.json").is_file():
        return folder
    configs = families.get(family).diffusers_configs
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        (tmp / component).mkdir(parents=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (tmp / component / name).write_text(json.dumps(configs[component]))
    shutil.copytree(families.clip_tokenizer_dir(), tmp / "tokenizer")
    if configs["tokenizer"]:
        tok_config = json.loads((tmp / "tokenizer" / "tokenizer_config.json").read_text())
        (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(dict(tok_config, **configs["tokenizer"])))
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
