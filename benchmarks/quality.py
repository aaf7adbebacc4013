"""Quality benchmark on the toy world: Perfusion vs textual inversion vs no key locking.

    .venv/bin/python benchmarks/quality.py [--concepts teddy stripebox ring] [--seeds 2] [--update-readme]

For each toy concept it trains (a) Perfusion, (b) textual inversion only (same embedding, no K/V
edits), (c) Perfusion without key locking (K target trained like V), then generates on unseen prompts
(backgrounds and positions outside the training images, size words) and measures:
- fidelity: share of images whose object the nearest-template classifier calls the concept;
- alignment: share of images whose background and position match the prompt (both must hold);
- the base model's alignment on the same prompts with the superclass word instead of the concept.
It sweeps the inference β for Perfusion. Writes benchmarks/results/quality.json,
docs/quality_tradeoff.png and, with --update-readme, the README table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, markdown_table, scatter, splice_readme

MODES = ("perfusion", "textual_inversion", "no_key_lock")
BETAS = (0.5, 0.6, 0.7, 0.8)
COLOURS = {"perfusion": (20, 60, 200), "textual_inversion": (200, 80, 20), "no_key_lock": (30, 150, 60),
           "base": (90, 90, 90)}


def unseen_prompts(name: str) -> list[tuple[str, str, str]]:
    """(prompt template with {} for the subject, background, position): every readable background ×
    position pair the training images never showed, in two phrasings with size words."""
    from perfusion_ext.toy.concepts import CONCEPTS, training_scenes
    from perfusion_ext.toy.world import POSITION_PHRASES, POSITIONS

    seen = {(s["background"], s["position"]) for s in training_scenes(name)}
    out = []
    for i, bg in enumerate(CONCEPTS[name].readable_backgrounds()):
        for j, pos in enumerate(POSITIONS):
            if (bg, pos) in seen:
                continue
            phrases = POSITION_PHRASES[pos]
            out.append((f"a photo of a {{}} {phrases[(i + j) % len(phrases)]}, {bg} background", bg, pos))
            size = ("small", "large")[(i + j) % 2]
            out.append((f"a {size} {{}} {phrases[(i + j + 1) % len(phrases)]} on a {bg} background", bg, pos))
    return out


def measure(pipe, prompts, subject: str, name: str, seeds: int, concepts_dir=None, beta=None) -> dict:
    from perfusion_ext.pipelines.generate import generate
    from perfusion_ext.toy import checkers
    from perfusion_ext.toy.concepts import fidelity

    fid = align = bg_ok = pos_ok = n = 0
    for template, bg, pos in prompts:
        text = template.format(subject if beta is None else subject.replace(">", f":beta={beta}>"))
        for seed in range(seeds):
            image = np.asarray(generate(pipe, text, concepts_dir=concepts_dir, seed=seed)[0][0])
            reading = checkers.read(image)
            fid += fidelity(image, name).is_concept
            bg_ok += reading.background == bg
            pos_ok += reading.position == pos
            align += reading.background == bg and reading.position == pos
            n += 1
    return {"fidelity": fid / n, "alignment": align / n, "background": bg_ok / n, "position": pos_ok / n, "n": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concepts", nargs="+", default=["teddy", "stripebox", "ring"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default="toy", help="toy (default) or a diffusers folder of the toy architecture")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)

    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.pipelines.loading import load_pipeline
    from perfusion_ext.toy.concepts import CONCEPTS, write_training_set
    from perfusion_ext.training import TrainConfig, train

    pipe = load_pipeline(args.model)
    backend = DiffusersBackend(pipe)
    results = {"concepts": {}, "betas": BETAS, "seeds": args.seeds}
    work = Path(tempfile.mkdtemp(prefix="perfusion-quality-"))
    for name in args.concepts:
        superclass = CONCEPTS[name].superclass
        images = write_training_set(name, work / f"{name}-images", n=6)
        prompts = unseen_prompts(name)
        entry = {"superclass": superclass, "prompts": [t for t, _, _ in prompts],
                 "base": measure(pipe, prompts, superclass, name, args.seeds)}
        for mode in MODES:
            started = time.time()
            folder = work / mode
            train(backend, TrainConfig(name, superclass, steps=args.steps, mode=mode, preview_every=0,
                                       masks_dir=str(images / "masks")), images, folder, overwrite=True)
            seconds = time.time() - started
            entry[mode] = measure(pipe, prompts, f"<perfusion:{name}>", name, args.seeds, folder)
            entry[mode]["train_seconds"] = round(seconds, 1)
            if mode == "perfusion":
                entry["beta_sweep"] = {str(b): measure(pipe, prompts, f"<perfusion:{name}>", name, args.seeds, folder, b)
                                       for b in BETAS}
            print(name, mode, entry[mode], flush=True)
        results["concepts"][name] = entry

    def mean(key, metric):
        return float(np.mean([c[key][metric] for c in results["concepts"].values()]))

    results["summary"] = {k: {m: mean(k, m) for m in ("fidelity", "alignment")} for k in ("base",) + MODES}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    points = [(results["summary"][k]["alignment"], results["summary"][k]["fidelity"], k, COLOURS[k])
              for k in ("base",) + MODES]
    points += [(float(np.mean([c["beta_sweep"][str(b)]["alignment"] for c in results["concepts"].values()])),
                float(np.mean([c["beta_sweep"][str(b)]["fidelity"] for c in results["concepts"].values()])),
                f"perfusion β={b}", COLOURS["perfusion"]) for b in BETAS]
    scatter(points, ROOT / "docs" / "quality_tradeoff.png", "alignment (background and position obeyed)",
            "fidelity (object classified as the concept)")
    print(json.dumps(results["summary"], indent=2))
    if args.update_readme:
        rows = [[k, f"{results['summary'][k]['fidelity']:.1%}", f"{results['summary'][k]['alignment']:.1%}"]
                for k in ("base",) + MODES]
        splice_readme("quality", markdown_table(["method", "fidelity", "alignment"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
