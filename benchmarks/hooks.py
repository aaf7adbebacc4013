"""What a concept costs at sampling time: UNet step time with 0, 1 and 8 concepts, side by side.

    OMP_NUM_THREADS=1 python -m benchmarks.hooks            # ~3 min on one CPU thread
    python -m benchmarks.hooks --quick                      # smoke pass

A mid-size UNet of SD1.5 topology (diffusers and A1111's ldm class, random weights, 16 attn2 layers,
batch 2 = negative + positive, 77 tokens, the same text tensor at every step as the pipelines pass it),
and the toy model. Each variant is timed interleaved with the others (median of repeated steps after
warm-ups), so a slower moment of the machine hits all of them. Also: loading a concept file and
attaching/detaching its hooks. Results: benchmarks/results/hooks.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT, markdown_table, random_concept

RESULTS = ROOT / "benchmarks" / "results" / "hooks.json"
CHANNELS = (64, 128, 256, 256)


def diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=CHANNELS,
        attention_head_dim=8, norm_num_groups=32).eval()


def ldm_unet():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    return UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=CHANNELS[0],
                     attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
                     use_spatial_transformer=True, transformer_depth=1, context_dim=768, legacy=False).eval()


def toy_unet():
    from perfusion_ext.pipelines.loading import load_pipeline

    return load_pipeline("toy").unet


def step_function(unet, latent: int, width: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([500, 500])
    text = torch.randn(2, 77, width, generator=g)
    if hasattr(unet, "down_blocks"):
        return lambda: unet(x, t, encoder_hidden_states=text).sample
    return lambda: unet(x, timesteps=t, context=text)


def step_times(unet, latent: int, family: str, repeats: int) -> dict:
    """Median ms per UNet step with none, 1 and 8 concepts (interleaved), and their ratios to none."""
    import perfusion_ext as pf
    from perfusion_ext.core.layers import cross_attention_layers

    width = next(iter(cross_attention_layers(unet).values())).in_dim
    concepts = [random_concept(unet, seed=k + 1, name=f"c{k}", family=family) for k in range(8)]
    step = step_function(unet, latent, width)
    variants = {"none": [], "1 concept": concepts[:1], "8 concepts": concepts}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for round_ in range(repeats + 2):
            for name, active in variants.items():
                with pf.activate(unet, active):
                    step()  # the first call after attaching fills the per-text coefficients, as a sampler's first step
                    start = time.perf_counter()
                    step()
                    if round_ >= 2:
                        times[name].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    out = {name: {"ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / base} for name, t in times.items()}
    projections = 2 * len(cross_attention_layers(unet))  # one hook per to_k and to_v
    out["1 concept"]["us_per_hooked_projection"] = 1000 * (out["1 concept"]["ms"] - out["none"]["ms"]) / projections
    return out


def activation_ms(unet, family: str, repeats: int) -> float:
    """Load a concept file and attach + detach its hooks (median ms)."""
    import perfusion_ext as pf

    with tempfile.TemporaryDirectory() as tmp:
        path = pf.save_concept(random_concept(unet, family=family), Path(tmp) / "c.safetensors")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with pf.activate(unet, [pf.load_concept(path)]):
                pass
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats, small latents")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    repeats = 3 if args.quick else 15
    models = {"SD1.5 topology, diffusers": (diffusers_unet, 8 if args.quick else 32, "sd1"),
              "SD1.5 topology, ldm (A1111)": (ldm_unet, 8 if args.quick else 32, "sd1"),
              "toy model": (toy_unet, 32, "toy")}
    results = {}
    for name, (build, latent, family) in models.items():
        unet = build()
        results[name] = {"steps": step_times(unet, latent, family, repeats),
                         "activate_ms": activation_ms(unet, family, repeats)}
        print(name, json.dumps(results[name]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} thread(s)"
    if not args.quick:
        RESULTS.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"machine: {machine}")
    print(markdown_table(["UNet", "step, no concept", "1 concept", "8 concepts", "per hooked projection",
                          "load + attach + detach"],
                         [[name, f"{r['steps']['none']['ms']:.1f} ms", f"{r['steps']['1 concept']['ratio']:.3f}×",
                           f"{r['steps']['8 concepts']['ratio']:.3f}×",
                           f"{r['steps']['1 concept']['us_per_hooked_projection']:.0f} µs", f"{r['activate_ms']:.1f} ms"]
                          for name, r in results.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
