"""The β dial on the toy model, as a picture: one trained concept, rows of prompts, columns of β.

    python -m benchmarks.beta_grid [--concept house] [--out docs/beta_grid.png]

Trains the concept with the default recipe (as the demo does), then renders every prompt at every β with
one seed per row, so each row differs only in β. Lower β opens the gate wider (more of the concept,
less of the prompt); higher β the reverse.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmarks._common import ROOT

BETAS = (0.4, 0.55, 0.7, 0.85, 1.0)
PROMPTS = ("a photo of a <perfusion:{name}{opt}> on the left, blue background",
           "a <perfusion:{name}{opt}> at the top, yellow background",
           "green background, a small <perfusion:{name}{opt}> on the right",
           "a <perfusion:{name}{opt}> in the middle, white background")
CELL, LABEL = 64, 14


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="house")
    parser.add_argument("--out", default=str(ROOT / "docs" / "beta_grid.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.pipelines.generate import generate
    from perfusion_ext.pipelines.loading import load_pipeline
    from perfusion_ext.toy.concepts import CONCEPTS, write_training_set
    from perfusion_ext.training import TrainConfig, train

    pipe, concept = load_pipeline("toy"), CONCEPTS[args.concept]
    with tempfile.TemporaryDirectory() as tmp:
        images = write_training_set(args.concept, Path(tmp) / "images", n=6)
        train(DiffusersBackend(pipe), TrainConfig(args.concept, concept.superclass, flip=concept.mirrorable,
                                                 masks_dir=str(images / "masks")), images, Path(tmp) / "concepts")
        grid = Image.new("RGB", (CELL * len(BETAS), LABEL + CELL * len(PROMPTS)), "white")
        draw = ImageDraw.Draw(grid)
        for j, beta in enumerate(BETAS):
            draw.text((j * CELL + 4, 1), f"β={beta}", fill="black")
        for i, template in enumerate(PROMPTS):
            for j, beta in enumerate(BETAS):
                prompt = template.format(name=args.concept, opt=f":beta={beta}")
                image = generate(pipe, prompt, concepts_dir=Path(tmp) / "concepts", seed=i)[0][0]
                grid.paste(image.resize((CELL, CELL), Image.NEAREST), (j * CELL, LABEL + i * CELL))
    grid.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
