"""`train`, the outer training loop: files, checkpoints, resume, previews, progress, interrupts, NaN guard."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file
from tqdm import tqdm

from ..core.atomic import atomic_save_safetensors, atomic_write_json
from ..core.concept import save_concept
from ..core.errors import PerfusionError
from ..core.runs import LOSS_KEY, RunFolder
from .backend import Backend
from .config import TrainCallbacks, TrainConfig, TrainProgress, TrainResult
from .dataset import load_images
from .report import write_loss_curve
from .trainer import ConceptTrainer

log = logging.getLogger(__name__)


def _save_checkpoint(trainer: ConceptTrainer, run: RunFolder) -> None:
    concept = trainer.concept()
    previous = (trainer.step - 1) // trainer.cfg.checkpoint_every * trainer.cfg.checkpoint_every
    window = trainer.losses[previous:trainer.step]
    if window:  # the step picker shows it: the mean loss of the steps since the previous checkpoint
        concept.metadata[LOSS_KEY] = f"{sum(window) / len(window):.6g}"
    save_concept(concept, run.checkpoint(trainer.cfg.name, trainer.step))
    tensors, meta = trainer.state()
    atomic_save_safetensors(tensors, run.state)
    atomic_write_json(meta, run.state_meta)
    save_concept(concept, run.concept)


def _write_log(trainer: ConceptTrainer, run: RunFolder, status: str, message: str, notes: list[str],
               seconds: float) -> None:
    atomic_write_json({
        "status": status, "message": message, "step": trainer.step, "seconds": round(seconds, 2),
        "config": dataclasses.asdict(trainer.cfg), "dataset_notes": notes,
        "images": [str(im.path) for im in trainer.dataset.images], "losses": trainer.losses,
    }, run.log)
    write_loss_curve(trainer.losses, run.loss_curve)


def _preview(backend, trainer: ConceptTrainer, run: RunFolder, callbacks: TrainCallbacks,
             checkpoint: bool = False) -> None:
    """Render a preview at the run's seed (also beside the step's checkpoint when there is one); any failure
    (out-of-memory included) is reported and skipped."""
    preview = getattr(backend, "preview", None)
    if preview is None:
        return
    try:
        image = preview(trainer.cfg.preview_prompt, trainer.concept(), seed=trainer.cfg.seed)
        path = run.preview_at(trainer.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        shutil.copyfile(path, run.preview)
        if checkpoint:
            shutil.copyfile(path, run.checkpoint_preview(trainer.cfg.name, trainer.step))
    except Exception as exc:  # noqa: BLE001 - a preview must never end the run
        log.warning("preview at step %d skipped: %s", trainer.step, exc)
        return
    if callbacks.on_preview:
        callbacks.on_preview(trainer.step, image)


def _prepare_run_folder(run: RunFolder, resume: bool, overwrite: bool) -> None:
    if resume:
        if not run.state.is_file():
            raise PerfusionError(f"nothing to resume: {run.state} does not exist. Start without --resume.")
        return
    if run.concept.exists() or run.root.exists():
        if not overwrite:
            raise PerfusionError(
                f"{run.concept.name} or {run.root.name}/ already exists in {run.concept.parent}: use --resume to "
                "continue that run, or another --name (nothing was overwritten)."
            )
        shutil.rmtree(run.root, ignore_errors=True)
        run.concept.unlink(missing_ok=True)


def train(backend: Backend, config: TrainConfig, images_dir: str | Path, out_dir: str | Path, resume: bool = False,
          callbacks: TrainCallbacks | None = None, overwrite: bool = False) -> TrainResult:
    """Train and write OUT/NAME.safetensors (+ NAME.png preview and the NAME.run/ folder)."""
    images_dir, out_dir, callbacks = Path(images_dir), Path(out_dir), callbacks or TrainCallbacks()
    run = RunFolder(out_dir, config.name)
    _prepare_run_folder(run, resume, overwrite)
    cfg = config.resolved(backend.family, backend.device)
    dataset = load_images(images_dir, cfg.resolution, cfg.masks_dir)
    for note in dataset.notes:
        log.warning("dataset: %s", note)
    if callbacks.on_dataset:
        callbacks.on_dataset(list(dataset.notes))
    trainer = ConceptTrainer(backend, cfg, dataset)
    if resume:
        trainer.restore(load_file(run.state), json.loads(run.state_meta.read_text()))
    run.root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    status, message = "finished", f"trained {cfg.steps} steps"
    last_good = trainer.concept()
    keyboard = False
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc=f"perfusion {cfg.name}", unit="step", dynamic_ncols=True)
    try:
        while trainer.step < cfg.steps:
            if callbacks.should_stop and callbacks.should_stop():
                status, message = "interrupted", f"stopped at step {trainer.step} on request"
                break
            loss = trainer.train_step()
            if not math.isfinite(loss) or not all(p.isfinite().all() for p in trainer.params().values()):
                status = "nan"
                message = (f"loss became {loss} at step {trainer.step}; stopped and kept the concept of step "
                           f"{trainer.step - 1}. Lower the learning rates or check the images.")
                trainer.step -= 1
                save_concept(last_good, run.concept)
                break
            trainer.losses.append(loss)
            last_good = trainer.concept()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if callbacks.on_progress:
                rate = bar.format_dict.get("rate") or 0
                eta = (cfg.steps - trainer.step) / rate if rate else float("nan")
                callbacks.on_progress(TrainProgress(trainer.step, cfg.steps, loss, eta))
            at_checkpoint = trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps
            if at_checkpoint:
                _save_checkpoint(trainer, run)
            if cfg.preview_every and (trainer.step % cfg.preview_every == 0 or at_checkpoint):
                _preview(backend, trainer, run, callbacks, checkpoint=at_checkpoint)
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted at step {trainer.step}; saved. Continue with --resume."
        keyboard = True
    finally:
        bar.close()
    if status != "nan":
        _save_checkpoint(trainer, run)
        if (cfg.preview_every and trainer.step and not keyboard
                and not run.checkpoint_preview(cfg.name, trainer.step).is_file()):
            _preview(backend, trainer, run, callbacks, checkpoint=True)  # every checkpoint gets its preview
    _write_log(trainer, run, status, message, dataset.notes, time.time() - started)
    log.info(message)
    return TrainResult(run.concept, run.root, trainer.step, status, message)
