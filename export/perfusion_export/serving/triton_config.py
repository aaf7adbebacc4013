"""The `config.pbtxt` of every model in a library repository, and the Python-backend `model.py` stubs.

The networks batch dynamically (requests from different pipeline executions, with different concepts,
share one UNet call: each row carries its own coefficient channels). The pipeline model runs several
instances so that their UNet calls meet in the batcher. A `model.py` is three lines: it puts the paths of
`PERFUSION_TRITON_PATH` on `sys.path` (Triton's Python stub ignores PYTHONPATH; `perfusion serve` sets it)
and imports its class from `perfusion_export.serving.triton_models`.
"""
from __future__ import annotations

from pathlib import Path

MAX_BATCH = {"text_encoder": 8, "unet": 16, "vae_decoder": 8}
QUEUE_DELAY_US = {"text_encoder": 1000, "unet": 2000, "vae_decoder": 1000}
PATH_VARIABLE = "PERFUSION_TRITON_PATH"

# Pipeline inputs: name, Triton type, optional. All [1]; `prompt` is the only required one.
PIPELINE_INPUTS = (("prompt", "TYPE_STRING", False), ("negative_prompt", "TYPE_STRING", True),
                   ("seed", "TYPE_INT64", True), ("steps", "TYPE_INT32", True), ("guidance", "TYPE_FP32", True),
                   ("width", "TYPE_INT32", True), ("height", "TYPE_INT32", True))

STUB = '''"""Triton Python-backend model written by `perfusion export --layout triton` (perfusion_export.serving)."""
import os
import site
import sys

# The stub ignores PYTHONPATH: take the paths `perfusion serve` sets, in order (numpy<2 first), running the
# .pth files of site-packages folders (editable installs); the stub's own defaults come after them.
_paths = [p for p in os.environ.get("{variable}", "").split(os.pathsep) if p]
_before = [p for p in sys.path if p not in _paths]
for _p in _paths:
    if os.path.basename(_p) == "site-packages":
        site.addsitedir(_p)
sys.path[:] = _paths + [p for p in sys.path if p not in _paths and p not in _before] + _before

from perfusion_export.serving.triton_models import {cls} as TritonPythonModel  # noqa: E402,F401
'''


def tensor(name: str, dtype: str, dims: list[int], optional: bool = False, reshape: list[int] | None = None) -> str:
    text = f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n'
    if optional:
        text += "    optional: true\n"
    if reshape is not None:
        text += f"    reshape: {{ shape: [ {', '.join(map(str, reshape))} ] }}\n"
    return text + "  }"


TENSORRT = ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
            '  parameters { key: "precision_mode" value: "FP16" }\n'
            '  parameters { key: "trt_engine_cache_enable" value: "1" } } ] } }')


def config(name: str, runtime: str, max_batch: int, inputs: list[str], outputs: list[str],
           instances: int | None = None, batching: bool = False, tensorrt: bool = False) -> str:
    """One config.pbtxt. runtime: 'python' (backend) or 'onnxruntime_onnx' (platform)."""
    lines = [f'name: "{name}"',
             'backend: "python"' if runtime == "python" else f'platform: "{runtime}"',
             f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(inputs) + "\n]",
             "output [\n" + ",\n".join(outputs) + "\n]"]
    if batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US[name]} }}")
    if instances is not None:
        lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
    if tensorrt:  # ONNX Runtime's TensorRT execution provider builds (and caches) the engine on first load
        lines.append(TENSORRT)
    return "\n".join(lines) + "\n"


def network_configs(dims: dict) -> dict[str, tuple[list[str], list[str]]]:
    """(inputs, outputs) of each network, batch axis implicit. The UNet's timestep is one number per row."""
    latent, image = dims["latent"], dims["image"]
    return {
        "text_encoder": ([tensor("input_ids", "TYPE_INT32", [-1])],
                         [tensor("last_hidden_state", "TYPE_FP32", [-1, dims["text"]])]),
        "unet": ([tensor("sample", "TYPE_FP32", [latent, -1, -1]),
                  tensor("timestep", "TYPE_FP32", [1], reshape=[]),
                  tensor("encoder_hidden_states", "TYPE_FP32", [-1, dims["context"]])],
                 [tensor("out_sample", "TYPE_FP32", [latent, -1, -1])]),
        "vae_decoder": ([tensor("latent_sample", "TYPE_FP32", [latent, -1, -1])],
                        [tensor("sample", "TYPE_FP32", [image, -1, -1])]),
    }


def write_repository(folder: Path, backend: str, dims: dict, pipeline_instances: int, tensorrt: bool = False) -> None:
    """config.pbtxt (and model.py where the backend is Python) for the three networks and the pipeline.
    `tensorrt` (onnxruntime flavour, GPU servers): the UNet and text encoder run through TensorRT."""
    for name, (inputs, outputs) in network_configs(dims).items():
        runtime = "python" if backend == "python" else "onnxruntime_onnx"
        write(folder / name / "config.pbtxt",
              config(name, runtime, MAX_BATCH[name], inputs, outputs, 1 if backend == "python" else None, True,
                     tensorrt and backend == "onnxruntime" and name != "vae_decoder"))
        if backend == "python":
            write(folder / name / "1" / "model.py", STUB.format(variable=PATH_VARIABLE, cls="OnnxModel"))
    inputs = [tensor(n, t, [1], optional=o) for n, t, o in PIPELINE_INPUTS]
    write(folder / "pipeline" / "config.pbtxt",
          config("pipeline", "python", 0, inputs, [tensor("image", "TYPE_UINT8", [-1, -1, 3])], pipeline_instances))
    write(folder / "pipeline" / "1" / "model.py", STUB.format(variable=PATH_VARIABLE, cls="PipelineModel"))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
