"""The training layer: train a concept against a small model interface (`Backend`), robust to interruptions.

Builds on `perfusion_ext.core` only; the diffusers backend lives in `perfusion_ext.pipelines`, the
WebUI's in `perfusion_ext.webui`.
    config    TrainConfig: the one source of training defaults and limits; progress/result records
    backend   the Backend interface and the methods every backend shares
    dataset   training images: checks, conversions, masks (one image-suffix list)
    trainer   ConceptTrainer: parameters, EMA targets, optimizer, one step
    loop      `train`: run folder, checkpoints, resume, previews, interrupts, NaN guard
    state     exact-resume state as safetensors + JSON
    report    the loss-curve PNG
"""
from .config import TrainCallbacks, TrainConfig, TrainProgress, TrainResult
from .loop import train

__all__ = ["TrainCallbacks", "TrainConfig", "TrainProgress", "TrainResult", "train"]
