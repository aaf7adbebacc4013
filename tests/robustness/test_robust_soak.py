"""Soak: many generations in a row on the tiny random toy pipeline, alternating concepts, strengths, β schedules,
bad tags and failures (a sampler that raises, a UNet call that raises, a WebUI generation abandoned half-way).
At the end no hook is left, the model is bit-identical to what it was, and the resident memory is flat.

40 generations in CI; `PERFUSION_SOAK_GENERATIONS=200` for the long run:
    PERFUSION_SOAK_GENERATIONS=200 .venv/bin/python -m pytest -q tests/robustness/test_robust_soak.py -s
"""
from __future__ import annotations

import gc
import os
import time

import pytest
import torch
from conftest import run_unet
from robust_helpers import hook_count, rss_mib, toy_concept, toy_pipeline
from test_webui_glue import FakeEnv, FakeP

from perfusion_ext.core.concept import save_concept
from perfusion_ext.pipelines.generate import generate
from perfusion_ext.webui.activation import Activator
from perfusion_ext.webui.concepts import ConceptStore

GENERATIONS = int(os.environ.get("PERFUSION_SOAK_GENERATIONS", "40"))
WARMUP = 8  # generations before the memory baseline (first calls allocate caches)
RSS_GROWTH_LIMIT_MIB = 24


class Boom(RuntimeError):
    pass


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, part).state_dict().items()}


def _hooks(pipe) -> int:
    return sum(hook_count(getattr(pipe, part)) for part in ("unet", "text_encoder", "vae"))


def test_soak(tmp_path, monkeypatch):
    pipe = toy_pipeline()
    for name, seed in (("teddy", 1), ("ring", 2)):
        save_concept(toy_concept(pipe, name, seed), tmp_path / f"{name}.safetensors")
    weights, hooks = _weights(pipe), _hooks(pipe)
    env = FakeEnv(pipe.unet)
    act = Activator(ConceptStore(lambda: tmp_path), env)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    real_step = pipe.scheduler.step

    def raising_step(*args, **kwargs):
        raise Boom("sampler failed")

    def raising_unet(module, args):
        raise Boom("UNet call failed")

    kinds = ["teddy", "ring", "both-scheduled", "plain", "raising-sampler", "bad-tags", "raising-unet",
             "strengths", "webui-abandoned", "webui"]
    counts = dict.fromkeys(kinds, 0)
    rss, started = {}, time.perf_counter()
    for i in range(GENERATIONS):
        kind = kinds[i % len(kinds)]
        counts[kind] += 1
        common = dict(concepts_dir=tmp_path, seed=i, num_inference_steps=2)
        if kind == "teddy":
            images, _ = generate(pipe, "a <perfusion:teddy> on the left, blue background", **common)
        elif kind == "ring":
            images, _ = generate(pipe, "a <perfusion:ring:0.5> at the top", **common)
        elif kind == "both-scheduled":
            images, _ = generate(pipe, "<perfusion:teddy:beta=0.8@0,0.6@0.5> and <perfusion:ring:tau=0.2>", **common)
        elif kind == "plain":
            images, _ = generate(pipe, "a red circle on the right", **common)
        elif kind == "bad-tags":
            images, warnings = generate(pipe, "<perfusion:teddy:nan> <perfusion:ghost> <perfusion:ring", **common)
            assert len(warnings) == 3, warnings
        elif kind == "strengths":
            images, _ = generate(pipe, f"<perfusion:teddy:{(i % 7) - 3}> <perfusion:ring:2.5>", **common)
        elif kind == "raising-sampler":
            monkeypatch.setattr(pipe.scheduler, "step", raising_step)
            with pytest.raises(Boom):
                generate(pipe, "a <perfusion:teddy> and <perfusion:ring>", **common)
            monkeypatch.setattr(pipe.scheduler, "step", real_step)
            images = None
        elif kind == "raising-unet":
            handle = pipe.unet.mid_block.register_forward_pre_hook(raising_unet)
            try:
                with pytest.raises(Boom):
                    generate(pipe, "<perfusion:ring:0.7> on the left", **common)
            finally:
                handle.remove()
            images = None
        else:  # the WebUI path: activate, sample, release; or a generation that dies before release
            act.activate(FakeP([f"a <perfusion:teddy:{0.5 + (i % 3) / 4}> and <perfusion:ring>"], [""], batch_size=1))
            assert act.handles and _hooks(pipe) == hooks + len(act.handles)  # an abandoned pass left nothing
            run_unet(pipe.unet, x, torch.tensor([10]), ctx)
            if kind == "webui":
                act.release()
            images = None  # "webui-abandoned": no release; the next activation must start clean
        if images is not None:
            assert len(images) == 1 and images[0].size == (32, 32)
        if kind != "webui-abandoned":
            assert _hooks(pipe) == hooks, (i, kind)
        if i + 1 == WARMUP:
            gc.collect()
            rss["baseline_mib"] = rss_mib()
    act.release()
    gc.collect()
    rss["end_mib"] = rss_mib()
    figures = {"generations": GENERATIONS, "seconds": round(time.perf_counter() - started, 1), **rss, "kinds": counts}
    print(f"\n[soak] {figures}")
    assert _hooks(pipe) == hooks  # no hook left behind
    assert not env.registered
    after = _weights(pipe)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)  # bit for bit
    if rss.get("baseline_mib") is not None and GENERATIONS > WARMUP:
        assert rss["end_mib"] - rss["baseline_mib"] < RSS_GROWTH_LIMIT_MIB, figures
