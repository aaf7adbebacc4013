"""Atomic file writes: write a temp file in the target folder, fsync, then rename over the target.

A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one. A process killed mid-write
leaves its hidden temp file (`.NAME.<random>.tmp`); `remove_stale_temps` clears those once they are old.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from .errors import PerfusionError, WriteError

# A save takes seconds; a temp file untouched this long was left by a process killed mid-write. Younger ones may be
# a save in progress in another process (the WebUI and the CLI can share a folder) and are never touched.
STALE_TEMP_SECONDS = 15 * 60
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]+\.tmp$")  # what atomic_path's mkstemp names them


def remove_stale_temps(folder: str | os.PathLike, target: str = "*",
                       older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove atomic_path's temp files in `folder` whose target name matches the glob `target` and that were last
    written more than `older_than` seconds ago; returns what was removed. Only regular files are removed (never a
    link, never outside `folder`), and any error is ignored: a cleanup never fails a save or a listing."""
    removed, now = [], time.time()
    try:
        with os.scandir(folder) as it:
            for entry in it:
                m = _TEMP_RE.match(entry.name)
                if not m or not fnmatch.fnmatchcase(m["target"], target):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                except OSError:
                    continue
    except OSError:
        pass
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temp path beside `target`; on success rename it onto `target`, else delete it. Stale temp files of
    `target` left by a killed process are removed first."""
    target = Path(target)
    remove_stale_temps(target.parent, glob.escape(target.name))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if isinstance(exc, PerfusionError):
            raise
        raise _write_error(target, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_error(target: Path, exc: OSError) -> WriteError:
    """What the user sees when a write fails (read-only folder, full disk): where, why, and that nothing was lost."""
    error = WriteError(f"could not write {target.name} in {target.parent}: {exc.strerror or exc}. The previous "
                       f"{target.name}, if there was one, is unchanged; make the folder writable or free disk space, "
                       "then try again.")
    error.errno = exc.errno
    return error


def atomic_save_safetensors(tensors, target, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(target) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as exc:
            if "(os error" in str(exc):  # safetensors' own error type for an I/O failure (a full disk)
                raise OSError(str(exc).rpartition("I/O error: ")[2]) from exc
            raise


def atomic_write_json(obj, target) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")


def atomic_write_bytes(data: bytes, target) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def file_restorer(path: Path):
    """An undo step that puts `path` back as it is now: absent, or with these bytes."""
    saved = path.read_bytes() if path.is_file() else None

    def restore() -> None:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(saved, path)

    return restore
