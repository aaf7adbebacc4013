"""The concept library as the card, the training tab and the REST API use it. No WebUI imports (unit-tested).

Thin over `core.library` and `core.runs` (which do the file work and never lose a file); this adds what the
WebUI needs: no operation on a concept while a training job writes it, answers as JSON-able dicts, and
errors as ApiError with an HTTP status (404 unknown, 409 busy, 422 refused).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core import library, runs
from ..core.errors import PerfusionError
from ..core.tags import NAME_RE
from .concepts import ConceptStore
from .train_request import ApiError


def _api_error(exc: PerfusionError) -> ApiError:
    text = str(exc)
    return ApiError(404 if text.startswith("unknown concept") or "no checkpoint" in text or "no trash entry" in text
                    else 422, text)


class LibraryActions:
    def __init__(self, store: ConceptStore, jobs=None):
        self.store = store
        self.jobs = jobs

    @property
    def folder(self) -> Path:
        return self.store.folder

    def _idle(self, *names: str) -> None:
        for job in (self.jobs.list() if self.jobs is not None else []):
            if job.active and job.request.name in names:
                raise ApiError(409, f"a training job for {job.request.name!r} is {job.state} ({job.id}); wait for it "
                                    "or interrupt it first")

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PerfusionError as exc:
            raise _api_error(exc) from None

    @staticmethod
    def _name(value, what: str = "name") -> str:
        if not isinstance(value, str) or not NAME_RE.match(value.strip()) or value.strip() in (".", ".."):
            raise ApiError(422, f"{what} must be 1-100 letters, digits, space, _ . - (no paths)")
        return value.strip()

    # ---- card operations ---------------------------------------------------------------------------
    def set_defaults(self, name: str, beta=None, tau=None) -> dict:
        """Store β/τ in the file (the tensor hash does not change)."""
        name = self._name(name)
        self._idle(name)
        for key, value in (("beta", beta), ("tau", tau)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ApiError(422, f"{key} must be a number, got {value!r}")
        self._call(library.set_gate_defaults, self.folder, name, beta=beta, tau=tau)
        concept = self.store.load(name).concept
        return {"name": name, "beta": concept.beta, "tau": concept.tau}

    def rename(self, name: str, new) -> dict:
        name, new = self._name(name), self._name(new, "new name")
        self._idle(name, new)
        path = self._call(library.rename_concept, self.folder, name, new)
        return {"name": new, "filename": str(path), "alias": name}

    def duplicate(self, name: str, new) -> dict:
        name, new = self._name(name), self._name(new, "new name")
        self._idle(new)
        path = self._call(library.duplicate_concept, self.folder, name, new)
        return {"name": new, "filename": str(path)}

    def delete(self, name: str) -> dict:
        name = self._name(name)
        self._idle(name)
        entry = self._call(library.delete_concept, self.folder, name)
        return {"name": name, "trash": entry.name}

    def trash(self) -> list[dict]:
        return library.list_trash(self.folder)

    def restore(self, entry: str) -> dict:
        if not isinstance(entry, str) or not entry or "/" in entry or "\\" in entry or entry in (".", ".."):
            raise ApiError(422, "entry must be the name of a trash entry")
        path = self._call(library.restore_concept, self.folder, entry)
        return {"restored": entry, "filename": str(path)}

    # ---- the step picker ---------------------------------------------------------------------------
    def steps(self, name: str) -> list[dict]:
        return [s.to_json() for s in self._call(runs.list_steps, self.folder, self._name(name))]

    def promote(self, name: str, step) -> dict:
        name = self._name(name)
        if isinstance(step, bool) or not isinstance(step, int):
            raise ApiError(422, f"step must be an integer, got {step!r}")
        self._idle(name)
        result = self._call(runs.promote_step, self.folder, name, step)
        return {"name": name, "step": result["step"], "filename": str(result["concept"]),
                "trash": result["trash"].name if result["trash"] else None}

    # ---- continue training -------------------------------------------------------------------------
    def continue_plan(self, name: str) -> dict:
        """A training request body that continues `name`: a free new name, its superclass, init_from, and the
        images of its run when they are all still on disk (their common folder, or the files)."""
        name = self._name(name)
        concept = self._call(self.store.load, name).concept
        new, n = f"{name}-2", 2
        while any(p.exists() for p in (self.folder / f"{new}.safetensors", self.folder / f"{new}.run")):
            n += 1
            new = f"{name}-{n}"
        body = {"name": new, "superclass": concept.superclass, "init_from": name}
        images = self._run_images(name)
        if images:
            parents = {p.parent for p in images}
            body["images"] = [str(parents.pop())] if len(parents) == 1 else [str(p) for p in images]
        return body

    def _run_images(self, name: str) -> list[Path]:
        try:
            log = json.loads(runs.run_folder(self.folder, name).log.read_text(encoding="utf-8"))
            images = [Path(p) for p in log.get("images", [])]
        except (OSError, ValueError, TypeError, PerfusionError):
            return []
        return images if images and all(p.is_file() for p in images) else []


def handle(actions: LibraryActions, action: str, name: str, body) -> dict | list:
    """One REST call: POST /concepts/{name}/{action} with a JSON body (GET for steps and continue)."""
    body = body if isinstance(body, dict) else {}
    if action == "defaults":
        unknown = set(body) - {"beta", "tau"}
        if unknown or not body:
            raise ApiError(422, 'the body must be {"beta": B} and/or {"tau": T}')
        return actions.set_defaults(name, body.get("beta"), body.get("tau"))
    if action in ("rename", "duplicate"):
        return getattr(actions, action)(name, body.get("new"))
    if action == "delete":
        return actions.delete(name)
    if action == "steps":
        return actions.steps(name)
    if action == "promote":
        return actions.promote(name, body.get("step"))
    if action == "continue":
        return actions.continue_plan(name)
    raise ApiError(404, f"unknown action {action!r}")
