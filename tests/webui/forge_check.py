"""Check the `<perfusion:NAME>` tag in a REAL Stable Diffusion WebUI Forge through its HTTP API (see README.md, "Forge").

    PERFUSION_FORGE_URL=http://127.0.0.1:7870 .venv/bin/python tests/webui/forge_check.py

Forge must run with `--api` (or `--nowebui`), this extension in `extensions/`, an SD1.5 checkpoint loaded (random
weights are enough) and at least two SD1 concept files in `models/perfusion/`. Optional:
    PERFUSION_FORGE_LOG=/path/to/console.log   also check the console: no error block naming perfusion, and the
                                              warning for the unknown tag
    PERFUSION_FORGE_CONCEPTS=teddy,teddy3      which two concepts to use (default: the first two that fit the model)
    PERFUSION_FORGE_EMPHASIS="No norm"         Forge's emphasis setting for every request (see below; "" keeps the
                                              server's)

Every image is 64x64, 2 Euler steps, seed 1234; images are compared by pixels. The requests set Forge's emphasis to
"No norm": with the default "Original", Forge rescales the conditioning by mean/mean, and a randomly initialised
text encoder (final LayerNorm = identity) can give a conditioning whose float32 mean is exactly 0, hence 0/0 = NaN
and a black image; a real checkpoint does not. A black (NaN) image counts as a failure.

Checks (numbered as in the task that introduced this script):
 2. the tag changes the image (vs the superclass prompt and vs the prompt without the tag), the infotext names the
    concept with its hash (`Perfusion hashes: "NAME: <12 hex>"`) and no concept word (Forge's `TI:` entry);
 3. the plain prompt after tagged generations is pixel-identical to the one before; strength 0 differs from
    strength 1 (the K/V edits) and still leaves nothing behind;
 4. `<perfusion:ghost>` generates (200) the image of the prompt without it, with a console warning;
 5. two concepts in one prompt (both hashes recorded), and GET /perfusion/v1/concepts answers;
 6. POST /perfusion/v1/train is refused on Forge with a message naming the `perfusion train` command line, and
    writes no concept.
Prints one JSON object with every figure; exits 1 when a check fails.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

URL = os.environ.get("PERFUSION_FORGE_URL", "").rstrip("/")
LOG = os.environ.get("PERFUSION_FORGE_LOG")
EMPHASIS = os.environ.get("PERFUSION_FORGE_EMPHASIS", "No norm")
BASE = {"negative_prompt": "", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler",
        "scheduler": "Automatic", "cfg_scale": 7, "seed": 1234, "batch_size": 1, "n_iter": 1}


def call(path, body=None, timeout=900):
    req = urllib.request.Request(URL + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, raw.decode(errors="replace")


class Gen:
    """One txt2img call: status, pixels (int array), infotext."""

    def __init__(self, prompt):
        body = {**BASE, "prompt": prompt}
        if EMPHASIS:
            body["override_settings"] = {"emphasis": EMPHASIS}
        start = time.time()
        self.prompt, (self.status, self.body) = prompt, call("/sdapi/v1/txt2img", body)
        self.seconds = round(time.time() - start, 1)
        self.pixels, self.info = None, ""
        if self.status == 200:
            raw = base64.b64decode(self.body["images"][0])
            self.pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.int16)
            self.info = json.loads(self.body["info"])["infotexts"][0]

    @property
    def black(self) -> bool:  # NaN latents decode to 0
        return self.pixels is None or int(self.pixels.max()) == 0


def diff(a: Gen, b: Gen) -> float | None:
    if a.pixels is None or b.pixels is None:
        return None
    return round(float(np.abs(a.pixels - b.pixels).mean()), 3)


def identical(a: Gen, b: Gen) -> bool:
    return a.pixels is not None and b.pixels is not None and np.array_equal(a.pixels, b.pixels)


def hashes_in(info: str) -> dict[str, str]:
    m = re.search(r'Perfusion hashes: "([^"]*)"', info) or re.search(r"Perfusion hashes: ([^,\n]*)", info)
    if not m:
        return {}
    return dict(part.strip().split(": ", 1) for part in m.group(1).split(",") if ": " in part)


def train_images(n=2, size=512):
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (40 + 60 * i, 120, 200 - 50 * i)).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def main() -> int:
    if not URL:
        print("set PERFUSION_FORGE_URL to a running Forge (--api)", file=sys.stderr)
        return 2
    summary, failures = {"url": URL, "emphasis": EMPHASIS or "(server setting)"}, []

    def check(name, ok, **figures):
        summary[name] = {"ok": bool(ok), **figures}
        if not ok:
            failures.append(name)

    status, version = call("/sdapi/v1/options")
    summary["checkpoint"] = version.get("sd_model_checkpoint") if status == 200 else None
    warm = Gen("a photo")  # Forge loads the checkpoint on the first generation: concept families need it loaded
    status, concepts = call("/perfusion/v1/concepts")
    listed = concepts if status == 200 and isinstance(concepts, list) else []
    wanted = [n for n in os.environ.get("PERFUSION_FORGE_CONCEPTS", "").split(",") if n]
    usable = [c for c in listed if c.get("compatible") and (not wanted or c["name"] in wanted)]
    check("5_concepts_listing", status == 200 and len(usable) >= 2, status=status, warmup_status=warm.status,
          listed=[(c["name"], c["base_family"], c["compatible"]) for c in listed])
    if len(usable) < 2:
        summary["failed"] = failures
        print(json.dumps(summary, indent=2))
        return 1
    a, b = usable[0], usable[1]
    sup = a["superclass"] or "bear"
    word = "perfusion" + re.sub(r"[^a-z]", "", a["name"].lower())  # the start of the concept's prompt word

    # 2 + 3: superclass, no tag, tag, strength 0, then the plain prompts again
    p0 = Gen(f"a photo of a {sup} on the beach")
    n0 = Gen("a photo of a  on the beach")
    t1 = Gen(f"a photo of a <perfusion:{a['name']}> on the beach")
    t0 = Gen(f"a photo of a <perfusion:{a['name']}:0> on the beach")
    p1 = Gen(f"a photo of a {sup} on the beach")
    n1 = Gen("a photo of a  on the beach")
    recorded = hashes_in(t1.info)
    check("2_tag_changes_image", t1.status == 200 and not t1.black and not identical(t1, p0) and not identical(t1, n0)
          and recorded.get(a["name"]) == a["short_hash"] and word not in t1.info,
          concept=a["name"], status=t1.status, seconds=t1.seconds, black=t1.black,
          mean_abs_diff_vs_superclass=diff(t1, p0), mean_abs_diff_vs_no_tag=diff(t1, n0),
          infotext_hashes=recorded, expected_hash=a["short_hash"],
          concept_word_in_infotext=word in t1.info,
          gates=(re.search(r'Perfusion gates: "([^"]*)"', t1.info) or [None, None])[1])
    check("3_nothing_left_behind", identical(p0, p1) and identical(n0, n1) and not p0.black and not t0.black
          and not identical(t0, t1),
          plain_identical_after=identical(p0, p1), no_tag_identical_after=identical(n0, n1),
          mean_abs_diff_plain_before_after=diff(p0, p1),
          strength0_vs_strength1=diff(t0, t1), strength0_vs_superclass=diff(t0, p0),
          strength0_vs_no_tag=diff(t0, n0))

    # 4: unknown tag
    g = Gen("a photo of a <perfusion:ghost> on the beach")
    warned = None
    if LOG and os.path.exists(LOG):
        warned = "unknown concept 'ghost'" in open(LOG, errors="replace").read()
    check("4_unknown_tag", g.status == 200 and identical(g, n0) and not hashes_in(g.info) and warned is not False,
          status=g.status, identical_to_no_tag=identical(g, n0), mean_abs_diff_vs_no_tag=diff(g, n0),
          console_warning=warned)

    # 5: two concepts
    two = Gen(f"a photo of a <perfusion:{a['name']}> and a <perfusion:{b['name']}> on the beach")
    two_plain = Gen(f"a photo of a {sup} and a {b['superclass'] or sup} on the beach")
    p2 = Gen(f"a photo of a {sup} on the beach")
    both = hashes_in(two.info)
    check("5_two_concepts", two.status == 200 and not two.black and both == {a["name"]: a["short_hash"],
                                                                             b["name"]: b["short_hash"]}
          and not identical(two, two_plain) and identical(p2, p0),
          concepts=[a["name"], b["name"]], status=two.status, infotext_hashes=both,
          mean_abs_diff_vs_superclass_words=diff(two, two_plain), plain_identical_after=identical(p2, p0))

    # 6: training is refused on Forge
    name = "forgecheck"
    status, body = call("/perfusion/v1/train", {"name": name, "superclass": sup, "images": train_images(), "steps": 2})
    job, message = None, (body.get("error") or body.get("detail")) if isinstance(body, dict) else str(body)
    if status == 200 and isinstance(body, dict) and body.get("job_id"):
        for _ in range(120):
            _, job = call(f"/perfusion/v1/jobs/{body['job_id']}?preview=false")
            if job.get("state") in ("finished", "failed", "interrupted", "nan"):
                break
            time.sleep(1)
        message = job.get("message")
    _, after = call("/perfusion/v1/concepts")
    written = any(c["name"] == name for c in after) if isinstance(after, list) else None
    p3 = Gen(f"a photo of a {sup} on the beach")
    refused = (status >= 400 or (job or {}).get("state") == "failed")
    check("6_training_refused", refused and bool(message) and "Forge" in message and "perfusion train" in message
          and written is False and identical(p3, p0),
          status=status, job_state=(job or {}).get("state"), message=message, concept_written=written,
          plain_identical_after=identical(p3, p0))

    if LOG and os.path.exists(LOG):  # 1: no error block naming the extension (its git info aside)
        text = open(LOG, errors="replace").read()
        blocks = [b for b in re.split(r"\n(?=\*\*\* )", text) if b.startswith("*** ") and "perfusion" in b.lower()]
        bad = [b.splitlines()[0] for b in blocks if "Failed reading extension data from Git" not in b]
        check("1_console", not bad, error_blocks=bad,
              perfusion_warnings=sorted(set(re.findall(r"Perfusion: (.+)", text)))[:10])

    summary["failed"] = failures
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
