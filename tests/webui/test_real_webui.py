"""Verification against a REAL AUTOMATIC1111 WebUI (see tests/webui/README.md); skipped in CI.

    PERFUSION_WEBUI_URL=http://127.0.0.1:7861      a running WebUI (--api) with this extension linked
    PERFUSION_WEBUI_LOG=/path/to/its/console.log    optional: check console warnings
    PERFUSION_WEBUI_AUTH_URL=http://127.0.0.1:7862  optional: a second one started with --api-auth user:pass
    PERFUSION_WEBUI_AUTH=user:pass
Run by tests/webui/run_real_webui.sh, which starts and stops the servers. Images are compared by
pixels (the PNG embeds the prompt). Uses the random-init SD1.5 of the setup: 64x64, 2 Euler steps.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

URL = os.environ.get("PERFUSION_WEBUI_URL")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="no WebUI: set PERFUSION_WEBUI_URL (tests/webui/run_real_webui.sh)"),
]
NAME = "vteddy"
BASE = {"negative_prompt": "", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", "cfg_scale": 7,
        "seed": 1, "batch_size": 1}


def call(path, body=None, url=None, auth=None, timeout=900):
    req = urllib.request.Request((url or URL) + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def txt2img(prompt, **kw):
    status, body = call("/sdapi/v1/txt2img", {**BASE, "prompt": prompt, **kw})
    assert status == 200, body
    return body


def pixels(b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def wait_job(job_id, states=("finished", "interrupted", "nan", "failed"), timeout=900):
    end = time.time() + timeout
    while time.time() < end:
        status, job = call(f"/perfusion/v1/jobs/{job_id}?preview=false")
        assert status == 200, job
        if job["state"] in states:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {states}")


def images_dir() -> Path:
    root = Path(os.environ.get("A1111_ROOT", "/tmp/a1111")) / "webui" / "perfusion-images" / NAME
    root.mkdir(parents=True, exist_ok=True)
    from PIL import Image, ImageDraw

    for i in range(4):
        im = Image.new("RGB", (64, 64), (30 + 40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(im).ellipse((10 + 3 * i, 12, 50, 54), fill=(150, 90, 40))
        im.save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained():
    """POST /perfusion/v1/train for 3 steps at 64 px (with one preview), then the concept is listed."""
    images_dir()
    status, body = call("/perfusion/v1/train", {"name": NAME, "superclass": "bear", "images": [NAME], "steps": 3,
                                                "batch_size": 2, "micro_batch": 1, "resolution": 64,
                                                "checkpoint_every": 3, "preview_every": 3, "overwrite": True})
    assert status == 200, body
    job = wait_job(body["job_id"])
    assert job["state"] == "finished", job
    status, job_full = call(f"/perfusion/v1/jobs/{body['job_id']}")
    assert job_full["preview"], "a preview image was rendered by the WebUI during training"
    status, concepts = call("/perfusion/v1/concepts")
    entry = next(c for c in concepts if c["name"] == NAME)
    assert entry["compatible"] and entry["base_family"] == "sd1"
    return entry


def test_plain_baseline_then_tag_changes_image_then_plain_is_identical(trained):
    plain = "a photo of a bear on the beach"
    p0 = pixels(txt2img(plain)["images"][0])
    tagged = txt2img(f"a photo of a <perfusion:{NAME}> on the beach")
    t1 = pixels(tagged["images"][0])
    t0 = pixels(txt2img(f"a photo of a <perfusion:{NAME}:0> on the beach")["images"][0])
    assert not np.array_equal(t1, p0), "the tag changes the image"
    assert not np.array_equal(t1, t0), "the K/V edits (strength 1 vs 0) change the image"
    p1 = pixels(txt2img(plain)["images"][0])
    assert np.array_equal(p0, p1), "the next plain generation is pixel-identical to the one before"
    info = json.loads(tagged["info"])["infotexts"][0]
    assert f'Perfusion hashes: "{NAME}: {trained["hash"][:12]}"' in info, info  # quoted by the WebUI, like Lora hashes
    assert f"<perfusion:{NAME}>" in info  # the prompt in the infotext keeps the tag


def img2img(prompt, init_b64, **kw):
    body = {**BASE, "steps": 4, "prompt": prompt, "init_images": [init_b64], "denoising_strength": 0.75, **kw}
    status, answer = call("/sdapi/v1/img2img", body)
    assert status == 200, answer
    return answer


def test_img2img_tag_changes_image_then_plain_is_identical(trained):
    init = txt2img("a bear in a forest", seed=3)["images"][0]
    plain = "a photo of a bear on the beach"
    # The WebUI encodes the init image by sampling the VAE posterior from torch's global RNG, which the previous
    # generation left seeded with ITS seed: an img2img right after a generation with another seed differs a
    # little (checked without any tag: max 4/255). One warm-up call puts every call below on the same footing.
    img2img(plain, init)
    p0 = pixels(img2img(plain, init)["images"][0])
    tagged = img2img(f"a photo of a <perfusion:{NAME}> on the beach", init)
    t1 = pixels(tagged["images"][0])
    t0 = pixels(img2img(f"a photo of a <perfusion:{NAME}:0> on the beach", init)["images"][0])
    p1 = pixels(img2img(plain, init)["images"][0])
    print(f"img2img mean |diff|: tag vs plain {np.abs(t1.astype(int) - p0).mean():.2f}, "
          f"strength 1 vs 0 {np.abs(t1.astype(int) - t0).mean():.2f}, plain vs plain {np.abs(p1.astype(int) - p0).mean():.2f}")
    assert p0.shape == (64, 64, 3)
    assert not np.array_equal(t1, p0), "the tag changes the img2img image"
    assert not np.array_equal(t1, t0), "the K/V edits act in img2img too"
    assert np.array_equal(p0, p1), "the next plain img2img is pixel-identical to the one before"
    info = json.loads(tagged["info"])["infotexts"][0]
    assert f'Perfusion hashes: "{NAME}: {trained["hash"][:12]}"' in info, info


def xyz_axis_index(label, is_img2img=False):
    """The X/Y/Z plot's axis types are passed by index; find `label` in the script's own choices."""
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and s["is_img2img"] == is_img2img)
    x_type = next(a for a in xyz["args"] if a["label"] == "X type")
    return x_type["choices"].index(label)


def test_xyz_plot_prompt_sr_over_strengths(trained):
    plain = "a photo of a bear on the beach"
    p0 = pixels(txt2img(plain)["images"][0])
    values = [f"<perfusion:{NAME}:{s}>" for s in ("0.0", "0.5", "1.0")]
    prompt = f"a photo of a {values[0]} on the beach"
    args = [xyz_axis_index("Prompt S/R"), ",".join(values), [], 0, "", [], 0, "", [],
            True, True, False, False, False, False, False, 0, False]
    #      draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds x/y/z, margin, csv_mode
    body = txt2img(prompt, script_name="x/y/z plot", script_args=args)
    assert len(body["images"]) == 4, "the grid and its three cells"
    grid, cells = pixels(body["images"][0]), [pixels(b) for b in body["images"][1:]]
    infos = json.loads(body["info"])["infotexts"]
    assert all(c.shape == (64, 64, 3) for c in cells) and grid.shape[0] > 64
    diffs = {f"{a}-{b}": float(np.abs(cells[a].astype(int) - cells[b]).mean()) for a, b in ((0, 1), (1, 2), (0, 2))}
    print("xyz cells mean |diff|:", diffs)
    assert all(d > 0 for d in diffs.values()), "the three strengths give three different images"
    assert all("Perfusion hashes" in i for i in infos[1:]), infos
    # each cell is the image the same prompt gives alone (the plot re-activates per cell, no leftovers)
    for value, cell in zip(values, cells):
        alone = pixels(txt2img(f"a photo of a {value} on the beach")["images"][0])
        assert np.array_equal(cell, alone), value
    # strength 0 still puts the concept's learned word in place of the tag (only the K/V edits are off), so it is
    # not the superclass prompt; the plain prompt after the plot is pixel-identical to the one before
    assert np.array_equal(pixels(txt2img(plain)["images"][0]), p0)


def test_bad_tags_still_generate_unchanged(trained):
    plain = pixels(txt2img("a cat")["images"][0])
    body = txt2img("<perfusion:doesnotexist> <perfusion:vteddy:beta=oops> <perfusion:../../etc/passwd> a cat")
    assert np.array_equal(pixels(body["images"][0]), plain), "bad tags are ignored, the image is the plain one"
    log = os.environ.get("PERFUSION_WEBUI_LOG")
    if log:
        text = Path(log).read_text(errors="replace")
        assert "unknown concept 'doesnotexist'" in text and "bad option" in text and "invalid concept name" in text


def test_hires_fix_and_batch_size_2(trained):
    hr = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6)
    with_tag = txt2img(f"a <perfusion:{NAME}> in a forest", **hr)
    without = txt2img("a bear in a forest", **hr)
    a, b = pixels(with_tag["images"][0]), pixels(without["images"][0])
    assert a.shape == (128, 128, 3) and not np.array_equal(a, b)
    assert "Perfusion hashes" in json.loads(with_tag["info"])["infotexts"][0]
    batch = txt2img(f"a <perfusion:{NAME}> in a forest", batch_size=2)
    assert len(batch["images"]) == 2
    infos = json.loads(batch["info"])["infotexts"]
    assert all("Perfusion hashes" in i for i in infos)


def test_negative_prompt_tag_is_applied(trained):
    neg_plain = pixels(txt2img("a cat", negative_prompt="a bear")["images"][0])
    neg_tag = pixels(txt2img("a cat", negative_prompt=f"a <perfusion:{NAME}>")["images"][0])
    assert not np.array_equal(neg_plain, neg_tag)


def test_png_info_finds_renamed_file_by_hash(trained):
    body = txt2img(f"a photo of <perfusion:{NAME}:0.7>")
    folder = Path(trained["filename"]).parent
    src, dst = folder / f"{NAME}.safetensors", folder / f"{NAME}renamed.safetensors"
    shutil.move(src, dst)
    try:
        status, info = call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
        assert status == 200
        params = info["parameters"]
        assert f"<perfusion:{NAME}renamed:0.7>" in params["Prompt"], params["Prompt"]
    finally:
        shutil.move(dst, src)


def test_gate_shut_on_its_own_token_is_noted(trained):
    """A copy of the concept with i* and u doubled halves every s, so its gate shuts on its own token: the gate
    line of the infotext shows it below one half, and the warning reaches the console (and the note under the
    image, which the WebUI keeps out of the API's info)."""
    import dataclasses

    from perfusion_ext.core.concept import load_concept, save_concept

    concept = load_concept(trained["filename"])
    shut = dataclasses.replace(concept, name=f"{NAME}shut", token=f"{NAME}shut",
                               target_input=2 * concept.target_input, target_input_cinv=2 * concept.target_input_cinv)
    path = Path(trained["filename"]).parent / f"{NAME}shut.safetensors"
    save_concept(shut, path)
    try:
        gates = {}
        for name in (NAME, f"{NAME}shut"):
            info = json.loads(txt2img(f"a photo of a <perfusion:{name}>")["info"])
            gates[name] = float(info["extra_generation_params"]["Perfusion gates"].split("own ")[1].split(",")[0])
        assert gates[NAME] >= 0.5 > gates[f"{NAME}shut"], gates
        log = os.environ.get("PERFUSION_WEBUI_LOG")
        if log:
            text = Path(log).read_text(errors="replace")
            assert f"<perfusion:{NAME}shut>'s gate on its own token is only {gates[NAME + 'shut']:.2f}" in text
            assert f"<perfusion:{NAME}>'s gate on its own token is only" not in text
    finally:
        path.unlink()


SECOND = "vmug"


def set_options(**options):
    status, body = call("/sdapi/v1/options", options)
    assert status == 200, body


def log_offset() -> int:
    """Where the WebUI's console log ends now (0 without PERFUSION_WEBUI_LOG): read what a test adds after it."""
    log = os.environ.get("PERFUSION_WEBUI_LOG")
    return Path(log).stat().st_size if log else 0


def log_since(offset: int) -> str | None:
    log = os.environ.get("PERFUSION_WEBUI_LOG")
    if not log:
        return None
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def trained_second(trained):
    """A second concept (another name and superclass, same images), for the two-concept checks."""
    status, body = call("/perfusion/v1/train", {"name": SECOND, "superclass": "cup", "images": [NAME], "steps": 3,
                                                "batch_size": 2, "micro_batch": 1, "resolution": 64, "seed": 5,
                                                "preview_every": 0, "overwrite": True})
    assert status == 200, body
    assert wait_job(body["job_id"])["state"] == "finished"
    status, concepts = call("/perfusion/v1/concepts")
    entry = next(c for c in concepts if c["name"] == SECOND)
    assert entry["compatible"] and entry["base_family"] == "sd1"
    return entry


def test_clause_encoding_setting_changes_only_two_concept_prompts(trained, trained_second):
    """perfusion_clause_encoding on: a prompt with two concepts gives another image and says so in the infotext; one
    concept is unchanged. Off again: the first image pixel for pixel (no conditioning cached from the other mode),
    the plain prompt too, and no Perfusion word (concept or stand-in) is left in the embedding database."""
    plain = "a photo of a bear and a cup on a table"
    two = f"a <perfusion:{NAME}> on the left, a <perfusion:{SECOND}> on the right"
    one = f"a photo of a <perfusion:{NAME}> on the beach"
    start = log_offset()
    set_options(perfusion_clause_encoding=False)
    try:
        p0 = pixels(txt2img(plain)["images"][0])
        off = txt2img(two)
        one_off = pixels(txt2img(one)["images"][0])
        set_options(perfusion_clause_encoding=True)  # GET /sdapi/v1/options never lists extension settings (its
        # response model is built before extensions add theirs): the infotext below shows the setting took effect
        on = txt2img(two)
        one_on = txt2img(one)
        set_options(perfusion_clause_encoding=False)
        off_again = txt2img(two)
        p1 = pixels(txt2img(plain)["images"][0])
    finally:
        set_options(perfusion_clause_encoding=False)
    x0, x1, x2 = (pixels(b["images"][0]) for b in (off, on, off_again))
    print(f"clause encoding mean |diff|: on vs off {np.abs(x1.astype(int) - x0).mean():.2f}, "
          f"off again vs off {np.abs(x2.astype(int) - x0).mean():.2f}")
    info_off, info_on, info_again, info_one = (json.loads(b["info"])["infotexts"][0]
                                               for b in (off, on, off_again, one_on))
    assert not np.array_equal(x1, x0), "clause-wise encoding changes a two-concept image"
    assert "Perfusion clause encoding: True" in info_on, info_on
    assert f"{NAME}: " in info_on and f"{SECOND}: " in info_on, info_on  # both concepts still in Perfusion hashes
    assert np.array_equal(x2, x0), "setting off again gives the first image (no stale cached conditioning)"
    assert "Perfusion clause encoding" not in info_off and "Perfusion clause encoding" not in info_again
    assert np.array_equal(pixels(one_on["images"][0]), one_off), "one concept: nothing to encode by clauses"
    assert "Perfusion clause encoding" not in info_one, info_one
    assert np.array_equal(p0, p1), "the plain prompt after these is pixel-identical to the one before"
    status, embeddings = call("/sdapi/v1/embeddings")
    assert status == 200 and not [w for w in embeddings["loaded"] if w.startswith("perfusion")], embeddings["loaded"]
    text = log_since(start)
    if text is not None:
        assert "clause-wise encoding not applied" not in text and "Traceback" not in text, text[-3000:]


def test_retrained_same_name_does_not_reuse_cached_conditioning(trained):
    prompt = f"a photo of a <perfusion:{NAME}> on the beach"
    before = pixels(txt2img(prompt)["images"][0])
    status, body = call("/perfusion/v1/train", {"name": NAME, "superclass": "dog", "images": [NAME], "steps": 2,
                                                "batch_size": 2, "micro_batch": 1, "resolution": 64, "seed": 7,
                                                "preview_every": 0, "overwrite": True})
    assert status == 200, body
    assert wait_job(body["job_id"])["state"] == "finished"
    after = pixels(txt2img(prompt)["images"][0])
    assert not np.array_equal(before, after)


def test_interrupt_and_queue_lock():
    images_dir()
    status, body = call("/perfusion/v1/train", {"name": NAME + "long", "superclass": "bear", "images": [NAME],
                                                "steps": 200, "batch_size": 1, "resolution": 64, "preview_every": 0,
                                                "overwrite": True})
    assert status == 200, body
    job_id = body["job_id"]
    wait_job(job_id, states=("running",))
    end = time.time() + 300
    while call(f"/perfusion/v1/jobs/{job_id}?preview=false")[1]["step"] < 1 and time.time() < end:
        time.sleep(0.5)
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("t", (txt2img("a cat"), time.time())))
    thread.start()  # must wait for the training job: it holds the WebUI's queue lock
    time.sleep(3)
    assert "t" not in done, "a generation ran during training"
    status, progress = call("/sdapi/v1/progress?skip_current_image=true")
    assert "Perfusion" in (progress.get("textinfo") or ""), progress
    status, _ = call(f"/perfusion/v1/jobs/{job_id}/interrupt", {})
    assert status == 200
    job = wait_job(job_id)
    assert job["state"] == "interrupted" and job["step"] < 200, job
    thread.join(600)
    assert done["t"][1] >= job["finished"]
    assert Path(job["concept_path"]).is_file()


def test_invalid_bodies_get_4xx():
    for body, code in [([], 422), ({"name": "x"}, 422), ({"name": "x", "superclass": "dog", "images": ["/etc"]}, 403),
                       ({"name": "../x", "superclass": "dog", "images": [NAME]}, 422)]:
        status, answer = call("/perfusion/v1/train", body)
        assert status == code and answer.get("error"), (body, status, answer)
    assert call("/perfusion/v1/jobs/nope")[0] == 404


@pytest.mark.skipif(not os.environ.get("PERFUSION_WEBUI_AUTH_URL"), reason="no --api-auth WebUI given")
def test_api_auth_refuses_anonymous_calls():
    url, auth = os.environ["PERFUSION_WEBUI_AUTH_URL"], os.environ.get("PERFUSION_WEBUI_AUTH", "user:pass")
    for path, body in [("/perfusion/v1/concepts", None), ("/perfusion/v1/train", {}), ("/perfusion/v1/jobs/x", None),
                       ("/perfusion/v1/jobs/x/interrupt", {})]:
        assert call(path, body, url=url)[0] == 401, path
        assert call(path, body, url=url, auth="user:wrong")[0] == 401, path
    assert call("/perfusion/v1/concepts", url=url, auth=auth)[0] == 200
    assert call("/perfusion/v1/train", {}, url=url, auth=auth)[0] == 422
