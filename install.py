"""Run by the WebUI at every launch: installs only what it lacks, through its own pip helpers.

- perfusion-pytorch with --no-deps (only its reference SD1.5 text covariance file is used).
Nothing for ONNX export: the exporter runs in a child process whose onnx, onnxscript and protobuf live in
the extension's own `export-env/` folder, installed there on the first export (perfusion_ext/webui/
export_env.py), because a stock WebUI pins protobuf 3.20 and no onnx release imports beside it.
Never torch or torchvision, and never a different version of anything the WebUI pins.
Silent and fast when everything is present (no pip call, no torch import).
"""
import importlib.util

import launch


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


if _missing("perfusion_pytorch"):
    launch.run_pip("install --no-deps perfusion-pytorch==0.1.23",
                   "perfusion-pytorch (reference SD1.5 covariance) for sd-webui-perfusion")
