"""CI tests of the WebUI glue's own logic (no WebUI here): tag rewriting, infotext, name safety,
the activation lifecycle on a tiny ldm UNet, request validation, jobs."""
from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_concept, run_unet, tiny_ldm_unet, unet_inputs
from PIL import Image

from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.webui import activation as pg
from perfusion_ext.webui.activation import Activator
from perfusion_ext.webui.concepts import ConceptStore, mismatch_reason
from perfusion_ext.webui.jobs import JobManager
from perfusion_ext.webui.train_request import ApiError, parse_train_request


# ---- prompts -------------------------------------------------------------------------------
def test_concept_word_is_letters_and_changes_with_hash():
    a = pg.concept_word("Teddy bear_2", "0123456789abcdef")
    assert a.isalpha() and a.startswith("perfusionteddybear")
    assert pg.concept_word("Teddy bear_2", "f123456789abcdef") != a  # retrained file -> new word -> no stale cache


def test_collect_whole_batch_and_conflicts():
    got = pg.collect({"prompt": ["a <perfusion:teddy:0.5> x", "b <perfusion:dog>"],
                      "negative prompt": ["<perfusion:teddy:0.9>", "<perfusion:bad:beta=oops>"]})
    assert list(got.tags) == ["teddy", "dog"]
    assert got.tags["teddy"].strength == 0.5
    assert any("different options" in w for w in got.warnings)
    assert any("bad option" in w for w in got.warnings)


def test_replace_tags_keeps_position_and_other_networks():
    out = pg.replace_tags("a photo of <perfusion:teddy:0.8:tau=0.2> on <lora:x:1> the <perfusion:nope> beach",
                          {"teddy": "WORD"})
    assert out.split() == ["a", "photo", "of", "WORD", "on", "<lora:x:1>", "the", "beach"]


@pytest.mark.parametrize("body", ["../../etc/passwd", "/abs/path", "a/b", "..", "x\\y"])
def test_path_like_names_are_malformed(body):
    tags, warnings = pg.scan(f"<perfusion:{body}>")
    assert not tags and warnings


def test_infotext_roundtrip_and_remap():
    text = pg.format_hashes({"teddy": "abcdef0123456789", "my, dog": "0011223344556677"})
    assert text == "teddy: abcdef012345, my dog: 001122334455"
    parsed = pg.parse_hashes(text)
    assert parsed == {"teddy": "abcdef012345", "my dog": "001122334455"}
    out = pg.remap_pasted("x <perfusion:teddy:0.7> y", parsed, lambda name, h: "renamed" if h == "abcdef012345" else None)
    assert out == "x <perfusion:renamed:0.7> y"


# ---- the concepts folder ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture()
def folder(tmp_path, unet):
    save_concept(make_concept(unet, "teddy", seed=1), tmp_path / "teddy.safetensors")
    save_concept(make_concept(unet, "other", seed=2), tmp_path / "sub" / "other.safetensors")
    (tmp_path / "teddy.run" / "checkpoints").mkdir(parents=True)
    save_concept(make_concept(unet, "ghost", seed=3), tmp_path / "teddy.run" / "checkpoints" / "ghost.safetensors")
    return tmp_path


def test_store_lists_resolves_and_refuses_escapes(folder):
    store = ConceptStore(lambda: folder)
    assert sorted(e.name for e in store.entries()) == ["other", "teddy"]  # run folders are not concepts
    assert store.load("other").path.name == "other.safetensors"
    for bad in ("../teddy", "/etc/passwd", "..", "ghost"):
        with pytest.raises(PerfusionError):
            store.load(bad)
    entry = store.load("teddy")
    assert store.resolve_pasted("renamed", entry.short_hash) == "teddy"
    assert store.resolve_pasted("teddy", entry.short_hash) == "teddy"
    assert store.resolve_pasted("teddy", "ffffffffffff") is None


def test_mismatch_reason():
    assert mismatch_reason("sdxl", "sd1") == "trained for SDXL; an SD1 model is loaded"
    assert mismatch_reason("sd1", "sd1") is None


# ---- activation lifecycle ----------------------------------------------------------------------
class FakeEnv:
    def __init__(self, unet, replacement=None, competitive_gates=False):
        self._unet, self.replacement, self.competitive_gates = unet, replacement, competitive_gates
        self.registered, self.warnings, self.closed = {}, [], 0

    def unet(self):
        return self._unet

    def register_embedding(self, word, concept):
        self.registered[word] = concept

    def unregister_embedding(self, word):
        self.registered.pop(word, None)

    def strip_tags(self, prompt):  # the WebUI's extra_networks.parse_prompt
        import re
        return re.sub(r"<(\w+):([^>]+)>", "", prompt)

    def unet_replacement(self):
        return self.replacement

    def defaults(self):
        return {"beta": 0.0, "tau": 0.0, "competitive_gates": self.competitive_gates}

    def warn(self, p, message):
        self.warnings.append(message)

    def on_activate(self, p, activator):
        pass


class FakeP:
    def __init__(self, prompts, negatives, batch_size=2, iteration=0, hr=None):
        self.all_prompts, self.all_negative_prompts = prompts, negatives
        self.batch_size, self.iteration = batch_size, iteration
        sl = slice(iteration * batch_size, (iteration + 1) * batch_size)
        strip = FakeEnv(None).strip_tags
        self.prompts = [strip(x) for x in prompts[sl]]  # what the WebUI leaves after parsing
        self.negative_prompts = list(negatives[sl])
        self.extra_generation_params = {}
        self.comments = {}
        self.enable_hr = hr is not None
        self.is_hr_pass = False
        if hr is not None:
            self.all_hr_prompts, self.all_hr_negative_prompts = hr, negatives
            self.hr_prompts = [strip(x) for x in hr[sl]]
            self.hr_negative_prompts = list(negatives[sl])


def test_activate_rewrites_prompts_hooks_and_releases_bit_exact(folder, unet):
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: folder), env)
    x, t, ctx = unet_inputs(unet)
    before = run_unet(unet, x, t, ctx)
    p = FakeP(["a photo of <perfusion:teddy:0.8> on <lora:l:1> the beach", "plain"],
              ["blurry <perfusion:other>", ""], hr=["hires <perfusion:teddy>", "hires plain"])
    act.activate(p)
    words = {c.name: w for w, c in env.registered.items()}
    assert set(words) == {"teddy", "other"}
    assert p.prompts[0].split() == ["a", "photo", "of", words["teddy"], "on", "the", "beach"]
    assert p.prompts[1] == "plain"
    assert p.negative_prompts[0].split() == ["blurry", words["other"]]
    assert p.hr_prompts[0].split() == ["hires", words["teddy"]]
    short = pg.parse_hashes(p.extra_generation_params[pg.INFOTEXT_KEY])
    assert set(short) == {"teddy", "other"} and all(len(v) == 12 for v in short.values())
    assert len(act.handles) == 2 * 16  # both concepts' K/V edits on every attn2 to_k/to_v
    assert not torch.equal(run_unet(unet, x, t, ctx), before)
    act.activate(p)  # activating again (hires pass, next batch) starts clean: no doubled hooks
    assert len(act.handles) == 2 * 16
    act.release()
    assert not env.registered and not act.handles
    assert torch.equal(run_unet(unet, x, t, ctx), before)  # bit for bit


def test_competitive_gates_setting_reaches_the_edits_with_two_concepts(folder, unet):
    x, t, ctx = unet_inputs(unet)
    outputs = {}
    for competitive in (False, True):
        env = FakeEnv(unet, competitive_gates=competitive)
        act = Activator(ConceptStore(lambda: folder), env)
        act.activate(FakeP(["<perfusion:teddy> and <perfusion:other>"], [""], batch_size=1))
        assert act.competitive is competitive
        assert all(edit.competitive is competitive for edit in act.edits.edits.values())
        outputs[competitive] = run_unet(unet, x, t, ctx)
        act.release()
        act.activate(FakeP(["<perfusion:teddy> alone"], [""], batch_size=1))
        assert act.competitive is False  # one concept: nothing to compete with
        act.release()
    assert not torch.equal(outputs[False], outputs[True])


def test_hires_pass_uses_hires_prompt_concepts(folder, unet):
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: folder), env)
    p = FakeP(["<perfusion:teddy>", "<perfusion:teddy>"], ["", ""], hr=["plain", "plain"])
    p.is_hr_pass = True
    act.activate(p)
    assert not act.handles  # hires prompt has no concept
    assert env.registered  # but the words are registered for the first-pass prompts
    act.release()


def test_bad_tags_warn_and_generation_goes_on(folder, unet):
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: folder), env)
    p = FakeP(["<perfusion:missing> <perfusion:../../x> <perfusion:teddy:beta=q> a cat"], [""], batch_size=1)
    act.activate(p)
    assert p.prompts[0].split() == ["a", "cat"]
    assert not act.handles and not env.registered
    assert any("unknown concept 'missing'" in w for w in env.warnings)
    assert any("invalid concept name" in w for w in env.warnings)
    assert any("bad option" in w for w in env.warnings)
    assert pg.INFOTEXT_KEY not in p.extra_generation_params


def test_family_mismatch_and_unet_replacement(tmp_path, unet):
    save_concept(make_concept(unet, "xl", family="sd1"), tmp_path / "xl.safetensors")
    sd2_unet = tiny_ldm_unet(context_dim=1024)
    env = FakeEnv(sd2_unet)
    act = Activator(ConceptStore(lambda: tmp_path), env)
    act.activate(FakeP(["<perfusion:xl>"], [""], batch_size=1))
    assert any("trained for SD1; an SD2 model is loaded" in w for w in env.warnings)
    env = FakeEnv(unet, replacement="TensorRT")
    act = Activator(ConceptStore(lambda: tmp_path), env)
    p = FakeP(["<perfusion:xl>"], [""], batch_size=1)
    act.activate(p)
    assert not act.handles and any("TensorRT" in w for w in env.warnings)
    act.release()


def test_changed_prompt_is_not_clobbered(folder, unet):
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: folder), env)
    p = FakeP(["<perfusion:teddy> dog"], [""], batch_size=1)
    p.prompts = ["something another script wrote"]
    act.activate(p)
    assert p.prompts == ["something another script wrote"]
    assert any("changed by another script" in w for w in env.warnings)
    act.release()


# ---- REST request validation ----------------------------------------------------------------------
def _png_b64():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def allowed(tmp_path):
    root = tmp_path / "allowed"
    (root / "teddy").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "teddy" / "a.png")
    return root


@pytest.mark.parametrize("body,status,needle", [
    ([], 422, "JSON object"),
    ({"name": "t"}, 422, "superclass"),
    ({"name": "../x", "superclass": "bear", "images": ["teddy"]}, 422, "name"),
    ({"name": "t", "superclass": "teddy bear", "images": ["teddy"]}, 422, "superclass"),
    ({"name": "t", "superclass": "bear"}, 422, "images is required"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "steps": "10"}, 422, "steps must be an integer"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "steps": 0}, 422, "between"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "tau": 0}, 422, "tau"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "resolution": 100}, 422, "multiple of 64"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "batch_size": 16, "micro_batch": 3}, 422, "divide"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "bogus": 1}, 422, "unknown field"),
    ({"name": "t", "superclass": "bear", "images": ["/etc"]}, 403, "outside"),
    ({"name": "t", "superclass": "bear", "images": ["../../etc"]}, 403, "outside"),
    ({"name": "t", "superclass": "bear", "images": ["nope"]}, 422, "does not exist"),
    ({"name": "t", "superclass": "bear", "images": ["data:image/png;base64,AAAA"]}, 422, "not an image"),
    ({"name": "t", "superclass": "bear", "images": ["teddy"], "resume": "yes"}, 422, "true or false"),
])
def test_train_request_rejections(allowed, body, status, needle):
    with pytest.raises(ApiError) as err:
        parse_train_request(body, [allowed])
    assert err.value.status == status and needle in err.value.message


def test_train_request_accepts_folder_files_and_base64(allowed):
    req = parse_train_request({"name": "teddy", "superclass": "bear", "images": ["teddy"], "steps": 3,
                               "resolution": 64}, [allowed])
    assert req.image_paths == [allowed / "teddy"] and req.steps == 3 and req.resolution == 64
    req = parse_train_request({"name": "teddy", "superclass": "bear",
                               "images": [str(allowed / "teddy" / "a.png"), "data:image/png;base64," + _png_b64(), _png_b64()]},
                              [allowed])
    assert len(req.image_paths) == 1 and len(req.image_bytes) == 2
    assert parse_train_request({"name": "x", "superclass": "dog", "images": ["/etc"]}, None).image_paths  # UI: trusted


def test_training_defaults_limits_and_image_types_have_one_source(allowed):
    """The REST API, the tab (same parser) and the CLI take defaults and limits from training.config."""
    from perfusion_ext.cli.main import build_parser
    from perfusion_ext.training.config import LIMITS, TrainConfig, field_defaults
    from perfusion_ext.training.dataset import IMAGE_SUFFIXES

    req = parse_train_request({"name": "teddy", "superclass": "bear", "images": ["teddy"]}, [allowed])
    sd = field_defaults("sd1")
    assert {k: getattr(req, k) for k in LIMITS} == {k: sd[k] for k in LIMITS}
    assert sd["steps"] == 400 and sd["resolution"] == 512 and field_defaults("toy")["steps"] == 150
    assert sd["lr_value"] == 0.03 and field_defaults("toy")["lr_value"] == 0.06  # chosen on the toy benchmark
    assert req.to_config(previews=False) == TrainConfig(
        "teddy", "bear", **{**{k: sd[k] for k in LIMITS}, "preview_every": 0})
    cli = build_parser().parse_args(["train", "--images", "x", "--name", "n", "--superclass", "dog"])
    for key in ("batch_size", "lr_value", "lr_embedding", "seed", "checkpoint_every", "preview_every", "mode"):
        assert getattr(cli, key) == field_defaults()[key], key
    for flag, value in (("--steps", "0"), ("--batch-size", "65"), ("--lr-value", "x")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--images", "x", "--name", "n", "--superclass", "dog", flag, value])
    with pytest.raises(ApiError, match="between"):
        parse_train_request({"name": "t", "superclass": "bear", "images": ["teddy"],
                             "batch_size": LIMITS["batch_size"][2] + 1}, [allowed])
    paper_gate = parse_train_request({"name": "t", "superclass": "bear", "images": ["teddy"], "train_beta": 0.75,
                                      "train_tau": 0.1}, [allowed]).to_config()
    assert (paper_gate.train_beta, paper_gate.train_tau) == (0.75, 0.1)
    assert (req.to_config().train_beta, req.to_config().train_tau) == (None, None)  # the concept's own gate
    (allowed / "scan.tif").write_bytes(b"II*\x00")  # the CLI's loader reads .tif, so the API takes it too
    assert ".tif" in IMAGE_SUFFIXES
    assert parse_train_request({"name": "t", "superclass": "bear", "images": ["scan.tif"]}, [allowed]).image_paths


# ---- jobs ----------------------------------------------------------------------------------------
def _request(name="teddy"):
    return parse_train_request({"name": name, "superclass": "bear", "images": ["/"], "steps": 5}, None)


def _wait(job, states, timeout=5.0):
    end = time.time() + timeout
    while job.state not in states and time.time() < end:
        time.sleep(0.01)
    return job.state


def test_jobs_run_under_lock_report_progress_and_interrupt():
    lock = threading.Lock()
    gate = threading.Event()

    def runner(job):
        assert lock.locked()
        for step in range(1, 6):
            if job.stop.is_set():
                job.state, job.message = "interrupted", f"stopped at {job.step}"
                return
            job.step, job.loss = step, 0.5
            gate.wait(2)
        job.state = "finished"

    jobs = JobManager(runner, lock)
    job = jobs.submit(_request())
    with pytest.raises(ApiError) as err:
        jobs.submit(_request())  # same name while running
    assert err.value.status == 409
    assert _wait(job, ("running",)) == "running"
    jobs.interrupt(job.id)
    gate.set()
    assert _wait(job, ("interrupted",)) == "interrupted"
    body = job.to_json()
    assert body["state"] == "interrupted" and body["loss"] == 0.5 and body["preview"] is None
    with pytest.raises(ApiError) as err:
        jobs.get("nope")
    assert err.value.status == 404


def test_job_failures_become_state_not_crashes():
    def runner(job):
        raise RuntimeError("boom")

    jobs = JobManager(runner, threading.Lock())
    job = jobs.submit(_request("b"))
    assert _wait(job, ("failed",)) == "failed" and "boom" in job.message


def test_export_request_validation():
    from perfusion_ext.webui.export import ExportRequest, child_args, parse_export_request
    from perfusion_ext.webui.train_request import ApiError

    assert parse_export_request({"concepts": ["teddy", "teddy", "ring"]}) == ExportRequest(("teddy", "ring"))
    assert parse_export_request({"concepts": ["a"], "layout": "optimum", "precision": "fp32", "beta": 0.6}) == \
        ExportRequest(("a",), "optimum", "fp32", 0.6, None)
    competitive = parse_export_request({"concepts": ["a", "b"], "competitive_gates": True})
    assert competitive.competitive_gates is True
    assert "--competitive-gates" in child_args(competitive, Path("m.safetensors"), [Path("a"), Path("b")], Path("o"), "n",
                                               False)
    for body, why in (([], "JSON object"), ({"concepts": []}, "non-empty"), ({"concepts": ["../x"]}, "non-empty"),
                      ({"concepts": ["a"], "layout": "tensorrt"}, "layout"), ({"concepts": ["a"], "precision": "int8"},
                      "precision"), ({"concepts": ["a"], "tau": 0}, "tau"), ({"concepts": ["a"], "beta": "x"}, "beta"),
                      ({"concepts": ["a"], "out_dir": "/etc"}, "unknown field"),
                      ({"concepts": ["a"], "competitive_gates": "yes"}, "competitive_gates")):
        with pytest.raises(ApiError, match=why) as err:
            parse_export_request(body)
        assert 400 <= err.value.status < 500


# ---- concept cards: no folder buttons for training runs -------------------------------------
def _buttons(*labels):
    return "".join(f"\n<button class='lg secondary gradio-button custom-button{' search-all' if not label else ''}' "
                   f"onclick='extraNetworksSearchButton(\"txt2img\", \"perfusion\", event)'>\n{label or 'all'}\n</button>\n"
                   for label in labels)


def test_folder_buttons_of_training_runs_are_dropped():
    from perfusion_ext.webui.concepts import drop_folder_buttons, is_hidden_folder

    assert is_hidden_folder("vteddy.run/") and is_hidden_folder("/vteddy.run/checkpoints/")
    assert is_hidden_folder("people\\kid.run\\previews\\") and is_hidden_folder(".cache/")
    assert not is_hidden_folder("people/") and not is_hidden_folder("runners/")
    only_runs = _buttons("", "vteddy.run/", "vteddy.run/checkpoints/", "vteddy.run/previews/")
    assert drop_folder_buttons(only_runs) == ""  # like a flat folder: no "all" button alone
    mixed = drop_folder_buttons(_buttons("", "people/", "people/kid.run/", "vteddy.run/"))
    assert "people/" in mixed and ">\nall\n<" in mixed and ".run" not in mixed
    assert drop_folder_buttons("") == "" and drop_folder_buttons("<div>x</div>") == "<div>x</div>"
