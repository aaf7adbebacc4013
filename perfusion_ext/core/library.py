"""The concepts folder: find concept files by name inside it (never outside it), and the library
operations the concept card and the CLI offer — set the stored β/τ, rename, duplicate, delete to the
folder's trash and restore — which never lose a file, also when they fail midway.

Layout: `NAME.safetensors` with its companions beside it (`NAME.png` and other previews, the WebUI's
`NAME.json`/`NAME.txt`, the training run folder `NAME.run/`). Hidden folders (`.trash/`) and run folders
hold no concepts by name. `.aliases.json` maps old names of renamed concepts to their new ones, so a
prompt with an old name still resolves (infotexts also resolve by tensor hash, which no operation here
changes: metadata edits rewrite only the file's header).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_write_json, file_restorer
from .concept import Concept, load_concept, update_metadata
from .errors import PerfusionError
from .tags import NAME_RE

CONCEPTS_ENV = "PERFUSION_CONCEPTS"
ALIASES_FILE = ".aliases.json"
TRASH_DIR = ".trash"
TRASH_MANIFEST = "trash.json"
# Files the WebUI and the trainer keep beside NAME.safetensors (previews, descriptions, user metadata).
COMPANION_SUFFIXES = tuple(f"{middle}{ext}" for ext in (".png", ".jpg", ".jpeg", ".webp", ".gif")
                           for middle in ("", ".preview")) + (".txt", ".description.txt", ".json")
RUN_SUFFIX = ".run"


def default_concepts_dir() -> Path:
    """`$PERFUSION_CONCEPTS`, else `./models/perfusion` (the WebUI's folder when run from its root)."""
    return Path(os.environ.get(CONCEPTS_ENV, Path.cwd() / "models" / "perfusion"))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise PerfusionError(f"invalid concept name {name!r}: letters, digits, space, _ . - only, no paths.")
    return name


def is_library_file(path: Path, root: Path) -> bool:
    """False for files inside a training run (`NAME.run/`) or a hidden folder (`.trash/`)."""
    return not any(part.endswith(RUN_SUFFIX) or part.startswith(".") for part in path.relative_to(root).parts[:-1])


def concept_path(folder: str | Path, name: str, aliases: bool = True) -> Path:
    """The file for `name` in `folder` (also in sub-folders, not in run or hidden folders), else the file an
    alias of a renamed concept points to; refuses names that escape the folder."""
    folder = Path(folder).resolve()
    check_name(name)
    direct = (folder / f"{name}.safetensors").resolve()
    if not direct.is_relative_to(folder):
        raise PerfusionError(f"concept name {name!r} points outside the concepts folder {folder}.")
    if direct.is_file():
        return direct
    for found in sorted(folder.rglob(f"{name}.safetensors")):
        resolved = found.resolve()
        if resolved.is_relative_to(folder) and resolved.is_file() and is_library_file(found, folder):
            return resolved
    target = read_aliases(folder).get(name) if aliases else None
    if target and target != name:
        try:
            return concept_path(folder, target, aliases=False)
        except PerfusionError:
            pass
    raise PerfusionError(f"unknown concept {name!r}: no {name}.safetensors in {folder}.")


def load_named(folder: str | Path, name: str) -> Concept:
    return load_concept(concept_path(folder, name))


def list_concepts(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file() and is_library_file(p, folder))


# ---- aliases -------------------------------------------------------------------------------------
def read_aliases(folder: str | Path) -> dict[str, str]:
    """Old name -> new name of renamed concepts (empty when there is no readable alias file)."""
    try:
        data = json.loads((Path(folder) / ALIASES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_aliases(folder: Path, aliases: dict[str, str]) -> None:
    atomic_write_json(aliases, folder / ALIASES_FILE)


def _aliases_restorer(folder: Path) -> Callable[[], None]:
    """Puts the alias file back as it is now (absent, or with these bytes)."""
    return file_restorer(folder / ALIASES_FILE)


# ---- companions and undo -------------------------------------------------------------------------
def companions(path: Path) -> list[Path]:
    """The files and the run folder that belong to the concept file `path` and exist."""
    stem = path.name[: -len(".safetensors")]
    out = [path.parent / f"{stem}{suffix}" for suffix in COMPANION_SUFFIXES]
    out.append(path.parent / f"{stem}{RUN_SUFFIX}")
    return [p for p in out if p.exists()]


class _Undo:
    """Steps done so far and how to take each back; `rollback` runs them in reverse."""

    def __init__(self):
        self.steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def rollback(self) -> list[str]:
        problems = []
        for step in reversed(self.steps):
            try:
                step()
            except OSError as exc:  # keep undoing the rest; the message says what is where
                problems.append(str(exc))
        self.steps.clear()
        return problems


def _move(src: Path, dst: Path, undo: _Undo) -> None:
    """Rename `src` to `dst` (same filesystem: atomic), never over an existing path."""
    if dst.exists():
        raise PerfusionError(f"{dst} already exists; nothing was overwritten.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    undo.add(lambda: os.rename(dst, src))


def _run(undo: _Undo, what: str, body: Callable[[], Path]) -> Path:
    """Run `body`; on any failure take every step back and re-raise with what happened to the files."""
    try:
        return body()
    except BaseException as exc:
        problems = undo.rollback()
        if problems:
            raise PerfusionError(f"{what} failed ({exc}) and could not be fully undone: {'; '.join(problems)}. "
                                 f"No file was deleted: look in the folder and its {TRASH_DIR}/.") from exc
        if isinstance(exc, PerfusionError):
            raise
        if isinstance(exc, Exception):
            raise PerfusionError(f"{what} failed: {exc}; every file is back where it was.") from exc
        raise


def _located(folder: str | Path, name: str) -> tuple[Path, Path]:
    root = Path(folder).resolve()
    path = concept_path(root, name, aliases=False)
    if path.name != f"{name}.safetensors":
        raise PerfusionError(f"{name!r} is not a concept file name in {root}.")
    return root, path


def _check_free(directory: Path, new: str) -> None:
    check_name(new)
    taken = [directory / f"{new}.safetensors", directory / f"{new}{RUN_SUFFIX}"]
    taken += [directory / f"{new}{suffix}" for suffix in COMPANION_SUFFIXES]
    clash = [p.name for p in taken if p.exists()]
    if clash:
        raise PerfusionError(f"{', '.join(clash)} already exist(s) in {directory}: choose another name.")


def _named(name: str, metadata: dict[str, str]) -> dict[str, str | None]:
    updates: dict[str, str | None] = {"perfusion.name": name, "perfusion.token": name}
    if metadata.get("modelspec.title") in (None, metadata.get("perfusion.name")):
        updates["modelspec.title"] = name
    return updates


def _file_metadata(path: Path) -> dict[str, str]:
    concept = load_concept(path)
    return {**concept.metadata, "perfusion.name": concept.name}


# ---- the trash -------------------------------------------------------------------------------------
def trash_entry(root: Path, name: str, reason: str) -> Path:
    """A new folder `.trash/YYYYmmdd-HHMMSS-NAME/` with its manifest (what was where, and why)."""
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    entry, n = root / TRASH_DIR / base, 1
    while entry.exists():
        n += 1
        entry = root / TRASH_DIR / f"{base}-{n}"
    entry.mkdir(parents=True)
    atomic_write_json({"name": name, "reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "files": []},
                      entry / TRASH_MANIFEST)
    return entry


def _record(entry: Path, root: Path, original: Path) -> None:
    manifest = json.loads((entry / TRASH_MANIFEST).read_text(encoding="utf-8"))
    manifest["files"].append({"name": original.name, "from": str(original.relative_to(root))})
    atomic_write_json(manifest, entry / TRASH_MANIFEST)


def list_trash(folder: str | Path) -> list[dict]:
    """Trash entries, newest first: {"entry", "name", "reason", "time", "files"}."""
    trash = Path(folder) / TRASH_DIR
    out = []
    for entry in sorted(trash.iterdir() if trash.is_dir() else [], reverse=True):
        try:
            manifest = json.loads((entry / TRASH_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out.append({"entry": entry.name, **manifest})
    return out


# ---- operations ------------------------------------------------------------------------------------
def set_gate_defaults(folder: str | Path, name: str, beta: float | None = None, tau: float | None = None) -> Path:
    """Store β and/or τ as the concept's defaults (`perfusion.beta`/`perfusion.tau`); the tensors and their
    hash stay as they are."""
    _, path = _located(folder, name)
    updates = {}
    for key, value in (("beta", beta), ("tau", tau)):
        if value is None:
            continue
        value = float(value)
        if value != value or abs(value) == float("inf") or (key == "tau" and value <= 0):
            raise PerfusionError(f"{key} must be a finite number{' > 0' if key == 'tau' else ''}, got {value}")
        updates[f"perfusion.{key}"] = repr(value)
    return update_metadata(path, updates) if updates else path


def rename_concept(folder: str | Path, name: str, new: str) -> Path:
    """NAME → NEW: the file (its `perfusion.name`/`token` and title metadata), its previews and companions and
    its run folder; the old name becomes an alias of the new one; the old file goes to the trash. The tensors,
    hence the hash infotexts record, are unchanged. On any failure every step is taken back."""
    root, path = _located(folder, name)
    directory = path.parent
    _check_free(directory, new)
    if new == name:
        return path
    undo = _Undo()

    def body() -> Path:
        target = _renamed_copy(path, new, undo)
        for item in companions(path):
            _move(item, directory / (new + item.name[len(name):]), undo)
        run = directory / f"{new}{RUN_SUFFIX}"
        checkpoints = run / "checkpoints"
        for item in sorted(checkpoints.glob(f"{name}-step*")) if checkpoints.is_dir() else []:
            _move(item, checkpoints / (new + item.name[len(name):]), undo)
        restore_aliases = _aliases_restorer(root)
        aliases = {old: (new if target_name == name else target_name) for old, target_name in read_aliases(root).items()}
        aliases[name] = new
        aliases.pop(new, None)
        _write_aliases(root, aliases)
        undo.add(restore_aliases)
        entry = trash_entry(root, name, f"renamed to {new}")
        undo.add(lambda: shutil.rmtree(entry, ignore_errors=True))
        _move(path, entry / path.name, undo)
        _record(entry, root, path)
        return target

    return _run(undo, f"renaming {name!r} to {new!r}", body)


def _renamed_copy(path: Path, new: str, undo) -> Path:
    """NEW.safetensors beside `path`: the same tensors, the metadata renamed; removed again on undo."""
    target = path.parent / f"{new}.safetensors"
    update_metadata(path, _named(new, _file_metadata(path)), target)
    undo.add(lambda: target.unlink(missing_ok=True))
    return target


def duplicate_concept(folder: str | Path, name: str, new: str) -> Path:
    """A copy named NEW (metadata renamed, same tensors) with copies of its previews and descriptions; the
    run folder stays with the original."""
    _, path = _located(folder, name)
    directory = path.parent
    _check_free(directory, new)
    undo = _Undo()

    def body() -> Path:
        target = _renamed_copy(path, new, undo)
        for item in companions(path):
            if item.is_file():
                copy = directory / (new + item.name[len(name):])
                shutil.copy2(item, copy)
                undo.add(lambda copy=copy: copy.unlink(missing_ok=True))
        return target

    return _run(undo, f"duplicating {name!r} as {new!r}", body)


def delete_concept(folder: str | Path, name: str) -> Path:
    """Move the concept, its previews and companions and its run folder into a new trash entry (never a hard
    delete); returns the entry. Aliases pointing at it are dropped and kept in the entry's manifest, so a
    restore brings them back. On any failure everything moves back."""
    root, path = _located(folder, name)
    undo = _Undo()

    def body() -> Path:
        entry = trash_entry(root, name, "deleted")
        undo.add(lambda: shutil.rmtree(entry, ignore_errors=True))
        for item in [*companions(path), path]:  # the concept file last: until then the card still works
            _move(item, entry / item.name, undo)
            _record(entry, root, item)
        aliases = read_aliases(root)
        kept = {old: new for old, new in aliases.items() if new != name}
        if kept != aliases:
            restore_aliases = _aliases_restorer(root)
            _write_aliases(root, kept)
            undo.add(restore_aliases)
            manifest = json.loads((entry / TRASH_MANIFEST).read_text(encoding="utf-8"))
            manifest["aliases"] = {old: new for old, new in aliases.items() if new == name}
            atomic_write_json(manifest, entry / TRASH_MANIFEST)
        return entry

    return _run(undo, f"deleting {name!r}", body)


def _exists(root: Path, name: str) -> bool:
    try:
        concept_path(root, name, aliases=False)
    except PerfusionError:
        return False
    return True


def restore_concept(folder: str | Path, entry_name: str) -> Path:
    """Move a trash entry's files back where they were (refused if any of those places is taken)."""
    root = Path(folder).resolve()
    entry = (root / TRASH_DIR / entry_name).resolve()
    if not entry.is_relative_to((root / TRASH_DIR).resolve()) or not (entry / TRASH_MANIFEST).is_file():
        raise PerfusionError(f"no trash entry {entry_name!r} in {root / TRASH_DIR}")
    try:
        manifest = json.loads((entry / TRASH_MANIFEST).read_text(encoding="utf-8"))
        moves = [(entry / f["name"], (root / f["from"]).resolve()) for f in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PerfusionError(f"trash entry {entry_name!r} has an unreadable {TRASH_MANIFEST} ({exc}); its files are "
                             f"still in {entry}") from exc
    for src, dst in moves:
        if not dst.is_relative_to(root) or src.parent != entry or src.name in ("", ".", ".."):
            raise PerfusionError(f"trash entry {entry_name!r} names a place outside {root}")
    clash = [str(dst.relative_to(root)) for _, dst in moves if dst.exists()]
    if clash:
        raise PerfusionError(f"cannot restore {entry_name!r}: {', '.join(clash)} exist(s) again; rename them first")
    undo = _Undo()

    def body() -> Path:
        for src, dst in moves:
            _move(src, dst, undo)
        aliases = read_aliases(root)
        returning = {old: new for old, new in (manifest.get("aliases") or {}).items()
                     if old not in aliases and not _exists(root, old)}
        if returning:  # the names that pointed at the concept before it was deleted work again
            undo.add(_aliases_restorer(root))
            _write_aliases(root, {**aliases, **returning})
        shutil.rmtree(entry)
        concept = next((dst for _, dst in moves if dst.suffix == ".safetensors"), root)
        return concept

    return _run(undo, f"restoring {entry_name!r}", body)
