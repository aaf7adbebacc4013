"""Concept file format v1: size budget, exact round trip, and the message for every bad file."""
import json
import struct

import pytest
import torch
from conftest import make_concept, tiny_diffusers_unet
from safetensors.torch import save_file

import perfusion_ext as pf
from perfusion_ext.cli import main as cli_main
from perfusion_ext.core.concept import Concept

SD15_OUT = {f"input_blocks.{i}.1.transformer_blocks.0.attn2": w for i, w in
            ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280))}
SD15_OUT["middle_block.1.transformer_blocks.0.attn2"] = 1280
SD15_OUT.update({f"output_blocks.{i}.1.transformer_blocks.0.attn2": w for i, w in
                 ((3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640), (9, 320), (10, 320), (11, 320))})


def sd15_concept(seed=0) -> Concept:
    g = torch.Generator().manual_seed(seed)
    i_star = torch.randn(768, generator=g)
    return Concept(
        name="teddy", token="teddy", superclass="bear", base_family="sd1",
        embeddings={"clip_l": torch.randn(1, 768, generator=g) * 0.02},
        target_input=i_star, target_input_cinv=torch.randn(768, generator=g) * 300 + i_star * 1e3,
        key_targets={k: torch.randn(w, generator=g) for k, w in SD15_OUT.items()},
        value_targets={k: torch.randn(w, generator=g) for k, w in SD15_OUT.items()},
        base_hash="0" * 64,
        metadata={"modelspec.description": "a toy teddy", "perfusion.steps": "400",
                  "perfusion.training": json.dumps({"lr_value": 0.03, "lr_embedding": 0.006, "batch": 16})},
    )


def test_sd15_concept_fits_budget_and_round_trips(tmp_path):
    concept = sd15_concept()
    assert sum(v.numel() for v in concept.value_targets.values()) == 12480
    path = pf.save_concept(concept, tmp_path / "teddy.safetensors")
    size = path.stat().st_size
    assert size <= 64 * 1024, size
    loaded = pf.load_concept(path)
    assert (loaded.name, loaded.token, loaded.superclass, loaded.base_family) == ("teddy", "teddy", "bear", "sd1")
    assert (loaded.beta, loaded.tau) == (0.7, 0.15)
    assert loaded.metadata["modelspec.description"] == "a toy teddy"
    stored = concept.tensors()
    assert stored["target_input"].dtype == torch.float32 and stored["embedding.clip_l"].dtype == torch.float16
    assert torch.equal(loaded.target_input, concept.target_input)
    assert torch.equal(loaded.target_input_cinv, concept.target_input_cinv)
    for layer in SD15_OUT:
        assert torch.equal(loaded.value_targets[layer], concept.value_targets[layer].half().float())
        assert torch.equal(loaded.key_targets[layer], concept.key_targets[layer].half().float())
    assert torch.equal(loaded.embeddings["clip_l"], concept.embeddings["clip_l"].half().float())
    # Saving what was loaded reproduces the same tensor bytes.
    again = pf.save_concept(loaded, tmp_path / "again.safetensors")
    assert pf.tensor_hash(again) == pf.tensor_hash(path)


def test_tensor_hash_ignores_metadata(tmp_path):
    concept = sd15_concept()
    a = pf.save_concept(concept, tmp_path / "a.safetensors")
    concept.metadata["modelspec.description"] = "edited description"
    b = pf.save_concept(concept, tmp_path / "b.safetensors")
    assert a.read_bytes() != b.read_bytes()
    assert pf.tensor_hash(a) == pf.tensor_hash(b)


def test_loaders_accept_bf16_and_fp32_tensors(tmp_path):
    concept = sd15_concept()
    for dtype in (torch.float32, torch.bfloat16):
        tensors = concept.tensors()
        for layer in SD15_OUT:
            tensors[f"layers.{layer}.value_target"] = concept.value_targets[layer].to(dtype)
        path = tmp_path / f"{dtype}.safetensors"
        save_file(tensors, str(path), metadata=concept.file_metadata())
        loaded = pf.load_concept(path)
        layer = next(iter(SD15_OUT))
        assert loaded.value_targets[layer].dtype == torch.float32
        assert torch.equal(loaded.value_targets[layer], concept.value_targets[layer].to(dtype).float())


def test_save_is_atomic(tmp_path, monkeypatch):
    path = pf.save_concept(sd15_concept(), tmp_path / "teddy.safetensors")
    original = path.read_bytes()
    import perfusion_ext.core.atomic as atomic

    def failing_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        pf.save_concept(sd15_concept(seed=1), path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["teddy.safetensors"]


def write_variant(tmp_path, name, tensors=None, metadata=None):
    concept = sd15_concept()
    t = concept.tensors() if tensors is None else tensors(concept.tensors())
    m = concept.file_metadata() if metadata is None else metadata(concept.file_metadata())
    path = tmp_path / name
    save_file(t, str(path), metadata=m)
    return path


def test_truncated_file(tmp_path):
    path = pf.save_concept(sd15_concept(), tmp_path / "teddy.safetensors")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(pf.PerfusionError, match=r"teddy.safetensors is not a readable safetensors file \(truncated or corrupt"):
        pf.load_concept(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(pf.PerfusionError, match="truncated or corrupt"):
        pf.load_concept(path)


def test_missing_file(tmp_path):
    with pytest.raises(pf.PerfusionError, match="does not exist"):
        pf.load_concept(tmp_path / "nope.safetensors")


def test_not_a_concept(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(pf.PerfusionError, match="not a Perfusion concept"):
        pf.load_concept(path)


def test_wrong_format_version(tmp_path):
    path = write_variant(tmp_path, "v2.safetensors", metadata=lambda m: {**m, "perfusion.format_version": "2"})
    with pytest.raises(pf.PerfusionError, match="format version 2; this extension reads version 1"):
        pf.load_concept(path)


def test_missing_required_metadata(tmp_path):
    path = write_variant(tmp_path, "m.safetensors",
                         metadata=lambda m: {k: v for k, v in m.items() if k != "perfusion.superclass"})
    with pytest.raises(pf.PerfusionError, match="lacks required metadata: perfusion.superclass"):
        pf.load_concept(path)


def test_optional_metadata_defaults(tmp_path):
    keep = ("perfusion.format_version", "perfusion.name", "perfusion.token", "perfusion.superclass",
            "perfusion.base_family")
    path = write_variant(tmp_path, "min.safetensors", metadata=lambda m: {k: m[k] for k in keep})
    c = pf.load_concept(path)
    assert (c.beta, c.tau, c.base_hash) == (0.7, 0.15, "")


def test_missing_tensors(tmp_path):
    path = write_variant(tmp_path, "a.safetensors",
                         tensors=lambda t: {k: v for k, v in t.items() if k != "target_input_cinv"})
    with pytest.raises(pf.PerfusionError, match="missing the tensor 'target_input_cinv'"):
        pf.load_concept(path)
    layer = next(iter(SD15_OUT))
    path = write_variant(tmp_path, "b.safetensors",
                         tensors=lambda t: {k: v for k, v in t.items() if k != f"layers.{layer}.value_target"})
    with pytest.raises(pf.PerfusionError, match="without both key and value targets"):
        pf.load_concept(path)
    path = write_variant(tmp_path, "c.safetensors",
                         tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("embedding.")})
    with pytest.raises(pf.PerfusionError, match="needs embeddings for clip_l"):
        pf.load_concept(path)


def test_inconsistent_shapes(tmp_path):
    layer = next(iter(SD15_OUT))
    path = write_variant(tmp_path, "s.safetensors",
                         tensors=lambda t: {**t, f"layers.{layer}.value_target": torch.zeros(3, dtype=torch.float16)})
    with pytest.raises(pf.PerfusionError, match=f"layer {layer} key/value targets must be equal-length"):
        pf.load_concept(path)


def test_nan_values(tmp_path):
    path = write_variant(tmp_path, "n.safetensors",
                         tensors=lambda t: {**t, "target_input": torch.full((768,), float("nan"))})
    with pytest.raises(pf.PerfusionError, match="NaN or infinite"):
        pf.load_concept(path)


def test_wrong_family_for_model(tmp_path):
    unet = tiny_diffusers_unet()
    concept = make_concept(unet, family="sdxl")
    concept.embeddings = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
    path = pf.save_concept(concept, tmp_path / "xl.safetensors")
    loaded = pf.load_concept(path)
    with pytest.raises(pf.PerfusionError, match="trained for sdxl; the loaded model is sd1. Load a sdxl model"):
        with pf.activate(unet, [loaded]):
            pass


def test_wrong_shapes_for_model(tmp_path):
    path = pf.save_concept(sd15_concept(), tmp_path / "teddy.safetensors")
    unet = tiny_diffusers_unet()  # SD1.5 topology, but 32/64-wide projections
    with pytest.raises(pf.PerfusionError, match="has 320 values, the model's projection outputs 32"):
        with pf.activate(unet, [pf.load_concept(path)]):
            pass


def test_inspect_cli(tmp_path, capsys):
    path = pf.save_concept(sd15_concept(), tmp_path / "teddy.safetensors")
    assert cli_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "perfusion.superclass = bear" in text and "layers.middle_block.1.transformer_blocks.0.attn2.value_target" in text
    assert "[1280] float16" in text and "KiB" in text
    assert cli_main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size_bytes"] == path.stat().st_size and len(info["layers"]) == 16
    assert info["tensors"]["target_input_cinv"] == {"shape": [768], "dtype": "float32"}
    path.write_bytes(path.read_bytes()[:100])
    assert cli_main(["inspect", str(path)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
