"""The Export section and POST /perfusion/v1/export: bake concepts into the loaded checkpoint's ONNX UNet.

Validation (`parse_export_request`) has no WebUI imports and is unit-tested. The export itself runs
under the WebUI's queue lock (never during a generation) in a child process with its own package folder
(`export_env`: onnx and the protobuf it needs never enter the WebUI's process or site-packages), reports
the child's progress lines through `shared.state`, writes the full export into
`models/perfusion-onnx/<checkpoint>-<concepts>/` and, for the `a1111-trt` layout, copies the UNet .onnx
(+ .onnx_data) into `models/Unet-onnx/`, where NVIDIA's TensorRT extension picks it up.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from perfusion_export.layouts import LAYOUTS, PRECISIONS  # light: no onnx needed

from ..core.errors import PerfusionError
from ..core.tags import NAME_RE
from .concepts import ConceptStore
from .train_request import ApiError


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    concepts: tuple[str, ...]
    layout: str = "a1111-trt"
    precision: str = "fp16"
    beta: float | None = None
    tau: float | None = None
    competitive_gates: bool = False  # baked as the setting of the same name applies them in the WebUI


def parse_export_request(body) -> ExportRequest:
    if not isinstance(body, dict):
        raise ApiError(422, 'body must be a JSON object like {"concepts": ["teddy"], "layout": "a1111-trt"}')
    unknown = set(body) - {"concepts", "layout", "precision", "beta", "tau", "competitive_gates"}
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(sorted(unknown))}")
    names = body.get("concepts")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and NAME_RE.match(n) for n in names):
        raise ApiError(422, "concepts must be a non-empty list of concept names")
    layout, precision = body.get("layout", "a1111-trt"), body.get("precision", "fp16")
    if layout not in LAYOUTS:
        raise ApiError(422, f"layout must be one of {', '.join(LAYOUTS)}")
    if precision not in PRECISIONS:
        raise ApiError(422, f"precision must be one of {', '.join(PRECISIONS)}")
    numbers = {}
    for key in ("beta", "tau"):
        value = body.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ApiError(422, f"{key} must be a number")
        numbers[key] = None if value is None else float(value)
    if numbers["tau"] is not None and numbers["tau"] <= 0:
        raise ApiError(422, "tau must be > 0")
    competitive = body.get("competitive_gates", False)
    if not isinstance(competitive, bool):
        raise ApiError(422, "competitive_gates must be true or false")
    return ExportRequest(tuple(dict.fromkeys(names)), layout, precision, numbers["beta"], numbers["tau"], competitive)


def child_args(request: ExportRequest, checkpoint: Path, concept_files: list[Path], out: Path, name: str,
               v_prediction: bool) -> list[str]:
    """The `perfusion export` arguments for this request (the child loads the checkpoint file itself)."""
    args = ["--model", str(checkpoint), "--out", str(out), "--layout", request.layout, "--precision",
            request.precision, "--overwrite", "--model-name", name]
    for f in concept_files:
        args += ["--concept", str(f)]
    for key in ("beta", "tau"):
        if getattr(request, key) is not None:
            args += [f"--{key}", repr(getattr(request, key))]
    if request.competitive_gates:
        args.append("--competitive-gates")
    if v_prediction:  # the WebUI knows it (yaml or its own test); a single file does not say
        args += ["--prediction-type", "v_prediction"]
    return args


def export_from_body(body, store: ConceptStore) -> dict:
    request = parse_export_request(body)
    from modules import call_queue, paths, shared

    from . import export_env

    info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
    if info is None:
        raise ApiError(409, "no checkpoint is loaded")
    checkpoint = Path(info.filename)
    try:
        concept_files = [store.path_for(n) for n in request.concepts]
    except PerfusionError as exc:
        raise ApiError(404, str(exc)) from exc
    name = f"{checkpoint.stem}-{'-'.join(request.concepts)}"
    out = Path(paths.models_path) / "perfusion-onnx" / name
    v_prediction = getattr(shared.sd_model, "parameterization", "eps") == "v"

    def progress(line: str) -> None:
        shared.state.textinfo = f"Perfusion export: {line[-200:]}"
        print(f"[perfusion export] {line}", flush=True)

    with call_queue.queue_lock:
        shared.state.begin(job="perfusion-export")
        shared.state.textinfo = f"Perfusion: exporting {name} to ONNX"
        try:
            try:
                export_env.ensure(progress)
            except PerfusionError as exc:
                raise ApiError(503, str(exc)) from exc
            try:
                export_env.run_export(child_args(request, checkpoint, concept_files, out, name, v_prediction),
                                      progress)
            except PerfusionError as exc:
                raise ApiError(422, str(exc)) from exc
        finally:
            shared.state.end()
    manifest = json.loads((out / "perfusion_manifest.json").read_text(encoding="utf-8"))
    result = {"out": str(out), "concepts": [c["name"] for c in manifest["concepts"]],
              "verification": manifest.get("verification", {}).get("unet", {})}
    if request.layout == "a1111-trt":
        target = Path(paths.models_path) / "Unet-onnx"
        target.mkdir(parents=True, exist_ok=True)
        for f in (out / "models" / "Unet-onnx").iterdir():
            shutil.copyfile(f, target / f".{f.name}.tmp")
            (target / f".{f.name}.tmp").replace(target / f.name)
        result["unet_onnx"] = str(target / f"{name}.onnx")
    return result
