"""Step 3 of the demo: export the trained concept to ONNX, sample the export with ONNX Runtime, and
compare the ORT image with the PyTorch-with-hooks image of the same seed."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("perfusion.demo")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def export_and_sample(model_spec, pipe, concept_path: Path, out: Path, prompt: str, torch_image) -> None:
    from perfusion_export.exporter import export_pipeline
    from perfusion_export.ort_pipeline import generate_onnx

    from ..pipelines.generate import sampling_defaults
    from ..toy import checkers

    if model_spec is None:  # the random stand-in model: save it so the exporter loads it like any folder
        model_spec = out / "random_model"
        pipe.save_pretrained(model_spec)
    folder = out / "onnx"
    info = export_pipeline(model_spec, [concept_path], folder, overwrite=True)
    unet = info.get("verification", {}).get("unet", {})
    log.info("    exported to %s (UNet ORT-vs-torch max relative error %s)", folder, unet.get("max_rel"))
    settings = sampling_defaults(pipe)
    image = generate_onnx(folder, prompt, seed=1, steps=settings["num_inference_steps"],
                          guidance_scale=settings["guidance_scale"],
                          guidance_rescale=settings.get("guidance_rescale", 0.0))[0]
    image.save(out / "onnx_sample.png")
    ort_arr, torch_arr = np.asarray(image), np.asarray(torch_image)
    log.info("    ONNX Runtime image %s: PSNR vs PyTorch hooks %.1f dB; checkers read %s (torch: %s)",
             out / "onnx_sample.png", psnr(ort_arr, torch_arr), checkers.read(ort_arr), checkers.read(torch_arr))
