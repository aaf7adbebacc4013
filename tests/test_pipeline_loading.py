"""Model loading: folders, refusals (pickles, the SDXL refiner, junk), single-file family detection."""
import json

import pytest
import torch
from safetensors.torch import save_file

import perfusion_ext as pf
from perfusion_ext.pipelines.loading import load_pipeline
from perfusion_ext.pipelines.single_file import config_folder, detect_family
from perfusion_ext.toy.plugin import tiny_random_pipeline


def test_diffusers_folder_round_trip(tmp_path):
    pipe = tiny_random_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(tmp_path / "model")
    ids = torch.tensor([[49406, 320, 736, 49407]])
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)


def test_refusals(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(pf.PerfusionError, match="pickle checkpoint; this tool never loads pickles"):
        load_pipeline(tmp_path / "model.ckpt")
    with pytest.raises(pf.PerfusionError, match="not found"):
        load_pipeline(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pf.PerfusionError, match="not a diffusers pipeline"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(pf.PerfusionError, match="not a readable safetensors checkpoint"):
        load_pipeline(tmp_path / "junk.safetensors")


def test_single_file_family_detection(tmp_path):
    def fake(keys):
        path = tmp_path / f"{len(keys)}-{keys[0][:8]}.safetensors"
        save_file({k: torch.zeros(1) for k in keys}, str(path))
        return path

    assert detect_family(fake(["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])) == "sd1"
    assert detect_family(fake(["cond_stage_model.model.token_embedding.weight"])) == "sd2"
    assert detect_family(fake(["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"])) == "sdxl"
    with pytest.raises(pf.PerfusionError, match="SDXL refiner"):
        detect_family(fake(["conditioner.embedders.0.model.token_embedding.weight"]))
    with pytest.raises(pf.PerfusionError, match="does not look like an SD1/SD2/SDXL"):
        detect_family(fake(["model.diffusion_model.x", "other"]))


def test_offline_config_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path))
    from diffusers import UNet2DConditionModel

    for family, width in (("sd1", 768), ("sd2", 1024), ("sdxl", 2048)):
        folder = config_folder(family)
        assert (folder / "tokenizer" / "vocab.json").is_file()
        assert UNet2DConditionModel.load_config(folder / "unet")["cross_attention_dim"] == width
    xl = config_folder("sdxl")
    index = json.loads((xl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((xl / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert json.loads((xl / "text_encoder_2" / "config.json").read_text())["hidden_size"] == 1280
