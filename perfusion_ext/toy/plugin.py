"""The toy world as a plug-in: registers the toy model, its sampling defaults and its caption corpus with
the family registry (`perfusion_ext.core.families`) when `perfusion_ext.toy` is imported.

Nothing below this package imports it: `--model toy`, the toy's sampling settings and the covariance
corpus for its text encoder reach the core, the pipelines and the trainer through the registry. Importing
this module is cheap; the toy's heavy modules load when a registered callable is called.
"""
from __future__ import annotations

from pathlib import Path

from ..core import families

MODEL_DIR = Path(__file__).parent / "model"  # the embedded toy model, a diffusers folder (fp16)
TRAIN_COMMAND = "python -m perfusion_ext.toy.train_base --export"
COVARIANCE_CAPTIONS = 2000


def sampling() -> dict:
    from .model import SAMPLING

    return dict(SAMPLING)


def captions() -> list[str]:
    """Training-split captions: the toy text encoder only knows the toy world's words."""
    from .world import corpus

    return corpus(COVARIANCE_CAPTIONS)


def tiny_random_pipeline(seed: int = 0):
    """The toy architecture with random weights: for tests, and the demo until the toy model exists."""
    import torch
    from transformers import CLIPTokenizer

    from . import model as toy_model
    from .evaluate import make_pipeline

    torch.manual_seed(seed)
    return make_pipeline(
        vae=toy_model.build_vae(), text_encoder=toy_model.build_text_encoder(), unet=toy_model.build_unet(),
        tokenizer=CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer"),
    )


def pair_objects(layout: str) -> tuple[tuple[str, str], ...]:
    """The named objects that fit the layout, each on every background it stands out from (without a background
    word the toy model paints blotches)."""
    from .named import NAMED
    from .two_named import words_for
    from .world import COLOURS

    return tuple((word, f"{colour} background") for word in words_for(layout) for colour in COLOURS
                 if colour not in (NAMED[word].colour_a, NAMED[word].colour_b))


PLUGIN = families.Plugin(
    model_dir=MODEL_DIR, model_hint=f"train it with `{TRAIN_COMMAND}`.", sampling=sampling, captions=captions,
    random_pipeline=tiny_random_pipeline, tokenizer_dir=MODEL_DIR / "tokenizer", pair_objects=pair_objects,
)


def register() -> None:
    families.register_plugin("toy", PLUGIN)
