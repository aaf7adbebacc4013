"""perfusion_manifest.json: what an export contains, how it was made, and what was verified."""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

MANIFEST = "perfusion_manifest.json"
FORMAT_VERSION = 1


def tool_versions() -> dict[str, str]:
    from perfusion_ext.core.version import __version__  # also where the extension is not pip-installed (WebUI)

    out = {"sd-webui-perfusion": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "diffusers", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def write(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        from perfusion_ext.core.errors import PerfusionError

        raise PerfusionError(f"{folder} is not a Perfusion export (no {MANIFEST}).")
    return json.loads(path.read_text(encoding="utf-8"))
