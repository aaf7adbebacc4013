"""Base-model report: attribute accuracy of the toy model on held-out prompts (issue 5).

    .venv/bin/python benchmarks/toy_base_report.py [--prompts 219] [--update-readme]

Prompts combine held-out attribute combinations with held-out phrasings. Writes
benchmarks/results/toy_base.json, docs/toy_grid.png and, with --update-readme, the README table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, markdown_table, splice_readme  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=219)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="toy", help="toy (default) or a diffusers folder of the toy architecture")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)

    from perfusion_ext.pipeline import load_pipeline
    from perfusion_ext.toy import model as toy_model
    from perfusion_ext.toy.evaluate import evaluate_pipeline, generate, save_grid
    from perfusion_ext.toy.world import held_out_prompts

    pipe = load_pipeline(args.model)
    started = time.time()
    result = evaluate_pipeline(pipe, n_prompts=args.prompts, seed=args.seed)
    result["seconds"] = round(time.time() - started, 1)
    result["sampling"] = dict(toy_model.SAMPLING, sampler="DDIM (trailing), v-prediction")
    training = json.loads((toy_model.MODEL_DIR.parent / "model_training.json").read_text()) \
        if (toy_model.MODEL_DIR.parent / "model_training.json").is_file() else {}
    result["training"] = training
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy_base.json").write_text(json.dumps(result, indent=2))
    prompts = [text for _, text in held_out_prompts(32, seed=args.seed)]
    save_grid(generate(pipe, prompts, seed=args.seed), ROOT / "docs" / "toy_grid.png", columns=8, scale=3)
    print(json.dumps(result, indent=2))
    if args.update_readme:
        table = markdown_table(
            ["attribute", "accuracy", "chance"],
            [[a, f"{result[a]:.1%}", c] for a, c in
             (("background", "17%"), ("colour", "20%"), ("shape", "33%"), ("position", "20%"))],
        )
        facts = (f"\n\n{result['n_prompts']} held-out prompts; DDIM trailing, {toy_model.SAMPLING['num_inference_steps']} "
                 f"steps, guidance {toy_model.SAMPLING['guidance_scale']}, rescale {toy_model.SAMPLING['guidance_rescale']}. "
                 f"Training: {training.get('summary', 'see model_training.json')}.")
        splice_readme("toy-accuracy", table + facts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
