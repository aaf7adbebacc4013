"""The step picker: every checkpoint gets a preview at the run's seed beside it and its loss in its metadata;
`list_steps` lists them; `promote_step` makes one the concept atomically, keeping the replaced file."""
from __future__ import annotations

import json

import pytest
import torch

import perfusion_ext as pf
from perfusion_ext.cli import main as cli_main
from perfusion_ext.core.concept import tensor_hash
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.library import TRASH_DIR, list_trash, set_gate_defaults
from perfusion_ext.core.runs import LOSS_KEY, PROMOTED_KEY, list_steps, promote_step, read_metadata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step toy run, checkpoints every 2 steps, previews on: checkpoints at steps 2 and 3."""
    import os

    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.toy.concepts import write_training_set
    from perfusion_ext.toy.plugin import tiny_random_pipeline
    from perfusion_ext.training import TrainConfig, train

    os.environ["PERFUSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    backend = DiffusersBackend(tiny_random_pipeline())
    seen = []
    original = backend.preview

    def preview(template, concept, seed=0):
        seen.append(seed)
        return original(template, concept, seed=seed)

    backend.preview = preview
    images = write_training_set("teddy", tmp_path_factory.mktemp("images"), n=4)
    out = tmp_path_factory.mktemp("concepts")
    cfg = TrainConfig(name="teddy", superclass="circle", steps=3, batch_size=2, micro_batch=2, checkpoint_every=2,
                      preview_every=10, seed=7)
    result = train(backend, cfg, images, out)
    assert result.status == "finished"
    return out, seen


@pytest.fixture()
def run(trained, tmp_path):
    import shutil

    shutil.copytree(trained[0], tmp_path / "c")
    return tmp_path / "c"


def test_every_checkpoint_has_a_preview_at_the_fixed_seed_and_a_loss(trained):
    out, seeds = trained
    checkpoints = sorted(p.name for p in (out / "teddy.run" / "checkpoints").iterdir())
    assert checkpoints == ["teddy-step000002.png", "teddy-step000002.safetensors", "teddy-step000003.png",
                           "teddy-step000003.safetensors"]
    assert seeds == [7, 7]  # one preview per checkpoint (preview_every is larger), each at the run's seed
    losses = json.loads((out / "teddy.run" / "log.json").read_text())["losses"]
    meta = {s: read_metadata(out / "teddy.run" / "checkpoints" / f"teddy-step00000{s}.safetensors") for s in (2, 3)}
    assert float(meta[2][LOSS_KEY]) == pytest.approx(sum(losses[0:2]) / 2, rel=1e-5)
    assert float(meta[3][LOSS_KEY]) == pytest.approx(losses[2], rel=1e-5)


def test_list_steps(trained):
    out, _ = trained
    steps = list_steps(out, "teddy")
    assert [s.step for s in steps] == [2, 3]
    assert [s.current for s in steps] == [False, True]  # the concept file is the last step
    assert all(s.preview is not None and s.preview.is_file() for s in steps)
    assert steps[0].loss == pytest.approx(float(read_metadata(steps[0].checkpoint)[LOSS_KEY]))
    assert list_steps(out, "nothing") == []


def test_promote_replaces_atomically_and_keeps_the_old_file(run):
    set_gate_defaults(run, "teddy", beta=0.61, tau=0.2)  # the user's (or auto-β's) choice survives a promote
    old_bytes = (run / "teddy.safetensors").read_bytes()
    old_png = (run / "teddy.png").read_bytes()
    result = promote_step(run, "teddy", 2)
    step2 = run / "teddy.run" / "checkpoints" / "teddy-step000002.safetensors"
    assert tensor_hash(run / "teddy.safetensors") == tensor_hash(step2)
    concept = pf.load_concept(run / "teddy.safetensors")
    assert concept.name == "teddy" and concept.metadata[PROMOTED_KEY] == "2" and concept.metadata["perfusion.steps"] == "2"
    assert (concept.beta, concept.tau) == (0.61, 0.2)
    assert (run / "teddy.png").read_bytes() == (run / "teddy.run" / "checkpoints" / "teddy-step000002.png").read_bytes()
    assert (result["trash"] / "teddy.safetensors").read_bytes() == old_bytes  # recoverable
    assert (result["trash"] / "teddy.png").read_bytes() == old_png
    assert list_trash(run)[0]["reason"] == "replaced by step 2"
    assert [s.current for s in list_steps(run, "teddy")] == [True, False]
    with pytest.raises(PerfusionError, match="no checkpoint at step 5"):
        promote_step(run, "teddy", 5)


def test_promote_failing_midway_puts_the_old_concept_back(run, monkeypatch):
    from perfusion_ext.core import runs

    before = (run / "teddy.safetensors").read_bytes(), (run / "teddy.png").read_bytes()
    original, calls = runs.atomic_write_bytes, []

    def broken(data, target):  # the first write (the new preview) fails; the rollback's writes work
        calls.append(target)
        if len(calls) == 1:
            raise OSError("disk full (simulated)")
        original(data, target)

    monkeypatch.setattr(runs, "atomic_write_bytes", broken)  # fails after the concept was replaced
    with pytest.raises(PerfusionError, match="disk full"):
        promote_step(run, "teddy", 2)
    monkeypatch.undo()
    assert ((run / "teddy.safetensors").read_bytes(), (run / "teddy.png").read_bytes()) == before
    assert not list(((run / TRASH_DIR)).glob("*/teddy.safetensors"))


def test_cli_steps_and_promote(run, capsys):
    assert cli_main(["steps", "--concepts", str(run), "teddy", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in listed] == [2, 3] and listed[1]["current"]
    assert cli_main(["steps", "--concepts", str(run), "teddy"]) == 0
    assert "preview" in capsys.readouterr().out
    assert cli_main(["steps", "--concepts", str(run), "teddy", "--promote", "2"]) == 0
    assert "step 2 is now" in capsys.readouterr().out
    assert cli_main(["steps", "--concepts", str(run), "teddy", "--promote", "9"]) == 2


def test_cli_library(run, capsys):
    assert cli_main(["library", "--concepts", str(run), "defaults", "teddy", "--beta", "0.61"]) == 0
    assert pf.load_concept(run / "teddy.safetensors").beta == 0.61
    assert cli_main(["library", "--concepts", str(run), "rename", "teddy", "bear"]) == 0
    assert (run / "bear.run" / "checkpoints" / "bear-step000002.png").is_file()
    assert [s.step for s in list_steps(run, "bear")] == [2, 3]  # the step picker follows the rename
    assert cli_main(["library", "--concepts", str(run), "delete", "bear"]) == 0
    capsys.readouterr()
    assert cli_main(["library", "--concepts", str(run), "trash"]) == 0
    entries = capsys.readouterr().out.split()
    deleted = next(e for e in list_trash(run) if e["reason"] == "deleted")["entry"]
    assert deleted in entries
    assert cli_main(["library", "--concepts", str(run), "restore", deleted]) == 0
    assert torch.equal(pf.load_concept(run / "bear.safetensors").target_input,
                       pf.load_concept(run / "bear.run" / "checkpoints" / "bear-step000003.safetensors").target_input)
