"""Exporter benchmark: ORT latency of the baked UNet vs the base UNet export, ORT vs PyTorch
eager (with the concept hooks) per denoising step, and export time and peak RSS, side by side.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_export            # tiny SD1.5-topology UNet (~3 min)
    OMP_NUM_THREADS=1 python -m benchmarks.bench_export --full     # + SD1.5-size random UNet (~25 min, ~4 GB)

Random weights (no downloads). Each export runs in its own child process so its peak RSS is its own.
Latencies are medians over interleaved runs (base, baked, torch alternate) on one thread.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from benchmarks._common import random_concept

SIZES = {
    # SD1.5 topology (4 levels, 2 layers per block, 16 attn2) at toy widths, as in the tests
    "tiny": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=2, norm_num_groups=32, latent=16),
    # SD1.5 itself (860M parameters), random weights
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32, latent=64),
}


def build_unet(size: str):
    from diffusers import UNet2DConditionModel

    cfg = dict(SIZES[size])
    latent = cfg.pop("latent")
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **cfg).eval()


def _export_child(size: str, baked: bool, out: str, queue) -> None:
    torch.set_num_threads(1)
    from perfusion_export.exporter import export_pipeline

    unet = build_unet(size)
    concepts = [random_concept(unet)] if baked else []
    pipe = types.SimpleNamespace(unet=unet, text_encoder=None)
    start = time.perf_counter()
    export_pipeline(pipe, concepts, out, layout="unet-only", verify_export=False, model_name=size)
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def timed_export(size: str, baked: bool, out: Path) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_export_child, args=(size, baked, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _inputs(size: str):
    latent = SIZES[size]["latent"]
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, latent, latent, generator=g), torch.randn(2, 77, 768, generator=g)
    return x, torch.tensor([500.0]), e


def _latency_child(size: str, variant: str, folder: str | None, repeats: int, queue) -> None:
    """Median seconds per UNet call of one variant, alone in its process (an SD1.5 UNet in ORT and in
    torch at once would need > 20 GB)."""
    torch.set_num_threads(1)
    x, t, e = _inputs(size)
    if variant == "torch_hooks":
        from perfusion_ext.core.hooks import activate

        unet = build_unet(size)
        concept = random_concept(unet)

        def call():
            with torch.no_grad(), activate(unet, [concept]):
                unet(x, t, encoder_hidden_states=e)
    else:
        from perfusion_export.verify import session

        sess = session(Path(folder) / "unet/model.onnx")
        feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy()}

        def call():
            sess.run(None, feed)
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    queue.put(statistics.median(times))


def latencies(size: str, folders: dict[str, Path], repeats: int, rounds: int = 2) -> dict[str, float]:
    """Per-call medians, measured side by side: the variants alternate, `rounds` times each."""
    ctx = mp.get_context("spawn")
    samples = {"base_ort": [], "baked_ort": [], "torch_hooks": []}
    for _ in range(rounds):
        for variant, folder in (("base_ort", folders["base"]), ("baked_ort", folders["baked"]), ("torch_hooks", None)):
            queue = ctx.Queue()
            proc = ctx.Process(target=_latency_child, args=(size, variant, str(folder) if folder else None,
                                                            repeats, queue))
            proc.start()
            samples[variant].append(queue.get())
            proc.join()
    return {k: statistics.median(v) for k, v in samples.items()}


HEADER = (f"{'UNet':6s} {'export s base/baked':>20s} {'peak RSS GiB base/baked':>24s} {'ORT base ms':>12s} "
          f"{'ORT baked ms':>13s} {'baked/base':>11s} {'torch+hooks ms':>15s} {'torch/ORT':>10s}")


def row(size, exports, lat) -> str:
    (tb, rb), (tk, rk) = exports["base"], exports["baked"]
    return (f"{size:6s} {tb:9.1f}/{tk:<9.1f} {rb:11.2f}/{rk:<11.2f} {lat['base_ort'] * 1e3:12.2f} "
            f"{lat['baked_ort'] * 1e3:13.2f} {lat['baked_ort'] / lat['base_ort']:10.3f}x "
            f"{lat['torch_hooks'] * 1e3:15.2f} {lat['torch_hooks'] / lat['baked_ort']:9.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the SD1.5-size UNet (~25 min, ~4 GB RAM)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    sizes = ["tiny"] + (["sd15"] if args.full else [])
    print(HEADER, flush=True)
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folders, exports = {}, {}
            for kind in ("base", "baked"):
                folders[kind] = Path(tmp) / kind
                exports[kind] = timed_export(size, kind == "baked", folders[kind])
                print(f"  {size} {kind} export: {exports[kind][0]:.1f} s, peak RSS {exports[kind][1]:.2f} GiB", flush=True)
            lat = latencies(size, folders, args.repeats if size == "tiny" else max(3, args.repeats // 5))
        print(row(size, exports, lat), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
