"""The toy base-model trainer checkpoints and resumes exactly (weights, optimizer, sampler stream)."""
import torch

from perfusion_ext.toy import train_base


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
