"""`python -m benchmarks [--quick]`: every performance benchmark, then one table of the goals.

Runs, in this order and in this process: hooks (sampling with 0/1/8 concepts, activation), training (a
Perfusion step vs a textual-inversion step, toy training wall time, concept file sizes) and serving (the
library engine on Triton vs one baked export per concept, library size per UNet call); each prints its
own table and, without --quick, writes its JSON under benchmarks/results/, from which the summary is
read. The exporter's benchmark (`python -m benchmarks.bench_export [--full]`) and the quality benchmark
(`python -m benchmarks.quality`) run on their own: they take much longer.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import hooks, serving, training
from benchmarks._common import ROOT, markdown_table, splice_readme

RESULTS = ROOT / "benchmarks" / "results"


def summary() -> list[list[str]]:
    rows = []
    h = json.loads((RESULTS / "hooks.json").read_text())["results"]
    for name, r in h.items():
        rows.append([f"sampling step, 1 / 8 concepts vs none ({name})",
                     f"{r['steps']['1 concept']['ratio']:.3f}× / {r['steps']['8 concepts']['ratio']:.3f}×",
                     "≤ 1.03× / ≤ 1.10×"])
        rows.append([f"hook overhead per projection, 1 concept ({name})",
                     f"{r['steps']['1 concept']['us_per_hooked_projection']:.0f} µs", "—"])
        rows.append([f"load + attach + detach ({name})", f"{r['activate_ms']:.1f} ms", "≤ 50 ms"])
    t = json.loads((RESULTS / "training.json").read_text())
    rows.append(["training step, Perfusion vs textual inversion (toy)", f"{t['step']['ratio']:.2f}×", "≤ 1.15×"])
    rows.append(["toy concept training, default settings", f"{t['toy_training']['seconds']:.0f} s", "≤ 120 s"])
    rows.append(["concept file SD1 / SD2 / SDXL",
                 " / ".join(f"{t['concept_bytes'][f] / 1024:.1f} KiB" for f in ("sd1", "sd2", "sdxl")), "≤ 64 KiB (SD1)"])
    s = json.loads((RESULTS / "serving.json").read_text())
    engines = list(s["engines"].values())
    rows.append(["serving throughput, library engine vs baked exports one after another",
                 f"{engines[0]['throughput_per_s'] / engines[1]['throughput_per_s']:.2f}×", "—"])
    rows.append(["UNet call, library of 1,024 vs 0 concepts (toy)",
                 f"{s['library_size_cost'][str(max(map(int, s['library_size_cost'])))]['ratio']:.2f}×", "—"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke pass of every benchmark (writes no results)")
    parser.add_argument("--update-readme", action="store_true", help="write the summary into README.md")
    args = parser.parse_args(argv)
    flags = ["--quick"] if args.quick else []
    for module in (hooks, training, serving):
        print(f"\n== {module.__name__} ==", flush=True)
        module.main(flags)
    if not args.quick:
        print("\n== summary ==")
        table = markdown_table(["what", "measured", "goal"], summary())
        print(table)
        if args.update_readme:
            machine = json.loads((RESULTS / "hooks.json").read_text())["machine"]
            splice_readme("performance", f"Measured on {machine} by `python -m benchmarks`:\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
