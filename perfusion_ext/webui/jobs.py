"""Server-side training jobs: queued, run one at a time under the WebUI's queue lock, observable and
interruptible from the training tab and the REST API. No WebUI imports (the runner and lock are injected).

A job lives in the server, not in the browser: closing or reloading the page loses nothing, and the
tab shows the running job again from here.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import logging
import threading
import time
import traceback
import uuid

from ..core.errors import PerfusionError
from .train_request import ApiError, TrainRequest

log = logging.getLogger("perfusion")
ACTIVE_STATES = ("queued", "running")


@dataclasses.dataclass
class Job:
    id: str
    request: TrainRequest
    state: str = "queued"  # queued | running | finished | interrupted | nan | failed
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    message: str = ""
    preview: object = None  # PIL image
    preview_step: int = 0
    concept_path: str | None = None
    dataset_notes: list[str] = dataclasses.field(default_factory=list)  # images skipped or converted, with why
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def preview_png_base64(self) -> str | None:
        if self.preview is None:
            return None
        buf = io.BytesIO()
        self.preview.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def to_json(self, preview: bool = True) -> dict:
        out = {
            "id": self.id, "name": self.request.name, "superclass": self.request.superclass, "state": self.state,
            "step": self.step, "total": self.total or self.request.steps,
            "loss": None if self.loss is None or self.loss != self.loss else round(self.loss, 6),
            "eta_seconds": None if self.eta_seconds is None or self.eta_seconds != self.eta_seconds
            else round(self.eta_seconds, 1),
            "message": self.message, "concept_path": self.concept_path, "dataset_notes": list(self.dataset_notes),
            "preview_step": self.preview_step,
            "created": self.created, "started": self.started, "finished": self.finished,
        }
        if preview:
            out["preview"] = self.preview_png_base64()
        return out


class JobManager:
    """`runner(job)` trains (in a worker thread, under `lock`) and fills job.state/message/concept_path."""

    def __init__(self, runner, lock, keep: int = 50):
        self.runner = runner
        self.lock = lock
        self.keep = keep
        self.jobs: dict[str, Job] = {}
        self._guard = threading.Lock()
        self._counter = itertools.count(1)

    def submit(self, request: TrainRequest) -> Job:
        with self._guard:
            for job in self.jobs.values():
                if job.active and job.request.name == request.name:
                    raise ApiError(409, f"a training job for {request.name!r} is already {job.state} ({job.id})")
            job = Job(id=f"{next(self._counter)}-{uuid.uuid4().hex[:8]}", request=request, total=request.steps)
            self.jobs[job.id] = job
            self._trim()
        threading.Thread(target=self._run, args=(job,), name=f"perfusion-train-{job.id}", daemon=True).start()
        return job

    def _trim(self):
        done = [j for j in self.jobs.values() if not j.active]
        for job in sorted(done, key=lambda j: j.created)[:max(0, len(self.jobs) - self.keep)]:
            del self.jobs[job.id]

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no training job {job_id!r}")
        return job

    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)

    def latest(self) -> Job | None:
        jobs = self.list()
        running = [j for j in jobs if j.active]
        return running[0] if running else (jobs[-1] if jobs else None)

    def interrupt(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.active:
            raise ApiError(409, f"training job {job_id!r} has already ended ({job.state}); there is nothing to interrupt")
        job.stop.set()
        if job.state == "queued":
            job.message = "interrupt requested; it will not start"
        return job

    def _run(self, job: Job) -> None:
        with self.lock:
            if job.stop.is_set():
                job.state, job.message, job.finished = "interrupted", "interrupted before it started", time.time()
                return
            job.state, job.started = "running", time.time()
            try:
                self.runner(job)
            except (PerfusionError, ApiError) as exc:
                job.state, job.message = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 - a job must never take the server down
                log.error("Perfusion training job %s failed:\n%s", job.id, traceback.format_exc())
                job.state, job.message = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                if job.state == "running":
                    job.state = "failed"
                job.finished = time.time()
