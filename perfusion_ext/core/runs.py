"""Training run folders and the step picker: every checkpoint of a run with its preview and loss, and
"promote", which makes a chosen step the concept.

    OUT/NAME.safetensors, OUT/NAME.png                      the concept and its card preview
    OUT/NAME.run/checkpoints/NAME-stepNNNNNN.safetensors    a loadable concept per checkpoint step
    OUT/NAME.run/checkpoints/NAME-stepNNNNNN.png            its preview, rendered at the run's fixed seed
    OUT/NAME.run/previews/step_NNNNNN.png                   every preview of the run
    OUT/NAME.run/{state.safetensors, state.json, log.json, loss.png}

A checkpoint's loss (`perfusion.loss` in its metadata) is the mean training loss of the steps since the
one before; runs written before that key existed fall back to log.json.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path

from .atomic import atomic_write_bytes, file_restorer
from .concept import load_concept, tensor_hash, update_metadata
from .errors import PerfusionError
from .library import RUN_SUFFIX, _record, _run, _Undo, check_name, concept_path, trash_entry

LOSS_KEY = "perfusion.loss"
PROMOTED_KEY = "perfusion.promoted_from_step"


class RunFolder:
    """OUT/NAME.safetensors, OUT/NAME.png and OUT/NAME.run/{state, checkpoints/, previews/, log.json, loss.png}."""

    def __init__(self, out_dir: Path, name: str):
        out_dir = Path(out_dir)
        self.name = name
        self.concept = out_dir / f"{name}.safetensors"
        self.preview = out_dir / f"{name}.png"
        self.root = out_dir / f"{name}{RUN_SUFFIX}"
        self.state = self.root / "state.safetensors"
        self.state_meta = self.root / "state.json"
        self.log = self.root / "log.json"
        self.loss_curve = self.root / "loss.png"

    def checkpoint(self, name: str, step: int) -> Path:
        return self.root / "checkpoints" / f"{name}-step{step:06d}.safetensors"

    def checkpoint_preview(self, name: str, step: int) -> Path:
        return self.root / "checkpoints" / f"{name}-step{step:06d}.png"

    def preview_at(self, step: int) -> Path:
        return self.root / "previews" / f"step_{step:06d}.png"

    def checkpoints(self) -> dict[int, Path]:
        """Step -> checkpoint file, whatever name the files carry (a renamed run keeps working)."""
        folder = self.root / "checkpoints"
        out = {}
        for path in sorted(folder.glob("*-step*.safetensors")) if folder.is_dir() else []:
            match = re.search(r"-step(\d+)\.safetensors$", path.name)
            if match:
                out[int(match.group(1))] = path
        return dict(sorted(out.items()))


@dataclasses.dataclass
class StepInfo:
    step: int
    checkpoint: Path
    preview: Path | None
    loss: float | None
    current: bool  # the concept file holds this step's tensors now

    def to_json(self) -> dict:
        return {"step": self.step, "checkpoint": str(self.checkpoint), "loss": self.loss,
                "preview": str(self.preview) if self.preview else None, "current": self.current}


def run_folder(folder: str | Path, name: str) -> RunFolder:
    """The run of concept `name`: beside its file (which may live in a sub-folder), else in `folder`."""
    check_name(name)
    try:
        return RunFolder(concept_path(folder, name, aliases=False).parent, name)
    except PerfusionError:
        return RunFolder(Path(folder).resolve(), name)


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(length)).get("__metadata__") or {})


def _log_losses(run: RunFolder) -> list[float]:
    try:
        return [float(x) for x in json.loads(run.log.read_text(encoding="utf-8")).get("losses", [])]
    except (OSError, ValueError, TypeError):
        return []


def list_steps(folder: str | Path, name: str) -> list[StepInfo]:
    """Every checkpoint of NAME's run, oldest first, with its preview (the one beside it, else the run's
    preview of that step), its loss and whether the concept file holds it now."""
    run = run_folder(folder, name)
    checkpoints = run.checkpoints()
    if not checkpoints:
        return []
    current = tensor_hash(run.concept) if run.concept.is_file() else None
    losses = _log_losses(run)
    out, previous = [], 0
    for step, path in checkpoints.items():
        preview = path.with_suffix(".png")
        preview = preview if preview.is_file() else (run.preview_at(step) if run.preview_at(step).is_file() else None)
        loss = None
        try:
            meta = read_metadata(path)
            loss = float(meta[LOSS_KEY]) if LOSS_KEY in meta else None
        except (OSError, ValueError, struct.error):
            pass  # an unreadable header: no loss shown, the step is still listed
        if loss is None and losses[previous:step]:
            window = losses[previous:step]
            loss = sum(window) / len(window)
        out.append(StepInfo(step, path, preview, loss, current is not None and tensor_hash(path) == current))
        previous = step
    return out


def gate_defaults(concept_file: Path) -> dict[str, str]:
    """The β/τ stored in the concept being replaced (the editor's or auto-β's choice), which a promoted step
    keeps: the checkpoints carry the training defaults. Empty when there is no readable file."""
    if not concept_file.is_file():
        return {}
    try:
        concept = load_concept(concept_file)
    except PerfusionError:
        return {}
    return {"perfusion.beta": repr(float(concept.beta)), "perfusion.tau": repr(float(concept.tau))}


def promote_step(folder: str | Path, name: str, step: int) -> dict:
    """Make checkpoint `step` the concept NAME.safetensors (and its preview NAME.png), atomically. The file
    and preview it replaces are kept, copied first into a trash entry ("replaced by step N"). Returns
    {"concept", "trash" (None when there was nothing to replace), "step"}."""
    run = run_folder(folder, name)
    checkpoint = run.checkpoints().get(int(step))
    if checkpoint is None:
        steps = ", ".join(str(s) for s in run.checkpoints()) or "none"
        raise PerfusionError(f"{name!r} has no checkpoint at step {step} (steps: {steps})")
    root = Path(folder).resolve()
    preview = checkpoint.with_suffix(".png")
    preview = preview if preview.is_file() else run.preview_at(int(step))
    undo = _Undo()

    def body() -> dict:
        entry = None
        if run.concept.is_file() or run.preview.is_file():
            entry = trash_entry(root, name, f"replaced by step {step}")
            undo.add(lambda: shutil.rmtree(entry, ignore_errors=True))
            for item in (run.concept, run.preview):
                if item.is_file():
                    shutil.copy2(item, entry / item.name)
                    _record(entry, root, item)
        for item in (run.concept, run.preview):  # put back exactly what was there, should a later step fail
            undo.add(file_restorer(item))
        update_metadata(checkpoint, {"perfusion.name": name, "perfusion.token": name, PROMOTED_KEY: str(int(step)),
                                     **gate_defaults(run.concept)}, run.concept)
        if preview.is_file():
            atomic_write_bytes(preview.read_bytes(), run.preview)
        elif run.preview.is_file():
            run.preview.unlink()  # the old card picture would show another step; it is in the trash
        return {"concept": run.concept, "trash": entry, "step": int(step)}

    return _run(undo, f"promoting step {step} of {name!r}", body)
