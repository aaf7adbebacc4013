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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temp path beside `target`; on success rename it onto `target`, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save_safetensors(tensors, target, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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
