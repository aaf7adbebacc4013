"""Run by the WebUI at every launch: installs only what it lacks, through its own pip helpers.

- onnx and onnxruntime (onnxruntime-gpu where CUDA is present), for the ONNX exporter;
- perfusion-pytorch with --no-deps (only its reference SD1.5 text covariance file is used).
Never torch or torchvision, and never a different version of anything the WebUI pins: pip runs with
the WebUI's requirements file (and the installed torch/torchvision) as constraints. If no onnx
release fits those pins, the exporter stays unavailable and one line says so; the WebUI starts anyway.
Silent and fast when everything is present (no pip call, no torch import).
"""
import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile

import launch


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _constraints() -> str:
    """A constraints file: the WebUI's pinned requirements plus the installed torch/torchvision."""
    lines = []
    reqs = os.environ.get("REQS_FILE", "requirements_versions.txt")
    if os.path.isfile(reqs):
        with open(reqs, encoding="utf-8") as f:
            lines += [ln.split("#")[0].strip() for ln in f if "==" in ln.split("#")[0]]
    for dist in ("torch", "torchvision"):
        try:
            lines.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    fd, path = tempfile.mkstemp(prefix="perfusion-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".install-failed")


def _failed_before(package: str, constraints: str) -> bool:
    """A package that could not be installed under these same pins is not retried at every launch."""
    return os.path.isfile(MARKER) and f"{package} {_digest(constraints)}" in open(MARKER, encoding="utf-8").read()


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _install(package: str, constraints: str) -> None:
    if _failed_before(package, constraints):
        return
    try:
        launch.run_pip(f'install {package} -c "{constraints}"', f"{package} for sd-webui-perfusion")
    except Exception:  # noqa: BLE001 - pip failed (no version fits the WebUI's pins, or offline)
        print(f"sd-webui-perfusion: could not install {package} without changing packages the WebUI pins; "
              "ONNX export is unavailable (Perfusion tags and training work without it).")
        with open(MARKER, "a", encoding="utf-8") as f:
            f.write(f"{package} {_digest(constraints)}\n")


need_onnx = _missing("onnx")
need_ort = _missing("onnxruntime")
if need_onnx or need_ort:
    constraints = _constraints()
    try:
        if need_onnx:
            _install("onnx", constraints)
        if need_ort:
            _install("onnxruntime-gpu" if _cuda() else "onnxruntime", constraints)
    finally:
        os.unlink(constraints)
if _missing("perfusion_pytorch"):
    launch.run_pip("install --no-deps perfusion-pytorch==0.1.23",
                   "perfusion-pytorch (reference SD1.5 covariance) for sd-webui-perfusion")
