"""The library as the WebUI's card, tab and REST API use it (no WebUI here): statuses, the running-job guard,
the step picker and promote, "continue training" (a request, and a trainer that starts from the concept)."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import make_concept, tiny_ldm_unet

import perfusion_ext as pf
from perfusion_ext.core.concept import tensor_hash
from perfusion_ext.webui.concepts import ConceptStore
from perfusion_ext.webui.jobs import JobManager
from perfusion_ext.webui.library_actions import LibraryActions, handle
from perfusion_ext.webui.train_request import ApiError, parse_train_request


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture()
def folder(tmp_path, unet):
    pf.save_concept(make_concept(unet, "teddy", seed=1), tmp_path / "teddy.safetensors")
    (tmp_path / "teddy.png").write_bytes(b"png")
    checkpoints = tmp_path / "teddy.run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step, seed in ((50, 5), (100, 6)):
        concept = make_concept(unet, "teddy", seed=seed)
        concept.metadata["perfusion.loss"] = f"{0.1 / step:.6g}"
        pf.save_concept(concept, checkpoints / f"teddy-step{step:06d}.safetensors")
        (checkpoints / f"teddy-step{step:06d}.png").write_bytes(f"png{step}".encode())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(b"x")
    (tmp_path / "teddy.run" / "log.json").write_text(json.dumps({"images": [str(images / "0.png"),
                                                                            str(images / "1.png")]}))
    return tmp_path


def actions(folder, jobs=None):
    return LibraryActions(ConceptStore(lambda: folder), jobs)


def test_defaults_rename_duplicate_delete_restore_through_the_rest_dispatcher(folder):
    lib = actions(folder)
    short = tensor_hash(folder / "teddy.safetensors")[:12]
    assert handle(lib, "defaults", "teddy", {"beta": 0.55}) == {"name": "teddy", "beta": 0.55, "tau": 0.15}
    for body in ({}, {"beta": "x"}, {"gamma": 1}, {"tau": 0}):
        with pytest.raises(ApiError) as err:
            handle(lib, "defaults", "teddy", body)
        assert err.value.status == 422
    assert handle(lib, "rename", "teddy", {"new": "bear"})["alias"] == "teddy"
    store = lib.store
    assert store.load("teddy").name == "bear"  # the old name resolves through the alias
    assert store.resolve_pasted("teddy", short) == "teddy" and store.find_by_hash(short).name == "bear"
    assert handle(lib, "duplicate", "bear", {"new": "cub"})["name"] == "cub"
    deleted = handle(lib, "delete", "cub", {})
    assert deleted["trash"] in [e["entry"] for e in lib.trash()]
    assert lib.restore(deleted["trash"])["filename"].endswith("cub.safetensors")
    for action, name, body, status in (("rename", "nope", {"new": "x"}, 404), ("rename", "bear", {"new": "../x"}, 422),
                                       ("rename", "bear", {"new": "cub"}, 422), ("fly", "bear", {}, 404)):
        with pytest.raises(ApiError) as err:
            handle(lib, action, name, body)
        assert err.value.status == status, (action, body)
    with pytest.raises(ApiError) as err:
        lib.restore("../../etc")
    assert err.value.status == 422


def test_no_operation_while_a_job_trains_that_concept(folder):
    gate = threading.Event()
    jobs = JobManager(lambda job: gate.wait(5), threading.Lock())
    job = jobs.submit(parse_train_request({"name": "teddy", "superclass": "bear", "images": ["/"], "steps": 5}, None))
    try:
        lib = actions(folder, jobs)
        for call in (lambda: lib.delete("teddy"), lambda: lib.rename("teddy", "x"), lambda: lib.promote("teddy", 50),
                     lambda: lib.set_defaults("teddy", beta=0.5)):
            with pytest.raises(ApiError) as err:
                call()
            assert err.value.status == 409 and job.id in err.value.message
        assert (folder / "teddy.safetensors").is_file()
    finally:
        gate.set()


def test_steps_and_promote(folder):
    lib = actions(folder)
    steps = handle(lib, "steps", "teddy", {})
    assert [s["step"] for s in steps] == [50, 100] and [s["loss"] for s in steps] == [0.002, 0.001]
    assert not any(s["current"] for s in steps)
    result = handle(lib, "promote", "teddy", {"step": 100})
    assert result["step"] == 100 and result["trash"]
    assert [s["current"] for s in lib.steps("teddy")] == [False, True]
    assert (folder / "teddy.png").read_bytes() == b"png100"
    for body in ({"step": "100"}, {"step": True}, {}):
        with pytest.raises(ApiError) as err:
            handle(lib, "promote", "teddy", body)
        assert err.value.status == 422
    with pytest.raises(ApiError) as err:
        handle(lib, "promote", "teddy", {"step": 7})
    assert err.value.status == 404


def test_continue_plan_is_a_valid_training_request(folder):
    plan = actions(folder).continue_plan("teddy")
    assert plan == {"name": "teddy-2", "superclass": "bear", "init_from": "teddy", "images": [str(folder / "images")]}
    req = parse_train_request(plan, None)
    assert req.init_from == "teddy" and req.image_paths == [folder / "images"]
    assert req.to_config(init_path=folder / "teddy.safetensors").init_from == str(folder / "teddy.safetensors")
    (folder / "images" / "1.png").unlink()  # the run's images are gone: the plan asks for new ones
    assert "images" not in actions(folder).continue_plan("teddy")
    with pytest.raises(ApiError, match="either resume"):
        parse_train_request({**plan, "resume": True}, None)
    with pytest.raises(ApiError, match="init_from"):
        parse_train_request({**plan, "init_from": "../x"}, None)


def test_trainer_starts_from_the_concept(tmp_path):
    import os

    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.toy.concepts import write_training_set
    from perfusion_ext.toy.plugin import tiny_random_pipeline
    from perfusion_ext.training import TrainConfig
    from perfusion_ext.training.dataset import load_images
    from perfusion_ext.training.trainer import ConceptTrainer

    os.environ["PERFUSION_CACHE"] = str(tmp_path / "cache")
    backend = DiffusersBackend(tiny_random_pipeline())
    images = load_images(write_training_set("teddy", tmp_path / "images", n=2), 32)
    cfg = TrainConfig(name="teddy", superclass="circle", steps=1, batch_size=2, preview_every=0)
    source = ConceptTrainer(backend, cfg.resolved("toy", backend.device), images)
    source.train_step()
    concept = source.concept()
    pf.save_concept(concept, tmp_path / "teddy.safetensors")
    stored = pf.load_concept(tmp_path / "teddy.safetensors")
    cont = ConceptTrainer(backend, TrainConfig(**{**cfg.__dict__, "name": "teddy-2",
                                                  "init_from": str(tmp_path / "teddy.safetensors")})
                          .resolved("toy", backend.device), images)
    again = cont.concept()
    assert torch.equal(again.embeddings["clip_l"], stored.embeddings["clip_l"])
    assert torch.equal(again.target_input, stored.target_input)
    assert all(torch.equal(again.value_targets[k], stored.value_targets[k]) for k in stored.value_targets)
    assert cont.step == 0 and not cont.optimizer.state  # a fresh optimizer
    with pytest.raises(pf.PerfusionError, match="trained as a 'circle'"):
        ConceptTrainer(backend, TrainConfig(**{**cfg.__dict__, "superclass": "square",
                                               "init_from": str(tmp_path / "teddy.safetensors")})
                       .resolved("toy", backend.device), images)

