"""Shared fixtures: tiny random UNets of SD1.5 topology (diffusers and ldm), random concepts, stand-ins of the WebUI."""
from __future__ import annotations

import importlib
import os
import sys
import threading
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("PERFUSION_TEST_THREADS", "1")))

from perfusion_ext.core.concept import Concept  # noqa: E402
from perfusion_ext.core.layers import cross_attention_layers  # noqa: E402

SD1_CONTEXT = 768


def tiny_diffusers_unet(context_dim: int = SD1_CONTEXT, channels=(32, 64, 64, 64), seed: int = 0):
    """SD1.5 topology (4 levels, 2 layers per block, 16 attn2 blocks) at toy widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=channels, layers_per_block=2, cross_attention_dim=context_dim,
        attention_head_dim=2, norm_num_groups=32,
    ).eval()


def tiny_ldm_unet(context_dim: int = SD1_CONTEXT, seed: int = 0):
    """A1111's ldm UNetModel with SD1.5's config at toy widths."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True,
        transformer_depth=1, context_dim=context_dim, legacy=False,
    ).eval()
    _randomize_zero_init(unet)
    return unet


def _randomize_zero_init(model):
    """ldm zero-initialises output convs and attention projections; a random model must not be inert."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)


@pytest.fixture(scope="session")
def diffusers_unet():
    return tiny_diffusers_unet()


@pytest.fixture(scope="session")
def ldm_unet():
    return tiny_ldm_unet()


@pytest.fixture(scope="module")
def random_toy_backend(tmp_path_factory):
    """A diffusers backend on the toy architecture with random weights and its own cache for the module
    (covariances are estimated once per module and never leak into another's)."""
    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERFUSION_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield DiffusersBackend(tiny_random_pipeline())


@pytest.fixture(scope="module")
def pipe():
    """The toy architecture with random weights, one per module (tests attach hooks and swap schedulers)."""
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    return tiny_random_pipeline()


@pytest.fixture
def toy_teddy_dir(pipe, tmp_path):
    """A concepts folder holding one random "teddy" (superclass "circle") for the toy architecture."""
    from perfusion_ext.core.concept import save_concept

    concept = make_concept(pipe.unet, name="teddy", family="toy", superclass="circle")
    concept.embeddings = {"clip_l": torch.randn(1, 128)}
    save_concept(concept, tmp_path / "teddy.safetensors")
    return tmp_path


@pytest.fixture(params=["diffusers", "ldm"])
def unet(request):
    return request.getfixturevalue(f"{request.param}_unet")


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def make_concept(unet, name="teddy", seed=1, covariance=None, family="sd1", superclass="bear") -> Concept:
    """A random concept that fits `unet`: key targets locked to W_k i_super, value targets random."""
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    d = next(iter(layers.values())).in_dim
    covariance = random_spd(d) if covariance is None else covariance
    i_star = torch.randn(d, generator=g, dtype=torch.float64)
    i_super = torch.randn(d, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(covariance, i_star)
    keys, values = {}, {}
    for lname, layer in layers.items():
        keys[lname] = (layer.to_k.weight.detach().double() @ i_super).float()
        values[lname] = torch.randn(layer.out_dim, generator=g)
    return Concept(
        name=name, token=name, superclass=superclass, base_family=family,
        embeddings={"clip_l": torch.randn(1, d, generator=g)},
        target_input=i_star.float(), target_input_cinv=u.float(), key_targets=keys, value_targets=values,
    )


def unet_inputs(unet, batch=2, tokens=77, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    d = next(iter(layers.values())).in_dim
    x = torch.randn(batch, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([10] * batch)
    ctx = torch.randn(batch, tokens, d, generator=g).to(dtype)
    return x, t, ctx


def run_unet(unet, x, t, ctx):
    with torch.no_grad():
        if hasattr(unet, "down_blocks"):
            return unet(x, t, encoder_hidden_states=ctx).sample
        return unet(x, timesteps=t, context=ctx)


# ---- stand-ins of the WebUI's `modules` ----------------------------------------------------------------------------
def install_modules(monkeypatch, fakes: dict) -> None:
    """Put stand-in `modules.*` entries into sys.modules (and onto the `modules` package) for this test."""
    for name, module in fakes.items():
        if name.count(".") == 1:
            setattr(fakes["modules"], name.split(".")[1], module)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture()
def webui_training(monkeypatch, tmp_path):
    """perfusion_ext.webui.training imported against stand-ins of `modules`; yields (shared, training module)."""
    class State:
        interrupted, job, job_count, job_no, sampling_step, sampling_steps, textinfo, current_image = (
            False, "", 0, 0, 0, 0, "", None)

        def begin(self, job=""):
            self.job = job

        def end(self):
            self.job = ""

        def assign_current_image(self, image):
            self.current_image = image

    shared = types.SimpleNamespace(sd_model=None, opts=types.SimpleNamespace(perfusion_save_previews=False),
                                   cmd_opts=types.SimpleNamespace(), state=State())
    fakes = {
        "modules": types.ModuleType("modules"),
        "modules.call_queue": types.SimpleNamespace(queue_lock=threading.Lock()),
        "modules.devices": types.SimpleNamespace(device=torch.device("cpu")),
        "modules.extra_networks": types.SimpleNamespace(ExtraNetwork=object, parse_prompt=lambda p: (p, {})),
        "modules.paths": types.SimpleNamespace(data_path=str(tmp_path / "data")),
        "modules.processing": types.SimpleNamespace(),
        "modules.sd_hijack": types.SimpleNamespace(model_hijack=None),
        "modules.sd_unet": types.SimpleNamespace(current_unet=None),
        "modules.shared": shared,
        "modules.textual_inversion": types.ModuleType("modules.textual_inversion"),
        "modules.textual_inversion.textual_inversion": types.SimpleNamespace(Embedding=object),
    }
    install_modules(monkeypatch, fakes)
    glue = ("perfusion_ext.webui.training", "perfusion_ext.webui.extra_network")
    for name in glue:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield shared, importlib.import_module("perfusion_ext.webui.training")
    import perfusion_ext.webui as package

    for name in glue:  # the next importer gets a fresh module, not one bound to these stand-ins
        sys.modules.pop(name, None)
        if hasattr(package, name.rsplit(".", 1)[1]):
            delattr(package, name.rsplit(".", 1)[1])
