"""Bad REST calls (`/perfusion/v1/...`, the routes of perfusion_ext.webui.api run against stand-ins of FastAPI and
the WebUI): every one gets a 4xx with a message that says what is wrong, never a 500, and no file is touched."""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import pytest
from conftest import make_concept, tiny_ldm_unet
from PIL import Image
from robust_helpers import ApiHarness, HTTPBasicCredentials, png_header, snapshot

from perfusion_ext.core.concept import save_concept
from perfusion_ext.webui.jobs import JobManager


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture()
def folders(tmp_path, unet):
    concepts, images = tmp_path / "models" / "perfusion", tmp_path / "data" / "perfusion-images"
    save_concept(make_concept(unet, "teddy", seed=1), concepts / "teddy.safetensors")
    (concepts / "teddy.png").write_bytes(b"card preview")
    for folder, side in (("small", 64), ("big", 512)):
        (images / folder).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (side, side), (40 * i, 90, 200)).save(images / folder / f"{i}.png")
    (tmp_path / "secret").mkdir()
    Image.new("RGB", (512, 512)).save(tmp_path / "secret" / "outside.png")
    return concepts, images


class Runner:
    """A training job stand-in: records what it was given and holds the lock until released."""

    def __init__(self):
        self.release, self.started = threading.Event(), []

    def __call__(self, job):
        self.started.append(job.request.name)
        self.release.wait(10)
        job.state, job.message = "finished", "trained (stand-in)"


@pytest.fixture()
def api(monkeypatch, folders):
    runner = Runner()
    harness = ApiHarness(monkeypatch, *folders, jobs=JobManager(runner, threading.Lock()))
    harness.runner = runner
    yield harness
    runner.release.set()
    harness.close()


def body(**fields) -> bytes:
    return json.dumps({"name": "teddy2", "superclass": "bear", **fields}).encode()


def b64_png(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (9, 9, 9)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _wait(predicate, timeout=5.0):
    end = time.time() + timeout
    while not predicate() and time.time() < end:
        time.sleep(0.01)
    return predicate()


# ---- POST /train: bodies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,status,needle", [
    pytest.param(b"{not json", 400, r"the body is not valid JSON", id="api-not-json"),
    pytest.param(b"[1, 2]", 422, r"the body must be a JSON object", id="api-json-array"),
    pytest.param(b"", 422, r"the body must be a JSON object", id="api-empty-body"),
    pytest.param(json.dumps({"superclass": "bear", "images": ["big"]}).encode(), 422, r"name is required",
                 id="api-missing-name"),
    pytest.param(body(), 422, r"images is required", id="api-missing-images"),
    pytest.param(body(name=5, images=["big"]), 422, r"name is required", id="api-name-wrong-type"),
    pytest.param(body(images="big"), 422, r"images must be a list", id="api-images-not-a-list"),
    pytest.param(body(images=["big"], steps="10"), 422, r"steps must be an integer, got '10'", id="api-steps-string"),
    pytest.param(body(images=["big"], steps=1.5), 422, r"steps must be an integer", id="api-steps-float"),
    pytest.param(body(images=["big"], resume="yes"), 422, r"resume must be true or false", id="api-flag-string"),
    pytest.param(body(images=["big"], seed=2 ** 80), 422, r"seed must be between", id="api-number-out-of-range"),
    pytest.param(body(images=["big"], bogus=1), 422, r"unknown field\(s\): bogus", id="api-unknown-field"),
    pytest.param(body(images=["big"], masks_dir=7), 422, r"masks_dir must be a server path", id="api-masks-wrong-type"),
])
def test_malformed_train_bodies_get_4xx(api, folders, raw, status, needle):
    before = snapshot(folders[0].parent.parent)
    code, answer = api.call("POST", "/train", raw)
    assert code == status
    assert re.search(needle, answer["detail"]), answer
    assert api.runner.started == [] and snapshot(folders[0].parent.parent) == before


@pytest.mark.parametrize("images,status,needle", [
    pytest.param(["/etc"], 403, r"outside the folders the API may read", id="api-absolute-path-outside"),
    pytest.param(["../../secret/outside.png"], 403, r"outside the folders the API may read", id="api-dotdot-outside"),
    pytest.param(["big\x00.png"], 422, r"contains a NUL character", id="api-path-with-nul"),
    pytest.param(["a" * 300 + ".png"], 422, r"not a usable path: .*File name too long", id="api-path-too-long"),
    pytest.param(["~nosuchuser/x.png"], 422, r"not a usable path", id="api-path-unknown-home"),
    pytest.param(["nope"], 422, r"does not exist on the server", id="api-path-missing"),
    pytest.param(["data:image/png;base64,AAAA"], 422, r"not an image PIL can read", id="api-base64-not-an-image"),
])
def test_image_paths_are_checked(api, images, status, needle):
    code, answer = api.call("POST", "/train", body(images=images))
    assert code == status, answer
    assert re.search(needle, answer["detail"]), answer
    assert api.runner.started == []


def test_a_link_inside_the_images_folder_that_leads_out_is_refused(api, folders):
    _, images = folders
    (images / "link.png").symlink_to(images.parent.parent / "secret" / "outside.png")
    (images / "linkdir").symlink_to(images.parent.parent / "secret")
    for item in ("link.png", "linkdir", "linkdir/outside.png"):
        code, answer = api.call("POST", "/train", body(images=[item]))
        assert code == 403 and "outside the folders the API may read" in answer["detail"], (item, answer)


def test_masks_folder_outside_is_refused(api):
    code, answer = api.call("POST", "/train", body(images=["big"], masks_dir="/etc"))
    assert code == 403 and "masks_dir '/etc' is outside" in answer["detail"]


def test_oversized_base64_is_refused_before_decoding(api, monkeypatch):
    from perfusion_ext.webui import train_request

    monkeypatch.setattr(train_request, "MAX_IMAGE_BYTES", 1 << 20)  # 1 MiB: the same check as 32 MiB, cheaper
    big = base64.b64encode(b"\x89PNG" + bytes(3 << 19)).decode()
    code, answer = api.call("POST", "/train", body(images=["big/0.png", big]))
    assert (code, answer["detail"]) == (413, "images[1] is larger than 1 MiB")


def test_base64_decompression_bomb_is_refused(api):
    bomb = base64.b64encode(png_header(20000, 20000)).decode()
    code, answer = api.call("POST", "/train", body(images=[bomb]))
    assert code == 422 and "decompression bomb" in answer["detail"], answer


# ---- images that cannot be used at the requested resolution: 422 at request time -------------------------------
def test_four_64px_images_at_the_default_resolution_get_422_naming_each(api):
    code, answer = api.call("POST", "/train", body(images=[f"small/{i}.png" for i in range(4)]))
    assert code == 422, answer
    detail = answer["detail"]
    assert "4 image(s) cannot be used at resolution 512" in detail
    for i in range(4):
        assert f"{i}.png: 64×64 px is below 256 px" in detail
    assert api.runner.started == []
    code, answer = api.call("POST", "/train", body(images=["small"]))  # the folder: none usable, each named
    assert code == 422 and all(f"{i}.png: 64×64 px" in answer["detail"] for i in range(4))
    code, answer = api.call("POST", "/train", body(images=[b64_png(64)]))  # an upload
    assert code == 422 and "images upload 0: 64×64 px is below 256 px" in answer["detail"]
    code, answer = api.call("GET", "/jobs")
    assert answer == []  # no job was created


def test_the_same_images_at_a_resolution_they_fit_are_accepted(api):
    code, answer = api.call("POST", "/train", body(images=[f"small/{i}.png" for i in range(4)], resolution=64))
    assert code == 200 and answer["name"] == "teddy2", answer


def test_a_folder_with_some_usable_images_is_accepted_like_the_cli(api, folders):
    _, images = folders
    Image.new("RGB", (8, 8)).save(images / "big" / "tiny.png")
    code, answer = api.call("POST", "/train", body(images=["big"]))
    assert code == 200, answer
    code, answer = api.call("POST", "/train", body(name="other", images=["big/0.png", "big/tiny.png"]))
    assert code == 422 and "1 image(s)" in answer["detail"] and "tiny.png: 8×8 px" in answer["detail"]


def test_gif_images_pass_the_request_time_check(api, folders):
    """GIF is a training image type (an animated one trains on its first frame): a folder of GIFs and a listed GIF
    are accepted, a GIF too small for the resolution is named. Before, both got 422 (no image files / not an image)."""
    gifs = folders[1] / "gifs"
    gifs.mkdir()
    frames = [Image.new("RGB", (300, 300), (60 * i, 90, 200)) for i in range(3)]
    frames[0].save(gifs / "anim.gif", save_all=True, append_images=frames[1:])
    frames[1].save(gifs / "still.gif")
    Image.new("RGB", (64, 64)).save(folders[1] / "small" / "tiny.gif")
    code, answer = api.call("POST", "/train", body(images=["gifs"]))
    assert code == 200, answer
    code, answer = api.call("POST", "/train", body(name="listed", images=["gifs/anim.gif", "gifs/still.gif"]))
    assert code == 200, answer
    code, answer = api.call("POST", "/train", body(name="small", images=["small/tiny.gif"]))
    assert code == 422 and "tiny.gif: 64×64 px is below 256 px" in answer["detail"], answer


def test_a_folder_without_images_gets_422(api, folders):
    (folders[1] / "docs").mkdir()
    (folders[1] / "docs" / "notes.txt").write_text("x")
    code, answer = api.call("POST", "/train", body(images=["docs"]))
    assert code == 422 and "holds no image files" in answer["detail"]


# ---- jobs ---------------------------------------------------------------------------------------------------
def test_unknown_job_ids_get_404(api):
    for job_id in ("nope", "../../etc", "1-" + "f" * 8):
        assert api.call("GET", "/jobs/{job_id}", job_id=job_id) == (404, {"error": f"no training job {job_id!r}",
                                                                          "detail": f"no training job {job_id!r}"})
        code, answer = api.call("POST", "/jobs/{job_id}/interrupt", job_id=job_id)
        assert code == 404


def test_two_trainings_at_once(api):
    code, first = api.call("POST", "/train", body(images=["big"]))
    assert code == 200
    assert _wait(lambda: api.runner.started == ["teddy2"])
    code, answer = api.call("POST", "/train", body(images=["big"]))  # the same name while it runs: 409
    assert code == 409 and "already running" in answer["detail"]
    code, second = api.call("POST", "/train", body(name="other", images=["big"]))  # another name: queued
    assert code == 200 and second["state"] == "queued"
    time.sleep(0.1)
    assert api.runner.started == ["teddy2"]  # one at a time: the lock
    api.runner.release.set()
    assert _wait(lambda: api.runner.started == ["teddy2", "other"])


def test_the_skipped_images_of_an_accepted_folder_are_in_the_jobs_status(monkeypatch, folders, webui_training,
                                                                          tmp_path):
    """A folder with some usable images is accepted; what the trainer skipped or converted was only in
    NAME.run/log.json and the console. GET /jobs/{id} now has it as `dataset_notes` once the folder is read
    (the real job runner and trainer on the toy model)."""
    import functools

    from robust_helpers import toy_pipeline

    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.toy.concepts import write_training_set
    from perfusion_ext.webui.concepts import ConceptStore

    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path / "cache"))
    training_shared, training = webui_training
    pipe = toy_pipeline()
    training_shared.sd_model = pipe.unet
    monkeypatch.setattr(training, "training_backend", lambda sd_model, resolution: DiffusersBackend(pipe))
    concepts, images = folders
    folder = write_training_set("house", images / "house", n=2)
    (folder / "notes.doc").write_text("x")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    runner = functools.partial(training.run_job, store=ConceptStore(lambda: concepts), release_hooks=lambda: None)
    api = ApiHarness(monkeypatch, concepts, images, jobs=JobManager(runner, threading.Lock()))
    try:
        code, job = api.call("POST", "/train", body(name="house", superclass="square", images=["house"], steps=1,
                                                    batch_size=2, micro_batch=2, resolution=64))
        assert code == 200, job
        status = lambda: api.call("GET", "/jobs/{job_id}", job_id=job["job_id"])[1]  # noqa: E731
        assert _wait(lambda: status()["state"] not in ("queued", "running"), timeout=120)
        answer = status()
    finally:
        api.close()
    assert answer["state"] == "finished", answer["message"]
    notes = answer["dataset_notes"]
    assert any(n.startswith("notes.doc: skipped (not an image type") for n in notes), notes
    assert "tiny.png: skipped (8×8 px is below 32 px; use images of at least 64 px)" in notes
    assert len(notes) == 2 and json.loads((concepts / "house.run" / "log.json").read_text())["dataset_notes"] == notes


def test_interrupting_a_finished_job_says_so(api):
    api.runner.release.set()
    code, job = api.call("POST", "/train", body(images=["big"]))
    assert _wait(lambda: api.call("GET", "/jobs/{job_id}", job_id=job["job_id"])[1]["state"] == "finished")
    code, answer = api.call("POST", "/jobs/{job_id}/interrupt", job_id=job["job_id"])
    assert code == 409 and "has already ended (finished); there is nothing to interrupt" in answer["detail"]
    assert api.call("GET", "/jobs/{job_id}", job_id=job["job_id"])[1]["state"] == "finished"


def test_no_checkpoint_loaded_gets_409(api):
    api.shared.sd_model = None
    code, answer = api.call("POST", "/train", body(images=["big"]))
    assert code == 409 and "no Stable Diffusion checkpoint is loaded" in answer["detail"]


def test_an_export_does_not_stop_the_server_answering(api, monkeypatch):
    """An export holds the queue lock for minutes; run on the event loop it froze every route of the WebUI
    (found with 20 clients against a real A1111: training requests answered only after their job had ended)."""
    import asyncio

    from robust_helpers import Request

    release = threading.Event()
    monkeypatch.setattr(api.api, "export_from_body", lambda body, store: {"released": release.wait(5)})
    export, _ = api.app.routes[("POST", api.api.PREFIX + "/export")]
    list_jobs, _ = api.app.routes[("GET", api.api.PREFIX + "/jobs")]

    async def meanwhile():
        await asyncio.sleep(0.05)
        listed = await list_jobs()
        release.set()
        return listed

    async def both():
        return await asyncio.gather(export(request=Request(b'{"concepts": ["teddy"]}')), meanwhile())

    exported, listed = asyncio.run(both())
    assert exported == {"released": True} and listed == []


def test_forge_gets_409_with_the_command_at_request_time(api):
    """Forge cannot train in its process: the request is refused at once (no job that fails a moment later)."""
    import types

    api.shared.sd_model = types.SimpleNamespace(forge_objects=object(),
                                                sd_checkpoint_info=types.SimpleNamespace(filename="/m/sd15.safetensors"))
    code, answer = api.call("POST", "/train", body(images=["big"]))
    assert code == 409 and "Forge cannot train" in answer["detail"], answer
    assert 'perfusion train --model "/m/sd15.safetensors"' in answer["detail"]
    assert api.call("GET", "/jobs")[1] == []


# ---- concept routes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,route,params,raw,status,needle", [
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "nope", "action": "rename"}, b'{"new": "x"}', 404,
                 "unknown concept 'nope'", id="api-concept-unknown"),
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "..", "action": "delete"}, b"{}", 422,
                 "name must be", id="api-concept-name-dotdot"),
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "teddy", "action": "rename"}, b'{"new": "../x"}', 422,
                 "new name must be", id="api-concept-new-name-path"),
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "teddy", "action": "defaults"}, b'{"beta": "x"}', 422,
                 "beta must be a number", id="api-defaults-wrong-type"),
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "teddy", "action": "defaults"}, b"[]", 422,
                 "the body must be", id="api-defaults-not-an-object"),
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "teddy", "action": "promote"}, b'{"step": "1"}', 422,
                 "step must be an integer", id="api-promote-wrong-type"),
    pytest.param("POST", "/concepts/{name}/{action}", {"name": "teddy", "action": "fly"}, b"{}", 404,
                 "unknown action 'fly'", id="api-concept-unknown-action"),
    pytest.param("POST", "/trash/{entry}/restore", {"entry": "../../etc"}, None, 422, "entry must be the name",
                 id="api-restore-path"),
    pytest.param("POST", "/trash/{entry}/restore", {"entry": "nope"}, None, 404, "no trash entry 'nope'",
                 id="api-restore-unknown"),
])
def test_bad_concept_calls_get_4xx_and_change_nothing(api, folders, method, route, params, raw, status, needle):
    before = snapshot(folders[0])
    code, answer = api.call(method, route, raw, **params)
    assert code == status and needle in answer["detail"], answer
    assert snapshot(folders[0]) == before


def test_a_broken_concept_file_is_a_card_and_a_422_not_a_500(api, folders):
    concepts, _ = folders
    (concepts / "broken.safetensors").write_bytes(b"abc")  # 3 bytes: shorter than a safetensors header
    (concepts / "huge.safetensors").write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")
    before = snapshot(concepts)
    code, listing = api.call("GET", "/concepts")
    assert code == 200
    broken = {c["name"]: c for c in listing}
    assert broken["teddy"]["reason"] is None
    assert "only 3 bytes: truncated" in broken["broken"]["reason"]
    assert "its header claims 4611686018427387904 bytes" in broken["huge"]["reason"]
    for name in ("broken", "huge"):
        code, answer = api.call("POST", "/concepts/{name}/{action}", b'{"beta": 0.5}', name=name, action="defaults")
        assert code == 422 and "is not a readable safetensors file" in answer["detail"], answer
        code, answer = api.call("GET", "/concepts/{name}/{action}", name=name, action="continue")
        assert code == 422 and "is not a readable safetensors file" in answer["detail"], answer
    assert snapshot(concepts) == before


# ---- --api-auth ------------------------------------------------------------------------------------------
def test_api_auth_is_enforced_on_every_route(monkeypatch, folders):
    harness = ApiHarness(monkeypatch, *folders, jobs=JobManager(Runner(), threading.Lock()), api_auth="ann:s3:cret")
    try:
        assert all(deps for _, deps in harness.app.routes.values())  # every route has the check
        for creds in (None, HTTPBasicCredentials("ann", "wrong"), HTTPBasicCredentials("bob", "s3:cret")):
            code, answer = harness.call("GET", "/concepts", credentials=creds)
            assert code == 401 and answer["detail"] == "Incorrect username or password"
            code, _ = harness.call("POST", "/train", body(images=["big"]), credentials=creds)
            assert code == 401
        code, listing = harness.call("GET", "/concepts", credentials=HTTPBasicCredentials("ann", "s3:cret"))
        assert code == 200 and [c["name"] for c in listing] == ["teddy"]
    finally:
        harness.close()
