"""Serving benchmark on the toy model: one library engine on Triton vs one baked export per concept.

    OMP_NUM_THREADS=1 python -m benchmarks.serving            # ~10 min on a 2-core CPU
    python -m benchmarks.serving --quick                      # smoke pass: 8 requests, N up to 256

Side by side, in one run:
1. the cost of library size per UNet call: ORT latency of the library UNet with N = 0, 16, 256, 1024 slots
   (batch 2, 77 tokens; median of interleaved runs), as a ratio to N = 0;
2. 64 requests over 16 distinct concepts (4 each, all arriving at once): the library engine (16 concepts in
   one repository, Triton with dynamic batching, `--triton-backend python`, the flavour this CPU server runs)
   vs one baked export per concept served one after another in-process with ONNX Runtime (refit the
   concept in, open the sessions, answer its requests, next concept). Throughput, p50 and p95 latency
   from arrival.

Random concepts (timing does not depend on looks). Results go to benchmarks/results/serving.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import ROOT, markdown_table, random_concept, splice_readme

SIZES = (0, 16, 256, 1024)
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
COLOURS = ("red", "blue", "green", "white")


def library_cost(pipe, sizes, repeats: int, folder: Path) -> dict:
    """Median ORT latency per UNet call for each library size; runs interleaved so drift hits all alike."""
    import onnxruntime as ort

    from perfusion_export.serving.repository import export_unet

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions, feeds = {}, {}
    d = 128
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        path = folder / f"unet_{n}" / "model.onnx"
        export_unet(pipe.unet, [], n, 18, path)
        sessions[n] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        latent = pipe.unet.config.sample_size
        context = torch.cat([torch.randn(2, 77, d, generator=g), torch.rand(2, 77, 2 * n, generator=g)], dim=-1)
        feeds[n] = {"sample": torch.randn(2, 4, latent, latent, generator=g).numpy(),
                    "timestep": np.array([500.0, 500.0], np.float32), "encoder_hidden_states": context.numpy()}
    times = {n: [] for n in sizes}
    for _ in range(3):
        for n in sizes:
            sessions[n].run(None, feeds[n])
    for _ in range(repeats):
        for n in sizes:
            start = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append(time.perf_counter() - start)
    base = statistics.median(times[sizes[0]])
    return {n: {"ms": 1000 * statistics.median(times[n]), "ratio": statistics.median(times[n]) / base} for n in sizes}


def workload(n_requests: int, n_concepts: int) -> list[tuple[str, int, int]]:
    """(prompt, concept index, seed): each concept n_requests / n_concepts times, interleaved as clients send."""
    return [(f"a photo of <perfusion:c{i % n_concepts}> on a {COLOURS[i % 4]} background", i % n_concepts, i)
            for i in range(n_requests)]


def latencies(finished: list[float]) -> dict:
    return {"throughput_per_s": len(finished) / max(finished), "p50_s": float(np.percentile(finished, 50)),
            "p95_s": float(np.percentile(finished, 95)), "total_s": max(finished)}


def library_engine(pipe, concepts: list[Path], jobs, folder: Path, instances: int) -> dict:
    import tritonclient.http as http

    from perfusion_export.serving import server as triton
    from perfusion_export.serving.repository import export_library

    repo = folder / "library"
    export_library(pipe, concepts, repo, n_slots=len(concepts), backend="python", pipeline_instances=instances,
                   verify_export=False)
    ports = triton.Ports(18300, 18301, 18302)
    with open(folder / "triton.log", "w") as log:
        process = triton.start(repo, ports, threads=1, log=log)
        try:
            triton.wait_ready(process, f"http://localhost:{ports.http}", timeout=300)

            def send(job):
                prompt, _, seed = job
                client = http.InferenceServerClient(f"localhost:{ports.http}", network_timeout=3600,
                                                    connection_timeout=3600)
                try:
                    inputs = [http.InferInput("prompt", [1], "BYTES"), http.InferInput("seed", [1], "INT64")]
                    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
                    inputs[1].set_data_from_numpy(np.array([seed], dtype=np.int64))
                    client.infer("pipeline", inputs).as_numpy("image")
                finally:
                    client.close()
                return time.perf_counter()

            send(jobs[0])  # warm-up
            before = triton.model_statistics(f"http://localhost:{ports.http}", "unet")
            with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                start = time.perf_counter()
                finished = [done - start for done in pool.map(send, jobs)]
            after = triton.model_statistics(f"http://localhost:{ports.http}", "unet")
        finally:
            triton.stop(process)
    out = latencies(finished)
    calls = after["execution_count"] - before["execution_count"]
    out["unet_rows_per_call"] = (after["inference_count"] - before["inference_count"]) / max(1, calls)
    return out


def baked_one_after_another(pipe, concepts: list[Path], jobs, folder: Path) -> dict:
    from perfusion_export.exporter import export_pipeline
    from perfusion_export.ort_pipeline import OrtStableDiffusion, generate_onnx
    from perfusion_export.refit import refit
    from perfusion_ext.core.families import sampling_defaults

    engine = folder / "baked"
    export_pipeline(pipe, [concepts[0]], engine, slots=1, verify_export=False)
    steps = sampling_defaults("toy")
    by_concept: dict[int, list] = {}
    for job in jobs:
        by_concept.setdefault(job[1], []).append(job)
    finished = []
    start = time.perf_counter()
    for index, group in sorted(by_concept.items()):
        refit(engine, concepts[index], 0)
        ort_pipe = OrtStableDiffusion(engine, ["CPUExecutionProvider"], threads=1)
        for prompt, _, seed in group:
            generate_onnx(engine, prompt, seed=seed,
                          steps=steps["num_inference_steps"], guidance_scale=steps["guidance_scale"],
                          guidance_rescale=steps.get("guidance_rescale", 0.0), pipeline=ort_pipe)
            finished.append(time.perf_counter() - start)
    return latencies(finished)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 requests over 4 concepts, N up to 256, few repeats")
    parser.add_argument("--instances", type=int, default=4, help="pipeline instances of the library engine")
    parser.add_argument("--update-readme", action="store_true", help="write the tables into README.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from perfusion_ext.core.concept import save_concept
    from perfusion_ext.pipelines.loading import load_pipeline

    pipe = load_pipeline("toy")
    n_requests, n_concepts = (8, 4) if args.quick else (64, 16)
    sizes = SIZES[:3] if args.quick else SIZES
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        concepts = [save_concept(random_concept(pipe.unet, seed=i + 1, name=f"c{i}", family="toy"),
                                 folder / f"c{i}.safetensors") for i in range(n_concepts)]
        cost = library_cost(pipe, sizes, 10 if args.quick else 40, folder)
        jobs = workload(n_requests, n_concepts)
        engines = {"library engine (Triton, dynamic batching)": library_engine(pipe, concepts, jobs, folder,
                                                                                args.instances),
                   "one baked export per concept, one after another": baked_one_after_another(pipe, concepts, jobs,
                                                                                              folder)}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform(terse=True)}"
    result = {"machine": machine, "requests": n_requests, "concepts": n_concepts,
              "library_size_cost": cost, "engines": engines, "quick": args.quick}
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    base = engines["one baked export per concept, one after another"]
    tables = (markdown_table(["library size N", "UNet call (ms)", "vs N = 0"],
                             [[n, f"{c['ms']:.2f}", f"{c['ratio']:.2f}×"] for n, c in cost.items()]),
              markdown_table(["engine", "requests/s", "p50 (s)", "p95 (s)", "throughput vs baked", "UNet rows per call"],
                             [[name, f"{e['throughput_per_s']:.2f}", f"{e['p50_s']:.1f}", f"{e['p95_s']:.1f}",
                               f"{e['throughput_per_s'] / base['throughput_per_s']:.2f}×",
                               f"{e['unet_rows_per_call']:.1f}" if "unet_rows_per_call" in e else "2 (one request)"]
                              for name, e in engines.items()]))
    print(f"machine: {machine}")
    print(tables[0] + "\n\n" + tables[1])
    if args.update_readme and not args.quick:
        splice_readme("serving", f"Measured by `python -m benchmarks.serving` on {machine}, toy model, "
                                 f"{n_requests} requests over {n_concepts} concepts arriving at once:\n\n"
                                 + tables[1] + "\n\nThe cost of library size per UNet call (batch 2, 77 tokens, "
                                 "ONNX Runtime, one thread):\n\n" + tables[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
