"""The committed toy model: size budget, loading, and one short generation read back by the checkers."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import perfusion_ext as pf
from perfusion_ext.cli import main as cli_main
from perfusion_ext.toy import checkers
from perfusion_ext.toy.model import MODEL_DIR
from perfusion_ext.toy.plugin import PLUGIN

pytestmark = pytest.mark.skipif(not PLUGIN.model_ready(), reason="the toy model is not committed yet")


def test_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert total <= 30 * 1024 * 1024, total


def test_the_whole_model_folder_stays_under_30_mb():
    """Everything a WebUI install downloads for the toy model: weights, configs and the tokenizer files."""
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 30_000_000, total


def test_loads_and_denoises():
    pipe = pf.load_pipeline("toy")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids).last_hidden_state
        out = pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor([999]), encoder_hidden_states=context).sample
    assert context.shape == (1, 77, 128) and out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_cli_generation_is_read_back_by_the_checkers(tmp_path):
    assert cli_main(["generate", "--model", "toy", "--prompt", "a red triangle on the left, green background",
                     "--out", str(tmp_path)]) == 0
    image = np.asarray(Image.open(tmp_path / "000000-00.png"))
    assert image.shape == (32, 32, 3)
    assert checkers.read(image) == checkers.Reading("green", "red", "triangle", "left")
