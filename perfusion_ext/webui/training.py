"""Training inside the WebUI: the job runner (the loaded model, the WebUI's progress state and its
queue lock) and previews rendered by the WebUI's own txt2img. The concepts folder and the hook cleanup
are passed in (state.py assembles the job manager), so this module needs no extension state.
The backend follows the loaded model: ldm (SD1, SD2) or sgm (SDXL); both refuse Forge and inpainting UNets.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from modules import call_queue, paths, processing, shared

from ..core.errors import PerfusionError
from ..core.hooks import ResolvedConcept, attach, build_edits, detach
from ..core.library import delete_concept
from ..training import TrainCallbacks, train
from ..training.dataset import pixels_of
from .activation import concept_word
from .backend import WebuiLdmBackend, is_sgm, refuse_unusable
from .concepts import ConceptStore, mismatch_reason
from .extra_network import WebuiEnv
from .jobs import Job, JobManager
from .sgm_backend import WebuiSgmBackend

log = logging.getLogger("perfusion")


class _Previews:
    """Adds previews to a WebUI backend: the WebUI's txt2img with the concept in memory (not yet in the concepts
    folder)."""

    preview_steps = 20
    unet: torch.nn.Module

    def __init__(self, sd_model, resolution: int):
        super().__init__(sd_model)
        self.preview_resolution = resolution

    def preview(self, prompt_template, concept, seed=0):
        env = WebuiEnv()
        word = concept_word(concept.name, "0" * 6) + "preview"
        env.register_embedding(word, concept)
        handles = attach(build_edits(self.unet, [ResolvedConcept(concept, 1.0, concept.beta, concept.tau)]))
        try:
            return self._txt2img(prompt_template.format(word), seed, self.preview_resolution)
        finally:
            detach(handles)
            env.unregister_embedding(word)

    def sample(self, prompt, seed, size):
        """The loaded model's own picture of a plain prompt (pair scenes), at the training resolution."""
        return pixels_of(self._txt2img(prompt, seed, size).convert("RGB"), size)

    def _txt2img(self, prompt: str, seed: int, size: int):
        """One image from the WebUI's txt2img, leaving its progress display as it was."""
        saved = {k: getattr(shared.state, k) for k in ("job", "job_count", "job_no", "sampling_step", "sampling_steps",
                                                        "textinfo", "current_image")}
        try:
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=prompt, negative_prompt="", seed=int(seed),
                sampler_name="Euler a", steps=self.preview_steps, cfg_scale=7.0, width=size,
                height=size, batch_size=1, n_iter=1, do_not_save_samples=True,
                do_not_save_grid=True, do_not_reload_embeddings=True,
            )
            p.disable_extra_networks = True  # our hooks are already on; the extra network would reset them
            p.scripts = None
            with torch.no_grad(), contextlib.closing(p):
                processed = processing.process_images(p)
            return processed.images[0]
        finally:
            for k, v in saved.items():
                setattr(shared.state, k, v)


class WebuiTrainingBackend(_Previews, WebuiLdmBackend):
    """SD1/SD2 (ldm) with previews."""


class WebuiSgmTrainingBackend(_Previews, WebuiSgmBackend):
    """SDXL (sgm) with previews."""


def training_backend(sd_model, resolution: int) -> WebuiTrainingBackend | WebuiSgmTrainingBackend:
    """The backend for the model the WebUI has loaded: sgm for SDXL, ldm otherwise (Forge refused first)."""
    refuse_unusable(sd_model)
    cls = WebuiSgmTrainingBackend if is_sgm(sd_model) else WebuiTrainingBackend
    return cls(sd_model, resolution)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """No parameter of the WebUI's model takes gradients during training; flags restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _stage_images(job: Job) -> tuple[Path, Path | None]:
    """The folder the trainer reads: the given folder, or a job folder with the listed files/uploads."""
    req = job.request
    if len(req.image_paths) == 1 and req.image_paths[0].is_dir() and not req.image_bytes:
        return req.image_paths[0], None
    tmp = Path(tempfile.mkdtemp(prefix=f"perfusion-{job.id}-", dir=_tmp_root()))
    for i, path in enumerate(req.image_paths):
        shutil.copyfile(path, tmp / f"{i:03d}_{path.name}")
    for i, data in enumerate(req.image_bytes):
        (tmp / f"upload_{i:03d}.png").write_bytes(data)
    return tmp, tmp


def _tmp_root() -> str:
    root = Path(paths.data_path) / "tmp" / "perfusion"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def run_job(job: Job, store: ConceptStore, release_hooks: Callable[[], None]) -> None:
    """Train on shared.sd_model into the store's folder; the caller holds the WebUI's queue lock."""
    req = job.request
    release_hooks()
    sd_model = shared.sd_model
    backend = training_backend(sd_model, req.resolution)
    out_dir = store.folder
    if req.resume:
        existing = out_dir / f"{req.name}.safetensors"
        if existing.is_file():
            entry = store.entry(existing)
            if entry.concept is not None:
                reason = mismatch_reason(entry.concept.base_family, backend.family)
                if reason:
                    raise PerfusionError(f"cannot resume {req.name!r}: {reason}")
    init_path = store.path_for(req.init_from) if req.init_from else None  # PerfusionError: unknown name
    if req.overwrite and not req.resume and (out_dir / f"{req.name}.safetensors").is_file():
        # the concept it replaces goes to the trash with its previews and run, never deleted for good
        entry = delete_concept(out_dir, req.name)
        if init_path is not None and init_path == (out_dir / f"{req.name}.safetensors").resolve():
            init_path = entry / init_path.name  # continuing a concept under its own name
    cfg = req.to_config(previews=bool(getattr(shared.opts, "perfusion_save_previews", True)), init_path=init_path)
    images_dir, cleanup = _stage_images(job)
    st = shared.state
    st.begin(job=f"perfusion-train-{job.id}")
    st.job_count = 1
    st.sampling_steps = req.steps
    # before step 1 the trainer encodes the images and, once per text encoder, estimates its covariance from 4,000
    # captions (38 min on 2 busy CPU cores for SD2's OpenCLIP-H in a real A1111): say so instead of a bare "step 0"
    job.message = st.textinfo = (f"Perfusion {req.name}: preparing (the images; on a text encoder's first training "
                                 "also its covariance, once: minutes on a CPU)")

    def on_progress(p):
        job.message = ""
        job.step, job.total, job.loss, job.eta_seconds = p.step, p.total, p.loss, p.eta_seconds
        st.sampling_step, st.sampling_steps = p.step, p.total
        st.textinfo = f"Perfusion {req.name}: step {p.step}/{p.total}, loss {p.loss:.4f}"

    def on_preview(step, image):
        job.preview, job.preview_step = image, step
        st.assign_current_image(image)

    def should_stop():
        return job.stop.is_set() or bool(st.interrupted)

    def on_dataset(notes):  # an accepted folder's skipped files reach GET /jobs/{id}, not only log.json
        job.dataset_notes = notes

    started = time.time()
    try:
        with frozen(sd_model), torch.enable_grad():
            result = train(backend, cfg, images_dir, out_dir, resume=req.resume, overwrite=req.overwrite,
                           callbacks=TrainCallbacks(on_progress=on_progress, on_preview=on_preview,
                                                    should_stop=should_stop, on_dataset=on_dataset))
    finally:
        st.end()
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    job.state = result.status
    job.step = result.steps_done
    job.concept_path = str(result.concept_path) if result.concept_path else None
    job.message = f"{result.message} in {time.time() - started:.0f} s; use <perfusion:{req.name}>"


def create_job_manager(store: ConceptStore, release_hooks: Callable[[], None]) -> JobManager:
    return JobManager(functools.partial(run_job, store=store, release_hooks=release_hooks), call_queue.queue_lock)
