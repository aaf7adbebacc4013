"""The `perfusion export` subcommand (registered by perfusion_ext.cli; heavy imports happen on use)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="bake concepts into an ONNX UNet + text encoder (optimum / a1111-trt / unet-only), or write "
                       "a Triton model repository serving a concept library (triton)",
        description="perfusion export --model toy|DIR|FILE --concept FILE … --out DIR\n"
                    "perfusion export --layout triton --library N [--concept FILE …] --out DIR\n"
                    "perfusion export refit DIR --concept FILE --slot K [--server URL]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["refit"],
                   help="refit: replace one slot of a --slots export or of a Triton library")
    p.add_argument("folder", nargs="?", help="(refit) the export folder")
    p.add_argument("--model", default="toy", help="toy, a diffusers folder or a .safetensors checkpoint")
    p.add_argument("--concept", action="append", default=[], help="concept file; repeat for several")
    p.add_argument("--beta", type=float, help="gate threshold for every concept (default: each file's)")
    p.add_argument("--tau", type=float, help="gate temperature for every concept (default: each file's)")
    p.add_argument("--strength", type=float, default=1.0, help="strength w baked for every concept")
    p.add_argument("--layout", default="optimum", choices=["optimum", "a1111-trt", "unet-only", "triton"])
    p.add_argument("--library", type=int, default=16,
                   help="(triton) concept slots in the engine; any subset is active per request (default 16)")
    p.add_argument("--triton-backend", default="onnxruntime", choices=["onnxruntime", "python"],
                   help="(triton) run the networks on Triton's onnxruntime backend (NGC containers) or through "
                        "ONNX Runtime inside Python-backend models (servers without it, e.g. nvidia-pytriton's)")
    p.add_argument("--triton-tensorrt", action="store_true",
                   help="(triton, onnxruntime backend, GPU servers) run the UNet and text encoder through TensorRT "
                        "(ONNX Runtime's TensorRT provider, fp16, engines cached)")
    p.add_argument("--pipeline-instances", type=int, default=4,
                   help="(triton) concurrent pipeline executions whose UNet calls are batched together")
    p.add_argument("--server", help="(refit of a Triton library) reload the changed models on this running "
                   "server, e.g. http://localhost:8000")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--opset", type=int, default=18, choices=[18, 19])
    p.add_argument("--slots", type=int, help="reserve N concept slots (refit-able initializers)")
    p.add_argument("--slot", type=int, help="(refit) the slot to replace")
    p.add_argument("--competitive-gates", action="store_true",
                   help="bake competitive gates: each token keeps only the gate of its most similar concept (as the WebUI "
                        "setting and `perfusion generate --competitive-gates`)")
    p.add_argument("--clause-encoding", action="store_true",
                   help="(triton) encode every request's prompt clause by clause: with several concepts, each one's "
                        "clause read as if the concepts before it were their superclass words (as the WebUI setting "
                        "and `perfusion generate --clause-encoding`)")
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
        if manifest_layout(args.folder) == "triton":
            from .serving.refit import refit_library

            info = refit_library(args.folder, args.concept[0], args.slot, args.beta, args.tau, server=args.server)
        else:
            info = refit(args.folder, args.concept[0], args.slot, args.strength, args.beta, args.tau)
        name = next(c["name"] for c in info["concepts"] if c["slot"] == args.slot)
        print(f"slot {args.slot} of {args.folder} now holds {name!r}")
        return 0
    if not args.out:
        raise PerfusionError("--out DIR is required.")
    if args.layout == "triton":
        from .serving.repository import export_library

        info = export_library(args.model, args.concept, args.out, n_slots=args.library, backend=args.triton_backend,
                              opset=args.opset, pipeline_instances=args.pipeline_instances,
                              overwrite=args.overwrite, verify_export=not args.no_verify,
                              tensorrt=args.triton_tensorrt, competitive_gates=args.competitive_gates,
                              clause_encoding=args.clause_encoding)
        print(json.dumps({"out": str(args.out), "library": args.library, "concepts": [c["name"] for c in info["concepts"]],
                          "unet_max_rel": info.get("verification", {}).get("unet", {}).get("max_rel")}, indent=2))
        return 0
    if args.clause_encoding:
        raise PerfusionError("--clause-encoding is a Triton library setting (--layout triton); with other layouts it "
                             "is chosen when generating: perfusion generate --model EXPORT --clause-encoding")
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
                           verify_export=not args.no_verify, overwrite=args.overwrite, model_name=name,
                           competitive_gates=args.competitive_gates)
    if args.build_trt:
        from .trt import build_engine

        build_engine(args.out, info)
    figures = info.get("verification", {}).get("unet", {})
    print(json.dumps({"out": str(args.out), "concepts": [c["name"] for c in info["concepts"]],
                      "unet_max_rel": figures.get("max_rel"), "concept_effect_rel": figures.get("concept_effect_rel")},
                     indent=2))
    return 0


def manifest_layout(folder) -> str | None:
    from pathlib import Path

    from . import manifest

    return manifest.read(Path(folder)).get("layout")


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a Triton library repository with NVIDIA Triton Inference Server",
                       description="perfusion serve REPO [--http-port P]: starts tritonserver on a repository "
                                   "written by `perfusion export --layout triton`; Ctrl-C stops it cleanly.")
    p.add_argument("repository", help="the repository folder")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--triton-home", help="folder with the nvidia-pytriton server (default: $PERFUSION_TRITON_HOME, "
                   "then .triton/ in this checkout, then a tritonserver on PATH)")
    p.add_argument("--threads", type=int, help="CPU threads per network (ONNX Runtime) in the Python flavour")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from .serving.server import Ports, serve

    return serve(args.repository, Ports(args.http_port, args.grpc_port, args.metrics_port), args.triton_home,
                 args.threads)
