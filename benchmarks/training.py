"""What training and a concept file cost, side by side in one run.

    OMP_NUM_THREADS=2 python -m benchmarks.training            # ~3 min on a 2-core CPU
    python -m benchmarks.training --quick                      # smoke pass

1. A Perfusion training step vs a textual-inversion-only step (the same model, batch and images: only the
   K/V edits differ), median of interleaved steps after warm-ups, on the toy model.
2. Training a toy concept with the default settings (the house, 6 images, the CLI's defaults): wall time.
3. Concept file size for SD1, SD2 and SDXL: a concept with every attn2 layer of the real UNet configs
   (built on the meta device, no weights), written as the trainer writes it.
Results: benchmarks/results/training.json.
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

from benchmarks._common import ROOT, markdown_table

RESULTS = ROOT / "benchmarks" / "results" / "training.json"


def step_ratio(pipe, images: Path, repeats: int) -> dict:
    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.training import TrainConfig
    from perfusion_ext.training.dataset import load_images
    from perfusion_ext.training.trainer import ConceptTrainer

    backend = DiffusersBackend(pipe)
    trainers = {}
    for mode in ("perfusion", "textual_inversion"):
        cfg = TrainConfig("house", "square", mode=mode, seed=0).resolved(backend.family, backend.device)
        trainers[mode] = ConceptTrainer(backend, cfg, load_images(images, cfg.resolution))
    times = {mode: [] for mode in trainers}
    for round_ in range(repeats + 2):
        for mode, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step()
            if round_ >= 2:
                times[mode].append(time.perf_counter() - start)
    ms = {mode: 1000 * statistics.median(t) for mode, t in times.items()}
    return {"perfusion_ms": ms["perfusion"], "textual_inversion_ms": ms["textual_inversion"],
            "ratio": ms["perfusion"] / ms["textual_inversion"]}


def toy_training_seconds(pipe, images: Path, out: Path, steps: int | None) -> dict:
    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.training import TrainConfig, train

    start = time.perf_counter()
    result = train(DiffusersBackend(pipe), TrainConfig("house", "square", steps=steps, flip=True,
                                                       masks_dir=str(images / "masks")), images, out, overwrite=True)
    return {"seconds": time.perf_counter() - start, "steps": steps or "default", "bytes": result.concept_path.stat().st_size}


def concept_bytes(family: str, folder: Path) -> int:
    """A concept for the family's real UNet layout (meta device: shapes only), saved as the trainer saves it."""
    from diffusers import UNet2DConditionModel

    from perfusion_ext.core import families
    from perfusion_ext.core.concept import Concept, save_concept
    from perfusion_ext.core.layers import cross_attention_layers

    fam = families.get(family)
    config = {k: v for k, v in fam.diffusers_configs["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    layers = cross_attention_layers(unet)
    d = next(iter(layers.values())).in_dim
    i_star = torch.randn(d)
    concept = Concept(name="size", token="size", superclass="thing", base_family=family,
                      embeddings={name: torch.randn(1, width) for name, width in fam.encoders},
                      target_input=i_star, target_input_cinv=i_star.clone(),  # any u with u · i* > 0
                      key_targets={n: torch.randn(layer.out_dim) for n, layer in layers.items()},
                      value_targets={n: torch.randn(layer.out_dim) for n, layer in layers.items()})
    return save_concept(concept, folder / f"{family}.safetensors").stat().st_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from perfusion_ext.pipelines.loading import load_pipeline
    from perfusion_ext.toy.concepts import write_training_set

    pipe = load_pipeline("toy")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = write_training_set("house", folder / "images", n=6)
        result = {"step": step_ratio(pipe, images, 3 if args.quick else 20),
                  "toy_training": toy_training_seconds(pipe, images, folder / "concepts", 10 if args.quick else None),
                  "concept_bytes": {f: concept_bytes(f, folder) for f in ("sd1", "sd2", "sdxl")}}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} thread(s)"
    result["machine"] = machine
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    step, toy, sizes = result["step"], result["toy_training"], result["concept_bytes"]
    print(f"machine: {machine}")
    print(markdown_table(["what", "measured", "goal"], [
        ["training step, Perfusion vs textual inversion (toy)",
         f"{step['perfusion_ms']:.0f} vs {step['textual_inversion_ms']:.0f} ms = {step['ratio']:.2f}×", "≤ 1.15×"],
        [f"toy concept training, {toy['steps']} steps", f"{toy['seconds']:.0f} s", "≤ 120 s"],
        ["concept file SD1 / SD2 / SDXL", " / ".join(f"{sizes[f] / 1024:.1f} KiB" for f in ("sd1", "sd2", "sdxl")),
         "≤ 64 KiB for SD1"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
