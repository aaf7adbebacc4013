"""The thin WebUI glue of the fidelity controls against stand-ins of the WebUI's modules (no WebUI here):
the sampler's cfg_denoiser callback, the token layout read from the WebUI's tokenizer, the X/Y/Z axes
found among the loaded scripts. The stand-ins leave sys.modules as they found it."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from conftest import install_modules, make_concept, tiny_ldm_unet
from test_webui_fidelity import LayoutEnv
from test_webui_glue import FakeP

from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.webui.activation import Activator
from perfusion_ext.webui.concepts import ConceptStore

GLUE = ("perfusion_ext.webui.extra_network", "perfusion_ext.webui.wiring")


def placeholder_chunk(tokenizer):
    """The WebUI's PromptChunk for "a perfusionteddyabc on white": start token, "a", the embedding's
    placeholder, "on white", end token, padding; the fix says where the embedding sits."""
    ids = tokenizer("a on white", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    embedding = types.SimpleNamespace(name="perfusionteddyabc", vectors=1)
    return types.SimpleNamespace(tokens=[bos, ids[0], 0, *ids[1:], eos] + [eos] * (77 - len(ids) - 3),
                                 fixes=[types.SimpleNamespace(offset=1, embedding=embedding)])


@pytest.fixture()
def webui(monkeypatch):
    """Stand-ins for the `modules` the glue imports; yields (modules namespace, extra_network, wiring)."""
    class ExtraNetwork:
        def __init__(self, name):
            self.name = name

    shared = types.SimpleNamespace(sd_model=None, opts=types.SimpleNamespace(), cmd_opts=types.SimpleNamespace())
    fakes = {
        "modules": types.ModuleType("modules"),
        "modules.devices": types.SimpleNamespace(device=torch.device("cpu")),
        "modules.extra_networks": types.SimpleNamespace(ExtraNetwork=ExtraNetwork, parse_prompt=lambda p: (p, {}),
                                                        register_extra_network=lambda n: None),
        "modules.sd_hijack": types.SimpleNamespace(model_hijack=None),
        "modules.sd_unet": types.SimpleNamespace(current_unet=None),
        "modules.shared": shared,
        "modules.scripts": types.SimpleNamespace(Script=object, AlwaysVisible=object(), scripts_data=[]),
        "modules.ui_extra_networks": types.SimpleNamespace(register_page=lambda page: None),
        "modules.textual_inversion": types.ModuleType("modules.textual_inversion"),
        "modules.textual_inversion.textual_inversion": types.SimpleNamespace(Embedding=object),
    }
    install_modules(monkeypatch, fakes)
    for name in GLUE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    extra_network = importlib.import_module("perfusion_ext.webui.extra_network")
    wiring = importlib.import_module("perfusion_ext.webui.wiring")
    yield fakes, extra_network, wiring
    for name in GLUE:  # the next importer gets a fresh module, not one bound to these stand-ins
        sys.modules.pop(name, None)


def test_token_layout_reads_the_webui_chunks(webui):
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    fakes, extra_network, _ = webui
    tokenizer = tiny_random_pipeline().tokenizer
    chunk = placeholder_chunk(tokenizer)
    model = types.SimpleNamespace(tokenize_line=lambda prompt: ([chunk, chunk], 8), tokenizer=tokenizer)
    fakes["modules.shared"].sd_model = types.SimpleNamespace(cond_stage_model=model)
    texts, positions = extra_network.WebuiEnv().token_layout("a perfusionteddyabc on white")
    assert len(texts) == 154 and texts[:2] == ["<|startoftext|>", "a</w>"] and texts[3] == "on</w>"
    assert positions == {"perfusionteddyabc": [2, 79]}  # offset + 1 in each 77-token chunk
    conditioner = types.SimpleNamespace(embedders=[object(), model])  # A1111's SDXL: the encoder that tokenizes
    fakes["modules.shared"].sd_model = types.SimpleNamespace(cond_stage_model=conditioner)
    assert extra_network.WebuiEnv().token_layout("a perfusionteddyabc on white")[1] == positions
    fakes["modules.shared"].sd_model = types.SimpleNamespace(cond_stage_model=object())  # nothing tokenizes
    assert extra_network.WebuiEnv().token_layout("x") == ([], {})


def test_sdxl_stand_in_vectors_split_the_webui_concatenation_in_the_family_order(webui):
    fakes, extra_network, _ = webui
    # A1111's conditioner concatenates clip_l (768) then clip_g (1280); here a two-token word
    rows = torch.cat([torch.ones(2, 768), torch.full((2, 1280), 2.0)], dim=1)
    rows[1] += 1.0  # the mean of the two tokens: 1.5 and 2.5
    model = types.SimpleNamespace(encode_embedding_init_text=lambda word, nvpt: rows)
    fakes["modules.shared"].sd_model = types.SimpleNamespace(cond_stage_model=model)
    concept = types.SimpleNamespace(superclass="teddy bear", base_family="sdxl",  # as read back from a file
                                    embeddings={"clip_g": torch.zeros(2, 1280), "clip_l": torch.zeros(2, 768)})
    out = extra_network.WebuiEnv().superclass_vectors(concept)
    assert torch.equal(out["clip_l"], torch.full((2, 768), 1.5)) and torch.equal(out["clip_g"], torch.full((2, 1280), 2.5))


def test_the_conditioning_wrapper_is_removed_without_a_trace(webui):
    fakes, extra_network, _ = webui

    class Model:
        def get_learned_conditioning(self, texts):
            return "own"

    model = Model()
    fakes["modules.shared"].sd_model = model
    restore = extra_network.WebuiEnv().wrap_conditioning(lambda original: lambda texts: ("wrapped", original(texts)))
    assert model.get_learned_conditioning(["x"]) == ("wrapped", "own")
    restore()
    assert "get_learned_conditioning" not in vars(model) and model.get_learned_conditioning(["x"]) == "own"


def test_cfg_denoiser_drives_schedules_and_the_inspector(webui, tmp_path, monkeypatch):
    _, _, wiring = webui
    unet = tiny_ldm_unet()
    save_concept(make_concept(unet, "teddy", seed=1), tmp_path / "teddy.safetensors")
    act = Activator(ConceptStore(lambda: tmp_path), LayoutEnv(unet))
    monkeypatch.setattr(wiring.state, "activator", lambda: act)
    p = FakeP(["a <perfusion:teddy:beta=0.8@0,0.5@0.5> x"], [""], batch_size=1)
    act.activate(p)
    module = next(iter(act.edits.edits))
    params = types.SimpleNamespace(sampling_step=0, total_sampling_steps=10, text_cond=torch.randn(1, 77, 768),
                                   denoiser=types.SimpleNamespace(step=3, total_steps=20))
    wiring.cfg_denoiser(params)  # the denoiser's own count wins: 3 of 20 calls
    assert act.edits.edits[module].betas.tolist() == [0.8]
    assert "Perfusion gates" in p.extra_generation_params and not act.inspect_pending
    params.denoiser = types.SimpleNamespace(step=10, total_steps=20)
    wiring.cfg_denoiser(params)
    assert act.edits.edits[module].betas.tolist() == [0.5]
    params.denoiser, params.sampling_step = None, 4  # no denoiser count: the WebUI's sampling step
    wiring.cfg_denoiser(params)
    assert act.edits.edits[module].betas.tolist() == [0.8]
    act.release()


def test_before_ui_registers_the_axes_once(webui, monkeypatch):
    fakes, _, wiring = webui

    class AxisOption:
        def __init__(self, label, type, apply, **kw):
            self.label = label

    xyz_module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[])
    fakes["modules.scripts"].scripts_data = [
        types.SimpleNamespace(script_class=type("S", (), {"__module__": "xyz_grid.py"}), module=xyz_module)]
    cards = types.ModuleType("perfusion_ext.webui.cards")
    cards.ExtraNetworksPagePerfusion = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "perfusion_ext.webui.cards", cards)
    monkeypatch.setattr(wiring.state, "store", lambda: None)
    monkeypatch.setattr(wiring.state, "activator", lambda: None)
    wiring.before_ui()
    wiring.before_ui()  # the UI can be rebuilt; the axes are added once
    assert [o.label for o in xyz_module.axis_options] == ["Perfusion β", "Perfusion τ", "Perfusion strength"]


@pytest.fixture()
def compose_glue(tmp_path, monkeypatch):
    """perfusion_ext.webui.compose against stand-ins of processing/shared: (module, runs, events, folder)."""
    unet = tiny_ldm_unet()
    for seed, (name, superclass) in enumerate((("teddy", "bear"), ("robot", "toy")), start=1):
        save_concept(make_concept(unet, name, seed=seed, superclass=superclass), tmp_path / f"{name}.safetensors")
    runs, events = [], []

    class Txt2Img:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def close(self):
            runs.append(self.kwargs)

    def process_images(p):
        events.append(("panel", webui_state.job_count))
        return types.SimpleNamespace(images=[f"image of {p.kwargs['prompt']}"])

    webui_state = types.SimpleNamespace(job_count=0, interrupted=False, begin=lambda job: events.append(("begin", job)),
                                        end=lambda: events.append(("end",)))
    processing = types.SimpleNamespace(StableDiffusionProcessingTxt2Img=Txt2Img, process_images=process_images,
                                       get_fixed_seed=lambda s: 4242 if s == -1 else s)
    import perfusion_ext.webui

    state = types.SimpleNamespace(store=lambda: ConceptStore(lambda: tmp_path))
    for name, module in {"modules": types.ModuleType("modules"), "modules.processing": processing,
                         "modules.shared": types.SimpleNamespace(sd_model="model", state=webui_state),
                         "perfusion_ext.webui.state": state}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(perfusion_ext.webui, "state", state, raising=False)  # `from . import state` reads this first
    monkeypatch.delitem(sys.modules, "perfusion_ext.webui.compose", raising=False)
    compose = importlib.import_module("perfusion_ext.webui.compose")
    monkeypatch.setattr(compose, "_model_family", lambda: "sd1")
    yield compose, runs, events
    sys.modules.pop("perfusion_ext.webui.compose", None)


def test_compose_preview_renders_each_concept_alone_then_together(compose_glue):
    """The tab's composition preview: one txt2img per panel at the same seed, tags kept for the extra network."""
    compose, runs, events = compose_glue
    panels, seed = compose.render("a <perfusion:teddy:0.8> left of a <perfusion:robot>", "blurry", 7, 20, 64, 64)
    assert [label for _, label in panels] == ["teddy", "robot", "together"] and seed == 7
    assert [r["prompt"] for r in runs] == ["a <perfusion:teddy:0.8> left of a toy", "a bear left of a <perfusion:robot>",
                                          "a <perfusion:teddy:0.8> left of a <perfusion:robot>"]
    assert {r["seed"] for r in runs} == {7} and all(r["negative_prompt"] == "blurry" for r in runs)
    # one WebUI job for the three panels (progress, Interrupt), ended after them
    assert events == [("begin", "perfusion_compose"), ("panel", 3), ("panel", 3), ("panel", 3), ("end",)]
    with pytest.raises(PerfusionError, match="unknown concept 'ghost'"):
        compose.render("a <perfusion:teddy> and <perfusion:ghost>", "", 1, 20, 64, 64)


def test_compose_preview_draws_a_random_seed_once(compose_glue):
    """Seed -1: the WebUI would draw a seed per panel (found in the real WebUI); the preview draws one for all."""
    compose, runs, _ = compose_glue
    panels, seed = compose.render("a <perfusion:teddy> left of a <perfusion:robot>", "", -1, 2, 64, 64)
    assert seed == 4242 and [r["seed"] for r in runs] == [4242, 4242, 4242] and len(panels) == 3


def test_compose_preview_refuses_a_concept_of_another_family(compose_glue, monkeypatch):
    """A concept of another family would be skipped by the activation (an SD2 one on SD1, in the real WebUI):
    its "alone" panel would be the superclass only. The preview says so before rendering anything."""
    compose, runs, events = compose_glue
    monkeypatch.setattr(compose, "_model_family", lambda: "sd2")
    with pytest.raises(PerfusionError, match=r"<perfusion:teddy> cannot be used here: trained for SD1"):
        compose.render("a <perfusion:teddy> left of a <perfusion:robot>", "", 1, 2, 64, 64)
    assert runs == [] and events == []
