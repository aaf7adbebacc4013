"""The ONNX exporter: verified parity, layouts' I/O contracts, slots and refit, EOS pooling,
refusals, atomicity, determinism, and ORT generation equal to the PyTorch hooks.

Every export here is of a tiny random model (the toy architecture, and one SD1.5-topology UNet) so the
file runs in a few minutes on one CPU thread; each export is made once per session and shared.
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_concept, tiny_diffusers_unet

from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError

pytest.importorskip("onnxruntime")
from perfusion_export import components, verify
from perfusion_export.bake import SlotEntry
from perfusion_export.exporter import export_pipeline
from perfusion_export.refit import refit


def legacy_eos(pipe):
    """SD1.5's CLIP config carries eos_token_id = 2 (pooling at argmax(input_ids)); mimic it."""
    pipe.text_encoder.config.eos_token_id = 2
    getattr(pipe.text_encoder, "text_model", pipe.text_encoder).eos_token_id = 2
    return pipe


@pytest.fixture(scope="session")
def toy():
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    return legacy_eos(tiny_random_pipeline(0))


@pytest.fixture(scope="session")
def files(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("concepts")
    out = {}
    for seed, name in ((1, "teddy"), (2, "robot")):
        out[name] = save_concept(make_concept(toy.unet, name=name, seed=seed, family="toy"), folder / f"{name}.safetensors")
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def baked(toy, files, exports):
    out = exports / "baked"
    return out, export_pipeline(toy, [files["teddy"]], out)


@pytest.fixture(scope="session")
def base_unet(toy, exports):
    out = exports / "base"
    return out, export_pipeline(toy, [], out, layout="unet-only")


@pytest.fixture(scope="session")
def two_slots(toy, files, exports):
    out = exports / "two"
    return out, export_pipeline(toy, [files["teddy"], files["robot"]], out, layout="unet-only", slots=3)


def unet_run(folder: Path, x, t, e, level="enable_all"):
    info = json.loads((folder / "perfusion_manifest.json").read_text())
    sess = verify.session(folder / info["files"]["unet"], level)
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, (x.numpy(), t.numpy(), e.numpy()))))[0]


def toy_inputs(seed=5, batch=2, tokens=77):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([321.0]), torch.randn(batch, tokens, 128, generator=g)


# ---- verification figures ----------------------------------------------------------------------------

@pytest.mark.slow
def test_baked_export_is_verified_with_numbers(baked):
    folder, info = baked
    v = info["verification"]
    assert len(v["unet"]["per_shape"]) == 6  # 3 shape sets × 2 ORT optimisation levels
    assert {k.split("_")[0] for k in v["unet"]["per_shape"]} == {"b1", "b2", "b3"}
    assert any("t154" in k for k in v["unet"]["per_shape"]) and any("t77" in k for k in v["unet"]["per_shape"])
    assert v["unet"]["max_rel"] <= 1e-4
    assert v["unet"]["concept_effect_rel"] >= 1e-3
    assert v["text_encoder"]["plain_prompts_bit_identical"] is True
    assert v["text_encoder"]["concept_prompts_hidden_rel"] <= 1e-4
    assert max(v["vae"].values()) <= 1e-4
    allowed = verify.allowed_ops()
    assert all(set(ops) <= allowed for ops in v["ops"].values())
    for part in ("unet", "text_encoder", "vae_encoder", "vae_decoder"):
        assert (folder / part / "model.onnx").is_file() and (folder / part / "model.onnx_data").is_file()
        assert (folder / part / "config.json").is_file()
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "model.onnx", "model.onnx_data"]
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


def test_allow_list_is_pinned_with_its_source():
    from importlib import resources

    text = resources.files("perfusion_export").joinpath("data/tensorrt_onnx_ops.txt").read_text()
    assert "onnx/onnx-tensorrt docs/operators.md at commit" in text
    assert {"MatMul", "Sigmoid", "Concat", "Conv", "LayerNormalization"} <= verify.allowed_ops()
    assert "Col2Im" not in verify.allowed_ops()


@pytest.mark.slow
def test_manifest_records_what_was_exported(baked, files):
    from perfusion_ext.core.concept import tensor_hash

    _, info = baked
    (c,) = info["concepts"]
    assert c["name"] == "teddy" and c["token_ids"] == [49408] and c["triggers"] == ["<teddy>"]
    assert c["tensor_sha256"] == tensor_hash(files["teddy"]) and (c["beta"], c["tau"]) == (0.7, 0.15)
    assert info["base_family"] == "toy" and len(info["base_hash"]) == 64
    assert info["layout"] == "optimum" and info["opset"] == 18 and info["precision"] == "fp32"
    assert info["slots"] == {"count": 1, "fixed": False, "initializers": info["slots"]["initializers"]}
    assert "perfusion_gate.weight" in info["slots"]["initializers"]
    assert info["tools"]["onnxruntime"] and info["io"]["unet"]["inputs"][0]["name"] == "sample"


@pytest.mark.slow
def test_no_absolute_paths_or_stack_traces_in_files(baked):
    folder, _ = baked
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix != ".onnx_data":
            data = f.read_bytes()
            assert str(folder.parent).encode() not in data and b"/work/" not in data and b"site-packages" not in data, f


@pytest.mark.slow
def test_gate_is_one_matmul_add_sigmoid_concat(baked, base_unet):
    import onnx

    def ops(folder):
        m = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
        return [n.op_type for n in m.graph.node]

    baked_ops, base_ops = ops(baked[0]), ops(base_unet[0])
    extra = {op: baked_ops.count(op) - base_ops.count(op) for op in set(baked_ops) | set(base_ops)}
    assert {k: v for k, v in extra.items() if v} == {"MatMul": 1, "Add": 1, "Sigmoid": 1, "Concat": 1}


# ---- I/O contracts of the layouts ------------------------------------------------------------------

@pytest.mark.slow
def test_baked_io_equals_base_io(base_unet, two_slots, baked):
    assert verify.io_table(base_unet[0] / "unet/model.onnx") == verify.io_table(two_slots[0] / "unet/model.onnx")
    assert verify.io_table(base_unet[0] / "unet/model.onnx") == verify.io_table(baked[0] / "unet/model.onnx")
    table = verify.io_table(baked[0] / "unet/model.onnx")
    assert [p["name"] for p in table["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert table["inputs"][2]["dims"] == ["batch_size", "sequence_length", 128]
    assert [p["name"] for p in table["outputs"]] == ["out_sample"]
    te = verify.io_table(baked[0] / "text_encoder/model.onnx")
    assert [p["name"] for p in te["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert verify.io_table(baked[0] / "vae_decoder/model.onnx")["inputs"][0]["name"] == "latent_sample"


# ---- text encoder: concept rows and EOS pooling -----------------------------------------------------

@pytest.mark.slow
def test_text_encoder_pools_at_real_eos_and_tokenizer_knows_trigger(baked, toy):
    from transformers import CLIPTokenizer

    folder, info = baked
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    ids = tok(["a photo of <teddy> on the beach"], padding="max_length", max_length=77,
              return_tensors="np").input_ids.astype(np.int32)
    assert 49408 in ids[0].tolist()
    hidden, pooled = verify.session(folder / "text_encoder/model.onnx").run(None, {"input_ids": ids})
    eos = int((ids[0] == toy.tokenizer.eos_token_id).argmax())
    np.testing.assert_array_equal(pooled[0], hidden[0, eos])
    assert not np.allclose(pooled[0], hidden[0, int(ids[0].argmax())])  # the legacy argmax would pick <teddy>
    config = json.loads((folder / "text_encoder/config.json").read_text())
    assert config["eos_token_id"] == 49407 and config["vocab_size"] == 49409


# ---- parity of a multi-concept, SD1.5-topology export in fp16 (a1111-trt layout) --------------------

@pytest.mark.slow
def test_sd1_topology_two_concepts_fp16_a1111_layout(toy, tmp_path):
    unet = tiny_diffusers_unet()
    pipe = types.SimpleNamespace(unet=unet, text_encoder=toy.text_encoder, tokenizer=toy.tokenizer,
                                 scheduler=toy.scheduler, vae=toy.vae)
    concepts = [make_concept(unet, name="a", seed=1), make_concept(unet, name="b", seed=2)]
    info = export_pipeline(pipe, concepts, tmp_path / "sd1", layout="a1111-trt", precision="fp16", model_name="sd15")
    v = info["verification"]
    assert v["unet"]["max_rel"] <= 1e-2 and v["unet"]["concept_effect_rel"] >= 1e-3
    assert set(v["gate_dtypes"].values()) == {"float32"}
    table = verify.io_table(tmp_path / "sd1/models/Unet-onnx/sd15.onnx")
    assert table["inputs"] == [
        {"name": "sample", "dtype": "float32", "dims": ["2B", 4, "H", "W"]},
        {"name": "timesteps", "dtype": "float32", "dims": ["2B"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "dims": ["2B", "77N", 768]}]
    assert table["outputs"] == [{"name": "latent", "dtype": "float32", "dims": ["2B", 4, "H", "W"]}]
    assert (tmp_path / "sd1/models/Unet-onnx/sd15.onnx_data").is_file()


# ---- slots and refit, determinism ------------------------------------------------------------------

@pytest.mark.slow
def test_multi_concept_slots_parity(two_slots):
    v = two_slots[1]["verification"]["unet"]
    assert v["max_rel"] <= 1e-4 and v["concept_effect_rel"] >= 1e-3


@pytest.mark.slow
def test_empty_slots_reproduce_base_and_refit_equals_fresh_export(toy, files, two_slots, base_unet, exports):
    from perfusion_ext.cli import main

    out = exports / "empty"
    export_pipeline(toy, [], out, layout="unet-only", slots=3, verify_export=False)
    x, t, e = toy_inputs()
    for level in verify.LEVELS:
        assert verify.rel(unet_run(out, x, t, e, level), unet_run(base_unet[0], x, t, e, level)) <= 1e-6
    assert main(["export", "refit", str(out), "--concept", str(files["teddy"]), "--slot", "0"]) == 0
    assert main(["export", "refit", str(out), "--concept", str(files["robot"]), "--slot", "1"]) == 0
    fresh = unet_run(two_slots[0], x, t, e)
    assert verify.rel(unet_run(out, x, t, e), fresh) <= 1e-5
    # Two independent exports (one refitted) are byte-identical: graph, weights and kept slot files.
    for name in ("unet/model.onnx", "unet/model.onnx_data", "perfusion_slots/base_kv.safetensors",
                 "perfusion_slots/layers.json", "perfusion_slots/slot0.safetensors", "perfusion_slots/slot1.safetensors"):
        assert filecmp.cmp(out / name, two_slots[0] / name, shallow=False), name
    info = json.loads((out / "perfusion_manifest.json").read_text())
    assert [c["name"] for c in info["concepts"]] == ["teddy", "robot"]


@pytest.mark.slow
def test_refit_refuses_bad_slot_and_non_slot_exports(files, two_slots, baked):
    with pytest.raises(PerfusionError, match="slot 7 does not exist"):
        refit(two_slots[0], files["teddy"], 7)
    with pytest.raises(PerfusionError, match="without --slots"):
        refit(baked[0], files["teddy"], 0)


# ---- refusals and atomicity -----------------------------------------------------------------------

def test_wrong_family_refused_before_writing(toy, tmp_path):
    from perfusion_ext.cli import main

    sd1 = save_concept(make_concept(tiny_diffusers_unet(), name="other", family="sd1"), tmp_path / "other.safetensors")
    with pytest.raises(PerfusionError, match="trained for sd1"):
        export_pipeline(toy, [sd1], tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out2")]) == 2


def test_failed_export_leaves_nothing(toy, files, tmp_path, monkeypatch):
    def broken(unet, entries, n_slots, layout, precision, opset, path, competitive=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(components, "export_unet", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_pipeline(toy, [files["teddy"]], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_options_refused(toy, files, tmp_path):
    with pytest.raises(PerfusionError, match="opset 17"):
        export_pipeline(toy, [], tmp_path / "o", opset=17)
    with pytest.raises(PerfusionError, match="do not fit in 1 slots"):
        export_pipeline(toy, [files["teddy"], files["robot"]], tmp_path / "o", slots=1)
    assert list(tmp_path.iterdir()) == []


# ---- run what you export -------------------------------------------------------------------------

@pytest.mark.slow
def test_ort_generation_matches_torch_hooks(baked, toy, files):
    from perfusion_export.ort_pipeline import generate_onnx
    from perfusion_ext.core.concept import load_concept
    from perfusion_ext.core.hooks import activate
    from perfusion_ext.core.tags import parse_prompt
    from perfusion_ext.core.text import PromptEncoder

    folder, _ = baked
    prompt = "a photo of <perfusion:teddy> on a red background"
    settings = dict(steps=4, guidance_scale=5.0, guidance_rescale=0.7)
    images = generate_onnx(folder, prompt, seed=3, n=2, **settings)
    concept = load_concept(files["teddy"])
    encoder = PromptEncoder(toy.tokenizer, toy.text_encoder)
    segments = parse_prompt(prompt).segments
    enc = encoder.encode([[""], [""], segments, segments], {"teddy": concept.embeddings["clip_l"]})
    with torch.no_grad(), activate(toy.unet, [concept]):
        ref = toy(prompt_embeds=enc.hidden[2:], negative_prompt_embeds=enc.hidden[:2], num_inference_steps=4,
                  guidance_scale=5.0, guidance_rescale=0.7, generator=torch.Generator().manual_seed(3),
                  height=32, width=32, output_type="np").images
    for img, r in zip(images, ref):
        a = np.asarray(img, np.float64) / 255
        b = np.round(np.clip(r, 0, 1) * 255) / 255
        mse = float(np.mean((a - b) ** 2))
        psnr = 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")
        assert psnr >= 40, psnr


@pytest.mark.slow
def test_ort_clause_encoding_equals_the_torch_encoder(toy, files, exports, tmp_path, capsys):
    import json

    from perfusion_export.ort_pipeline import OrtStableDiffusion, encode_clauses, replace_tags
    from perfusion_ext.cli import main as cli_main
    from perfusion_ext.core import clauses
    from perfusion_ext.core.concept import load_concept
    from perfusion_ext.core.tags import parse_prompt
    from perfusion_ext.core.text import PromptEncoder

    folder = exports / "two-optimum"
    info = export_pipeline(toy, [files["teddy"], files["robot"]], folder, verify_export=False)
    assert [c["superclass"] for c in info["concepts"]] == ["bear", "bear"]
    pipe = OrtStableDiffusion(folder)
    prompt = "a <perfusion:teddy> on the left, a <perfusion:robot> on the right, red background"
    text = replace_tags(prompt, pipe.info)
    plain = pipe.encode([text])[0]
    served = encode_clauses(pipe, prompt, pipe.token_ids([text])[0], plain)
    concepts = {n: load_concept(files[n]) for n in ("teddy", "robot")}
    with torch.no_grad():
        reference = clauses.encode_clauses(PromptEncoder(toy.tokenizer, toy.text_encoder), parse_prompt(prompt).segments,
                                           {n: c.embeddings for n, c in concepts.items()},
                                           {n: c.superclass for n, c in concepts.items()}).hidden[0].numpy()
    assert np.abs(served - reference).max() <= 1e-4
    assert np.abs(served - plain).max() > 1e-2
    args = ["generate", "--model", str(folder), "--prompt", prompt, "--steps", "1", "--clause-encoding"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    manifest = json.loads((folder / "perfusion_manifest.json").read_text())
    for c in manifest["concepts"]:
        del c["superclass"]  # an export written before clause-wise encoding
    (folder / "perfusion_manifest.json").write_text(json.dumps(manifest))
    assert cli_main(args + ["--out", str(tmp_path / "b")]) != 0
    assert "export it again to use --clause-encoding" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_generate_samples_an_export_with_ort(baked, tmp_path, capsys):
    from perfusion_ext.cli import main as cli_main

    folder, _ = baked
    code = cli_main(["generate", "--model", str(folder), "--prompt", "a <perfusion:teddy> <perfusion:ghost> on the left",
                     "--steps", "2", "--out", str(tmp_path)])
    assert code == 0
    assert len(list(tmp_path.glob("*.png"))) == 1
    assert "'ghost' is not baked into this export" in capsys.readouterr().err


@pytest.mark.slow
def test_two_exports_of_the_same_inputs_are_byte_identical(toy, files, two_slots, tmp_path):
    first, _ = two_slots
    second = tmp_path / "again"
    export_pipeline(toy, [files["teddy"], files["robot"]], second, layout="unet-only", slots=3)
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.slow
def test_competitive_gates_are_baked_and_verified(toy, files, two_slots, exports):
    out = exports / "competitive"
    info = export_pipeline(toy, [files["teddy"], files["robot"]], out, layout="unet-only", slots=3,
                           competitive_gates=True)
    assert info["competitive_gates"] is True and two_slots[1]["competitive_gates"] is False
    v = info["verification"]["unet"]  # ORT against the hooks with competitive gates, every shape and level
    assert v["max_rel"] <= 1e-4 and v["concept_effect_rel"] >= 1e-3
    # the verifier's inputs mix the concepts' i* at some tokens: there the two graphs differ
    from perfusion_ext.core.concept import load_concept

    teddy, robot = (load_concept(files[n]).target_input.float() for n in ("teddy", "robot"))
    x, t, e = toy_inputs()
    e[:, 1], e[:, 2] = teddy, 0.6 * teddy + 0.5 * robot
    assert verify.rel(unet_run(out, x, t, e), unet_run(two_slots[0], x, t, e)) > 1e-4
    import onnx

    ops = [n.op_type for n in onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph.node]
    assert {"ReduceMax", "Equal"} <= set(ops)


@pytest.mark.slow
def test_competitive_gates_with_different_betas_bake_the_similarity_rule_and_refit(toy, files, exports):
    """With β 0.9 and 0.2 a token near both concepts has its most open gate on the one it is less similar to:
    the ONNX graph must pick the similar one, as the hooks do, also after a refit changes a slot's β."""
    from perfusion_ext.cli import main
    from perfusion_ext.core.concept import load_concept
    from perfusion_ext.core.gated_edit import gate_edit

    teddy, robot = (dataclasses.replace(load_concept(files[n]), beta=b) for n, b in (("teddy", 0.9), ("robot", 0.2)))
    out = exports / "competitive_betas"
    info = export_pipeline(toy, [teddy, robot], out, layout="unet-only", slots=3, competitive_gates=True)
    assert info["verification"]["unet"]["max_rel"] <= 1e-4
    x, t, e = toy_inputs()
    e[:, 1] = 0.8 * teddy.target_input.float() + 0.3 * robot.target_input.float()
    edit = gate_edit([(teddy, 0.9, 0.15), (robot, 0.2, 0.15)])
    s, gates = edit.similarity(e[0, 1]), edit.gate(edit.similarity(e[0, 1]))
    assert s[0] > s[1] and gates[1] > gates[0]  # a token where the two rules disagree
    entries = [SlotEntry(0, teddy, 1.0, 0.9, 0.15), SlotEntry(1, robot, 1.0, 0.2, 0.15)]
    ref = verify.torch_unet(toy.unet, x, t, e, entries, competitive=True)
    assert verify.rel(unet_run(out, x, t, e), ref) <= 1e-4
    # a refit that gives the robot β 0.95 moves its τ/β initializers with it
    assert main(["export", "refit", str(out), "--concept", str(files["robot"]), "--slot", "1", "--beta", "0.95"]) == 0
    entries[1] = SlotEntry(1, load_concept(files["robot"]), 1.0, 0.95, 0.15)
    ref = verify.torch_unet(toy.unet, x, t, e, entries, competitive=True)
    assert verify.rel(unet_run(out, x, t, e), ref) <= 1e-4
