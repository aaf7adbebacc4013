"""Concurrency and faults in a REAL AUTOMATIC1111 WebUI: 20 mixed clients, then SIGKILL mid-training.

    .venv/bin/python tests/webui/concurrency.py [--minutes 10] [--clients 20] [--port 7863] [--json OUT]

Starts the WebUI (API only, `$A1111_ROOT/run-webui.sh`, the layout of tests/webui/README.md) and runs:

1. **Mixed load**: `--clients` threads for `--minutes`: generations without tags, with tags (trained concepts at
   random strengths, an unknown name), training jobs (a second job for a busy name must be refused with 409),
   listings (concepts, jobs, progress), ONNX exports, and bad requests that must get 4xx. Passes when no
   request got a 5xx or no answer, every client finished (no deadlock), no generation finished inside a
   training job's running window (the queue lock), the plain image at seed 1 is pixel-identical before
   and after (no hook left behind), and every finished job's concept loads with `load_concept`.
2. **SIGKILL mid-training**: a 40-step job with a checkpoint every 4 steps; the WebUI's process group is
   killed with SIGKILL after step 10; then the concepts folder must hold no half-written file (every
   .safetensors loads; temp files are counted), the WebUI is started again, the job is resumed and must go on
   from the last checkpoint's step, not from 0, and finish with a loadable concept.

Prints a JSON summary (and writes it with --json); exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

ROOT = Path(os.environ.get("A1111_ROOT", "/tmp/a1111"))
REPO = Path(__file__).resolve().parents[2]
CONCEPTS = ROOT / "webui" / "models" / "perfusion"
TIMEOUT = 1800  # an export holds the queue lock for minutes: every client waits behind it
# A random-init text encoder's LayerNorm has zero bias, so a prompt's mean can be exactly 0 and the WebUI's
# default emphasis ("Original") divides by it: NaNs from the checkpoint, not from a concept. No norm avoids it.
GENERATION = {"override_settings": {"emphasis": "No norm"}}


def start_webui(port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.Popen(["bash", str(ROOT / "run-webui.sh"), "--nowebui", "--port", str(port)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the WebUI exited ({proc.returncode}); see {log}")
        try:
            status, _ = W.call("/perfusion/v1/concepts", timeout=5)
            if status == 200:
                return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"the WebUI did not answer in 10 minutes; see {log}")


def stop_webui(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    proc.wait(120)


class Recorder:
    """Every request: endpoint kind, status (or the exception), duration, completion time."""

    def __init__(self):
        self.rows: list[dict] = []
        self.guard = threading.Lock()

    def call(self, kind: str, path: str, body=None):
        start = time.time()
        try:
            status, answer = W.call(path, body, timeout=TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding, not a crash of the script
            status, answer = f"error: {type(exc).__name__}: {exc}", None
        with self.guard:
            self.rows.append({"kind": kind, "path": path.split("?")[0], "status": status, "start": start,
                              "end": time.time()})
        return status, answer

    def failures(self) -> list[dict]:
        return [r for r in self.rows if not isinstance(r["status"], int) or r["status"] >= 500]


def concept_names() -> list[str]:
    status, concepts = W.call("/perfusion/v1/concepts")
    return [c["name"] for c in concepts if c.get("compatible")] if status == 200 else []


def client(role: str, index: int, rec: Recorder, deadline: float, jobs: list, problems: list) -> None:
    rng = random.Random(index)
    while time.time() < deadline:
        if role == "plain":
            status, _ = rec.call("txt2img", "/sdapi/v1/txt2img",
                                 {**W.BASE, **GENERATION, "prompt": "a cat", "seed": rng.randint(0, 99)})
        elif role == "tagged":
            names = concept_names() or ["ghost"]
            tag = rng.choice(names + ["ghost"])
            prompt = f"a photo of a <perfusion:{tag}:{rng.choice([0.5, 1, 1.5])}> on a table"
            status, _ = rec.call("txt2img", "/sdapi/v1/txt2img", {**W.BASE, **GENERATION, "prompt": prompt})
            if status != 200:
                problems.append(f"tag {tag!r}: generation answered {status}")
        elif role == "trainer":
            name = f"cc{index}"
            body = {"name": name, "superclass": "bear", "images": [W.NAME], "steps": rng.randint(3, 6),
                    "batch_size": 1, "resolution": 64, "checkpoint_every": 2, "preview_every": 0, "overwrite": True}
            status, answer = rec.call("train", "/perfusion/v1/train", body)
            if status == 200:
                again, _ = rec.call("train", "/perfusion/v1/train", body)
                if again != 409:
                    problems.append(f"a second job for busy {name!r} answered {again}, not 409")
                job = wait(rec, answer["job_id"], deadline + TIMEOUT)
                jobs.append(job)
                rec.call("bad", f"/perfusion/v1/jobs/{answer['job_id']}/interrupt", {})  # a finished job
        elif role == "lister":
            for path in ("/perfusion/v1/concepts", "/perfusion/v1/jobs", "/sdapi/v1/progress?skip_current_image=true",
                         "/perfusion/v1/trash"):
                rec.call("list", path)
            time.sleep(rng.uniform(0.5, 2))
        elif role == "exporter":
            names = concept_names()
            if names:
                rec.call("export", "/perfusion/v1/export", {"concepts": [rng.choice(names)], "layout": "a1111-trt"})
            else:
                time.sleep(5)
        elif role == "bad":
            for path, body in [("/perfusion/v1/train", {"name": "../x", "superclass": "dog", "images": [W.NAME]}),
                               ("/perfusion/v1/train", {"name": "x", "superclass": "dog", "images": ["/etc"]}),
                               ("/perfusion/v1/train", [1, 2]), ("/perfusion/v1/jobs/nope", None),
                               ("/perfusion/v1/export", {"concepts": ["ghost"]}),
                               ("/perfusion/v1/concepts/ghost/rename", {"new_name": "y"})]:
                status, _ = rec.call("bad", path, body)
                if not (isinstance(status, int) and 400 <= status < 500):
                    problems.append(f"bad request {path} answered {status}, not 4xx")
            time.sleep(rng.uniform(1, 3))


def wait(rec: Recorder, job_id: str, until: float) -> dict:
    while time.time() < until:
        status, job = rec.call("list", f"/perfusion/v1/jobs/{job_id}?preview=false")
        if status == 200 and job["state"] not in ("queued", "running"):
            return job
        time.sleep(1)
    return {"id": job_id, "state": "timeout"}


def roles(n: int) -> list[str]:
    base = ["plain"] * 5 + ["tagged"] * 5 + ["trainer"] * 3 + ["lister"] * 4 + ["exporter"] + ["bad"] * 2
    return (base * (n // len(base) + 1))[:n]


def loadable(path: Path) -> str | None:
    from perfusion_ext.core.concept import load_concept

    try:
        load_concept(path)
        return None
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{path.name}: {exc}"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def mixed_load(minutes: float, n_clients: int) -> dict:
    W.images_dir()
    W.call("/perfusion/v1/train", {"name": "cc-seed", "superclass": "bear", "images": [W.NAME], "steps": 2,
                                   "batch_size": 1, "resolution": 64, "preview_every": 0, "overwrite": True})
    reference = W.pixels(W.txt2img("a cat", **GENERATION)["images"][0])
    rec, jobs, problems = Recorder(), [], []
    deadline = time.time() + 60 * minutes
    threads = [threading.Thread(target=client, args=(role, i, rec, deadline, jobs, problems), daemon=True)
               for i, role in enumerate(roles(n_clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline + TIMEOUT - time.time()))
    hung = sum(t.is_alive() for t in threads)
    after = W.pixels(W.txt2img("a cat", **GENERATION)["images"][0])
    windows = [(j["started"], j["finished"]) for j in jobs if j.get("started") and j.get("finished")]
    inside = [r for r in rec.rows if r["kind"] == "txt2img" and r["status"] == 200
              and any(s + 1 < r["end"] < f - 1 for s, f in windows)]
    unloadable = [m for j in jobs if j.get("state") == "finished" and j.get("concept_path")
                  for m in [loadable(Path(j["concept_path"]))] if m]
    counts = collections.Counter(f"{r['kind']} {r['status']}" for r in rec.rows)
    gen_seconds = [r["end"] - r["start"] for r in rec.rows if r["kind"] == "txt2img" and r["status"] == 200]
    return {
        "minutes": minutes, "clients": n_clients, "requests": len(rec.rows), "by_kind_and_status": dict(sorted(counts.items())),
        "failures_5xx_or_no_answer": rec.failures()[:20], "hung_clients": hung,
        "generations_inside_a_training_job": len(inside), "jobs": collections.Counter(j["state"] for j in jobs),
        "unloadable_concepts": unloadable, "model_unchanged": bool((reference == after).all()),
        "generation_seconds_p50": percentile(gen_seconds, 0.5), "generation_seconds_p95": percentile(gen_seconds, 0.95),
        "problems": problems[:20],
    }


def scan_concepts_folder() -> dict:
    temp = sorted(p.name for p in CONCEPTS.rglob("*.tmp"))
    broken = [m for p in sorted(CONCEPTS.glob("*.safetensors")) for m in [loadable(p)] if m]
    return {"temp_files": temp, "unloadable": broken, "concepts": len(list(CONCEPTS.glob("*.safetensors")))}


def sigkill_and_resume(port: int, log: Path, proc: subprocess.Popen) -> tuple[dict, subprocess.Popen]:
    name = "cckill"
    body = {"name": name, "superclass": "bear", "images": [W.NAME], "steps": 40, "batch_size": 1, "resolution": 64,
            "checkpoint_every": 4, "preview_every": 0, "overwrite": True}
    status, answer = W.call("/perfusion/v1/train", body)
    assert status == 200, answer
    while True:
        status, job = W.call(f"/perfusion/v1/jobs/{answer['job_id']}?preview=false")
        if job["step"] > 10 or job["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    killed_at = job["step"]
    stop_webui(proc, signal.SIGKILL)
    after_kill = scan_concepts_folder()
    state = CONCEPTS / f"{name}.run" / "state.json"
    checkpoint_step = json.loads(state.read_text())["step"] if state.is_file() else None
    proc = start_webui(port, log)
    status, answer = W.call("/perfusion/v1/train", {**body, "overwrite": False, "resume": True})
    steps_seen = []
    while status == 200:
        _, job = W.call(f"/perfusion/v1/jobs/{answer['job_id']}?preview=false")
        if job["state"] == "running" and job["step"]:
            steps_seen.append(job["step"])
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    return {
        "killed_at_step": killed_at, "checkpoint_step": checkpoint_step, "after_kill": after_kill,
        "resume_status": status, "resumed_job_state": job.get("state") if status == 200 else answer,
        "first_step_after_resume": steps_seen[0] if steps_seen else None,
        "final_concept": loadable(CONCEPTS / f"{name}.safetensors") or "loads",
    }, proc


def verdict(load: dict, kill: dict) -> list[str]:
    bad = []
    if load["failures_5xx_or_no_answer"]:
        bad.append("requests got a 5xx or no answer")
    if load["hung_clients"]:
        bad.append("clients hung (deadlock?)")
    if load["generations_inside_a_training_job"]:
        bad.append("generations finished while a training job held the queue lock")
    if not load["model_unchanged"]:
        bad.append("the plain image changed: something was left on the model")
    if load["unloadable_concepts"] or load["problems"]:
        bad.append("unloadable concepts or wrong answers")
    if kill["after_kill"]["unloadable"]:
        bad.append("a concept was half-written by the kill")
    if kill["resumed_job_state"] != "finished" or kill["final_concept"] != "loads":
        bad.append("the killed run did not resume to a loadable concept")
    first, ckpt = kill["first_step_after_resume"], kill["checkpoint_step"]
    if ckpt is None or first is None or first <= ckpt - 1 or first > ckpt + 4:
        bad.append("the resumed job did not go on from the last checkpoint")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--port", type=int, default=7863)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ["PERFUSION_WEBUI_URL"] = f"http://127.0.0.1:{args.port}"
    os.environ.setdefault("A1111_ROOT", str(ROOT))
    (ROOT / "webui" / "extensions" / "sd-webui-perfusion").unlink(missing_ok=True)
    (ROOT / "webui" / "extensions" / "sd-webui-perfusion").symlink_to(REPO)
    global W
    sys.path[:0] = [str(Path(__file__).parent), str(REPO)]
    import test_real_webui as W

    log = ROOT / "perfusion-concurrency.log"
    proc = start_webui(args.port, log)
    try:
        load = mixed_load(args.minutes, args.clients)
        kill, proc = sigkill_and_resume(args.port, log, proc)
    finally:
        stop_webui(proc)
    summary = {"mixed_load": load, "sigkill": kill, "failed_checks": verdict(load, kill)}
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 1 if summary["failed_checks"] else 0


W = None
if __name__ == "__main__":
    sys.exit(main())
