"""ONNX export from inside the WebUI without touching its packages: a child process with a package folder.

A stock A1111 1.10 pins protobuf 3.20, and no onnx release that torch's ONNX exporter accepts imports
beside it. So the exporter never runs in the WebUI's process: `run_export` starts the WebUI's own Python
on `python -m perfusion_ext export …` with `export-env/` (in the extension's folder) first on its path.
That folder holds, installed once with `pip install --target export-env --no-deps` on the first export,
only what the WebUI lacks or cannot import: onnx, onnxscript, onnx-ir, ml_dtypes and a protobuf that fits
them, plus onnxruntime or diffusers when the WebUI has none. Python finds the folder's packages before the
WebUI's, in the child only; the WebUI's site-packages are never written (`pip freeze` is unchanged).

Before installing and before each export a probe (`python -c …` under the same path) imports every module
the exporter needs and reports each failure with its reason, so an environment that still cannot export
says why (for example a torch older than the ONNX exporter needs) instead of failing half way.
Progress lines (the exporter's log) and errors (its `perfusion: error:` line) come back to the caller.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..core.errors import PerfusionError

ROOT = Path(__file__).resolve().parents[2]  # the extension's folder
ENV_DIR = ROOT / "export-env"
MIN_TORCH = (2, 6)  # torch.onnx.export(dynamo=True, optimize=True) with onnxscript
# module -> the pip requirement that provides it (installed into ENV_DIR with --no-deps when it fails to import)
MODULES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnx_ir": "onnx-ir", "ml_dtypes": "ml_dtypes",
           "onnxruntime": "onnxruntime", "diffusers": "diffusers"}
ALWAYS = ("protobuf",)  # onnx's generated code needs a protobuf of its own era: installed beside it
# diffusers declares no transformers requirement and its newest releases want huggingface_hub 1.x, so the newest one
# `--no-deps` brings may not import beside the WebUI's packages. Found in a real A1111 1.10.1 (transformers 4.30.2,
# huggingface_hub 0.36.2): 0.42.1 lacks huggingface_hub.resolve_revision; 0.32-0.36 need transformers'
# SiglipImageProcessor; 0.31.0 imports its pipelines and exports. Tried in turn until the probe imports the pipelines.
DIFFUSERS_FALLBACKS = ("diffusers>=0.30,<0.37", "diffusers>=0.30,<0.32")

PROBE = r"""
import importlib, json, sys
# diffusers imports lazily: `import diffusers` passes where its pipelines cannot import, so those are resolved too
ATTRS = {"diffusers": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel")}
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        for attr in ATTRS.get(name, ()):
            getattr(module, attr)
        out[name] = {"ok": True, "version": getattr(module, "__version__", ""), "file": getattr(module, "__file__", "")}
    except Exception as exc:  # every failure is reported, whatever its type
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
print(json.dumps(out))
"""


def child_env(env_dir: Path = ENV_DIR) -> dict[str, str]:
    """The child's environment: the package folder first, then our packages, then whatever was there."""
    env = dict(os.environ)
    parts = [str(env_dir), str(ROOT), str(ROOT / "export")]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def probe(python: str = sys.executable, env_dir: Path = ENV_DIR) -> dict[str, dict]:
    """Import every module the exporter needs in a child with the folder on its path; per module ok/version/error."""
    names = ["torch", "google.protobuf", "transformers", "safetensors", *MODULES]
    done = subprocess.run([python, "-c", PROBE, *names], env=child_env(env_dir), capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise PerfusionError(f"the export environment probe failed: {done.stderr.strip()[-500:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    torch_info = found.get("torch", {})
    if torch_info.get("ok"):
        version = tuple(int(p) for p in torch_info["version"].split("+")[0].split(".")[:2])
        if version < MIN_TORCH:
            torch_info.update(ok=False, error=f"torch {torch_info['version']} is older than the "
                              f"{'.'.join(map(str, MIN_TORCH))} its ONNX exporter needs")
    return found


def problems(found: dict[str, dict]) -> list[str]:
    return [f"{name}: {info['error']}" for name, info in found.items() if not info.get("ok")]


def missing_requirements(found: dict[str, dict]) -> list[str]:
    """What to install into the folder: each exporter module that failed to import, and protobuf with onnx."""
    wanted = [req for module, req in MODULES.items() if not found.get(module, {}).get("ok")]
    return [*ALWAYS, *wanted] if wanted else []


def install(requirements: list[str], progress: Callable[[str], None], python: str = sys.executable,
            env_dir: Path = ENV_DIR) -> None:
    """pip install --target ENV_DIR --no-deps: nothing outside the folder is written."""
    env_dir.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--upgrade",
           "--target", str(env_dir), "--no-deps", *requirements]
    progress(f"installing {', '.join(requirements)} into {env_dir.name}/ (once; the WebUI's packages are untouched)")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise PerfusionError(f"could not install {' '.join(requirements)} into {env_dir}: "
                             f"{done.stderr.strip()[-800:]}")


def ensure(progress: Callable[[str], None], python: str = sys.executable, env_dir: Path = ENV_DIR) -> dict:
    """The probe's findings once every module imports; installs what is missing first. Raises with each reason."""
    found = probe(python, env_dir)
    needed = missing_requirements(found)
    if needed:
        install(needed, progress, python, env_dir)
        found = probe(python, env_dir)
        for fallback in DIFFUSERS_FALLBACKS if "diffusers" in needed else ():
            if found.get("diffusers", {}).get("ok"):
                break
            reason = " ".join(found["diffusers"].get("error", "").split())
            progress(f"diffusers does not import beside this WebUI's packages ({reason[:200]}); trying {fallback}")
            for stale in env_dir.glob("diffusers-*.dist-info"):  # pip --target --upgrade leaves the old one behind
                shutil.rmtree(stale, ignore_errors=True)
            install([fallback], progress, python, env_dir)
            found = probe(python, env_dir)
    bad = problems(found)
    if bad:
        raise PerfusionError("ONNX export cannot run in this WebUI's Python even with its own package folder: "
                             + "; ".join(bad) + ". Export with the command line tool instead (perfusion export).")
    return found


def run_export(args: list[str], progress: Callable[[str], None], python: str = sys.executable,
               env_dir: Path = ENV_DIR, timeout: float = 6 * 3600) -> None:
    """`python -m perfusion_ext export ARGS` in a child; each log line goes to `progress`. PerfusionError with the
    exporter's own message when it refuses or fails."""
    cmd = [python, "-m", "perfusion_ext", "export", *args]
    proc = subprocess.Popen(cmd, env=child_env(env_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-40:]
                progress(line)
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    if code != 0:
        message = next((t.split("perfusion: error:", 1)[1].strip() for t in reversed(tail) if "perfusion: error:" in t),
                       None)
        last = "\n".join(tail[-15:])
        raise PerfusionError(message or f"the exporter stopped with code {code}:\n{last}")
