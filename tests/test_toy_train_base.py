"""The toy base-model trainer checkpoints and resumes exactly (weights, optimizer, sampler stream)."""
import shutil

import pytest
import torch

from perfusion_ext.toy import train_base

pytestmark = pytest.mark.slow


def test_checkpoint_round_trip_continues_identically(tmp_path):
    args = train_base.parse_args(["--work", str(tmp_path), "--device", "cpu", "--batch", "4"])
    first = train_base.Trainer(args)
    assert first.load()  # the committed resume point: EMA weights, a fresh optimizer that warms up again
    assert first.state["warmup_origin"] == first.state["step"] and first.learning_rate(0.0) < args.lr / 100
    first.hardware_log()
    first.train_diffusion_step(0.0)
    first.save()
    step = first.state["step"]
    loss_next = first.train_diffusion_step(0.0)

    resumed = train_base.Trainer(args)
    assert resumed.load() and resumed.state["step"] == step
    assert resumed.state["hardware"] == first.state["hardware"]
    assert torch.equal(resumed.train_diffusion_step(0.0), loss_next)
    for a, b in zip(resumed.unet.parameters(), first.unet.parameters()):
        assert torch.equal(a, b)


def test_world_v2_starts_with_an_anchored_vae_and_resumes(tmp_path):
    args = train_base.parse_args(["--work", str(tmp_path), "--device", "cpu", "--batch", "4", "--world", "v2",
                                  "--vae-v2-steps", "2"])
    first = train_base.Trainer(args)
    assert first.load() and first.state["world"] == "v2"
    first._start_world_v2()  # what loading a one-object (world v1) model does
    assert first.state["phase"] == "vae_v2" and first.state["vae_v2_step"] == 0
    for a, b in zip(first.vae_anchor.parameters(), first.vae.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    first.train_vae_v2_step()
    assert first.state["phase"] == "vae_v2"
    first.save()
    resumed = train_base.Trainer(args)
    assert resumed.load() and resumed.state["phase"] == "vae_v2" and resumed.state["vae_v2_step"] == 1
    for a, b in zip(resumed.vae_anchor.parameters(), first.vae_anchor.parameters()):
        assert torch.equal(a, b)
    # the VAE's Adam state resumes too (a fresh one takes full-size first steps)
    for p, q in zip(resumed.vae.parameters(), first.vae.parameters()):
        assert torch.equal(resumed.vae_optimizer.state[p]["exp_avg_sq"], first.vae_optimizer.state[q]["exp_avg_sq"])
    resumed.train_vae_v2_step()  # the last VAE step hands over to the diffusion phase
    assert resumed.state["phase"] == "diffusion" and resumed.state["warmup_origin"] == resumed.state["step"]
    images, ids = resumed.sampler.sample(4)
    assert images.shape == (4, 32, 32, 3) and ids.shape == (4, 77)


def test_fresh_clone_resumes_from_the_committed_fp16_model(tmp_path, monkeypatch, capsys):
    """The fp32 resume file is not in the repository: a fresh clone starts from the committed fp16 model."""
    absent = tmp_path / "training" / train_base.RESUME_FILE.name
    absent.parent.mkdir()
    shutil.copyfile(train_base.RESUME_FILE.with_suffix(".json"), absent.with_suffix(".json"))
    monkeypatch.setattr(train_base, "RESUME_FILE", absent)
    args = train_base.parse_args(["--work", str(tmp_path / "work"), "--device", "cpu", "--batch", "4"])
    trainer = train_base.Trainer(args)
    assert trainer.load() and "starting from the committed fp16 model" in capsys.readouterr().out
    committed = train_base.committed_model_weights()
    for prefix, module in (("unet", trainer.unet), ("unet", trainer.ema_unet), ("vae", trainer.vae)):
        for name, value in module.state_dict().items():
            assert torch.equal(value, committed[f"{prefix}.{name}"].float()), name
    assert trainer.state["warmup_origin"] == trainer.state["step"] > 0


def test_a_killed_run_still_counts_in_the_hardware_log(tmp_path):
    args = train_base.parse_args(["--work", str(tmp_path), "--device", "cpu", "--batch", "4", "--minutes", "0"])
    first = train_base.Trainer(args)
    assert first.load()
    first.hardware_log()
    killed = {"hardware": "2 CPU threads (x86_64)", "seconds": 60.0, "images": 640, "batch": 64}
    first.state["hardware_current"] = killed  # what a checkpoint holds while a run is in progress
    first.save()
    resumed = train_base.Trainer(args)
    resumed.run()  # zero minutes: nothing trained, the killed run's segment is accounted for
    assert resumed.state["hardware"][-1] == killed and "hardware_current" not in resumed.state


def test_the_committed_world_v2_model_resumes_without_redoing_its_vae(tmp_path):
    args = train_base.parse_args(["--work", str(tmp_path), "--device", "cpu", "--batch", "4", "--world", "v2"])
    trainer = train_base.Trainer(args)
    assert trainer.load()
    assert trainer.state["world"] == "v2" and trainer.state["phase"] == "diffusion"
    assert trainer.state["vae_v2_step"] >= args.vae_v2_steps
