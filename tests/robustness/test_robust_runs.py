"""Training runs that go wrong: a NaN loss, an interrupt or Ctrl-C at a step, a read-only or full output folder
while saving, a crash in the middle of a save. The user is told what happened; the concept saved before stays
intact and loadable, no half-written file is left where a concept is looked for."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch
from robust_helpers import toy_concept, toy_pipeline

import perfusion_ext as pf
from perfusion_ext.core import atomic
from perfusion_ext.core.errors import PerfusionError, WriteError
from perfusion_ext.pipelines.backend import DiffusersBackend
from perfusion_ext.toy.concepts import write_training_set
from perfusion_ext.training import TrainCallbacks, TrainConfig, train
from perfusion_ext.webui.jobs import JobManager
from perfusion_ext.webui.train_request import parse_train_request


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    os.environ.setdefault("PERFUSION_CACHE", str(tmp_path_factory.mktemp("cache")))
    return DiffusersBackend(toy_pipeline())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_training_set("house", tmp_path_factory.mktemp("house"), n=2)


def config(**kw):
    base = dict(name="house", superclass="square", steps=4, batch_size=2, micro_batch=2, checkpoint_every=2,
                preview_every=0, seed=3)
    return TrainConfig(**{**base, **kw})


def leftovers(folder):
    """Temp files of interrupted atomic writes (hidden, never listed as concepts)."""
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_nan_loss_stops_and_keeps_the_last_good_concept(backend, images, tmp_path, monkeypatch):
    original, calls = backend.predict, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        return out * float("nan") if calls["n"] > 3 else out  # one micro-batch per step: step 4 is NaN

    monkeypatch.setattr(backend, "predict", poisoned)
    result = train(backend, config(steps=6), images, tmp_path)
    assert result.status == "nan"
    assert result.message.startswith("loss became nan at step 4; stopped and kept the concept of step 3. Lower the")
    concept = pf.load_concept(result.concept_path)
    assert concept.metadata["perfusion.steps"] == "3"
    assert all(torch.isfinite(t).all() for t in concept.value_targets.values())


@pytest.mark.parametrize("stop_at", [1, 3])
def test_interrupt_at_a_step_saves_and_resume_finishes(backend, images, tmp_path, stop_at):
    done = {"steps": 0}

    def on_progress(p):
        done["steps"] = p.step

    stop = TrainCallbacks(on_progress=on_progress, should_stop=lambda: done["steps"] >= stop_at)
    result = train(backend, config(), images, tmp_path, callbacks=stop)
    assert (result.status, result.message) == ("interrupted", f"stopped at step {stop_at} on request")
    assert pf.load_concept(result.concept_path).metadata["perfusion.steps"] == str(stop_at)
    result = train(backend, config(), images, tmp_path, resume=True)
    assert result.status == "finished" and pf.load_concept(result.concept_path).metadata["perfusion.steps"] == "4"
    assert leftovers(tmp_path) == []


def test_ctrl_c_mid_step_saves(backend, images, tmp_path, monkeypatch):
    original, calls = backend.predict, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "predict", interrupted)
    result = train(backend, config(), images, tmp_path)
    assert result.status == "interrupted" and result.message == "interrupted at step 2; saved. Continue with --resume."
    assert pf.load_concept(result.concept_path).metadata["perfusion.steps"] == "2"


def _fail_saves_after(monkeypatch, n_ok: int, failure):
    """Let `n_ok` atomic writes through, then make every later one fail inside the write with `failure()`."""
    original, count = atomic.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] > n_ok:
            with open(filename, "wb") as f:
                f.write(b"half a file")  # the write got this far
            raise failure()
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", save_file)


@pytest.mark.parametrize("case,failure,message", [
    pytest.param("read-only", lambda: OSError(errno.EROFS, "Read-only file system"),
                 r"could not write house-step000004.safetensors in .*: Read-only file system\. The previous",
                 id="run-read-only-folder-while-saving"),
    pytest.param("disk-full", lambda: Exception("Error while serializing: I/O error: No space left on device "
                                                "(os error 28)"),
                 r"could not write .*: No space left on device \(os error 28\)\. The previous .* is unchanged; make "
                 r"the folder writable or free disk space", id="run-disk-full-while-saving"),
])
def test_a_failing_save_is_reported_and_the_previous_concept_survives(backend, images, tmp_path, monkeypatch, case,
                                                                       failure, message):
    train(backend, config(steps=2), images, tmp_path)  # a finished run: the concept of step 2
    concept_file = tmp_path / "house.safetensors"
    before = concept_file.read_bytes()
    _fail_saves_after(monkeypatch, 0, failure)
    with pytest.raises(WriteError, match=message) as err:
        train(backend, config(steps=4), images, tmp_path, resume=True)
    assert isinstance(err.value, PerfusionError) and isinstance(err.value, OSError)
    assert concept_file.read_bytes() == before and pf.load_concept(concept_file).metadata["perfusion.steps"] == "2"
    assert leftovers(tmp_path) == []
    monkeypatch.undo()  # the folder is writable again: the run continues from its last checkpoint
    assert train(backend, config(steps=4), images, tmp_path, resume=True).status == "finished"


def test_a_read_only_folder_is_reported_before_anything_is_written(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError, match=r"could not write x.json in .*: Permission denied"):
        atomic.atomic_write_json({"a": 1}, tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_in_a_webui_job_is_its_message(tmp_path):
    def runner(job):
        raise WriteError("could not write teddy.safetensors in /models/perfusion: Read-only file system. ...")

    jobs = JobManager(runner, threading.Lock())
    job = jobs.submit(parse_train_request({"name": "teddy", "superclass": "bear", "images": ["/"], "steps": 5}, None))
    for _ in range(500):
        if not job.active:
            break
        threading.Event().wait(0.01)
    assert job.state == "failed" and job.message.startswith("could not write teddy.safetensors")


def test_ctrl_c_in_the_middle_of_a_save_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "teddy.safetensors"
    atomic.atomic_save_safetensors({"a": torch.zeros(4)}, target)
    before = target.read_bytes()
    _fail_saves_after(monkeypatch, 0, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_save_safetensors({"a": torch.ones(4)}, target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_a_process_killed_in_the_middle_of_a_save_leaves_the_previous_file(tmp_path):
    """SIGKILL-like: the process ends inside the write (no cleanup runs). The concept is intact; the temp file
    left behind is hidden and never taken for a concept."""
    target = tmp_path / "teddy.safetensors"
    atomic.atomic_save_safetensors({"a": torch.zeros(4)}, target)
    before = target.read_bytes()
    code = textwrap.dedent(f"""
        import os
        from perfusion_ext.core.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half a concept")
            os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    assert target.read_bytes() == before
    assert len(leftovers(tmp_path)) == 1
    from perfusion_ext.core.library import list_concepts

    assert list_concepts(tmp_path) == [target]


def test_temp_files_of_killed_saves_are_removed_once_stale(tmp_path):
    """A kill mid-save left its hidden temp file for good. Listing the concepts (the WebUI's store) and saving one
    remove such files once untouched for STALE_TEMP_SECONDS; a younger one may be a save in progress in another
    process and stays, as do links and the temp files of other kinds of file."""
    from perfusion_ext.webui.concepts import ConceptStore

    pipe = toy_pipeline()
    teddy, ring = tmp_path / "teddy.safetensors", tmp_path / "sub" / "ring.safetensors"
    for i, path in enumerate((teddy, ring)):
        pf.save_concept(toy_concept(pipe, path.stem, i), path)

    def temp_of(target, age_s):  # what atomic_path leaves when its process is killed (the test above)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.write(fd, b"half a concept")
        os.close(fd)
        os.utime(name, (time.time() - age_s,) * 2)
        return name

    old = atomic.STALE_TEMP_SECONDS + 60
    stale = [temp_of(teddy, old), temp_of(ring, old), temp_of(tmp_path / "gone.safetensors", old)]
    in_progress = temp_of(teddy, 5)
    other_kind = temp_of(tmp_path / "log.json", old)
    (tmp_path / "outside.bin").write_bytes(b"not ours")
    link = tmp_path / ".link.safetensors.abc12345.tmp"
    link.symlink_to(tmp_path / "outside.bin")
    os.utime(link, (time.time() - old,) * 2, follow_symlinks=False)
    keep = sorted(os.path.basename(p) for p in (in_progress, other_kind, link))

    assert [e.name for e in ConceptStore(lambda: tmp_path).entries()] == ["ring", "teddy"]
    assert leftovers(tmp_path) == keep and not any(os.path.exists(p) for p in stale)
    assert (tmp_path / "outside.bin").read_bytes() == b"not ours"
    os.utime(in_progress, (time.time() - old,) * 2)  # the other process died too: the next save of teddy clears it
    pf.save_concept(toy_concept(pipe, "teddy", 3), teddy)
    assert not os.path.exists(in_progress) and pf.load_concept(teddy).name == "teddy"
