"""Load a single-file SD1/SD2 (ldm layout) or SDXL (sgm layout) checkpoint (.safetensors) offline.

diffusers' single-file loader fetches component configs from the hub unless it is given a local
diffusers-layout folder; we write that folder once into the cache, from the family registry's configs
and the CLIP tokenizer files available offline (`core.families.clip_tokenizer_dir`), and point the
loader at it.

A single file does not say whether its model predicts ε or v (SD2 768-v). In order: `--prediction-type`;
a `.yaml` of the same name beside it (A1111's convention; `parameterization: "v"`); for families with
v-prediction models (SD2) the test A1111 runs on every SD2 checkpoint it loads (a trained v model's output
at t = 999 on a constant input is far below the input); else ε.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ..core import families
from ..core.covariance import cache_dir
from ..core.errors import PerfusionError

log = logging.getLogger(__name__)
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
    fam = families.get(family)
    configs = fam.diffusers_configs
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    index = {"_class_name": fam.pipeline_class}
    for component, config in configs.items():
        if component.startswith("tokenizer"):
            shutil.copytree(families.clip_tokenizer_dir(), tmp / component)
            if config:
                path = tmp / component / "tokenizer_config.json"
                path.write_text(json.dumps(dict(json.loads(path.read_text()), **config)))
            index[component] = ["transformers", "CLIPTokenizer"]
            continue
        (tmp / component).mkdir(parents=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (tmp / component / name).write_text(json.dumps(config))
        library = "transformers" if component.startswith("text_encoder") else "diffusers"
        index[component] = [library, config["architectures"][0] if "architectures" in config else config["_class_name"]]
    if fam.pipeline_class == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    (tmp / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def yaml_prediction_type(path: Path) -> str | None:
    """What an A1111-style `.yaml` beside the checkpoint says (`parameterization: "v"`), or None without one."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    found = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(encoding="utf-8", errors="replace"), re.M)
    return "v_prediction" if found and found.group(1) == "v" else "epsilon"


@torch.no_grad()
def looks_like_v_prediction(unet) -> bool:
    """A1111's test for SD2 checkpoints: at t = 999 a trained v model's output on a constant 0.5 input (and a
    constant context) lies far below the input; an ε model's does not. Meaningless for random weights."""
    width = unet.config.cross_attention_dim
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=unet.device, dtype=unet.dtype)
    context = torch.full((1, 2, width), 0.5, device=unet.device, dtype=unet.dtype)
    out = unet(x, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return float((out.float() - x.float()).mean()) < -1


def prediction_type(path: Path, family: str, unet, override: str | None = None) -> tuple[str, str]:
    """(prediction type, how it was decided) for a single-file checkpoint; see the module docstring."""
    if override is not None:
        if override not in PREDICTION_TYPES:
            raise PerfusionError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {override!r}")
        return override, "given"
    from_yaml = yaml_prediction_type(path)
    if from_yaml is not None:
        return from_yaml, f"from {path.with_suffix('.yaml').name}"
    if families.get(family).v_architecture is not None:
        return ("v_prediction" if looks_like_v_prediction(unet) else "epsilon"), "A1111's v-prediction test"
    return "epsilon", "the family's default"


def load_single_file(path: Path, prediction: str | None = None):
    """The checkpoint as a diffusers pipeline of its family, with its prediction type decided (see above)."""
    family = detect_family(path)
    fam = families.get(family)
    cls = getattr(diffusers, fam.pipeline_class)
    extra = ({"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
             if cls is StableDiffusionPipeline else {})
    pipe = cls.from_single_file(str(path), config=str(config_folder(family)), local_files_only=True, **extra)
    kind, how = prediction_type(path, family, pipe.unet, prediction)
    log.info("%s: %s model, %s prediction (%s)", path.name, fam.label, kind, how)
    if kind != pipe.scheduler.config.get("prediction_type"):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=kind)
    default_size = fam.diffusers_configs["unet"]["sample_size"]
    if kind == "v_prediction" and fam.v_resolution and pipe.unet.config.sample_size == default_size:
        pipe.unet.register_to_config(sample_size=fam.v_resolution // pipe.vae_scale_factor)  # 768-v models
    return pipe
