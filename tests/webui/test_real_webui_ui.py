"""The extension's UI in a REAL AUTOMATIC1111 WebUI, driven in headless chromium; skipped in CI.

    PERFUSION_WEBUI_UI_URL=http://127.0.0.1:7860   a running WebUI in UI mode (--api), after `Startup time:`
    A1111_ROOT=/tmp/a1111                          its setup (tests/webui/README.md), for the concepts folder
    PERFUSION_CHROMIUM=/usr/bin/chromium
    PERFUSION_WEBUI_LOG=/path/to/its/console.log    optional: no traceback while composing
    PERFUSION_COMPOSE_CONCEPTS=vteddy,vteddyui      optional: the two concepts of the composition preview
Needs playwright (the setup's uitest-venv) and the concept `vteddy` that
test_real_webui.py trains; run by tests/webui/run_real_webui.sh after that suite. Covers: the concept
cards page (no folder buttons for training runs `NAME.run/`), the user metadata editor on a Perfusion
card, the `<perfusion:` completion hint, the training tab's upload path and Interrupt button, and its
composition preview (each concept alone, then together, pixel-equal to txt2img; bad prompts).
Training: 64 px, 2 steps (upload) and an interrupted long run. Standard library only besides playwright.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

URL = os.environ.get("PERFUSION_WEBUI_UI_URL")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="no WebUI UI: set PERFUSION_WEBUI_UI_URL (tests/webui/run_real_webui.sh)"),
]
NAME = "vteddy"
CONCEPTS = Path(os.environ.get("A1111_ROOT", "/tmp/a1111")) / "webui" / "models" / "perfusion"
SHOTS = Path(__file__).resolve().parents[2] / "docs"


def api(path, body=None):
    req = urllib.request.Request(URL + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")


def png(path: Path, seed: int, size: int = 64) -> Path:
    """A small RGB PNG (a disc on a gradient) written with the standard library."""
    rows = []
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            inside = (x - 30 - 2 * seed) ** 2 + (y - 32) ** 2 < 18 ** 2
            row += bytes((150, 90, 40) if inside else ((30 + 40 * seed + x) % 256, 120, (200 - 30 * seed + y) % 256))
        rows.append(bytes(row))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not any(c["name"] == NAME for c in api("/perfusion/v1/concepts")):
        pytest.skip(f"no concept {NAME!r}: run tests/webui/test_real_webui.py first (the runner does)")
    console = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("PERFUSION_CHROMIUM", "/usr/bin/chromium"),
                                    headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        pg.on("pageerror", lambda e: console.append(f"error: {e}"))
        pg.goto(URL, wait_until="domcontentloaded", timeout=120_000)
        pg.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
        yield pg
        browser.close()
    errors = [c for c in console if c.startswith("error") and "perfusion" in c.lower()]
    assert not errors, errors


def open_cards(page):
    page.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
    page.locator("#txt2img_extra_tabs > .tab-nav button", has_text="Perfusion").first.click()
    page.wait_for_selector(f"#txt2img_perfusion_cards .card[data-name='{NAME}']", timeout=60_000)


def refresh_cards(page):
    page.locator("#txt2img_perfusion_extra_refresh:visible").first.click()  # the WebUI repeats this id
    page.wait_for_timeout(1500)
    page.wait_for_selector(f"#txt2img_perfusion_cards .card[data-name='{NAME}']", timeout=60_000)


def dir_buttons(page):
    return [t.strip() for t in page.locator("#txt2img_perfusion_dirs button").all_inner_texts()]


def test_concept_cards_show_no_training_run_folders(page):
    runs = sorted(p.name for p in CONCEPTS.glob("*.run") if p.is_dir())
    assert runs, "the trainer left NAME.run/ folders in the concepts folder (test_real_webui.py trains)"
    open_cards(page)
    buttons = dir_buttons(page)
    print("run folders on disk:", runs, "| folder buttons:", buttons)
    assert not any(".run" in b for b in buttons), buttons
    assert buttons == [], "a flat concepts folder shows no folder buttons at all, like the WebUI's own pages"
    page.screenshot(path=str(SHOTS / "webui-concept-cards.png"))
    # a real subfolder with a concept still gets its button (and its own training run still does not)
    sub = CONCEPTS / "uitestsub"
    (sub / "vsub.run" / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(CONCEPTS / f"{NAME}.safetensors", sub / "vsub.safetensors")
    try:
        refresh_cards(page)
        buttons = dir_buttons(page)
        print("with a subfolder:", buttons)
        assert "all" in buttons and any(b.strip("/\\") == "uitestsub" for b in buttons), buttons
        assert not any(".run" in b for b in buttons), buttons
        assert page.locator("#txt2img_perfusion_cards .card[data-name='vsub']").count() == 1
    finally:
        shutil.rmtree(sub)
        refresh_cards(page)
    assert dir_buttons(page) == []


def test_user_metadata_editor_on_a_perfusion_card(page):
    open_cards(page)
    concept = next(c for c in api("/perfusion/v1/concepts") if c["name"] == NAME)
    sidecar = CONCEPTS / f"{NAME}.json"
    backup = sidecar.read_bytes() if sidecar.exists() else None
    text = f"UI test description {int(time.time())}"
    card = page.locator(f"#txt2img_perfusion_cards .card[data-name='{NAME}']")
    try:
        card.hover()
        card.locator(".edit-button").click()
        editor = page.locator("#txt2img_perfusion_edit_user_metadata")
        editor.wait_for(state="visible", timeout=30_000)
        page.wait_for_function(
            "() => document.querySelector('#txt2img_perfusion_edit_user_metadata .file-metadata') !== null", timeout=30_000)
        table = editor.locator(".file-metadata").inner_text()
        print("editor file table:", table.replace("\n", " | "))
        assert concept["short_hash"] in table and f"{NAME}.safetensors" in table, table
        description = editor.locator("label:has-text('Description') textarea")
        description.fill(text)
        editor.locator("label:has-text('Notes') textarea").fill("notes from the UI test")
        editor.locator("button", has_text="Save").click()
        end = time.time() + 30
        while time.time() < end and not (sidecar.exists() and text in sidecar.read_text()):
            time.sleep(0.3)
        saved = json.loads(sidecar.read_text())
        assert saved["description"] == text and saved["notes"] == "notes from the UI test", saved
        page.wait_for_function(  # the card is re-rendered by get-single-card with the new description
            f"() => {{ const c = document.querySelector(\"#txt2img_perfusion_cards .card[data-name='{NAME}'] .description\");"
            f" return c && c.innerText.includes({json.dumps(text)}); }}", timeout=30_000)
        # the extension still reads the concept and the tag still generates with the sidecar in place
        assert any(c["name"] == NAME and c["compatible"] for c in api("/perfusion/v1/concepts"))
    finally:
        if backup is None:
            sidecar.unlink(missing_ok=True)
        else:
            sidecar.write_bytes(backup)
        refresh_cards(page)


def test_completion_hint_in_the_prompt_box(page):
    page.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
    box = page.locator("#txt2img_prompt textarea")
    box.fill("")
    box.click()
    box.type("a photo of <perfusion:", delay=30)
    page.wait_for_timeout(1500)  # the first hint loads the names from /perfusion/v1/concepts
    box.type(NAME[:3], delay=60)
    hint = page.locator("#txt2img_prompt .perfusion-hint")
    hint.wait_for(state="visible", timeout=10_000)
    shown = hint.inner_text()
    print("hint:", shown)
    assert f"<perfusion:{NAME}>" in shown and "Tab completes" in shown, shown
    box.press("Tab")
    value = box.input_value()
    print("after Tab:", repr(value))
    assert value == f"a photo of <perfusion:{NAME}>", value
    assert not hint.is_visible()
    box.type(" and <perfusion:zzz", delay=30)
    assert "no Perfusion concept starts with" in hint.inner_text()
    box.fill("")


def _tab(page):
    page.locator("#tabs > .tab-nav button", has_text="Perfusion").first.click()
    page.wait_for_selector("#perfusion_train", timeout=60_000)


def _fill(page, elem_id, value):
    page.locator(f"#{elem_id} :is(textarea, input)").first.fill(str(value))


def _job_id(page, timeout=60):
    page.wait_for_function("() => /Job [\\w-]+ queued/.test(document.querySelector('#perfusion_message').innerText)",
                           timeout=timeout * 1000)
    return re.search(r"Job ([\w-]+) queued", page.inner_text("#perfusion_message")).group(1)


def _wait_state(job_id, states, timeout=600):
    end = time.time() + timeout
    while time.time() < end:
        job = api(f"/perfusion/v1/jobs/{job_id}?preview=false")
        if job["state"] in states:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {states}")


def test_training_tab_upload_then_interrupt(page, tmp_path):
    files = [str(png(tmp_path / f"up{i}.png", i)) for i in range(4)]
    _tab(page)
    _fill(page, "perfusion_name", NAME + "ui")
    _fill(page, "perfusion_superclass", "bear")
    _fill(page, "perfusion_images_dir", "")
    _fill(page, "perfusion_steps", 2)
    _fill(page, "perfusion_batch_size", 2)
    _fill(page, "perfusion_micro_batch", 1)
    _fill(page, "perfusion_resolution", 64)
    overwrite = page.locator("#perfusion_overwrite input[type=checkbox]")
    if not overwrite.is_checked():
        overwrite.check()
    page.locator("#perfusion_uploads input[type=file]").set_input_files(files)
    page.wait_for_function("() => document.querySelectorAll('#perfusion_uploads tr, #perfusion_uploads .file').length >= 4"
                           " || document.querySelector('#perfusion_uploads').innerText.includes('up3')", timeout=60_000)
    page.locator("#perfusion_train").click()
    job_id = _job_id(page)
    job = _wait_state(job_id, ("finished", "failed", "nan", "interrupted"))
    assert job["state"] == "finished" and job["step"] == 2, job
    page.wait_for_function(f"() => document.querySelector('#perfusion_status').innerText.includes('{job_id}') && "
                           "document.querySelector('#perfusion_status').innerText.includes('finished')", timeout=30_000)
    concept = next(c for c in api("/perfusion/v1/concepts") if c["name"] == NAME + "ui")
    print("uploaded-images concept:", {k: concept[k] for k in ("name", "short_hash", "steps", "compatible")})
    assert concept["compatible"] and Path(concept["filename"]).is_file()

    # a long run from the same uploads, stopped with the Interrupt button
    _fill(page, "perfusion_name", NAME + "uiint")
    _fill(page, "perfusion_steps", 300)
    _fill(page, "perfusion_batch_size", 1)
    page.locator("#perfusion_train").click()
    page.wait_for_function(  # the new job's message replaces the old one
        "() => /Job [\\w-]+ queued: training vteddyuiint/.test(document.querySelector('#perfusion_message').innerText)",
        timeout=60_000)
    job_id = _job_id(page)
    _wait_state(job_id, ("running",))
    end = time.time() + 300
    while api(f"/perfusion/v1/jobs/{job_id}?preview=false")["step"] < 1 and time.time() < end:
        time.sleep(0.5)
    page.wait_for_function("() => /running/.test(document.querySelector('#perfusion_status').innerText) && "
                           "/step [1-9][0-9]*\\/300/.test(document.querySelector('#perfusion_status').innerText)",
                           timeout=60_000)
    page.screenshot(path=str(SHOTS / "webui-training-running.png"), full_page=True)
    page.locator("#perfusion_interrupt").click()
    page.wait_for_function("() => document.querySelector('#perfusion_message').innerText.includes('Interrupt requested')",
                           timeout=30_000)
    job = _wait_state(job_id, ("finished", "interrupted", "failed", "nan"))
    print("interrupted job:", {k: job[k] for k in ("state", "step", "total")})
    assert job["state"] == "interrupted" and 1 <= job["step"] < 300, job
    assert Path(job["concept_path"]).is_file()
    page.wait_for_function("() => document.querySelector('#perfusion_status').innerText.includes('interrupted')",
                           timeout=30_000)


# ---- the composition preview -------------------------------------------------------------------------
def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG (what the WebUI writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + n])
            assert depth == 8 and ctype in (2, 6) and not interlace, (depth, ctype, interlace)
            ch = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw, stride, out, prev = zlib.decompress(idat), w * ch, bytearray(), bytearray(w * ch)
    for y in range(h):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b, c = (line[i - ch] if i >= ch else 0), prev[i], (prev[i - ch] if i >= ch else 0)
            if kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                a = a if pa <= pb and pa <= pc else b if pb <= pc else c
            line[i] = (line[i] + (0, a, b, (a + b) // 2, a)[kind]) & 255
        out += line
        prev = line
    rgb = out if ch == 3 else bytes(v for i, v in enumerate(out) if i % 4 != 3)
    return w, h, bytes(rgb)


def txt2img_pixels(prompt, seed, sampler="Euler a"):
    body = api("/sdapi/v1/txt2img", {"prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": seed,
                                     "cfg_scale": 7, "sampler_name": sampler})
    return png_pixels(base64.b64decode(body["images"][0]))


def _compose(page, prompt, seed=5, timeout=600):
    """Fill the accordion, press Compose, wait for its answer (a message other than the one before: every call
    here expects a new one); (result text, [(caption, img src)])."""
    _fill(page, "perfusion_compose_prompt", prompt)
    _fill(page, "perfusion_compose_seed", seed)
    _fill(page, "perfusion_compose_steps", 2)
    _fill(page, "perfusion_compose_size", 64)
    answer = "#perfusion_compose_result .perfusion-status"  # not the block's text: it shows "processing | 2.1s"
    before = page.locator(answer).inner_text().strip() if page.locator(answer).count() else ""
    page.locator("#perfusion_compose").click()
    page.wait_for_function("([sel, before]) => { const e = document.querySelector(sel);"
                           " return e && e.innerText.trim() !== before && !document.querySelector("
                           "'#perfusion_compose_gallery').innerText.includes('processing'); }",
                           arg=[answer, before], timeout=timeout * 1000)
    gallery = page.locator("#perfusion_compose_gallery .thumbnail-item")
    panels = [(gallery.nth(i).locator(".caption-label").inner_text().strip(),
               gallery.nth(i).locator("img").get_attribute("src")) for i in range(gallery.count())]
    return page.locator(answer).inner_text().strip(), panels


def test_composition_preview_each_concept_alone_then_together(page):
    """The accordion renders A alone (B as its superclass word), B alone and A+B at one seed; each panel is the
    plain txt2img of its prompt; bad prompts get a message, no traceback; nothing is left on the model."""
    names = {c["name"]: c for c in api("/perfusion/v1/concepts") if c["compatible"]}
    wanted = os.environ.get("PERFUSION_COMPOSE_CONCEPTS", f"{NAME},{NAME}ui").split(",")
    if not all(n in names for n in wanted):
        pytest.skip(f"needs the concepts {wanted} (the upload test trains {NAME}ui)")
    a, b = wanted[:2]
    superclass = {n: names[n]["superclass"] for n in (a, b)}
    log = Path(os.environ["PERFUSION_WEBUI_LOG"]) if os.environ.get("PERFUSION_WEBUI_LOG") else None
    log_start = log.stat().st_size if log else 0
    plain = txt2img_pixels("a photo of a bear", 1, sampler="Euler")
    _tab(page)
    if not page.locator("#perfusion_compose_prompt").is_visible():
        page.locator(".label-wrap", has_text="Composition preview").first.click()
    page.wait_for_selector("#perfusion_compose_prompt textarea", state="visible", timeout=30_000)

    prompt = f"a <perfusion:{a}> on the left, a <perfusion:{b}> on the right"
    message, panels = _compose(page, prompt)
    print("compose:", message, [caption for caption, _ in panels])
    assert [caption for caption, _ in panels] == [a, b, "together"], panels
    assert message == f"3 panels ({a}, {b}, together) at seed 5", message
    images = [png_pixels(urllib.request.urlopen(src, timeout=60).read()) for _, src in panels]
    assert all(im[:2] == (64, 64) for im in images) and len({im[2] for im in images}) == 3, "three different images"
    alone = {a: f"a <perfusion:{a}> on the left, a {superclass[b]} on the right",
             b: f"a {superclass[a]} on the left, a <perfusion:{b}> on the right", "together": prompt}
    for (caption, _), image in zip(panels, images):
        assert image == txt2img_pixels(alone[caption], 5), f"the {caption!r} panel is the txt2img of {alone[caption]!r}"

    # seed -1: one seed drawn for all panels, shown in the message
    message, panels = _compose(page, prompt, seed=-1)
    seed = int(re.search(r"at seed (\d+)", message).group(1))
    assert png_pixels(urllib.request.urlopen(panels[2][1], timeout=60).read()) == txt2img_pixels(prompt, seed)

    for bad, expected in ((f"a <perfusion:{a}> alone", "needs at least two known concepts in the prompt, got"),
                          (f"a <perfusion:{a}> and a <perfusion:nosuchconcept>", "unknown concept 'nosuchconcept'"),
                          (f"a <perfusion:{a}:abc> and a <perfusion:{b}>", f"(ignored <perfusion:{a}:abc>:")):
        message, panels = _compose(page, bad)
        print("bad prompt:", repr(bad), "->", message)
        assert expected in message and panels == [], (bad, message, panels)
        assert page.locator("#perfusion_compose_result .perfusion-error").count() == 1

    assert txt2img_pixels("a photo of a bear", 1, sampler="Euler") == plain, "nothing is left on the model"
    if log:
        new = log.read_text(errors="replace")[log_start:]
        assert "Traceback" not in new and "Perfusion: composition preview failed" not in new, new[-3000:]
