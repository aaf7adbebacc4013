#!/usr/bin/env python3
"""Screenshots of the Perfusion tab and the concept cards in a real WebUI UI (headless chromium).

needs: a UI on --url (run-webui.sh --port 7860, after `Startup time:`) and the playwright venv of the
WebUI setup (tests/webui/README.md). usage: screenshots.py [--url URL] [--out docs] [--compose A,B]
The composition preview (webui-compose.png) uses two concepts that fit the loaded model: --compose, else
the first two of the listing (skipped with fewer). 64 px, 2 steps.
"""
import argparse
import json
import sys
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright


def compose_shot(page, a, out) -> str:
    """The training tab's "Composition preview" accordion after a run: each concept alone, then together."""
    with urllib.request.urlopen(a.url + "/perfusion/v1/concepts", timeout=60) as r:
        listed = [c["name"] for c in json.loads(r.read()) if c["compatible"]]
    names = a.compose.split(",") if a.compose else listed[:2]
    if len(names) < 2 or not set(names) <= set(listed):
        return f"skipped: needs two concepts that fit the loaded model, have {listed}"
    page.locator(".label-wrap", has_text="Composition preview").first.click()
    page.wait_for_selector("#perfusion_compose_prompt textarea", state="visible", timeout=30_000)
    for elem_id, value in (("perfusion_compose_prompt", f"a <perfusion:{names[0]}> on the left, a "
                                                        f"<perfusion:{names[1]}> on the right"),
                           ("perfusion_compose_seed", 5), ("perfusion_compose_steps", 2), ("perfusion_compose_size", 64)):
        page.locator(f"#{elem_id} :is(textarea, input)").first.fill(str(value))
    page.locator("#perfusion_compose").click()
    page.wait_for_function("() => document.querySelector('#perfusion_compose_result .perfusion-status') && "
                           "!document.querySelector('#perfusion_compose_gallery').innerText.includes('processing')",
                           timeout=600_000)
    page.evaluate("() => document.querySelectorAll('.toast-wrap, .toast-body').forEach(e => e.remove())")  # leak popups
    page.set_viewport_size({"width": 1000, "height": 900})  # smaller thumbnails: the noise of the random model
    page.mouse.move(0, 0)                                     # compresses badly (keeps the PNG under 150 KB);
    page.wait_for_timeout(1000)                               # no thumbnail under the mouse
    accordion = page.locator(".gradio-accordion", has=page.locator("#perfusion_compose_prompt")).first
    accordion.screenshot(path=str(out / "webui-compose.png"))
    captions = page.locator("#perfusion_compose_gallery .caption-label").all_inner_texts()
    result = page.inner_text("#perfusion_compose_result .perfusion-status").strip()
    return f"{result}; captions {captions}" if len(captions) == 3 else f"failed: {result}; captions {captions}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--compose", default="", help="two concept names, A,B, for the composition preview")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    console = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.goto(a.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
        # the concept cards: txt2img -> Perfusion page of the extra networks
        page.locator("#txt2img_extra_tabs > .tab-nav button", has_text="Perfusion").first.click()
        page.wait_for_selector("#txt2img_perfusion_cards .card", timeout=60_000)
        # the WebUI loads its options after the page: a card clicked before that adds "undefined" as separator
        page.wait_for_function("() => typeof opts !== 'undefined' && opts.extra_networks_add_text_separator !== undefined",
                               timeout=60_000)
        page.fill("#txt2img_prompt textarea", "a photo of a ")
        page.locator("#txt2img_perfusion_cards .card").first.click()
        page.wait_for_timeout(500)
        prompt = page.input_value("#txt2img_prompt textarea")
        page.screenshot(path=str(out / "webui-concept-cards.png"))
        cards = page.locator("#txt2img_perfusion_cards .card").count()
        grey = page.locator("#txt2img_perfusion_cards .card.perfusion-incompatible").count()
        # the training tab
        page.locator("#tabs > .tab-nav button", has_text="Perfusion").first.click()
        page.wait_for_selector("#perfusion_train", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#perfusion_status') && "
                               "document.querySelector('#perfusion_status').innerText.length > 10", timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "webui-training-tab.png"), full_page=True)
        status = page.inner_text("#perfusion_status")
        compose = compose_shot(page, a, out)
        browser.close()
    errors = [c for c in console if c.startswith("error") and "perfusion" in c.lower()]
    print(f"cards: {cards} ({grey} greyed); prompt after card click: {prompt!r}")
    print("training tab status:", status.replace("\n", " | "))
    print("composition preview:", compose)
    print("console errors mentioning perfusion:", errors or "none")
    ok = cards >= 1 and "<perfusion:" in prompt and not errors and "failed" not in compose
    print("SCREENSHOTS", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
