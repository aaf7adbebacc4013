"""SD2 (ε and v) and SDXL end to end, on tiny random pipelines of their real architectures (tiny_families.py):
family detection, prompt encoding equal to diffusers' own, the concept tag on both SDXL encoders, the
covariance over SDXL's 2048-wide concatenation, the hook properties on their UNets, training (the SDXL
denoiser with pooled text_embeds and size/crop time_ids), the CLI, single-file checkpoints in the original
layouts (ldm for SD2, sgm for SDXL) with ε/v decided, the SDXL refiner refused by name and a distilled
(fewer-layer) SDXL UNet working on its own concepts only.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import (
    sd2_single_file,
    sdxl_single_file,
    small_covariance_corpus,
    tiny_ldm_sd2_unet,
    tiny_sd2_pipeline,
    tiny_sdxl_pipeline,
    tiny_sdxl_refiner_unet,
    tiny_sdxl_unet,
)

import perfusion_ext as pf
from perfusion_ext.core import families
from perfusion_ext.core.concept import Concept
from perfusion_ext.core.layers import cross_attention_layers, unet_family
from perfusion_ext.core.tags import ConceptTag
from perfusion_ext.pipelines import single_file
from perfusion_ext.pipelines.backend import DiffusersBackend
from perfusion_ext.pipelines.encoding import prompt_encoder
from perfusion_ext.pipelines.loading import load_pipeline
from perfusion_ext.training import TrainConfig, train
from perfusion_ext.training.dataset import load_images

PROMPTS = ["a photo of a dog on the beach", "", "a red dog and a blue cat, highly detailed, 4k"]


small_corpus = pytest.fixture(scope="module", autouse=True)(small_covariance_corpus)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return tiny_sd2_pipeline(tmp_path_factory.mktemp("sd2"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 48×32 pictures (landscape: SDXL's crop conditioning sees a left offset)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(folder / f"dog_{i}.png")
    return folder


def sdxl_concept(unet, name="teddy", seed=1) -> Concept:
    """A random SDXL concept: both embeddings, key targets locked to W_k i_super, random value targets."""
    from conftest import make_concept

    concept = make_concept(unet, name=name, seed=seed, family="sdxl")
    g = torch.Generator().manual_seed(seed)
    concept.embeddings = {"clip_l": torch.randn(1, 768, generator=g) * 0.02,
                          "clip_g": torch.randn(1, 1280, generator=g) * 0.02}
    return concept


# ---- families and prompt encoding ----------------------------------------------------------------------

def test_families_and_encoders_come_from_the_model(sd2, sdxl):
    assert unet_family(sd2.unet) == "sd2" and unet_family(sdxl.unet) == "sdxl"
    assert len(cross_attention_layers(sd2.unet)) == 16 and len(cross_attention_layers(sdxl.unet)) == 17
    enc = prompt_encoder(sdxl)
    assert [(p.name, p.layer, p.pooled) for p in enc.parts] == [("clip_l", "penultimate", False),
                                                                ("clip_g", "penultimate", True)]
    assert [(p.name, p.layer) for p in prompt_encoder(sd2).parts] == [("clip_h", "last")]
    assert families.get("sdxl").embedding_keys == ("embedding.clip_l", "embedding.clip_g")


def test_plain_prompts_encode_as_diffusers_does(sd2, sdxl):
    with torch.no_grad():
        ours = prompt_encoder(sd2).encode([[p] for p in PROMPTS])
        theirs = sd2.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        assert torch.allclose(ours.hidden, theirs, atol=1e-5) and ours.pooled is None
        ours = prompt_encoder(sdxl).encode([[p] for p in PROMPTS])
        hidden, _, pooled, _ = sdxl.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    assert ours.hidden.shape == (3, 77, 2048) and ours.pooled.shape == (3, 1280)
    assert torch.allclose(ours.hidden, hidden, atol=1e-5)
    assert torch.allclose(ours.pooled, pooled, atol=1e-5)


def test_sdxl_tag_uses_both_embeddings_and_pools_at_the_real_eos(sdxl):
    """A concept whose vectors are the superclass word's encodes exactly like the superclass prompt, context and
    pooled output alike, although the configs carry the legacy eos_token_id (argmax pooling would land on the
    concept's id past the vocabulary)."""
    enc = prompt_encoder(sdxl)
    assert sdxl.text_encoder_2.config.eos_token_id == 2
    dog = sdxl.tokenizer("dog", add_special_tokens=False).input_ids[0]
    vectors = {p.name: p.text_encoder.get_input_embeddings().weight[dog][None].detach() for p in enc.parts}
    with torch.no_grad():
        tagged = enc.encode([["a photo of a ", ConceptTag("teddy"), " on the beach"]], {"teddy": vectors})
        plain = enc.encode([["a photo of a dog on the beach"]])
        other = enc.encode([["a photo of a ", ConceptTag("teddy"), " on the beach"]],
                           {"teddy": {k: v + 0.5 for k, v in vectors.items()}})
    assert tagged.concept_positions == [{"teddy": [5]}] and tagged.input_ids[0, 5] >= len(sdxl.tokenizer)
    assert torch.allclose(tagged.hidden, plain.hidden, atol=1e-5)
    assert torch.allclose(tagged.pooled, plain.pooled, atol=1e-5)
    moved = (other.hidden - plain.hidden)[0].abs().amax(-1)
    assert moved[:5].max() < 1e-5 and moved[5] > 1e-3  # causal: only the tag and what follows change
    assert (other.hidden - plain.hidden)[0, 5, :768].abs().max() > 1e-3  # CLIP-L's half …
    assert (other.hidden - plain.hidden)[0, 5, 768:].abs().max() > 1e-3  # … and bigG's half both move


def test_sdxl_covariance_is_over_the_2048_wide_concatenation(sdxl):
    backend = DiffusersBackend(sdxl)
    cov = backend.text_covariance()
    assert cov.shape == (2048, 2048) and torch.allclose(cov, cov.T)
    assert torch.equal(backend.text_covariance(), cov)  # the cached copy is the same C
    from perfusion_ext.core.covariance import caption_corpus, estimate_covariance, tokenize_for_covariance

    ids = tokenize_for_covariance(sdxl.tokenizer, caption_corpus()[:40])

    def encode(x):
        a = sdxl.text_encoder(x, output_hidden_states=True).hidden_states[-2]
        b = sdxl.text_encoder_2(x, output_hidden_states=True).hidden_states[-2]
        return torch.cat([a, b], -1)

    with torch.no_grad():
        small = estimate_covariance(encode, ids)
    assert torch.allclose(small[:768, :768].diagonal().mean(), cov[:768, :768].diagonal().mean(), rtol=0.3)
    assert torch.allclose(small[768:, 768:].diagonal().mean(), cov[768:, 768:].diagonal().mean(), rtol=0.3)


# ---- hooks on the SD2 and SDXL UNets -------------------------------------------------------------------

def sdxl_inputs(unet, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, 2048, generator=g)
    added = {"text_embeds": torch.randn(batch, 1280, generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return x, torch.tensor([10] * batch), ctx, added


def test_hooks_on_sdxl_unet_lock_keys_and_restore_bit_for_bit(sdxl):
    unet = sdxl.unet
    concept = sdxl_concept(unet)
    x, t, ctx, added = sdxl_inputs(unet)
    ctx[:, 4] = concept.target_input
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        with pf.activate(unet, [concept]):
            edited = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        after = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        # gate forced open (β far below s = 1): the key at i* is exactly o*_K = W_k i_super, the value o*_V
        with pf.activate(unet, [(concept, 1.0, -50.0, 1.0)]):
            for name, layer in cross_attention_layers(unet).items():
                k = layer.to_k(concept.target_input[None])[0]
                v = layer.to_v(concept.target_input[None])[0]
                assert torch.allclose(k, concept.key_targets[name], atol=1e-4, rtol=1e-4)
                assert torch.allclose(v, concept.value_targets[name], atol=1e-4, rtol=1e-4)
    assert (edited - base).abs().max() > 1e-4
    assert torch.equal(after, base)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_sdxl_refiner_refused_by_name_and_distilled_sdxl_layouts_kept_apart():
    with pytest.raises(pf.PerfusionError, match="SDXL refiner"):
        unet_family(tiny_sdxl_refiner_unet())
    base, distilled = tiny_sdxl_unet(), tiny_sdxl_unet(transformer_layers=(1, 1, 1))
    assert unet_family(distilled) == "sdxl" and len(cross_attention_layers(distilled)) == 11
    x, t, ctx, added = sdxl_inputs(distilled)
    with pf.activate(distilled, [sdxl_concept(distilled)]), torch.no_grad():
        distilled(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
    with pytest.raises(pf.PerfusionError, match="trained on a distilled SDXL UNet with 11 attn2 layers .*SSD-1B"):
        with pf.activate(base, [sdxl_concept(distilled)]):
            pass
    with pytest.raises(pf.PerfusionError, match="loaded model is a distilled SDXL UNet with 11"):
        with pf.activate(distilled, [sdxl_concept(base)]):
            pass


# ---- training ------------------------------------------------------------------------------------------

def config(**kw):
    base = dict(name="teddy", superclass="dog", steps=2, batch_size=2, micro_batch=2, checkpoint_every=2,
                preview_every=0, seed=3, resolution=32)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_trains_eps_and_v(tmp_path, images, prediction):
    pipe = tiny_sd2_pipeline(tmp_path / "tok", prediction_type=prediction)
    backend = DiffusersBackend(pipe)
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([100, 900])
    expected = pipe.scheduler.get_velocity(latents, noise, t) if prediction == "v_prediction" else noise
    assert torch.equal(backend.target(latents, noise, t), expected)
    result = train(backend, config(), images, tmp_path / "out")
    assert result.status == "finished"
    concept = pf.load_concept(result.concept_path)
    assert concept.base_family == "sd2" and concept.embeddings["clip_h"].shape == (1, 1024)
    assert concept.dim == 1024 and len(concept.layers) == 16
    architecture = "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512"
    assert concept.metadata["modelspec.architecture"] == f"{architecture}/perfusion"


def test_sdxl_trains_with_pooled_text_and_size_crop_conditioning(sdxl, images, tmp_path):
    backend = DiffusersBackend(sdxl)
    assert type(backend.noise_scheduler).__name__ == "DDPMScheduler"  # q(x_t|x_0), not Euler's x + σε
    seen = []
    handle = sdxl.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    try:
        from perfusion_ext.training.trainer import ConceptTrainer

        cfg = config().resolved(backend.family, backend.device)
        trainer = ConceptTrainer(backend, cfg, load_images(images, 32))
        groups = trainer.optimizer.param_groups
        assert [tuple(p.shape) for p in groups[0]["params"]] == [(1, 768), (1, 1280)]
        trainer.train_step()
    finally:
        handle.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for g in groups for p in g["params"])
    frozen = [p for m in backend.frozen_modules() for p in m.parameters()]
    assert all(p.grad is None for p in frozen)
    # original 32×48 (h, w); scaled to 32 px high it is 48 wide: the centred crop starts 8 px from the left
    assert seen and all(torch.equal(s["time_ids"][0].cpu(), torch.tensor([32.0, 48.0, 0.0, 8.0, 32.0, 32.0]))
                        for s in seen)
    assert all(s["text_embeds"].shape == (2, 1280) for s in seen)
    concept = trainer.concept()
    assert concept.dim == 2048 and len(concept.layers) == 17
    assert sorted(concept.embeddings) == ["clip_g", "clip_l"]
    for name, layer in trainer.layers.items():  # key locking holds on SDXL too
        assert torch.allclose(concept.key_targets[name], (layer.to_k.weight.double() @ trainer.i_super).float())


def test_cli_train_generate_inspect_on_sd2_and_sdxl_folders(sd2, sdxl, images, tmp_path, capsys):
    from perfusion_ext.cli.main import main

    for label, pipe in (("sd2", sd2), ("sdxl", sdxl)):
        model = tmp_path / label
        pipe.save_pretrained(model)
        concepts = tmp_path / f"{label}-concepts"
        assert main(["train", "--model", str(model), "--images", str(images), "--name", "teddy", "--superclass",
                     "dog", "--steps", "1", "--batch-size", "1", "--resolution", "32", "--preview-every", "0",
                     "--out", str(concepts)]) == 0
        assert main(["generate", "--model", str(model), "--concepts", str(concepts), "--prompt",
                     "a photo of a <perfusion:teddy> on the beach", "--steps", "2", "--out",
                     str(tmp_path / f"{label}-out")]) == 0
        assert len(list((tmp_path / f"{label}-out").glob("*.png"))) == 1
        capsys.readouterr()
        assert main(["inspect", str(concepts / "teddy.safetensors"), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["metadata"]["perfusion.base_family"] == label
        keys = {k for k in info["tensors"] if k.startswith("embedding.")}
        assert keys == set(families.get(label).embedding_keys)
    assert main(["inspect", "--model", str(tmp_path / "sd2"), "--concepts", str(tmp_path / "sd2-concepts"),
                 "--prompt", "a photo of a <perfusion:teddy>", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"][5]["text"] == "<perfusion:teddy>"


def test_a_concept_of_one_family_is_refused_on_another(sd2, sdxl):
    concept = sdxl_concept(sdxl.unet)
    with pytest.raises(pf.PerfusionError, match="trained for sdxl; the loaded model is sd2"):
        with pf.activate(sd2.unet, [concept]):
            pass


# ---- single-file checkpoints --------------------------------------------------------------------------

def test_sd2_single_file_loads_eps_or_v(sd2, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    sd2.save_pretrained(configs)
    monkeypatch.setattr(single_file, "config_folder", lambda family: configs)  # tiny sizes, not SD2's
    path = sd2_single_file(tmp_path / "sd2-model.safetensors", len(sd2.tokenizer))
    assert single_file.detect_family(path) == "sd2"
    pipe = load_pipeline(path)
    assert pipe.text_encoder.config.num_hidden_layers == 2  # OpenCLIP's 3 blocks, the penultimate kept
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():  # diffusers' conversion of the ldm weights is exact
        ours = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        ldm = tiny_ldm_sd2_unet()(x, timesteps=torch.tensor([500]), context=ctx)
    # float32 through two attention implementations: 1.5e-5 of an output of 1.5 on an AMD EPYC (1e-5 was
    # exceeded there); a wrongly converted weight moves it by the order of the output itself
    assert (ours - ldm).abs().max() <= 1e-4 * ldm.abs().max(), ((ours - ldm).abs().max(), ldm.abs().max())
    assert pipe.scheduler.config.prediction_type in ("epsilon", "v_prediction")  # A1111's test decides
    assert load_pipeline(path, prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert single_file.yaml_prediction_type(path) == "v_prediction"
    assert load_pipeline(path).scheduler.config.prediction_type == "v_prediction"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert load_pipeline(path).scheduler.config.prediction_type == "epsilon"


def test_sdxl_single_file_loads_and_the_refiner_is_refused(tmp_path, monkeypatch):
    pipe = tiny_sdxl_pipeline(tmp_path / "tok", transformer_layers=(1, 1, 1))
    pipe.save_pretrained(tmp_path / "configs")
    monkeypatch.setattr(single_file, "config_folder", lambda family: tmp_path / "configs")
    path = sdxl_single_file(tmp_path / "xl.safetensors", pipe)
    assert single_file.detect_family(path) == "sdxl"
    loaded = load_pipeline(path)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline" and unet_family(loaded.unet) == "sdxl"
    te = loaded.text_encoder.state_dict()
    assert all(torch.equal(v, te[k]) for k, v in pipe.text_encoder.state_dict().items())
    from perfusion_ext.pipelines.generate import generate

    images, _ = generate(loaded, "a photo of a dog", num_inference_steps=2)
    assert images[0].size == (16, 16)
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.0.model.token_embedding.weight": torch.zeros(1)},
              str(tmp_path / "refiner.safetensors"))
    with pytest.raises(pf.PerfusionError, match="SDXL refiner"):
        load_pipeline(tmp_path / "refiner.safetensors")


# ---- export (ONNX) ---------------------------------------------------------------------------------------

def psnr(image, reference) -> float:
    a = np.asarray(image, np.float64) / 255
    b = np.asarray(reference, np.float64) / 255
    mse = float(np.mean((a - b) ** 2))
    return 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")


def sd2_concept(unet, seed=1):
    from conftest import make_concept

    concept = make_concept(unet, seed=seed, family="sd2")
    concept.embeddings = {"clip_h": torch.randn(1, 1024, generator=torch.Generator().manual_seed(seed)) * 0.02}
    return concept


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["v_prediction"])  # ε exports as SD1 does (test_export.py)
def test_sd2_export_is_verified_and_samples_like_torch(tmp_path, prediction):
    pytest.importorskip("onnxruntime")
    from perfusion_export.exporter import export_pipeline
    from perfusion_export.ort_pipeline import generate_onnx
    from perfusion_ext.pipelines.generate import generate

    pipe = tiny_sd2_pipeline(tmp_path / "tok", prediction_type=prediction)
    path = pf.save_concept(sd2_concept(pipe.unet), tmp_path / "teddy.safetensors")
    info = export_pipeline(pipe, [path], tmp_path / "export")
    v = info["verification"]
    assert info["base_family"] == "sd2" and v["unet"]["max_rel"] <= 1e-4 and v["unet"]["concept_effect_rel"] >= 1e-3
    assert v["text_encoder"]["plain_prompts_bit_identical"] and v["text_encoder"]["pooled_at_eos_max_abs"] <= 1e-6
    config = json.loads((tmp_path / "export" / "text_encoder" / "config.json").read_text())
    assert config["eos_token_id"] == pipe.tokenizer.eos_token_id != 2  # the legacy id replaced by the real one
    assert json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"] == prediction
    prompt = "a photo of a <perfusion:teddy> on the beach"
    ours = generate_onnx(tmp_path / "export", prompt, seed=2, steps=3, guidance_scale=5.0)[0]
    ref, _ = generate(pipe, prompt, seed=2, loaded={"teddy": pf.load_concept(path)}, num_inference_steps=3,
                      guidance_scale=5.0)
    assert psnr(ours, ref[0]) >= 40


@pytest.mark.slow
def test_sdxl_export_optimum_and_a1111_trt(tmp_path):
    pytest.importorskip("onnxruntime")
    from perfusion_export import verify
    from perfusion_export.exporter import export_pipeline
    from perfusion_export.ort_pipeline import generate_onnx
    from perfusion_ext.pipelines.generate import generate

    pipe = tiny_sdxl_pipeline(tmp_path / "tok", transformer_layers=(1, 1, 1))
    path = pf.save_concept(sdxl_concept(pipe.unet), tmp_path / "teddy.safetensors")
    info = export_pipeline(pipe, [path], tmp_path / "export")
    out = tmp_path / "export"
    v = info["verification"]
    assert info["base_family"] == "sdxl" and v["unet"]["max_rel"] <= 1e-4 and v["unet"]["concept_effect_rel"] >= 1e-3
    unet_io = verify.io_table(out / "unet" / "model.onnx")
    assert [i["name"] for i in unet_io["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                       "time_ids"]
    assert unet_io["inputs"][3]["dims"] == ["batch_size", 1280] and unet_io["inputs"][4]["dims"] == ["batch_size", 6]
    for part, pooled in (("text_encoder", "pooler_output"), ("text_encoder_2", "text_embeds")):
        assert v[part]["plain_prompts_bit_identical"] and v[part]["concept_prompts_hidden_rel"] <= 1e-4
        assert v[part]["pooled_at_eos_max_abs"] <= 1e-4
        outputs = [o["name"] for o in verify.io_table(out / part / "model.onnx")["outputs"]]
        assert pooled in outputs and "hidden_states.1" in outputs  # the penultimate of 2 layers
        config = json.loads((out / part / "config.json").read_text())
        assert config["eos_token_id"] == pipe.tokenizer.eos_token_id and config["vocab_size"] == len(pipe.tokenizer) + 1
    assert json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert info["tokens"]["encoders"] == {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    for negative in ("", "blurry"):
        prompt = "a photo of a <perfusion:teddy> on the beach"
        ours = generate_onnx(out, prompt, negative_prompt=negative, seed=2, steps=3, guidance_scale=5.0)[0]
        ref, _ = generate(pipe, prompt, negative, seed=2, loaded={"teddy": pf.load_concept(path)},
                          num_inference_steps=3, guidance_scale=5.0)
        assert psnr(ours, ref[0]) >= 40, negative
    # NVIDIA's WebUI TensorRT extension: sample, timesteps, encoder_hidden_states, y (sgm's 2816-wide vector)
    trt = export_pipeline(pipe, [path], tmp_path / "trt", layout="a1111-trt", model_name="xl-teddy")
    table = verify.io_table(tmp_path / "trt" / "models" / "Unet-onnx" / "xl-teddy.onnx")
    assert [i["name"] for i in table["inputs"]] == ["sample", "timesteps", "encoder_hidden_states", "y"]
    assert table["inputs"][3]["dims"] == ["2B", 1280 + 6 * 8] and table["outputs"][0]["name"] == "latent"
    assert trt["verification"]["unet"]["max_rel"] <= 1e-4


def test_superclass_encodings_cached_once_per_caption(sdxl, images):
    """The GPU memory/speed path, run on the CPU: each caption's superclass encoding is computed once, alone,
    and equals the batch encoding the CPU path uses."""
    from perfusion_ext.training.trainer import ConceptTrainer

    backend = DiffusersBackend(sdxl)
    trainer = ConceptTrainer(backend, config().resolved(backend.family, backend.device), load_images(images, 32))
    assert trainer.cache_superclass is False  # CPU: off, so CPU runs stay bit-for-bit what they were
    trainer.cache_superclass = True
    tag = ConceptTag("teddy")
    prompts = [trainer._segments("a photo of a {}", tag), trainer._segments("a {} on the beach", tag)]
    calls = []
    original = backend.encode_prompts
    backend.encode_prompts = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            first = trainer._superclass_encoding(prompts)
            again = trainer._superclass_encoding(prompts[::-1])
            plain = original(prompts, {"teddy": trainer.superclass_embedding})
    finally:
        backend.encode_prompts = original
    assert len(calls) == 2  # two captions, encoded once each
    assert torch.allclose(first.hidden, plain.hidden, atol=1e-5) and torch.allclose(first.pooled, plain.pooled, atol=1e-5)
    assert torch.equal(again.hidden, first.hidden.flip(0)) and first.concept_positions == plain.concept_positions
    trainer.train_step()


def test_gate_inspector_and_auto_beta_read_sdxl_2048_wide_context(sdxl):
    from perfusion_ext.pipelines.auto_beta import gate_curve
    from perfusion_ext.pipelines.inspect import inspect_prompt

    concept = sdxl_concept(sdxl.unet)
    report = inspect_prompt(sdxl, "a <perfusion:teddy> on a white background", loaded={"teddy": concept})
    assert [t["text"] for t in report["tokens"][:3]] == ["<start>", "a", "<perfusion:teddy>"]
    assert all(0.0 <= t["gate"]["teddy"] <= 1.0 for t in report["tokens"])
    curve = gate_curve(sdxl, concept, betas=(0.5, 0.9))
    assert curve[0]["leak"] >= curve[1]["leak"]
