"""The WebUI glue on Forge's objects (stand-ins; no Forge here): the UNet found behind Forge's UNet patcher,
the concept's vectors registered in every text engine's embedding database (SDXL: one per encoder, each
reading its own key) and removed again, and training refused with the command that does it instead.
"""
from __future__ import annotations

import types

import pytest
import torch
from conftest import make_concept, run_unet, tiny_ldm_unet, unet_inputs
from test_webui_stubbed import webui  # noqa: F401 - the stand-in WebUI modules

import perfusion_ext as pf


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


def forge_model(unet, keys=("text_processing_engine_l", "text_processing_engine_g")):
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=patcher),
                                  sd_checkpoint_info=types.SimpleNamespace(filename="/models/xl.safetensors"))
    for key in keys:
        setattr(model, key, types.SimpleNamespace(embeddings=ForgeEmbeddingDatabase()))
    return model


def test_forge_unet_and_embeddings(webui):  # noqa: F811
    fakes, extra_network, _ = webui
    extra_network.Embedding = Embedding
    unet = tiny_ldm_unet()
    model = forge_model(unet)
    fakes["modules.shared"].sd_model = model
    env = extra_network.WebuiEnv()
    assert env.unet() is unet
    concept = make_concept(unet)
    concept.embeddings = {"clip_l": torch.zeros(1, 768), "clip_g": torch.ones(1, 1280)}
    env.register_embedding("perfusionteddy", concept)
    for engine in (model.text_processing_engine_l, model.text_processing_engine_g):
        emb = engine.embeddings.word_embeddings["perfusionteddy"]
        assert sorted(emb.vec) == ["clip_g", "clip_l"] and emb.vectors == 1 and emb.shape == 2048
    env.unregister_embedding("perfusionteddy")
    assert not model.text_processing_engine_l.embeddings.word_embeddings
    assert not model.text_processing_engine_g.embeddings.word_embeddings
    # the hooks go on the module Forge samples with, and leave it bit for bit
    x, t, ctx = unet_inputs(unet)
    ctx[:, 4] = concept.target_input
    base = run_unet(unet, x, t, ctx)
    with pf.activate(env.unet(), [concept]):
        assert (run_unet(unet, x, t, ctx) - base).abs().max() > 1e-4
    assert torch.equal(run_unet(unet, x, t, ctx), base)


def test_outside_forge_the_webui_paths_are_unchanged(webui):  # noqa: F811
    fakes, extra_network, _ = webui
    unet = tiny_ldm_unet()
    fakes["modules.shared"].sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    assert extra_network.WebuiEnv().unet() is unet
    assert extra_network.forge_text_engines(fakes["modules.shared"].sd_model) == []


def test_forge_training_is_refused_with_the_cli_command():
    from perfusion_ext.webui.backend import WebuiLdmBackend

    with pytest.raises(pf.PerfusionError, match='Forge cannot train.*perfusion train --model "/models/xl.safetensors"'):
        WebuiLdmBackend(forge_model(tiny_ldm_unet()))
