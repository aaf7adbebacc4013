"""The extension's process-wide state inside the WebUI: the concepts folder, the store, the activator,
the training jobs. Created lazily, so importing this module needs nothing but the WebUI's cmd_opts.

The assembly point of the WebUI glue: the modules below it get what they need passed in (the store, the
hook cleanup) and never import this one; api.py, ui_tab.py and wiring.py above it use it.
"""
from __future__ import annotations

import os
from pathlib import Path

_store = None
_activator = None
_jobs = None


def concepts_dir() -> Path:
    from modules import paths, shared

    folder = getattr(shared.cmd_opts, "perfusion_dir", None) or os.path.join(paths.models_path, "perfusion")
    return Path(folder)


def images_dirs() -> list[Path]:
    """Folders the REST API may read training images from (besides base64 uploads)."""
    from modules import paths, shared

    value = getattr(shared.cmd_opts, "perfusion_images_dir", None) or os.path.join(paths.data_path, "perfusion-images")
    return [Path(p) for p in str(value).split(os.pathsep) if p]


def store():
    global _store
    if _store is None:
        from .concepts import ConceptStore

        _store = ConceptStore(concepts_dir)
    return _store


def activator():
    global _activator
    if _activator is None:
        from .activation import Activator
        from .extra_network import WebuiEnv

        _activator = Activator(store(), WebuiEnv())
    return _activator


def release_hooks(*_args, **_kwargs) -> None:
    """Callback-friendly: remove any Perfusion hooks and concept words left on the model."""
    if _activator is not None:
        _activator.release()


def library():
    """The concept library's operations (rename, delete to the trash, promote …), aware of running jobs."""
    from .library_actions import LibraryActions

    return LibraryActions(store(), jobs())


def jobs():
    global _jobs
    if _jobs is None:
        from .training import create_job_manager

        _jobs = create_job_manager(store(), release_hooks)
    return _jobs
