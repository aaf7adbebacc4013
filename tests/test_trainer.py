"""Trainer on the toy architecture (random weights): optimizer contents, resume, interrupt, NaN, datasets."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import perfusion_ext as pf
from perfusion_ext.toy.concepts import write_training_set
from perfusion_ext.training import TrainCallbacks, TrainConfig, train
from perfusion_ext.training.dataset import load_images
from perfusion_ext.training.trainer import ConceptTrainer


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_training_set("teddy", tmp_path_factory.mktemp("teddy"), n=4)


def config(**kw):
    base = dict(name="teddy", superclass="circle", steps=4, batch_size=4, micro_batch=2, checkpoint_every=2,
                preview_every=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_optimizer_holds_exactly_the_trainable_tensors(random_toy_backend, images):
    cfg = config().resolved(random_toy_backend.family, random_toy_backend.device)
    trainer = ConceptTrainer(random_toy_backend, cfg, load_images(images, 32))
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.006, 0.06]  # the toy family's value rate
    assert groups[0]["params"] == list(trainer.embedding.values())
    assert groups[1]["params"] == list(trainer.value_targets.values())
    assert len(groups[1]["params"]) == len(trainer.layers) == 11
    trainer.train_step()
    frozen = [p for m in random_toy_backend.frozen_modules() for p in m.parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(not p.requires_grad for p in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for g in groups for p in g["params"])
    concept = trainer.concept()
    assert all(not t.requires_grad for t in concept.key_targets.values())
    assert not trainer.i_star.requires_grad and not trainer.cov_cholesky.requires_grad
    # Key locking: o*_K = W_k i_super for every layer, never a trained tensor.
    for name, layer in trainer.layers.items():
        expected = (layer.to_k.weight.double() @ trainer.i_super).float()
        assert torch.allclose(concept.key_targets[name], expected)


def test_baseline_modes_train_the_right_tensors(random_toy_backend, images):
    def trainer(mode):
        cfg = config(mode=mode).resolved("toy", random_toy_backend.device)
        return ConceptTrainer(random_toy_backend, cfg, load_images(images, 32))

    ti = trainer("textual_inversion")
    assert [len(g["params"]) for g in ti.optimizer.param_groups] == [1]
    nk = trainer("no_key_lock")
    assert len(nk.optimizer.param_groups[1]["params"]) == 22


def test_resume_equals_uninterrupted_run(random_toy_backend, images, tmp_path):
    full = train(random_toy_backend, config(), images, tmp_path / "full")
    assert full.status == "finished" and full.steps_done == 4
    stopper = TrainCallbacks(should_stop=lambda: stopper.calls.append(1) or len(stopper.calls) > 2)
    stopper.calls = []
    part = train(random_toy_backend, config(), images, tmp_path / "split", callbacks=stopper)
    assert part.status == "interrupted" and part.steps_done == 2
    resumed = train(random_toy_backend, config(), images, tmp_path / "split", resume=True)
    assert resumed.status == "finished" and resumed.steps_done == 4
    a, b = pf.load_concept(full.concept_path), pf.load_concept(resumed.concept_path)
    assert torch.equal(a.target_input, b.target_input)
    assert torch.equal(a.embeddings["clip_l"], b.embeddings["clip_l"])
    assert all(torch.equal(a.value_targets[k], b.value_targets[k]) for k in a.value_targets)
    log = json.loads((full.run_dir / "log.json").read_text())
    assert len(log["losses"]) == 4 and log["status"] == "finished"
    assert (full.run_dir / "loss.png").is_file()
    assert sorted(p.name for p in (full.run_dir / "checkpoints").iterdir()) == [
        "teddy-step000002.safetensors", "teddy-step000004.safetensors"]


def test_keyboard_interrupt_saves_a_loadable_concept(random_toy_backend, images, tmp_path):
    def progress(p):
        if p.step == 1:
            raise KeyboardInterrupt

    result = train(random_toy_backend, config(), images, tmp_path, callbacks=TrainCallbacks(on_progress=progress))
    assert result.status == "interrupted" and "--resume" in result.message
    concept = pf.load_concept(result.concept_path)
    assert concept.metadata["perfusion.steps"] == "1"


def test_nan_loss_stops_and_keeps_last_good_concept(random_toy_backend, images, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = random_toy_backend.predict

    def poisoned(noisy, t, context):
        calls["n"] += 1
        out = original(noisy, t, context)
        return out * float("nan") if calls["n"] > 4 else out  # 2 micro-batches per step: step 3 is NaN

    monkeypatch.setattr(random_toy_backend, "predict", poisoned)
    result = train(random_toy_backend, config(steps=6, checkpoint_every=10), images, tmp_path)
    assert result.status == "nan" and "kept the concept of step 2" in result.message
    concept = pf.load_concept(result.concept_path)
    assert concept.metadata["perfusion.steps"] == "2"
    assert torch.isfinite(concept.value_targets[concept.layers[0]]).all()


def test_failing_preview_never_ends_the_run(random_toy_backend, images, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(random_toy_backend, "preview", broken, raising=False)
    result = train(random_toy_backend, config(steps=2, preview_every=1), images, tmp_path)
    assert result.status == "finished"


def test_existing_concept_is_never_overwritten(random_toy_backend, images, tmp_path):
    train(random_toy_backend, config(steps=1), images, tmp_path)
    before = (tmp_path / "teddy.safetensors").read_bytes()
    with pytest.raises(pf.PerfusionError, match="already exists.*use --resume"):
        train(random_toy_backend, config(steps=1), images, tmp_path)
    assert (tmp_path / "teddy.safetensors").read_bytes() == before
    with pytest.raises(pf.PerfusionError, match="nothing to resume"):
        train(random_toy_backend, config(steps=1, name="other"), images, tmp_path, resume=True)


def test_superclass_must_be_one_token(random_toy_backend, images, tmp_path):
    with pytest.raises(pf.PerfusionError, match="must be exactly one"):
        train(random_toy_backend, config(superclass="xylophonist-circle"), images, tmp_path)


def test_bad_image_folders(tmp_path):
    with pytest.raises(pf.PerfusionError, match="does not exist"):
        load_images(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(pf.PerfusionError, match="is empty"):
        load_images(tmp_path / "empty", 32)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.doc").write_text("x")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (8, 8)).save(junk / "tiny.png")
    with pytest.raises(pf.PerfusionError) as err:
        load_images(junk, 32)
    msg = str(err.value)
    assert "no usable image" in msg and "broken.png: skipped (unreadable or corrupt" in msg
    assert "tiny.png: skipped (8×8 px is below 16 px" in msg and "notes.doc: skipped (not an image type" in msg


def test_odd_images_are_converted_with_notes(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    rgba = Image.fromarray(base).convert("RGBA")
    alpha = np.zeros((40, 40), np.uint8)
    alpha[10:30, 10:30] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "alpha.png")
    rotated = Image.fromarray(base[:, :20])  # 20 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(base).save(tmp_path / "a.png")
    Image.fromarray(base).save(tmp_path / "b_copy.png")
    data = load_images(tmp_path, 32)
    notes = "\n".join(data.notes)
    assert "cmyk.jpg: CMYK converted to RGB" in notes
    assert "deep.png: 16/32-bit image, scaled to 8 bits" in notes
    assert "alpha.png: has transparency; alpha used as the subject mask" in notes
    assert "rotated.jpg: rotated upright from its EXIF orientation" in notes
    assert "b_copy.png: skipped (duplicate of a.png)" in notes
    assert len(data.images) == 5
    alpha_image = next(im for im in data.images if im.path.name == "alpha.png")
    assert alpha_image.mask is not None and alpha_image.mask.shape == (32, 32)
    assert alpha_image.mask[16, 16] == pytest.approx(1.0) and alpha_image.mask[0, 0] == pytest.approx(0.0)
    assert all(im.pixels.shape == (3, 32, 32) for im in data.images)


def test_out_of_memory_falls_back_to_smaller_micro_batches(random_toy_backend, images, monkeypatch):
    trainer = ConceptTrainer(random_toy_backend, config(batch_size=4, micro_batch=4).resolved("toy", random_toy_backend.device),
                             load_images(images, 32))
    original = random_toy_backend.predict

    def limited(noisy, t, context):
        if noisy.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return original(noisy, t, context)

    monkeypatch.setattr(random_toy_backend, "predict", limited)
    loss = trainer.train_step()
    assert trainer.cfg.micro_batch == 1 and trainer.step == 1 and np.isfinite(loss)
