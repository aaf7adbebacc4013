"""Find concept files by name inside a concepts folder, never outside it."""
from __future__ import annotations

import os
from pathlib import Path

from .concept import Concept, load_concept
from .errors import PerfusionError
from .tags import NAME_RE

CONCEPTS_ENV = "PERFUSION_CONCEPTS"


def default_concepts_dir() -> Path:
    """`$PERFUSION_CONCEPTS`, else `./models/perfusion` (the WebUI's folder when run from its root)."""
    return Path(os.environ.get(CONCEPTS_ENV, Path.cwd() / "models" / "perfusion"))


def concept_path(folder: str | Path, name: str) -> Path:
    """The file for `name` in `folder` (also in sub-folders); refuses names that escape the folder."""
    folder = Path(folder).resolve()
    if not NAME_RE.match(name) or name in (".", ".."):
        raise PerfusionError(f"invalid concept name {name!r}: letters, digits, space, _ . - only, no paths.")
    direct = (folder / f"{name}.safetensors").resolve()
    if not direct.is_relative_to(folder):
        raise PerfusionError(f"concept name {name!r} points outside the concepts folder {folder}.")
    if direct.is_file():
        return direct
    for found in sorted(folder.rglob(f"{name}.safetensors")):
        resolved = found.resolve()
        if resolved.is_relative_to(folder):
            return resolved
    raise PerfusionError(f"unknown concept {name!r}: no {name}.safetensors in {folder}.")


def load_named(folder: str | Path, name: str) -> Concept:
    return load_concept(concept_path(folder, name))


def list_concepts(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file()) if folder.is_dir() else []
