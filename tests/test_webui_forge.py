"""The WebUI glue on Forge's objects (stand-ins modelled on a real Forge f2.0.1v1.10.1, commit dfdcbab6, checked
with tests/webui/forge_check.py):
- the UNet sits behind Forge's UNet patcher (`sd_model.forge_objects.unet.model.diffusion_model`), and its attn2
  projections are `backend.operations.ForgeOperations.Linear`: a plain Module (not a torch.nn.Linear) with
  `in_features`, `out_features`, a `weight` Parameter and `F.linear` in forward;
- `sd_model.cond_stage_model` is None; the text engines (`text_processing_engine` for SD1/SD2, `_l` and `_g` for
  SDXL) each hold an embedding database, tokenize lines into 77-token chunks and write `TI: word, …` into the
  generation parameters for every embedding used;
- training is refused with the command that does it instead.
"""
from __future__ import annotations

import types

import pytest
import torch
from conftest import make_concept, run_unet, tiny_ldm_unet, unet_inputs
from test_webui_stubbed import placeholder_chunk, webui  # noqa: F401 - the stand-in WebUI modules

import perfusion_ext as pf
from perfusion_ext.core.layers import cross_attention_layers
from perfusion_ext.webui.activation import concept_word, drop_concept_words_from_ti


class ForgeEmbeddingDatabase:
    """Forge's backend.text_processing.textual_inversion.EmbeddingDatabase: register_embedding_by_name(e, name)."""

    def __init__(self):
        self.word_embeddings = {}

    def register_embedding_by_name(self, embedding, name):
        if embedding is None:
            self.word_embeddings.pop(name, None)
        else:
            self.word_embeddings[name] = embedding


class Embedding:  # the WebUI's textual_inversion.Embedding
    def __init__(self, vec, name):
        self.vec, self.name = vec, name


class ForgeLinear(torch.nn.Module):
    """backend.operations.ForgeOperations.Linear (fp weights, no LoRA): a Module, not a torch.nn.Linear."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.scale_weight = None
        self.parameters_manual_cast = False

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class QuantizedLinear(torch.nn.Module):
    """Forge's GGUF / NF4 layers: packed integer weights, no float matrix to read."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(torch.zeros(linear.out_features * linear.in_features // 2, 1,
                                                     dtype=torch.uint8), requires_grad=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def forge_unet(layer=ForgeLinear):
    """The tiny ldm UNet with every attn2 to_k/to_v swapped for Forge's layer class (same weights)."""
    unet = tiny_ldm_unet()
    for path, module in list(unet.named_modules()):
        if path.endswith("attn2"):
            module.to_k, module.to_v = layer(module.to_k), layer(module.to_v)
    return unet


def forge_model(unet, keys=("text_processing_engine_l", "text_processing_engine_g")):
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))  # UnetPatcher -> KModel
    model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=patcher), cond_stage_model=None,
                                  sd_checkpoint_info=types.SimpleNamespace(filename="/models/xl.safetensors"))
    for key in keys:
        setattr(model, key, types.SimpleNamespace(embeddings=ForgeEmbeddingDatabase()))
    return model


def test_forge_projections_are_found_and_edited():
    unet = forge_unet()
    layers = cross_attention_layers(unet)
    assert layers and all(isinstance(layer.to_k, ForgeLinear) for layer in layers.values())
    assert not any(isinstance(layer.to_k, torch.nn.Linear) for layer in layers.values())
    concept = make_concept(unet)
    x, t, ctx = unet_inputs(unet)
    ctx[:, 4] = concept.target_input
    base = run_unet(unet, x, t, ctx)
    with pf.activate(unet, [concept]):
        assert (run_unet(unet, x, t, ctx) - base).abs().max() > 1e-4
    assert torch.equal(run_unet(unet, x, t, ctx), base)


def test_quantized_projections_are_refused_by_name():
    with pytest.raises(pf.PerfusionError, match="QuantizedLinear.*quantized"):
        cross_attention_layers(forge_unet(QuantizedLinear))


@pytest.mark.parametrize("keys", [("text_processing_engine",), ("text_processing_engine_l", "text_processing_engine_g")])
def test_forge_unet_and_embeddings(webui, keys):  # noqa: F811
    fakes, extra_network, _ = webui
    extra_network.Embedding = Embedding
    unet = forge_unet()
    model = forge_model(unet, keys)
    fakes["modules.shared"].sd_model = model
    env = extra_network.WebuiEnv()
    assert env.unet() is unet
    concept = make_concept(unet)
    concept.embeddings = ({"clip_l": torch.zeros(1, 768)} if len(keys) == 1
                          else {"clip_l": torch.zeros(1, 768), "clip_g": torch.ones(1, 1280)})
    env.register_embedding("perfusionteddy", concept)
    engines = [getattr(model, key) for key in keys]
    for engine in engines:
        emb = engine.embeddings.word_embeddings["perfusionteddy"]
        if len(keys) == 1:  # one encoder: the plain tensor, as Forge's own loader makes it
            assert isinstance(emb.vec, torch.Tensor) and emb.vectors == 1 and emb.shape == 768
        else:  # SDXL: each engine picks its encoder's key from the dict
            assert sorted(emb.vec) == ["clip_g", "clip_l"] and emb.vectors == 1 and emb.shape == 2048
    env.unregister_embedding("perfusionteddy")
    assert not any(engine.embeddings.word_embeddings for engine in engines)
    # the hooks go on the module Forge samples with, and leave it bit for bit
    x, t, ctx = unet_inputs(unet)
    ctx[:, 4] = concept.target_input
    base = run_unet(unet, x, t, ctx)
    with pf.activate(env.unet(), [concept]):
        assert (run_unet(unet, x, t, ctx) - base).abs().max() > 1e-4
    assert torch.equal(run_unet(unet, x, t, ctx), base)


def test_forge_token_layout_reads_the_text_engine(webui):  # noqa: F811
    """Forge has no cond_stage_model; the gate inspector's token layout comes from the first text engine."""
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    fakes, extra_network, _ = webui
    tokenizer = tiny_random_pipeline().tokenizer
    chunk = placeholder_chunk(tokenizer)
    model = forge_model(tiny_ldm_unet(), ("text_processing_engine",))
    model.text_processing_engine.tokenize_line = lambda prompt: ([chunk], 4)
    model.text_processing_engine.tokenizer = tokenizer
    fakes["modules.shared"].sd_model = model
    texts, positions = extra_network.WebuiEnv().token_layout("a perfusionteddyabc on white")
    assert len(texts) == 77 and texts[:2] == ["<|startoftext|>", "a</w>"] and texts[3] == "on</w>"
    assert positions == {"perfusionteddyabc": [2]}
    fakes["modules.shared"].sd_model = forge_model(tiny_ldm_unet(), ("text_processing_engine",))  # no tokenizer
    assert extra_network.WebuiEnv().token_layout("x") == ([], {})


def test_forge_ti_entry_names_no_concept_word(webui):  # noqa: F811
    """Forge writes `TI: <every embedding used>`; the concept words are recorded as Perfusion hashes instead."""
    _, _, wiring = webui
    hashes = {"teddy": "36ecbdad3e4c" + "0" * 52, "cat": "1d9cfdc553c7" + "0" * 52}
    word = concept_word("teddy", hashes["teddy"])
    params = {"TI": f"{word}, myembedding, {concept_word('cat', hashes['cat'])}"}
    drop_concept_words_from_ti(params, hashes)
    assert params == {"TI": "myembedding"}
    p = types.SimpleNamespace(extra_generation_params={"TI": word, "Perfusion hashes": "teddy: 36ecbdad3e4c"},
                              _perfusion_hashes=hashes)
    wiring.PerfusionScript().postprocess_batch(p, [], batch_number=0)
    assert p.extra_generation_params == {"Perfusion hashes": "teddy: 36ecbdad3e4c"}
    p = types.SimpleNamespace(extra_generation_params={"TI": "other"})  # no concept in this generation
    wiring.PerfusionScript().postprocess_batch(p, [], batch_number=0)
    assert p.extra_generation_params == {"TI": "other"}


def test_outside_forge_the_webui_paths_are_unchanged(webui):  # noqa: F811
    fakes, extra_network, _ = webui
    unet = tiny_ldm_unet()
    fakes["modules.shared"].sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    assert extra_network.WebuiEnv().unet() is unet
    assert extra_network.forge_text_engines(fakes["modules.shared"].sd_model) == []


def test_forge_training_is_refused_with_the_cli_command():
    from perfusion_ext.webui.backend import WebuiLdmBackend

    with pytest.raises(pf.PerfusionError, match='Forge cannot train.*perfusion train --model "/models/xl.safetensors"'):
        WebuiLdmBackend(forge_model(forge_unet()))
