"""Serving a concept library: the library math, the per-request pipeline, refit, and a real Triton server.

The library UNet must equal the PyTorch hooks for any active subset (exactly the multi-concept edit);
a request through the repository must give the image `perfusion generate` gives; a refit must equal a
fresh export; and on a real tritonserver (the nvidia-pytriton wheel that dev/triton.sh installs; the
tests skip with a message where it cannot start) concurrent requests with different concepts are batched
together and each answer equals the request run alone.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_concept

from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.gated_edit import stack_edit
from perfusion_ext.core.hooks import ResolvedConcept

pytest.importorskip("onnxruntime")
from perfusion_export import onnx_io
from perfusion_export.bake import SlotEntry
from perfusion_export.serving import library

PROMPTS = ("a photo of <perfusion:teddy> on a red background",
           "<perfusion:robot:0.7:beta=0.6> left of <perfusion:teddy>",
           "a white square on a blue background",
           "a <perfusion:teddy:beta=0.8@0,0.6@0.5> in the middle")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) / 255 ** 2
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture(scope="module")
def toy():
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    return tiny_random_pipeline(0)


@pytest.fixture(scope="module")
def concept_dir(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("concepts")
    for seed, name in ((1, "teddy"), (2, "robot"), (3, "kite")):
        save_concept(make_concept(toy.unet, name=name, seed=seed, family="toy"), folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def repo(toy, concept_dir, tmp_path_factory):
    from perfusion_export.serving.repository import export_library

    out = tmp_path_factory.mktemp("triton") / "repo"
    info = export_library(toy, [concept_dir / "teddy.safetensors", concept_dir / "robot.safetensors"], out,
                          n_slots=4, backend="python", pipeline_instances=3)
    return out, info


def test_library_weight_equals_the_multi_concept_edit_for_any_subset(toy, concept_dir):
    """[e | c_o | c_a] @ [Wᵀ; O*; −(W I*)ᵀ] = W e + Σ_S w (g o* − α W i*), float64, for every subset and strength."""
    from perfusion_ext.core.concept import load_concept
    from perfusion_ext.core.layers import cross_attention_layers

    concepts = [load_concept(concept_dir / f"{n}.safetensors") for n in ("teddy", "robot", "kite")]
    layers = cross_attention_layers(toy.unet)
    name, layer = next(iter(layers.items()))
    entries = [SlotEntry(slot, c, 1.0, c.beta, c.tau) for slot, c in zip((0, 2, 3), concepts)]
    n = 5
    weight = layer.to_v.weight.double()
    lib = library.library_weight(weight, name, "value", entries, n)
    assert lib.shape == (weight.shape[1] + 2 * n, weight.shape[0])
    assert torch.count_nonzero(lib[weight.shape[1] + 1]) == 0  # empty slot 1: zero rows
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 9, weight.shape[1], generator=g, dtype=torch.float64)
    e[:, 2] = concepts[0].target_input.double()
    e[:, 5] = concepts[2].target_input.double()
    e[:, 7] = 0.6 * concepts[0].target_input.double() + 0.5 * concepts[1].target_input.double()  # near two
    for (subset, strength), competitive in itertools.product(
            (([0], 1.0), ([1, 2], 0.6), ([0, 1, 2], 1.3), ([], 1.0)), (False, True)):
        active = [(entries[k].slot, ResolvedConcept(concepts[k], strength, 0.6 + 0.1 * k, 0.1 + 0.05 * k))
                  for k in subset]
        channels = library.coefficient_channels(e, active, n, competitive=competitive).double()
        assert torch.count_nonzero(channels[..., [s for s in range(n) if s not in {a[0] for a in active}]]) == 0
        ours = torch.cat([e, channels], dim=-1) @ lib
        ref = e @ weight.T
        if active:
            edit = stack_edit([(r.concept, r.strength, r.beta, r.tau) for _, r in active], "value", name,
                              competitive=competitive)
            ref = ref + edit.delta(e, weight)
        rel = float(((ours - ref).norm() / ref.norm()).detach())
        assert rel < 1e-6, (subset, competitive, rel)  # channels are fp32; everything else float64


def model_config_parser():
    """tritonclient's ModelConfig protobuf (its grpc package refuses to import without grpcio, the file itself
    needs only protobuf): the schema Triton reads config.pbtxt with."""
    import importlib.util

    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_every_config_parses_with_tritons_schema(backend, tmp_path):
    from google.protobuf import text_format

    from perfusion_export.serving.triton_config import write_repository

    write_repository(tmp_path, backend, {"text": 128, "context": 160, "latent": 4, "image": 3}, 3,
                     tensorrt=backend == "onnxruntime")
    model_config = model_config_parser()
    configs = {m: text_format.Parse((tmp_path / m / "config.pbtxt").read_text(), model_config())
               for m in ("text_encoder", "unet", "vae_decoder", "pipeline")}
    for name in ("text_encoder", "unet", "vae_decoder"):
        c = configs[name]
        assert c.name == name and c.max_batch_size > 0 and c.HasField("dynamic_batching")
        assert (c.platform, c.backend) == (("onnxruntime_onnx", "") if backend == "onnxruntime" else ("", "python"))
        assert (tmp_path / name / "1" / "model.py").is_file() == (backend == "python")
    assert [i.name for i in configs["unet"].input] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(configs["unet"].input[2].dims) == [-1, 160]
    accelerators = [[a.name for a in configs[m].optimization.execution_accelerators.gpu_execution_accelerator]
                    for m in ("text_encoder", "unet", "vae_decoder")]
    assert accelerators == ([["tensorrt"], ["tensorrt"], []] if backend == "onnxruntime" else [[], [], []])
    timestep = configs["unet"].input[1]
    assert list(timestep.dims) == [1] and timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    pipeline = configs["pipeline"]
    assert pipeline.backend == "python" and pipeline.instance_group[0].count == 3
    assert [(i.name, i.optional) for i in pipeline.input][:2] == [("prompt", False), ("negative_prompt", True)]
    assert pipeline.output[0].name == "image" and list(pipeline.output[0].dims) == [-1, -1, 3]


@pytest.mark.slow
def test_repository_layout_and_verified_parity(repo):
    folder, info = repo
    for model in ("text_encoder", "unet", "vae_decoder", "pipeline"):
        assert (folder / model / "config.pbtxt").is_file()
        assert (folder / model / "1" / "model.py").is_file()
    assert 'backend: "python"' in (folder / "unet" / "config.pbtxt").read_text()
    assert "dynamic_batching" in (folder / "unet" / "config.pbtxt").read_text()
    assert "count: 3" in (folder / "pipeline" / "config.pbtxt").read_text()
    assert info["verification"]["unet"]["max_rel"] < 1e-4
    assert set(info["verification"]["unet"]["per_set"]) == {"none@1.0", "teddy@0.6", "robot@1.0", "teddy+robot@0.6"}
    lib = json.loads((folder / "pipeline" / "library" / "library.json").read_text())
    assert lib["slots"] == 4 and [c["name"] for c in lib["concepts"]] == ["teddy", "robot"]
    width = onnx_io.load(folder / "unet" / "1" / "model.onnx").graph.inputs[2].shape[2]
    assert width == 128 + 2 * 4


@pytest.mark.slow
def test_local_pipeline_equals_perfusion_generate(repo, toy, concept_dir):
    from perfusion_export.serving.runtime import local_pipeline
    from perfusion_ext.pipelines.generate import generate

    lib = local_pipeline(repo[0], threads=1)
    images = {}
    for prompt in PROMPTS:
        images[prompt] = lib.generate(prompt, seed=3, steps=4)
        ref, _ = generate(toy, prompt, concepts_dir=concept_dir, seed=3, num_inference_steps=4)
        assert images[prompt].shape == (32, 32, 3)
        assert psnr(images[prompt], np.asarray(ref[0])) >= 40, prompt
    plain = lib.generate("a photo of a bear on a red background", seed=3, steps=4)
    assert psnr(images[PROMPTS[0]], plain) < 40  # the concept changes the image


@pytest.mark.slow
def test_a_library_with_competitive_gates_serves_what_generate_draws_with_them(toy, concept_dir, tmp_path):
    from perfusion_export.serving.repository import export_library
    from perfusion_export.serving.runtime import local_pipeline
    from perfusion_ext.pipelines.generate import generate

    out = tmp_path / "repo"
    info = export_library(toy, [concept_dir / "teddy.safetensors", concept_dir / "robot.safetensors"], out,
                          n_slots=3, backend="python", pipeline_instances=1, competitive_gates=True)
    assert info["competitive_gates"] is True and info["verification"]["unet"]["max_rel"] <= 1e-4
    lib = local_pipeline(out, threads=1)
    served = lib.generate(PROMPTS[1], seed=3, steps=4)
    ref, _ = generate(toy, PROMPTS[1], concepts_dir=concept_dir, seed=3, num_inference_steps=4, competitive_gates=True)
    assert psnr(served, np.asarray(ref[0])) >= 40


@pytest.mark.slow
def test_a_library_with_clause_encoding_reads_each_clause_as_the_torch_encoder(repo, toy, concept_dir):
    from perfusion_export.serving.runtime import local_pipeline
    from perfusion_ext.core.clauses import encode_clauses
    from perfusion_ext.core.concept import load_concept
    from perfusion_ext.core.text import PromptEncoder

    lib = local_pipeline(repo[0], threads=1)
    prompt = "a <perfusion:teddy> on the left, a <perfusion:robot> on the right, red background"
    segments, _, ids = lib.active_concepts(prompt)
    concepts = {n: load_concept(concept_dir / f"{n}.safetensors") for n in ("teddy", "robot")}
    encoder = PromptEncoder(toy.tokenizer, toy.text_encoder)
    with torch.no_grad():
        reference = encode_clauses(encoder, segments, {n: c.embeddings for n, c in concepts.items()},
                                   {n: c.superclass for n, c in concepts.items()}).hidden[0].numpy()
    plain = lib.encode(segments, "", ids)
    lib.info["clause_encoding"] = True  # what `perfusion export --layout triton --clause-encoding` writes
    served = lib.encode(segments, "", ids)
    assert np.abs(served[1] - reference).max() <= 1e-4
    assert np.abs(served[1] - plain[1]).max() > 1e-2  # the robot's clause changed
    assert np.array_equal(served[0], plain[0])  # the negative prompt is its own


@pytest.mark.slow
def test_bad_requests_get_clear_errors(repo):
    from perfusion_export.serving.runtime import local_pipeline

    lib = local_pipeline(repo[0], threads=1)
    for kwargs, message in ((dict(prompt="a <perfusion:ghost>"), "unknown concept 'ghost': this library holds robot, teddy"),
                            (dict(prompt="a <perfusion:teddy:beta=x>"), "beta"),
                            (dict(prompt="a cat", steps=0), "steps must be between 1 and 200"),
                            (dict(prompt="a cat", width=30), "width must be a positive multiple of 8"),
                            (dict(prompt="a cat", guidance=float("nan")), "guidance must be a finite number")):
        with pytest.raises(PerfusionError, match=message):
            lib.generate(**kwargs)


@pytest.mark.slow
def test_refit_into_a_free_slot_equals_a_fresh_export(repo, toy, concept_dir, tmp_path):
    import shutil

    from perfusion_export.serving.refit import refit_library
    from perfusion_export.serving.repository import export_library

    refitted = tmp_path / "refitted"
    shutil.copytree(repo[0], refitted)
    with pytest.raises(PerfusionError, match="slot 9 does not exist"):
        refit_library(refitted, concept_dir / "kite.safetensors", 9)
    with pytest.raises(PerfusionError, match="already occupies another slot"):
        refit_library(refitted, concept_dir / "teddy.safetensors", 2)
    refit_library(refitted, concept_dir / "kite.safetensors", 2)
    fresh = tmp_path / "fresh"
    export_library(toy, [concept_dir / f"{n}.safetensors" for n in ("teddy", "robot", "kite")], fresh, n_slots=4,
                   backend="python", pipeline_instances=3, verify_export=False)
    for part in ("unet", "text_encoder"):
        a = onnx_io.load(refitted / part / "1" / "model.onnx").graph.initializers
        b = onnx_io.load(fresh / part / "1" / "model.onnx").graph.initializers
        for name in b:
            assert np.array_equal(a[name].const_value.numpy(), b[name].const_value.numpy()), name
    assert json.loads((refitted / "pipeline/library/library.json").read_text())["concepts"] == \
        json.loads((fresh / "pipeline/library/library.json").read_text())["concepts"]


@pytest.mark.slow
def test_cli_generate_runs_a_repository_locally(repo, tmp_path):
    from perfusion_ext.cli import main as cli_main

    code = cli_main(["generate", "--model", str(repo[0]), "--prompt", "a <perfusion:robot> on the left",
                     "--steps", "2", "--n", "2", "--out", str(tmp_path)])
    assert code == 0 and len(list(tmp_path.glob("*.png"))) == 2


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    from perfusion_export.serving import server as triton

    try:
        triton.find_install()
    except PerfusionError as exc:
        pytest.skip(f"tritonserver cannot start here: {exc}")
    ports = triton.Ports(*free_ports(3))
    log_path = tmp_path_factory.mktemp("triton_log") / "server.log"
    with open(log_path, "w") as log:
        process = triton.start(repo[0], ports, threads=1, log=log)
        url = f"http://localhost:{ports.http}"
        try:
            triton.wait_ready(process, url, timeout=300)
        except PerfusionError as exc:
            triton.stop(process)
            pytest.skip(f"tritonserver did not start: {exc}; log: {log_path.read_text()[-2000:]}")
        yield url
        started = time.monotonic()
        assert triton.stop(process) == 0
        assert time.monotonic() - started < 30


def infer(url: str, prompt: str, **settings) -> np.ndarray:
    """One request through tritonclient's HTTP client (what a customer's code runs)."""
    import tritonclient.http as http

    types = {"seed": ("INT64", np.int64), "steps": ("INT32", np.int32), "guidance": ("FP32", np.float32)}
    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=600, connection_timeout=600)
    inputs = [http.InferInput("prompt", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    for key, value in settings.items():
        datatype, dtype = types[key]
        tensor = http.InferInput(key, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        inputs.append(tensor)
    try:
        return client.infer("pipeline", inputs).as_numpy("image")
    finally:
        client.close()  # an open keep-alive connection would hold the server's shutdown for its exit timeout


@pytest.mark.slow
def test_triton_batches_requests_with_different_concepts_exactly(server, repo, concept_dir):
    pytest.importorskip("tritonclient.http")
    from perfusion_export.serving.refit import refit_library
    from perfusion_export.serving.runtime import local_pipeline
    from perfusion_export.serving.server import model_statistics
    from perfusion_ext.core.errors import PerfusionError as Error

    before = model_statistics(server, "unet")
    requests = [(p, 11 + i) for i, p in enumerate(PROMPTS)] + [("a <perfusion:ghost> on the left", 1)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = {pool.submit(infer, server, p, seed=s, steps=4): (p, s) for p, s in requests}
        answers = {}
        for future in concurrent.futures.as_completed(futures):
            try:
                answers[futures[future]] = future.result()
            except Exception as exc:  # noqa: BLE001 — the unknown concept's error, checked below
                answers[futures[future]] = exc
    ghost = answers.pop(requests[-1])
    assert "unknown concept 'ghost'" in str(ghost) and "400" in str(ghost.status())  # the client's error
    alone = local_pipeline(repo[0], threads=1)
    for (prompt, seed), image in answers.items():
        assert psnr(image, alone.generate(prompt, seed=seed, steps=4)) >= 40, prompt
    after = model_statistics(server, "unet")
    rows = after["inference_count"] - before["inference_count"]
    calls = after["execution_count"] - before["execution_count"]
    assert rows == 4 * 4 * 2  # 4 good requests x 4 steps x [negative; positive]
    assert calls < rows / 2, (rows, calls)  # rows from different requests shared UNet calls

    # refit under load: a concept goes into free slot 2 while requests run; none is lost
    work = dict(enumerate(PROMPTS[:3]))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = [pool.submit(infer, server, p, seed=5, steps=4) for p in work.values()]
        refit_library(repo[0], concept_dir / "kite.safetensors", 2, server=server)
        assert all(f.result().shape == (32, 32, 3) for f in running)
    kite = infer(server, "a <perfusion:kite> on a blue background", seed=2, steps=4)
    assert psnr(kite, local_pipeline(repo[0], threads=1).generate("a <perfusion:kite> on a blue background",
                                                                  seed=2, steps=4)) >= 40
    with pytest.raises(Error):
        local_pipeline(repo[0], threads=1).generate("a <perfusion:ghost>")


def test_serve_refuses_a_folder_that_is_not_a_triton_repository(tmp_path):
    from perfusion_export.serving.server import check_repository

    with pytest.raises(PerfusionError, match="not a Perfusion export"):
        check_repository(tmp_path)
    (tmp_path / "perfusion_manifest.json").write_text(json.dumps({"layout": "optimum"}))
    with pytest.raises(PerfusionError, match="serve a repository written by `perfusion export --layout triton`"):
        check_repository(Path(tmp_path))
