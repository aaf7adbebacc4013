"""The WebUI's SDXL training backend (`WebuiSgmBackend`) against stand-ins of the sgm model A1111 holds
(`sgm_standins.py`), loaded from a tiny single-file SDXL checkpoint that also loads as a diffusers pipeline, so
every number is compared with two references on the same weights: A1111's own generation path (the stand-in's
get_learned_conditioning) and the command line tool's diffusers backend. No WebUI in CI.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from sgm_standins import engine_from_single_file
from tiny_families import sdxl_single_file, small_covariance_corpus, tiny_sdxl_pipeline

from perfusion_ext import load_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.layers import cross_attention_layers
from perfusion_ext.core.tags import ConceptTag
from perfusion_ext.pipelines import single_file
from perfusion_ext.pipelines.backend import DiffusersBackend
from perfusion_ext.pipelines.encoding import time_ids as diffusers_time_ids
from perfusion_ext.webui.backend import WebuiLdmBackend
from perfusion_ext.webui.sgm_backend import WebuiSgmBackend

PROMPTS = ["a photo of a dog on the beach", "", "a red dog and a blue cat, highly detailed, 4k",
           " ".join(["a small red house near the river"] * 14)]  # 98 words: two 75-token windows


small_corpus = pytest.fixture(scope="module", autouse=True)(small_covariance_corpus)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(tiny diffusers pipeline, its sgm single file, that file loaded by the CLI's loader)."""
    from perfusion_ext.pipelines.loading import load_pipeline

    tmp = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl_pipeline(tmp / "tok", transformer_layers=(1, 1, 1))
    pipe.save_pretrained(tmp / "configs")
    path = sdxl_single_file(tmp / "xl.safetensors", pipe)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(single_file, "config_folder", lambda family: tmp / "configs")
        loaded = load_pipeline(path)
    return pipe, path, loaded


def make_engine(files, parameterization="eps"):
    pipe, path, _ = files
    return engine_from_single_file(path, pipe.tokenizer, pipe.text_encoder.config,
                                   heads_g=pipe.text_encoder_2.config.num_attention_heads,
                                   time_dim=pipe.unet.config.addition_time_embed_dim, parameterization=parameterization)


@pytest.fixture(scope="module")
def engine(files):
    return make_engine(files)


@pytest.fixture(scope="module")
def backend(engine):
    return WebuiSgmBackend(engine)


@pytest.fixture(scope="module")
def reference(files):
    return DiffusersBackend(files[2])


def size_ids(n, height, width):
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(n, 6)


def test_family_tables_and_refusals(backend, engine):
    assert backend.family == "sdxl" and backend.encoder_names == ("clip_l", "clip_g")
    dog = backend.word_token_ids("dog")
    assert len(dog) == 1
    rows = backend.token_embedding(dog[0])
    l_table = engine.conditioner.embedders[0].wrapped.transformer.get_input_embeddings().wrapped.weight
    g_table = engine.conditioner.embedders[1].wrapped.model.token_embedding.wrapped.weight
    assert torch.equal(rows["clip_l"][0], l_table[dog[0]]) and torch.equal(rows["clip_g"][0], g_table[dog[0]])
    with pytest.raises(PerfusionError, match="No Stable Diffusion checkpoint"):
        WebuiSgmBackend(None)
    with pytest.raises(PerfusionError, match="Forge cannot train"):
        WebuiSgmBackend(types.SimpleNamespace(forge_objects=object(), is_sdxl=True))
    inpaint = types.SimpleNamespace(is_sdxl=True, conditioner=engine.conditioner,
                                    model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(in_channels=9)))
    with pytest.raises(PerfusionError, match="9 input channels.*inpainting"):
        WebuiSgmBackend(inpaint)
    with pytest.raises(PerfusionError, match="not SDXL"):
        WebuiSgmBackend(types.SimpleNamespace(cond_stage_model=object()))
    with pytest.raises(PerfusionError, match="SDXL"):  # the ldm backend hands SDXL over
        WebuiLdmBackend(engine)


def test_plain_prompts_encode_as_a1111_generates_and_as_the_cli_trains(backend, engine, reference, files):
    ours = backend.encode_prompts([[p] for p in PROMPTS], {})
    a1111 = engine.get_learned_conditioning(PROMPTS)  # what txt2img conditions on (1024×1024, no crop)
    assert ours.hidden.shape == a1111["crossattn"].shape == (4, 154, 2048)
    torch.testing.assert_close(ours.hidden, a1111["crossattn"], rtol=1e-5, atol=1e-5)
    vector = backend.vector(ours.pooled, size_ids(4, 1024, 1024))
    assert vector.shape == a1111["vector"].shape == (4, 1280 + 3 * 2 * 8)
    torch.testing.assert_close(vector, a1111["vector"], rtol=1e-5, atol=1e-5)
    cli = reference.encode_prompts([[p] for p in PROMPTS], {})  # diffusers' conversion of the same file
    torch.testing.assert_close(ours.hidden, cli.hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.pooled, cli.pooled, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and diffusers' own encode_prompt (one window)
        embeds, _, pooled, _ = files[2].encode_prompt(PROMPTS[:3], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.hidden[:3, :77], embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.pooled[:3], pooled, rtol=1e-4, atol=1e-4)


def test_concept_vectors_enter_both_encoders_with_gradients_only_to_them(backend, engine):
    g = torch.Generator().manual_seed(5)
    vec_l = torch.nn.Parameter(torch.randn(1, 768, generator=g) * 0.02)
    vec_g = torch.nn.Parameter(torch.randn(1, 1280, generator=g) * 0.02)
    enc = backend.encode_prompts([["a photo of a ", ConceptTag("teddy"), " on the beach"], ["plain"]],
                                 {"teddy": {"clip_l": vec_l, "clip_g": vec_g}})
    pos = enc.concept_positions[0]["teddy"]
    assert enc.concept_positions[1] == {} and len(pos) == 1 and enc.input_ids[0, pos[0]] >= backend.prompt_encoder.vocab_size
    # the same as A1111 generating with the vectors written into the rows of a real token ("dog")
    dog = backend.word_token_ids("dog")[0]
    tables = [engine.conditioner.embedders[0].wrapped.transformer.get_input_embeddings().wrapped.weight,
              engine.conditioner.embedders[1].wrapped.model.token_embedding.wrapped.weight]
    saved = [t[dog].clone() for t in tables]
    with torch.no_grad():
        tables[0][dog], tables[1][dog] = vec_l[0], vec_g[0]
        ref = engine.get_learned_conditioning(["a photo of a dog on the beach"])
        tables[0][dog], tables[1][dog] = saved
    torch.testing.assert_close(enc.hidden[:1], ref["crossattn"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backend.vector(enc.pooled[:1], size_ids(1, 1024, 1024)), ref["vector"],
                               rtol=1e-5, atol=1e-5)
    assert not torch.equal(enc.pooled[0], backend.encode_prompts([["a photo of a dog on the beach"]], {}).pooled[0])
    g2 = torch.Generator().manual_seed(6)
    loss = (enc.hidden[0, pos[0]] * torch.randn(2048, generator=g2)).sum() + \
        (enc.pooled[0] * torch.randn(1280, generator=g2)).sum()
    loss.backward()
    assert vec_l.grad is not None and vec_l.grad.abs().sum() > 0
    assert vec_g.grad is not None and vec_g.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in engine.parameters())  # nothing else is trained
    assert all(torch.equal(t[dog], s) for t, s in zip(tables, saved))


def test_pooled_reads_clip_g_only(backend):
    vec_l = torch.nn.Parameter(torch.randn(1, 768) * 0.02)
    vec_g = torch.nn.Parameter(torch.randn(1, 1280) * 0.02)
    enc = backend.encode_prompts([["a ", ConceptTag("teddy")]], {"teddy": {"clip_l": vec_l, "clip_g": vec_g}})
    enc.pooled.sum().backward()
    assert vec_l.grad is None and vec_g.grad.abs().sum() > 0


def test_unet_noise_and_latents_match_the_cli_backend(backend, engine, reference, files):
    loaded = files[2]
    g = torch.Generator().manual_seed(3)
    lat, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(backend.add_noise(lat, noise, t), reference.add_noise(lat, noise, t))
    assert torch.equal(backend.target(lat, noise, t), noise) and backend.prediction_type == "epsilon"
    assert backend.num_train_timesteps == 1000
    enc = backend.encode_prompts([["a photo of a dog"], ["a cat"]], {})
    ids = torch.tensor([[32.0, 48.0, 0.0, 8.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    noisy = backend.add_noise(lat, noise, t)
    ours = backend.predict(noisy, t, enc.hidden, enc.pooled, ids)
    with torch.no_grad():
        theirs = reference.predict(noisy, t, enc.hidden, enc.pooled, ids)
    assert ours.shape == lat.shape and (ours - theirs).abs().max() < 1e-4
    assert (ours - backend.predict(noisy, t, enc.hidden, enc.pooled, ids.flip(0))).abs().max() > 1e-4  # y is read
    # without time_ids: the whole image, no crop (as the CLI backend does)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    latents = backend.encode_images(images)
    torch.manual_seed(0)
    with torch.no_grad():
        cli_latents = loaded.vae.encode(images).latent_dist.sample() * loaded.vae.config.scaling_factor
    torch.testing.assert_close(latents, cli_latents, rtol=1e-4, atol=1e-4)
    assert backend.vae_scale == 2
    torch.testing.assert_close(backend.predict(noisy, t, enc.hidden, enc.pooled),
                               backend.predict(noisy, t, enc.hidden, enc.pooled, diffusers_time_ids(2, 16, 16)))


def test_v_parameterization_target(files):
    backend = WebuiSgmBackend(make_engine(files, parameterization="v"))
    lat, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ac = backend.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(backend.target(lat, noise, t), ac.sqrt() * noise - (1 - ac).sqrt() * lat)
    assert backend.prediction_type == "v_prediction"


def test_covariance_is_the_clis_2048_wide_c(backend, reference, tmp_path):
    from perfusion_ext.core.covariance import cache_dir

    before = set((cache_dir() / "covariance").glob("*")) if (cache_dir() / "covariance").is_dir() else set()
    cov = backend.text_covariance()
    assert cov.shape == (2048, 2048) and cov.dtype == torch.float64 and torch.allclose(cov, cov.T)
    written = set((cache_dir() / "covariance").glob("*")) - before
    assert len(written) <= 1  # cached once, under the WebUI modules' hash
    assert torch.equal(backend.text_covariance(), cov)  # a later run reads the cache
    # the same C as the CLI estimates on the diffusers conversion of the same file: same captions, same readings
    torch.testing.assert_close(cov, reference.text_covariance(), rtol=1e-3, atol=1e-5)


def test_short_windows_read_as_full_windows(backend, engine):
    """The covariance feeds bigG each caption on its own width; causal attention makes that the 77-token reading."""
    reader = backend.prompt_encoder.parts[1].text_encoder
    ids = torch.tensor([backend.prompt_encoder.tokenizer("a red dog on the grass").input_ids])
    full = torch.cat([ids, torch.zeros(1, 77 - ids.shape[1], dtype=ids.dtype)], 1)
    with torch.no_grad():
        short = reader.short_reading(ids)
        whole = engine.conditioner.embedders[1].wrapped.encode_with_transformer(full)["penultimate"][:, :ids.shape[1]]
    torch.testing.assert_close(short, whole, rtol=1e-5, atol=1e-5)


def _images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_training_writes_a_loadable_sdxl_concept(backend, engine, tmp_path):
    from perfusion_ext.training import TrainCallbacks, TrainConfig, train

    before = {k: v.clone() for k, v in engine.state_dict().items()}
    seen = []
    cfg = TrainConfig(name="teddy", superclass="dog", steps=2, batch_size=2, micro_batch=1, resolution=64,
                      checkpoint_every=2, preview_every=0)
    result = train(backend, cfg, _images(tmp_path / "images"), tmp_path / "out",
                   callbacks=TrainCallbacks(on_progress=seen.append))
    assert result.status == "finished" and [p.step for p in seen] == [1, 2]
    concept = load_concept(result.concept_path)
    assert concept.base_family == "sdxl"
    assert concept.embeddings["clip_l"].shape == (1, 768) and concept.embeddings["clip_g"].shape == (1, 1280)
    assert set(concept.layers) == set(cross_attention_layers(engine.model.diffusion_model))
    start = backend.token_embedding(backend.word_token_ids("dog")[0])
    assert all(not torch.equal(concept.embeddings[k], start[k]) for k in ("clip_l", "clip_g"))  # both trained
    assert all(torch.equal(v, before[k]) for k, v in engine.state_dict().items())  # the model is untouched


# ---- the job runner inside the WebUI (training.py) with stand-ins of the WebUI's modules (conftest) -------------
def test_the_job_runner_trains_sdxl_on_the_loaded_model(webui_training, engine, tmp_path):
    from perfusion_ext.webui.concepts import ConceptStore
    from perfusion_ext.webui.jobs import Job
    from perfusion_ext.webui.train_request import parse_train_request

    shared, training = webui_training
    assert isinstance(training.training_backend(engine, 64), training.WebuiSgmTrainingBackend)
    shared.sd_model = engine
    req = parse_train_request({"name": "teddy", "superclass": "dog", "images": [str(_images(tmp_path / "imgs"))],
                               "steps": 2, "batch_size": 1, "resolution": 64, "checkpoint_every": 2},
                              allowed_roots=None, family="sdxl")
    job = Job(id="1", request=req)
    training.run_job(job, ConceptStore(lambda: tmp_path / "concepts"), release_hooks=lambda: None)
    assert job.state == "finished" and job.step == 2, job.message
    assert load_concept(job.concept_path).base_family == "sdxl"
    assert all(not p.requires_grad for p in engine.parameters())  # flags restored


def test_the_job_runner_keeps_its_refusals(webui_training, engine):
    from test_webui_backend import FakeLatentDiffusion

    _, training = webui_training
    forge = types.SimpleNamespace(forge_objects=object(), is_sdxl=True, conditioner=engine.conditioner,
                                  sd_checkpoint_info=types.SimpleNamespace(filename="/models/xl.safetensors"))
    with pytest.raises(PerfusionError, match='Forge cannot train.*"/models/xl.safetensors"'):
        training.training_backend(forge, 64)
    inpaint = types.SimpleNamespace(is_sdxl=True, conditioner=engine.conditioner,
                                    model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(in_channels=9)))
    with pytest.raises(PerfusionError, match="inpainting"):
        training.training_backend(inpaint, 64)
    assert isinstance(training.training_backend(FakeLatentDiffusion(), 64), training.WebuiTrainingBackend)  # SD1: ldm
