"""The WebUI training backend against a tiny stand-in of A1111's loaded ldm model (no WebUI in CI).

The stand-in has the attributes the backend uses, with the WebUI's semantics: a text wrapper with
`tokenize` / `encode_with_transformers` / `id_start/id_end/id_pad` around a transformers CLIPTextModel
whose token embedding is wrapped like the WebUI's EmbeddingsWithFixes, and ldm's q_sample/get_v
formulas, encode_first_stage/get_first_stage_encoding and apply_model around a real ldm UNetModel.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import tiny_ldm_unet
from PIL import Image

from perfusion_ext import load_concept
from perfusion_ext.core.tags import ConceptTag
from perfusion_ext.webui.backend import WebuiLdmBackend


class EmbeddingsWithFixes(torch.nn.Module):  # what the WebUI puts around the token table
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class FakeClipWrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from perfusion_ext.toy import model as toy_model

        torch.manual_seed(0)
        tokenizer = CLIPTokenizer.from_pretrained(toy_model.MODEL_DIR / "tokenizer")
        transformer = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        transformer.set_input_embeddings(EmbeddingsWithFixes(transformer.get_input_embeddings()))
        self.wrapped = types.SimpleNamespace(tokenizer=tokenizer, transformer=transformer)
        self.transformer = transformer
        self.id_start, self.id_end, self.id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        return self.transformer(input_ids=tokens).last_hidden_state


class Wrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class FakeLatentDiffusion(torch.nn.Module):
    def __init__(self, parameterization="eps"):
        super().__init__()
        self.model = Wrapper(tiny_ldm_unet())
        self.cond_stage_model = FakeClipWrapper()
        torch.manual_seed(1)
        self.first_stage_model = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.parameterization = parameterization
        self.num_timesteps = 1000
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.register_buffer("sqrt_alphas_cumprod", ac.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - ac).sqrt().float())
        self.is_sdxl = False

    def _at(self, buf, t, x):
        return buf[t].view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x_start, t, noise=None):
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def get_v(self, x, noise, t):
        return self._at(self.sqrt_alphas_cumprod, t, x) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x) * x

    def encode_first_stage(self, x):
        return self.first_stage_model(x)

    def get_first_stage_encoding(self, z):
        return 0.18215 * z

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond)


@pytest.fixture(scope="module")
def sd_model():
    return FakeLatentDiffusion().eval()


@pytest.fixture(scope="module")
def backend(sd_model):
    sd_model.requires_grad_(False)
    return WebuiLdmBackend(sd_model)


def test_family_and_refusals(backend, sd_model):
    assert backend.family == "sd1" and backend.encoder_names == ("clip_l",)
    with pytest.raises(Exception, match="No Stable Diffusion checkpoint"):
        WebuiLdmBackend(None)
    xl = types.SimpleNamespace(is_sdxl=True)
    with pytest.raises(Exception, match="SDXL"):
        WebuiLdmBackend(xl)


def test_tokens_and_embedding_rows(backend, sd_model):
    ids = backend.word_token_ids("bear")
    assert len(ids) == 1
    table = sd_model.cond_stage_model.transformer.get_input_embeddings().wrapped.weight
    assert torch.equal(backend.token_embedding(ids[0])["clip_l"][0], table[ids[0]])


def test_encode_prompts_puts_concept_vector_at_tag_with_gradient(backend, sd_model):
    vec = torch.nn.Parameter(torch.randn(1, 768))
    tag = ConceptTag("teddy")
    enc = backend.encode_prompts([["a photo of a ", tag, " on the beach"], ["plain"]], {"teddy": {"clip_l": vec}})
    assert enc.hidden.shape == (2, 77, 768)
    pos = enc.concept_positions[0]["teddy"]
    assert pos == [5]  # BOS a photo of a -> position 5
    assert enc.concept_positions[1] == {}
    # same as the WebUI's own encoder with that vector written into the table row of a real token
    clip = sd_model.cond_stage_model
    ids = clip.tokenize(["a photo of a bear on the beach"])[0]
    full = [clip.id_start] + ids + [clip.id_end] * (77 - len(ids) - 1)
    table = clip.transformer.get_input_embeddings().wrapped.weight
    bear = backend.word_token_ids("bear")[0]
    saved = table[bear].clone()
    with torch.no_grad():
        table[bear] = vec.detach()[0]
        ref = clip.encode_with_transformers(torch.tensor([full]))
        table[bear] = saved
    torch.testing.assert_close(enc.hidden[0], ref[0], rtol=1e-5, atol=1e-5)
    (enc.hidden[0, pos[0]] * torch.randn(768)).sum().backward()  # (a plain sum of a LayerNorm output is constant)
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert table.grad is None  # the text encoder is never trained


def test_latents_noise_targets_and_prediction(sd_model):
    backend = WebuiLdmBackend(sd_model)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    lat = backend.encode_images(images)
    assert lat.shape == (2, 4, 8, 8)
    noise = torch.randn_like(lat)
    t = torch.tensor([10, 900])
    noisy = backend.add_noise(lat, noise, t)
    a, s = sd_model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1), sd_model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a * lat + s * noise)
    assert torch.equal(backend.target(lat, noise, t), noise)
    sd_model.parameterization = "v"
    try:
        torch.testing.assert_close(backend.target(lat, noise, t), a * noise - s * lat)
    finally:
        sd_model.parameterization = "eps"
    ctx = torch.randn(2, 77, 768, requires_grad=True)
    pred = backend.predict(noisy, t, ctx)
    assert pred.shape == lat.shape
    pred.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert backend.num_train_timesteps == 1000


def test_text_covariance_is_spd(backend):
    cov = backend.text_covariance()
    assert cov.shape == (768, 768) and cov.dtype == torch.float64
    torch.linalg.cholesky(cov)


def test_trainer_runs_on_webui_backend(tmp_path, backend):
    from perfusion_ext.training import TrainCallbacks, TrainConfig, train

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    seen = []
    cfg = TrainConfig(name="teddy", superclass="bear", steps=2, batch_size=2, micro_batch=1, resolution=64,
                      checkpoint_every=2, preview_every=0)
    result = train(backend, cfg, images, tmp_path / "out", callbacks=TrainCallbacks(on_progress=seen.append))
    assert result.status == "finished" and [p.step for p in seen] == [1, 2]
    concept = load_concept(result.concept_path)
    assert concept.base_family == "sd1" and len(concept.layers) == 16 and concept.embeddings["clip_l"].shape == (1, 768)
