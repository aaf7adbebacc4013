"""`--build-trt`: a strongly typed TensorRT engine from the exported UNet, checked against ORT.

Needs the `tensorrt` and `polygraphy` packages and an NVIDIA GPU; none exist on the machines this
project is tested on, so this path has never been run here (the CPU verification is the contract).
Strongly typed: the precision comes from the graph (TensorRT 10.12+ deprecated weak typing).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from perfusion_ext.core.errors import PerfusionError

from . import verify

TRT_TOLERANCE = 1e-2


def check_available() -> None:
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise PerfusionError(f"--build-trt needs the tensorrt and polygraphy packages and an NVIDIA GPU ({exc}).") from exc


def build_engine(folder, info: dict) -> dict:
    """Build `<unet>.plan` beside the UNet's .onnx (profile: the verification shapes) and compare with ORT."""
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
        TrtRunner,
    )

    onnx_path = Path(folder) / info["files"]["unet"]
    inputs = info["io"]["unet"]["inputs"]
    names = [p["name"] for p in inputs]
    channels, dim = inputs[0]["dims"][1], inputs[2]["dims"][2]
    per_sample = inputs[1]["dims"] != [1]
    profile = Profile()
    profile.add(names[0], (1, channels, 8, 8), (2, channels, 64, 64), (4, channels, 128, 128))
    profile.add(names[1], *([(1,), (2,), (4,)] if per_sample else [(1,)] * 3))
    profile.add(names[2], (1, 77, dim), (2, 77, dim), (4, 154, dim))
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    engine = SaveEngine(EngineFromNetwork(network, CreateConfig(profiles=[profile])), str(onnx_path.with_suffix(".plan")))
    rng = np.random.default_rng(0)
    feed = {names[0]: rng.standard_normal((2, channels, 64, 64), dtype=np.float32),
            names[1]: np.full((2,) if per_sample else (1,), 400.0, dtype=np.float32),
            names[2]: rng.standard_normal((2, 77, dim), dtype=np.float32)}
    with TrtRunner(engine) as runner:
        trt_out = next(iter(runner.infer(feed).values()))
    ort_out = verify.session(onnx_path).run(None, feed)[0]
    error = verify.rel(np.asarray(trt_out), ort_out)
    if error > TRT_TOLERANCE:
        raise verify.VerificationError(f"TensorRT vs ORT relative error {error:.3g} > {TRT_TOLERANCE}")
    return {"trt_vs_ort_rel": error, "engine": str(onnx_path.with_suffix(".plan"))}
