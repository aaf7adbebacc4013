"""`perfusion` command line: train, generate, inspect, steps, library (and export and serve, from perfusion_export)."""
from __future__ import annotations

import argparse
import json
import sys

from ..core.errors import PerfusionError
from ..training.config import LIMITS, MODES, family_default_help, field_defaults, paper_recipe


def cmd_inspect(args) -> int:
    if args.prompt is not None:
        return _inspect_gates(args)
    if args.file is None:
        raise PerfusionError("inspect needs a concept FILE, or --prompt TEXT (with --model and --concepts) "
                             "to see every token's similarity and gate")
    from ..core.concept import describe, format_description

    info = describe(args.file)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_description(info))
    return 0


def _inspect_gates(args) -> int:
    from ..core.library import default_concepts_dir
    from ..pipelines.inspect import format_report, inspect_prompt

    report = inspect_prompt(_load(args), args.prompt, concepts_dir=args.concepts or default_concepts_dir(),
                            competitive_gates=args.competitive_gates, clause_encoding=args.clause_encoding)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _load(args):
    from ..pipelines.loading import load_pipeline

    return load_pipeline(args.model, device=args.device, prediction_type=getattr(args, "prediction_type", None))


PREDICTION_HELP = ("for a single-file checkpoint: what its model predicts (default: a .yaml beside the file with "
                   "parameterization: v, else A1111's test on SD2 files, else epsilon)")


def cmd_train(args) -> int:
    from ..core.library import default_concepts_dir
    from ..pipelines.backend import DiffusersBackend
    from ..training import TrainConfig, train

    config = TrainConfig(
        name=args.name, superclass=args.superclass, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
        micro_batch=args.micro_batch, lr_value=args.lr_value, lr_embedding=args.lr_embedding,
        resolution=args.resolution, checkpoint_every=args.checkpoint_every, preview_every=args.preview_every,
        masks_dir=args.masks, mode=args.mode, description=args.description, flip=args.flip,
        init_from_captions=args.init_from_captions, background_distill=args.background_distill,
        embedding_pull=args.embedding_pull, leak_penalty=args.leak_penalty, context_gate=args.context_gate,
        phrasing_gate=args.phrasing_gate, leading_object=args.leading_object, pair_scenes=args.pair_scenes,
        train_beta=args.train_beta, train_tau=args.train_tau,
    )
    if args.paper_recipe:
        config = paper_recipe(config)

    pipe = _load(args)
    result = train(DiffusersBackend(pipe), config, args.images, args.out or default_concepts_dir(), resume=args.resume,
                   overwrite=args.overwrite)
    print(f"{result.status}: {result.message}\nconcept: {result.concept_path}\nrun folder: {result.run_dir}")
    if result.status == "finished" and args.auto_beta and config.mode == "perfusion":
        _auto_beta(pipe, result.concept_path)
    return {"finished": 0, "interrupted": 130}.get(result.status, 1)


def _auto_beta(pipe, concept_path) -> None:
    """Store as the concept's default the lowest β whose gate stays shut on other words (pipelines.auto_beta)."""
    from ..core.concept import load_concept, save_concept
    from ..pipelines.auto_beta import MAX_LEAK, choose_by_gate, gate_curve, with_default_beta

    concept = load_concept(concept_path)
    curve = gate_curve(pipe, concept)
    beta = choose_by_gate(curve)
    save_concept(with_default_beta(concept, beta, curve, "gate"), concept_path)
    chosen = next(p for p in curve if p["beta"] == beta)
    print(f"auto-β: default β {beta:g} (mean gate on its own token {chosen['own_gate']:.2f}, on other tokens "
          f"{chosen['leak']:.3f}; bound {MAX_LEAK}); override per prompt with <perfusion:NAME:1:beta=...>")


def _generate_exported(args) -> tuple[list, list[str]]:
    """An exported ONNX folder: sample it with ONNX Runtime (concepts are baked in; a Triton library repository
    runs its serving pipeline locally, one seed per image)."""
    import warnings as py_warnings

    from PIL import Image

    from perfusion_export import manifest
    from perfusion_export.ort_pipeline import OrtStableDiffusion, generate_onnx

    from ..core.families import sampling_defaults

    if manifest.read(args.model).get("layout") == "triton":
        from perfusion_export.serving.runtime import local_pipeline

        library = local_pipeline(args.model)
        library.info["clause_encoding"] = library.info.get("clause_encoding", False) or args.clause_encoding
        return [Image.fromarray(library.generate(args.prompt, args.negative, seed=args.seed + i, steps=args.steps,
                                                 guidance=args.guidance)) for i in range(args.n)], []
    pipe = OrtStableDiffusion(args.model)
    defaults = sampling_defaults(pipe.info["base_family"])
    with py_warnings.catch_warnings(record=True) as caught:
        py_warnings.simplefilter("always")
        images = generate_onnx(args.model, args.prompt, negative_prompt=args.negative, seed=args.seed, n=args.n,
                               steps=args.steps or defaults["num_inference_steps"],
                               guidance_scale=args.guidance or defaults["guidance_scale"],
                               guidance_rescale=defaults.get("guidance_rescale", 0.0), pipeline=pipe,
                               clause_encoding=args.clause_encoding)
    return images, [str(w.message) for w in caught]


def cmd_generate(args) -> int:
    from pathlib import Path

    from ..core.library import default_concepts_dir
    from ..pipelines.generate import generate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(args.model).is_dir() and (Path(args.model) / "perfusion_manifest.json").is_file():
        images, warnings = _generate_exported(args)
    else:
        concepts_dir = args.concepts or default_concepts_dir()
        images, warnings = generate(_load(args), args.prompt, args.negative, concepts_dir, seed=args.seed, n=args.n,
                                    competitive_gates=args.competitive_gates, clause_encoding=args.clause_encoding,
                                    num_inference_steps=args.steps,
                                    guidance_scale=args.guidance)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for i, image in enumerate(images):
        path = out / f"{args.seed:06d}-{i:02d}.png"
        image.save(path)
        print(path)
    return 0


def cmd_compose(args) -> int:
    from pathlib import Path

    from ..core.library import default_concepts_dir
    from ..pipelines.compose import compose

    image, warnings = compose(_load(args), args.prompt, args.concepts or default_concepts_dir(), seed=args.seed,
                              negative=args.negative, competitive_gates=args.competitive_gates,
                              clause_encoding=args.clause_encoding,
                              num_inference_steps=args.steps, guidance_scale=args.guidance)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(out)
    return 0


def cmd_steps(args) -> int:
    from ..core.library import default_concepts_dir
    from ..core.runs import list_steps, promote_step

    folder = args.concepts or default_concepts_dir()
    if args.promote is not None:
        result = promote_step(folder, args.name, args.promote)
        kept = f"; the file it replaced is in {result['trash']}" if result["trash"] else ""
        print(f"{args.name}: step {result['step']} is now {result['concept']}{kept}")
        return 0
    steps = list_steps(folder, args.name)
    if args.json:
        print(json.dumps([s.to_json() for s in steps], indent=2))
        return 0
    if not steps:
        print(f"{args.name}: no checkpoints (no {args.name}.run/checkpoints/ in {folder})")
        return 1
    print(f"{'step':>7}  {'loss':>9}  {'now':>3}  preview")
    for s in steps:
        loss = "–" if s.loss is None else f"{s.loss:.5f}"
        print(f"{s.step:>7}  {loss:>9}  {'*' if s.current else '':>3}  {s.preview or '–'}")
    return 0


def cmd_library(args) -> int:
    from ..core import library

    folder = args.concepts or library.default_concepts_dir()
    if args.action == "trash":
        for entry in library.list_trash(folder):
            print(f"{entry['entry']}  {entry['reason']}  ({', '.join(f['name'] for f in entry['files'])})")
        return 0
    if args.action == "rename":
        done = library.rename_concept(folder, args.name, args.new)
    elif args.action == "duplicate":
        done = library.duplicate_concept(folder, args.name, args.new)
    elif args.action == "delete":
        done = library.delete_concept(folder, args.name)
    elif args.action == "restore":
        done = library.restore_concept(folder, args.name)
    else:  # defaults
        done = library.set_gate_defaults(folder, args.name, beta=args.beta, tau=args.tau)
    print(done)
    return 0


def _bounded(field: str):
    """An argparse type that enforces the trainer's limits for `field` (training.config.LIMITS)."""
    kind, lo, hi = LIMITS[field]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling options `generate` and `compose` share, so both read a prompt the same way."""
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None, help=PREDICTION_HELP)
    _add_competitive_arg(p)


def _add_competitive_arg(p: argparse.ArgumentParser) -> None:
    """The options for prompts with several concepts."""
    p.add_argument("--competitive-gates", action="store_true",
                   help="with several concepts in a prompt, each word keeps only the gate of its most similar concept, so "
                        "one concept's edit never acts on another's word")
    p.add_argument("--clause-encoding", action="store_true",
                   help="with several concepts in a prompt, encode each one's clause as if the concepts before it were "
                        "their superclass words, so a concept drawn second is not read in the first one's context")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfusion", description="Perfusion concepts for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a concept from a folder of images")
    p.add_argument("--model", default="toy", help="toy, a diffusers folder, or a .safetensors checkpoint")
    p.add_argument("--images", required=True, help="folder of 4–8 images (optional NAME.txt captions with {})")
    p.add_argument("--name", required=True)
    p.add_argument("--superclass", required=True, help="one-token word for what it is: dog, bear, toy, circle…")
    defaults = field_defaults()
    p.add_argument("--steps", type=_bounded("steps"), default=None, help=family_default_help("steps"))
    p.add_argument("--out", default=None,
                   help="concepts folder to write to (default: $PERFUSION_CONCEPTS, else ./models/perfusion)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/NAME.run/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing concept/run of that name")
    p.add_argument("--seed", type=_bounded("seed"), default=defaults["seed"])
    p.add_argument("--batch-size", type=_bounded("batch_size"), default=defaults["batch_size"])
    p.add_argument("--micro-batch", type=_bounded("micro_batch"), default=None,
                   help="gradient-accumulation chunk size")
    p.add_argument("--lr-value", type=_bounded("lr_value"), default=None, help=family_default_help("lr_value"))
    p.add_argument("--lr-embedding", type=_bounded("lr_embedding"), default=defaults["lr_embedding"])
    p.add_argument("--resolution", type=_bounded("resolution"), default=None,
                   help=family_default_help("resolution"))
    p.add_argument("--masks", default=None, help="folder of subject masks named like the images")
    p.add_argument("--checkpoint-every", type=_bounded("checkpoint_every"), default=defaults["checkpoint_every"])
    p.add_argument("--preview-every", type=_bounded("preview_every"), default=defaults["preview_every"])
    p.add_argument("--mode", default=defaults["mode"], choices=list(MODES))
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=defaults["flip"],
                   help="mirror half the training images (--no-flip for objects that are not left/right symmetric)")
    p.add_argument("--init-from-captions", action=argparse.BooleanOptionalAction,
                   default=defaults["init_from_captions"],
                   help="start i* and the value targets from the training captions (else generic templates)")
    p.add_argument("--background-distill", type=_bounded("background_distill"),
                   default=defaults["background_distill"],
                   help="weight of matching the frozen base's superclass prediction outside the masks (needs --masks)")
    p.add_argument("--embedding-pull", type=_bounded("embedding_pull"), default=defaults["embedding_pull"],
                   help="weight of keeping the learned word near its superclass embedding")
    p.add_argument("--leak-penalty", type=_bounded("leak_penalty"), default=defaults["leak_penalty"],
                   help="weight of keeping the gate shut on the words after the concept's (0.1 on the toy benchmark)")
    p.add_argument("--context-gate", type=_bounded("context_gate"), default=defaults["context_gate"],
                   help="weight of keeping the concept's own gate open when another object comes before it")
    p.add_argument("--phrasing-gate", type=_bounded("phrasing_gate"), default=defaults["phrasing_gate"],
                   help="weight of keeping the concept's own gate open after a size word or a style prefix "
                        "(on, 1; 0 turns it off)")
    p.add_argument("--leading-object", type=_bounded("leading_object"), default=defaults["leading_object"],
                   help="share of training captions that start with another object's clause (\"a SUPERCLASS on "
                        "the left, …\"), so the concept also works as the second object of a prompt (0 to 1)")
    p.add_argument("--pair-scenes", type=_bounded("pair_scenes"), default=defaults["pair_scenes"],
                   help="add N two-object scenes to the training images: the subject (cut out by its mask, so it "
                        "needs --masks or transparent images) pasted beside the base model's own SUPERCLASS, so "
                        "the concept also works as the second of two concepts in a prompt (0: off)")
    p.add_argument("--train-beta", type=_bounded("train_beta"), default=None,
                   help="the gate's β during training (default: the concept's inference β, 0.7; the paper: 0.75)")
    p.add_argument("--train-tau", type=_bounded("train_tau"), default=None,
                   help="the gate's τ during training (default: the concept's inference τ, 0.15; the paper: 0.1)")
    p.add_argument("--auto-beta", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, store as default the lowest β whose gate stays shut on other words")
    p.add_argument("--paper-recipe", action="store_true",
                   help="the paper's recipe: flips on, generic templates, none of the extra loss terms")
    p.add_argument("--description", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None, help=PREDICTION_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images from a prompt with <perfusion:NAME> tags")
    p.add_argument("--model", default="toy", help="toy, a diffusers folder, a .safetensors checkpoint, or a folder "
                   "written by `perfusion export` (sampled with ONNX Runtime)")
    p.add_argument("--concepts", default=None,
                   help="concepts folder (default: $PERFUSION_CONCEPTS, else ./models/perfusion)")
    p.add_argument("--prompt", required=True)
    _add_sampling_args(p)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--out", default="outputs")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("compose", help="preview several concepts in one prompt: each alone (the others replaced by "
                                       "their superclass word) and all together, side by side at one seed")
    p.add_argument("--model", default="toy", help="toy, a diffusers folder or a .safetensors checkpoint")
    p.add_argument("--concepts", default=None,
                   help="concepts folder (default: $PERFUSION_CONCEPTS, else ./models/perfusion)")
    p.add_argument("--prompt", required=True, help="a prompt with two or more <perfusion:NAME> tags")
    _add_sampling_args(p)
    p.add_argument("--out", default="outputs/compose.png")
    p.set_defaults(func=cmd_compose)
    p = sub.add_parser("inspect", help="a concept file's metadata, layers, shapes, dtypes and size; or, with "
                                       "--prompt, every token's similarity and gate for the prompt's concepts")
    p.add_argument("file", nargs="?", help="a concept file to describe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--prompt", default=None, help="a prompt with <perfusion:NAME> tags: inspect its gates")
    p.add_argument("--model", default="toy", help="with --prompt: toy, a diffusers folder or a checkpoint")
    p.add_argument("--concepts", default=None, help="with --prompt: the concepts folder")
    p.add_argument("--device", default="cpu")
    _add_competitive_arg(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("steps", help="a training run's checkpoints with their previews and losses; --promote STEP "
                                     "makes that step the concept (the replaced file goes to the trash)")
    p.add_argument("name", help="the concept whose NAME.run/ to read")
    p.add_argument("--concepts", default=None,
                   help="concepts folder (default: $PERFUSION_CONCEPTS, else ./models/perfusion)")
    p.add_argument("--promote", type=int, default=None, metavar="STEP")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_steps)
    p = sub.add_parser("library", help="rename, duplicate, delete (to the folder's .trash/), restore a concept, or "
                                       "store its default β/τ; no operation loses a file")
    p.add_argument("--concepts", default=None,
                   help="concepts folder (default: $PERFUSION_CONCEPTS, else ./models/perfusion)")
    actions = p.add_subparsers(dest="action", required=True)
    for action, helptext in (("rename", "NAME NEW: file, previews, run folder; the old name stays an alias"),
                             ("duplicate", "NAME NEW: a copy with its previews")):
        q = actions.add_parser(action, help=helptext)
        q.add_argument("name")
        q.add_argument("new")
    actions.add_parser("delete", help="NAME: move it, its previews and run folder to .trash/").add_argument("name")
    actions.add_parser("restore", help="ENTRY: move a .trash/ entry back").add_argument("name", metavar="entry")
    actions.add_parser("trash", help="list .trash/ entries")
    q = actions.add_parser("defaults", help="NAME [--beta B] [--tau T]: the β/τ stored in the file")
    q.add_argument("name")
    q.add_argument("--beta", type=float, default=None)
    q.add_argument("--tau", type=float, default=None)
    p.set_defaults(func=cmd_library)
    from perfusion_export.cli import add_parser as add_export_parser  # light: heavy imports happen on use
    from perfusion_export.cli import add_serve_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    from .logs import setup_cli_logging

    setup_cli_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PerfusionError as exc:
        print(f"perfusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perfusion: interrupted", file=sys.stderr)
        return 130
