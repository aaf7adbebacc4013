"""Atomic file writes: write a temp file in the target folder, fsync, then rename over the target.

A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .errors import PerfusionError, WriteError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temp path beside `target`; on success rename it onto `target`, else delete it."""
    target = Path(target)
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
