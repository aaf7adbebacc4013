"""The quality benchmark's prompts and its smoke run (the full run is `python -m benchmarks.quality`)."""
import json

import pytest

from benchmarks import quality
from perfusion_ext.toy.concepts import CONCEPTS, training_scenes


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_unseen_prompts(name):
    prompts = quality.unseen_prompts(name)
    assert len(prompts) >= 30 and len({p for p, _, _ in prompts}) == len(prompts)
    seen = {(s["background"], s["position"]) for s in training_scenes(name)}
    assert all((bg, pos) not in seen and bg in CONCEPTS[name].readable_backgrounds() for _, bg, pos in prompts)
    assert all(p.count("{}") == 1 for p, _, _ in prompts)
    assert any(p.startswith(bg) for p, bg, _ in prompts) and any(" small " in p for p, _, _ in prompts)


@pytest.mark.slow
def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "quality.json"
    assert quality.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["concepts"]["house"]
    assert set(entry["ceilings"]) == {"vae_round_trip", "spelled_out"}
    for row in ("base", "perfusion", "textual_inversion"):
        assert 0 <= entry[row]["fidelity"] <= 1 and 0 <= entry[row]["alignment"] <= 1 and entry[row]["n"] == 4
    assert 0 <= entry["perfusion"]["leak"] <= 1 and "leak" not in entry["textual_inversion"]
    assert set(entry["beta_sweep"]) == {str(b) for b in quality.BETAS}
