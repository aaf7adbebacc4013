#!/usr/bin/env python3
"""Screenshots of the Perfusion tab and the concept cards in a real WebUI UI (headless chromium).

needs: a UI on --url (run-webui.sh --port 7860, after `Startup time:`) and the playwright venv of the
WebUI setup (tests/webui/README.md). usage: screenshots.py [--url URL] [--out docs]
"""
import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
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
        browser.close()
    errors = [c for c in console if c.startswith("error") and "perfusion" in c.lower()]
    print(f"cards: {cards} ({grey} greyed); prompt after card click: {prompt!r}")
    print("training tab status:", status.replace("\n", " | "))
    print("console errors mentioning perfusion:", errors or "none")
    ok = cards >= 1 and "<perfusion:" in prompt and not errors
    print("SCREENSHOTS", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
