"""The concepts folder as the WebUI sees it: names, cached loads, tensor hashes, family checks.

Free of WebUI imports. Names resolve through `perfusion_ext.core.library.concept_path`, which refuses
anything that would reach outside the folder. Training run folders (`NAME.run/`) are not concepts. Listing also
removes stale temp files of concept saves killed mid-write (`core.atomic.remove_stale_temps`).
"""
from __future__ import annotations

import dataclasses
import html
import re
import threading
from pathlib import Path

from ..core import families
from ..core.atomic import remove_stale_temps
from ..core.concept import Concept, load_concept, tensor_hash
from ..core.errors import PerfusionError
from ..core.library import concept_path


@dataclasses.dataclass
class Entry:
    name: str
    path: Path
    sha256: str
    concept: Concept | None
    error: str | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def mismatch_reason(concept_family: str | None, model_family: str | None) -> str | None:
    """Why a concept cannot be used on the loaded model, or None."""
    if concept_family is None or model_family is None or concept_family == model_family:
        return None
    return f"trained for {families.label(concept_family)}; an {families.label(model_family)} model is loaded"


def is_hidden_folder(relative: str) -> bool:
    """A folder under the concepts folder that holds no concepts of its own: a training run (`NAME.run/`,
    with its checkpoints/ and previews/) or a hidden one, at any depth. `relative` as the WebUI labels it."""
    return any(part.endswith(".run") or (part.startswith(".") and part not in (".", ".."))
               for part in re.split(r"[\\/]+", relative.strip()) if part)


_DIR_BUTTON = re.compile(r"\s*<button\b[^>]*>(.*?)</button>\s*", re.S)


def drop_folder_buttons(buttons_html: str) -> str:
    """The Extra Networks "Dirs" view (one button per subfolder, plus "all") without the buttons of hidden
    folders; no buttons at all when only "all" would be left, as the WebUI does for a flat folder."""
    matches = list(_DIR_BUTTON.finditer(buttons_html))
    if not matches:  # markup we do not know: leave it alone
        return buttons_html
    kept, others = [], 0
    for m in matches:
        label = html.unescape(m.group(1)).strip()
        if "search-all" in m.group(0).split(">", 1)[0]:
            kept.append(m.group(0))
        elif not is_hidden_folder(label):
            kept.append(m.group(0))
            others += 1
    return "".join(kept) if others else ""


def _is_run_file(path: Path, root: Path) -> bool:
    return any(part.endswith(".run") or part.startswith(".") for part in path.relative_to(root).parts[:-1])


class ConceptStore:
    """Concepts under `folder()` (a callable: the folder can change with settings/command line)."""

    def __init__(self, folder):
        self._folder = folder
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple, Entry]] = {}

    @property
    def folder(self) -> Path:
        return Path(self._folder())

    def path_for(self, name: str) -> Path:
        """The file of `name`; PerfusionError for unknown names and names that escape the folder."""
        path = concept_path(self.folder, name)
        if _is_run_file(path, self.folder.resolve()):
            raise PerfusionError(f"unknown concept {name!r}: no {name}.safetensors in {self.folder}.")
        return path

    def entry(self, path: Path) -> Entry:
        path = Path(path)
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            with self._lock:
                cached = self._cache.get(path)
                if cached and cached[0] == key:
                    return cached[1]
            sha = tensor_hash(path)  # PerfusionError for a truncated or foreign file
        except OSError as exc:  # removed meanwhile, unreadable, a folder: the tag is skipped, never a crash
            raise PerfusionError(f"cannot read {path.name}: {exc.strerror or exc}.") from exc
        try:
            concept, error = load_concept(path), None
        except PerfusionError as exc:
            concept, error = None, str(exc)
        entry = Entry(path.stem, path, sha, concept, error)
        with self._lock:
            self._cache[path] = (key, entry)
        return entry

    def load(self, name: str) -> Entry:
        entry = self.entry(self.path_for(name))
        if entry.concept is None:
            raise PerfusionError(entry.error)
        return entry

    def entries(self) -> list[Entry]:
        root = self.folder
        if not root.is_dir():
            return []
        resolved = root.resolve()
        out = []
        for path in sorted(root.rglob("*.safetensors")):
            try:
                if not path.resolve().is_relative_to(resolved):  # a link that leads out: never read, said why
                    out.append(Entry(path.stem, path, "", None, "a link to a file outside the concepts folder; "
                                                                "not loaded (copy the file into the folder instead)"))
                    continue
                if not path.is_file() or _is_run_file(path.resolve(), resolved):
                    continue
                out.append(self.entry(path))
            except (OSError, ValueError) as exc:  # unreadable header: shown as a broken card
                out.append(Entry(path.stem, path, "", None, f"unreadable: {exc}"))
        for folder in {root} | {entry.path.parent for entry in out}:  # what saves killed mid-write left, once stale
            remove_stale_temps(folder, "*.safetensors")
        return out

    def find_by_hash(self, short: str) -> Entry | None:
        short = short.lower()
        for entry in self.entries():
            if entry.sha256 and entry.sha256.startswith(short) and entry.concept is not None:
                return entry
        return None

    def resolve_pasted(self, name: str, short: str) -> str | None:
        """For PNG Info pasting: keep `name` when its file has this hash, else the file that has it."""
        try:
            if self.load(name).sha256.startswith(short):
                return name
        except PerfusionError:
            pass
        found = self.find_by_hash(short)
        return found.name if found else None
