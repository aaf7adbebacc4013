"""Smoke pass of the performance benchmarks (no timing asserted) and the concept file size goal."""
from __future__ import annotations

import collections

from conftest import tiny_diffusers_unet

from benchmarks import hooks, serving, training


def test_concept_files_of_the_real_layouts_stay_small(tmp_path):
    """SD1.5's 16 attn2 layers: ≤ 64 KiB; SD2 about the same; SDXL (70 layers) a few hundred KiB."""
    sizes = {f: training.concept_bytes(f, tmp_path) for f in ("sd1", "sd2", "sdxl")}
    assert sizes["sd1"] <= 64 * 1024 and sizes["sd2"] <= 64 * 1024
    assert sizes["sdxl"] <= 512 * 1024


def test_step_times_runs_every_variant():
    result = hooks.step_times(tiny_diffusers_unet(), 8, "sd1", repeats=1)
    assert set(result) == {"none", "1 concept", "8 concepts"} and result["none"]["ratio"] == 1.0
    assert all(v["ms"] > 0 for v in result.values())


def test_serving_workload_spreads_requests_over_concepts():
    jobs = serving.workload(64, 16)
    assert len(jobs) == 64 and set(collections.Counter(c for _, c, _ in jobs).values()) == {4}
    assert all(f"<perfusion:c{c}>" in prompt for prompt, c, _ in jobs)
    assert serving.latencies([1.0, 2.0, 4.0])["throughput_per_s"] == 3 / 4.0
