"""Base-model report: attribute accuracy of the toy model on held-out prompts.

    .venv/bin/python benchmarks/toy_base_report.py [--prompts 219] [--update-readme]
    .venv/bin/python benchmarks/toy_base_report.py --readme-only   # tables from the last results, no generation

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
from _common import ROOT, markdown_table, splice_readme


def update_readme(result: dict) -> None:
    """The README's toy-world tables from a report's results."""
    from perfusion_ext.toy import model as toy_model
    from perfusion_ext.toy.evaluate import ATTRIBUTES, PAIR_ATTRIBUTES

    training = result.get("training", {})
    table = markdown_table(
        ["attribute", "accuracy", "chance"],
        [[a, f"{result[a]:.1%}", c] for a, c in
         (("background", "17%"), ("colour", "20%"), ("shape", "33%"), ("position", "20%"))],
    )
    pair_table = markdown_table(
        ["two-object prompts", "accuracy"],
        [[a.removeprefix("pair_").replace("_", " "), f"{result[a]:.1%}"] for a in PAIR_ATTRIBUTES]
        + [[f"named object ({result['named_n_prompts']} prompts): " + k, f"{result[a]:.1%}"]
           for a, k in (("named", "right"), ("named_background", "background"), ("named_position", "position"))],
    )
    by_template = markdown_table(
        ["held-out phrasing", "n"] + list(ATTRIBUTES),
        [[f"`{t}`", r["n"]] + [f"{r[a]:.0%}" for a in ATTRIBUTES] for t, r in result["by_template"].items()],
    )
    curve = markdown_table(
        ["images seen", "training time (CPU + GPU)"] + list(ATTRIBUTES) + ["two objects right", "relation",
                                                                           "named object right"],
        [[f"{e['images_seen']:,}", f"{e['train_minutes']:.0f} min"] + [f"{e[a]:.0%}" for a in ATTRIBUTES]
         + [f"{e[k]:.0%}" if k in e else "—" for k in ("pair_both", "pair_relation", "named")]
         for e in training.get("evaluations", [])],
    )
    facts = (f"\n\n{result['n_prompts']} held-out prompts; DDIM trailing, {toy_model.SAMPLING['num_inference_steps']} "
             f"steps, guidance {toy_model.SAMPLING['guidance_scale']}, rescale {toy_model.SAMPLING['guidance_rescale']}. "
             f"Training: {training.get('summary', 'see model_training.json')}.")
    pair_facts = (f"\n\n{result['pair_n_prompts']} held-out two-object prompts (held-out colour/shape/relation "
                  "combinations in held-out phrasings); \"both\" = both colours, both shapes and the relation right; "
                  "named objects (\"a rocket on the left\") on held-out word/position/background combinations in "
                  "held-out phrasings, judged like a concept.")
    splice_readme("toy-accuracy", table + facts + "\n\n" + pair_table + pair_facts
                  + "\n\nBy held-out phrasing:\n\n" + by_template
                  + "\n\nAccuracy curve (evaluations during training, same prompts):\n\n" + curve)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=219)
    p.add_argument("--pair-prompts", type=int, default=120, help="held-out two-object prompts (world v2)")
    p.add_argument("--named-prompts", type=int, default=60, help="held-out named two-part objects (world v2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="toy", help="toy (default) or a diffusers folder of the toy architecture")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--readme-only", action="store_true",
                   help="write the README tables from benchmarks/results/toy_base.json without measuring again")
    args = p.parse_args(argv)
    if args.readme_only:
        update_readme(json.loads((ROOT / "benchmarks" / "results" / "toy_base.json").read_text()))
        return 0

    from perfusion_ext.pipelines.loading import load_pipeline
    from perfusion_ext.toy import model as toy_model
    from perfusion_ext.toy.evaluate import evaluate_named, evaluate_pairs, generate, save_grid, score
    from perfusion_ext.toy.world import EVAL_TEMPLATES, held_out_prompts, held_out_template

    pipe = load_pipeline(args.model)
    started = time.time()
    pairs = held_out_prompts(args.prompts, seed=args.seed)
    images = generate(pipe, [text for _, text in pairs], seed=args.seed)
    result = score(images, [scene for scene, _ in pairs])
    result["n_prompts"] = args.prompts
    result["seconds"] = round(time.time() - started, 1)
    # Per held-out phrasing: a template the model misparses shows up here, not just as a lower mean.
    result["by_template"] = {}
    for template in EVAL_TEMPLATES:
        chosen = [i for i in range(len(pairs)) if held_out_template(i) == template]
        result["by_template"][template] = dict(score(images[chosen], [pairs[i][0] for i in chosen]), n=len(chosen))
    result.update(evaluate_pairs(pipe, n_prompts=args.pair_prompts, seed=args.seed,
                                 grid_path=ROOT / "docs" / "toy_pairs_grid.png"))
    result.update(evaluate_named(pipe, n_prompts=args.named_prompts, seed=args.seed,
                                 grid_path=ROOT / "docs" / "toy_named_grid.png"))
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
        update_readme(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
