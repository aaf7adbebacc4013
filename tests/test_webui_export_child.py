"""The WebUI's ONNX export runs in a child process with its own package folder (webui/export_env.py):
the arguments it gets, what the probe asks to install, that errors come back as the exporter's message,
and a real export through the child (no WebUI needed: the child is `python -m perfusion_ext export`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.webui import export_env
from perfusion_ext.webui.export import ExportRequest, child_args


def test_child_arguments_carry_the_request():
    request = ExportRequest(("teddy", "ring"), "a1111-trt", "fp16", 0.6, None)
    args = child_args(request, Path("/m/sdxl.safetensors"), [Path("/c/teddy.safetensors"), Path("/c/ring.safetensors")],
                      Path("/o/x"), "sdxl-teddy-ring", v_prediction=True)
    assert args[:2] == ["--model", "/m/sdxl.safetensors"]
    assert args.count("--concept") == 2 and "--tau" not in args
    assert args[args.index("--beta") + 1] == "0.6" and args[args.index("--model-name") + 1] == "sdxl-teddy-ring"
    assert args[args.index("--prediction-type") + 1] == "v_prediction" and "--overwrite" in args


def test_probe_findings_become_an_install_list():
    ok = {"ok": True, "version": "1"}
    found = {m: dict(ok) for m in ("torch", "google.protobuf", *export_env.MODULES)}
    assert export_env.missing_requirements(found) == [] and export_env.problems(found) == []
    found["onnx"] = {"ok": False, "error": "ImportError: cannot import name 'runtime_version' from 'google.protobuf'"}
    found["diffusers"] = {"ok": False, "error": "ModuleNotFoundError: No module named 'diffusers'"}
    assert export_env.missing_requirements(found) == ["protobuf", "onnx", "diffusers"]
    assert export_env.problems(found)[0].startswith("onnx: ImportError")


def test_probe_resolves_diffusers_pipelines_not_just_the_package(tmp_path):
    # a diffusers whose pipelines cannot import (in A1111 1.10: 'cannot import name SiglipImageProcessor') passes a
    # bare `import diffusers`; the probe must report it
    fake = tmp_path / "env" / "diffusers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9'\n")
    found = export_env.probe(sys.executable, tmp_path / "env")
    assert not found["diffusers"]["ok"] and "StableDiffusionPipeline" in found["diffusers"]["error"]


def test_ensure_falls_back_to_older_diffusers_until_its_pipelines_import(monkeypatch, tmp_path):
    # as in a real A1111 1.10.1: the newest diffusers and 0.32-0.36 fail beside its transformers/huggingface_hub
    ok = {"ok": True, "version": "1"}
    state = {"diffusers": {"ok": False, "error": "ModuleNotFoundError: No module named 'diffusers'"}}
    installs = []

    def fake_probe(python, env_dir):
        return {**{m: dict(ok) for m in ("torch", "google.protobuf", *export_env.MODULES)}, **state}

    def fake_install(requirements, progress, python, env_dir):
        installs.append(list(requirements))
        good = requirements == ["diffusers>=0.30,<0.32"]
        state["diffusers"] = dict(ok) if good else {"ok": False, "error": "ImportError: cannot import name 'x'"}

    monkeypatch.setattr(export_env, "probe", fake_probe)
    monkeypatch.setattr(export_env, "install", fake_install)
    lines = []
    found = export_env.ensure(lines.append, env_dir=tmp_path)
    assert found["diffusers"]["ok"]
    assert installs == [["protobuf", "diffusers"], *[[f] for f in export_env.DIFFUSERS_FALLBACKS]]
    assert sum("trying diffusers" in line for line in lines) == len(export_env.DIFFUSERS_FALLBACKS)
    state["diffusers"] = {"ok": False, "error": "ModuleNotFoundError: No module named 'diffusers'"}
    monkeypatch.setattr(export_env, "DIFFUSERS_FALLBACKS", ("diffusers<0",))
    with pytest.raises(PerfusionError, match="diffusers: ImportError"):  # none imports: the reason is named
        export_env.ensure(lines.append, env_dir=tmp_path)


def test_probe_in_this_python_and_the_child_path(tmp_path):
    found = export_env.probe(sys.executable, tmp_path / "env")
    assert found["torch"]["ok"] and found["onnx"]["ok"]
    env = export_env.child_env(tmp_path / "env")
    assert env["PYTHONPATH"].split(":")[:3] == [str(tmp_path / "env"), str(export_env.ROOT),
                                                str(export_env.ROOT / "export")]


def test_exporter_refusal_comes_back_as_its_message(tmp_path):
    lines = []
    with pytest.raises(PerfusionError, match="model '.*missing' not found"):
        export_env.run_export(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], lines.append,
                              env_dir=tmp_path / "env")
    assert any("perfusion: error:" in line for line in lines)


@pytest.mark.slow
def test_export_through_the_child_process(tmp_path):
    from conftest import make_concept

    from perfusion_ext.core.concept import save_concept
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    concept = save_concept(make_concept(pipe.unet, family="toy"), tmp_path / "teddy.safetensors")
    lines = []
    export_env.run_export(["--model", str(tmp_path / "model"), "--concept", str(concept), "--out", str(tmp_path / "x"),
                           "--layout", "a1111-trt", "--model-name", "toy-teddy"], lines.append,
                          env_dir=tmp_path / "env")
    manifest = json.loads((tmp_path / "x" / "perfusion_manifest.json").read_text())
    assert manifest["files"]["unet"] == "models/Unet-onnx/toy-teddy.onnx"
    assert manifest["verification"]["unet"]["max_rel"] <= 1e-4
    assert any("exporting the UNet" in line for line in lines)  # the child's progress reached the caller
