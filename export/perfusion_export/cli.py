"""The `perfusion export` subcommand (registered by perfusion_ext.cli; heavy imports happen on use)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="bake concepts into an ONNX UNet + text encoder (optimum / a1111-trt / unet-only)",
        description="perfusion export --model toy|DIR|FILE --concept FILE … --out DIR\n"
                    "perfusion export refit DIR --concept FILE --slot K",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["refit"], help="refit: replace one slot of a --slots export")
    p.add_argument("folder", nargs="?", help="(refit) the export folder")
    p.add_argument("--model", default="toy", help="toy, a diffusers folder or a .safetensors checkpoint")
    p.add_argument("--concept", action="append", default=[], help="concept file; repeat for several")
    p.add_argument("--beta", type=float, help="gate threshold for every concept (default: each file's)")
    p.add_argument("--tau", type=float, help="gate temperature for every concept (default: each file's)")
    p.add_argument("--strength", type=float, default=1.0, help="strength w baked for every concept")
    p.add_argument("--layout", default="optimum", choices=["optimum", "a1111-trt", "unet-only"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--opset", type=int, default=18, choices=[18, 19])
    p.add_argument("--slots", type=int, help="reserve N concept slots (refit-able initializers)")
    p.add_argument("--slot", type=int, help="(refit) the slot to replace")
    p.add_argument("--no-verify", action="store_true", help="skip the CPU verification (not recommended)")
    p.add_argument("--build-trt", action="store_true", help="also build a TensorRT engine (needs tensorrt + GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--out", help="destination folder")
    p.add_argument("--model-name", default=None, help="the name inside the export (a1111-trt: the .onnx file name; "
                   "default: the model's folder or file name)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="for a single-file checkpoint: what its model predicts (default: as `perfusion train` decides)")
    p.set_defaults(func=run)


def run(args) -> int:
    from perfusion_ext.core.errors import PerfusionError

    if args.action == "refit":
        from .refit import refit

        if not args.folder or len(args.concept) != 1 or args.slot is None:
            raise PerfusionError("usage: perfusion export refit DIR --concept FILE --slot K")
        info = refit(args.folder, args.concept[0], args.slot, args.strength, args.beta, args.tau)
        name = next(c["name"] for c in info["concepts"] if c["slot"] == args.slot)
        print(f"slot {args.slot} of {args.folder} now holds {name!r}")
        return 0
    if not args.out:
        raise PerfusionError("--out DIR is required.")
    from .exporter import export_pipeline

    concepts = [(c, args.strength) for c in args.concept]
    if args.build_trt:
        from .trt import check_available

        check_available()
    model, name = args.model, args.model_name
    if args.prediction_type is not None:
        from perfusion_ext.pipelines.loading import load_pipeline

        from .exporter import _model_name

        model = load_pipeline(args.model, prediction_type=args.prediction_type)
        name = name or _model_name(args.model)
    info = export_pipeline(model, concepts, args.out, layout=args.layout, precision=args.precision,
                           opset=args.opset, slots=args.slots, beta=args.beta, tau=args.tau,
                           verify_export=not args.no_verify, overwrite=args.overwrite, model_name=name)
    if args.build_trt:
        from .trt import build_engine

        build_engine(args.out, info)
    figures = info.get("verification", {}).get("unet", {})
    print(json.dumps({"out": str(args.out), "concepts": [c["name"] for c in info["concepts"]],
                      "unet_max_rel": figures.get("max_rel"), "concept_effect_rel": figures.get("concept_effect_rel")},
                     indent=2))
    return 0
