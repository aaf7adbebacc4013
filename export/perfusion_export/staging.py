"""Build an export in a temp folder beside its destination and rename it into place only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from perfusion_ext.core.errors import PerfusionError


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PerfusionError(f"{out} already exists and is not empty; choose another --out or pass --overwrite.")


@contextlib.contextmanager
def staged(out: Path, overwrite: bool):
    """Yield an empty temp folder; on success it replaces `out`, on any error it is deleted."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            check_destination(out, overwrite)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
