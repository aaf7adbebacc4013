"""The README's demo: train a toy concept, generate with <perfusion:...>, export to ONNX, sample it.

Runs on the embedded toy model (a tiny random model of the same architecture until the toy model is
trained, which it says loudly), on a CPU, in a few minutes.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("perfusion.demo")

DEMO_CONCEPT = "house"  # a red triangle on top of a white square: drawable by the toy model, named by no word
PROMPTS = (
    "a photo of a <perfusion:{name}> on the left, blue background",
    "a <perfusion:{name}> at the top, yellow background",
    "{bg} background, a <perfusion:{name}> on the right",
    "a <perfusion:{name}:0.0> on the left, blue background",  # strength 0: only the learned word acts
)


def _grid(images: list[Image.Image], scale: int = 4) -> Image.Image:
    w, h = images[0].size
    grid = Image.new("RGB", (len(images) * (w + 2), h), (128, 128, 128))
    for i, im in enumerate(images):
        grid.paste(im, (i * (w + 2), 0))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--concept", default=DEMO_CONCEPT, help="a toy concept: house, lollipop, signpost, duotone "
                        "(drawable) or teddy, stripebox, ring (beyond what the toy model can draw)")
    args = parser.parse_args(argv)
    from .logs import setup_cli_logging

    setup_cli_logging()

    from ..pipelines.backend import DiffusersBackend
    from ..pipelines.generate import generate
    from ..pipelines.loading import load_pipeline
    from ..toy import checkers, plugin
    from ..toy.concepts import CONCEPTS, fidelity, write_training_set
    from ..training import TrainConfig, train

    out = Path(args.out)
    started = time.time()
    if plugin.PLUGIN.model_ready():
        pipe, model_spec = load_pipeline("toy"), "toy"
        log.info("model: the embedded toy model (perfusion_ext/toy/model)")
    else:
        pipe, model_spec = plugin.tiny_random_pipeline(), None
        log.warning("NOTE: the toy model is not trained yet, so this demo runs on a TINY RANDOM model of the same "
                    "architecture: every step runs for real, but the images are noise.")
    name, concept = args.concept, CONCEPTS[args.concept]
    images = write_training_set(name, out / f"{name}_images", n=6)
    log.info("1/3 training <perfusion:%s> (superclass %r) on %s", name, concept.superclass, images)
    result = train(DiffusersBackend(pipe), TrainConfig(name, concept.superclass, steps=args.steps, flip=concept.mirrorable,
                                                        masks_dir=str(images / "masks")),
                   images, out / "concepts", overwrite=True)
    log.info("    %s in %.0f s -> %s (%.1f KiB)", result.message, time.time() - started, result.concept_path,
             result.concept_path.stat().st_size / 1024)

    log.info("2/3 generating with PyTorch hooks")
    generated = []
    prompts = [p.format(name=name, bg="green" if "green" in concept.readable_backgrounds() else "white")
               for p in PROMPTS]
    for prompt in prompts:
        image = generate(pipe, prompt, concepts_dir=out / "concepts", seed=1)[0][0]
        generated.append(image)
        arr = np.asarray(image)
        (background, position), fid = checkers.read_alignment(arr), fidelity(arr, name)
        log.info("    %-62s background=%s position=%s looks-like-%s=%s%s", prompt, background, position, name,
                 fid.is_concept, "" if fid.is_concept else f" ({fid.reason})")
    grid_path = out / "demo_grid.png"
    _grid(generated).save(grid_path)
    log.info("    grid: %s", grid_path)

    if not args.skip_export:
        from .demo_export import export_and_sample

        log.info("3/3 exporting to ONNX and sampling it with ONNX Runtime")
        export_and_sample(model_spec, pipe, result.concept_path, out, prompts[0], generated[0])
    log.info("demo finished in %.0f s; everything is in %s", time.time() - started, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
