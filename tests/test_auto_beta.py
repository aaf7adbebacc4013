"""Auto-β: selection on synthetic curves, and the gate proxy on a concept locked to its own token."""
import json

import torch
from conftest import make_concept

import perfusion_ext as pf
from perfusion_ext.core.tags import parse_prompt
from perfusion_ext.core.text import PromptEncoder
from perfusion_ext.pipelines.auto_beta import choose_by_gate, choose_by_quality, gate_curve, with_default_beta


def test_choose_by_quality_keeps_alignment_within_the_margin():
    curve = [{"beta": 0.5, "fidelity": 0.9, "alignment": 0.50},
             {"beta": 0.6, "fidelity": 0.8, "alignment": 0.75},
             {"beta": 0.7, "fidelity": 0.6, "alignment": 0.85},
             {"beta": 0.8, "fidelity": 0.6, "alignment": 0.90}]
    assert choose_by_quality(curve, base_alignment=0.8, margin=0.1) == 0.6  # 0.75 >= 0.72; 0.50 is not
    assert choose_by_quality(curve, base_alignment=0.9, margin=0.1) == 0.8  # fidelity tie: the higher β
    assert choose_by_quality(curve, base_alignment=1.0, margin=0.0) == 0.8  # none within: best alignment


def test_choose_by_gate_takes_the_lowest_beta_under_the_leak_bound():
    curve = [{"beta": b, "own_gate": 1.0, "leak": leak} for b, leak in ((0.4, 0.3), (0.5, 0.08), (0.6, 0.04), (0.7, 0.01))]
    assert choose_by_gate(curve, max_leak=0.05) == 0.6
    assert choose_by_gate(curve, max_leak=0.001) == 0.7  # none: the highest β


def test_gate_curve_on_a_concept_locked_to_its_token(pipe, tmp_path):
    concept = make_concept(pipe.unet, name="teddy", family="toy", superclass="circle")
    concept.embeddings = {"clip_l": torch.randn(1, 128) * 3}
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    encoded = encoder.encode([parse_prompt("a photo of a <perfusion:teddy> on a white background").segments],
                             {"teddy": concept.embeddings["clip_l"]})
    concept.target_input = encoded.hidden[0, encoded.concept_positions[0]["teddy"][0]].detach().clone()
    concept.target_input_cinv = concept.target_input.clone()
    curve = gate_curve(pipe, concept, betas=(0.5, 0.9))
    assert [p["beta"] for p in curve] == [0.5, 0.9]
    assert curve[0]["own_gate"] >= curve[1]["own_gate"] and curve[0]["leak"] >= curve[1]["leak"]  # monotone in β
    assert all(0 <= p["leak"] <= 1 and 0 <= p["own_gate"] <= 1 for p in curve)
    tuned = with_default_beta(concept, choose_by_gate(curve), curve, "gate")
    pf.save_concept(tuned, tmp_path / "teddy.safetensors")
    loaded = pf.load_concept(tmp_path / "teddy.safetensors")
    assert loaded.beta == tuned.beta and json.loads(loaded.metadata["perfusion.beta_curve"])["curve"] == curve


def test_cli_train_stores_the_auto_beta(pipe, tmp_path, monkeypatch, capsys):
    import perfusion_ext.pipelines.loading as loading
    from perfusion_ext.cli import main as cli_main
    from perfusion_ext.toy.concepts import write_training_set

    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pipe)
    images = write_training_set("house", tmp_path / "house", n=4)
    assert cli_main(["train", "--images", str(images), "--name", "house", "--superclass", "square", "--steps", "2",
                     "--batch-size", "2", "--preview-every", "0", "--out", str(tmp_path / "out")]) == 0
    concept = pf.load_concept(tmp_path / "out" / "house.safetensors")
    record = json.loads(concept.metadata["perfusion.beta_curve"])
    assert record["method"] == "gate" and concept.beta == choose_by_gate(record["curve"])
    assert "auto-β: default β" in capsys.readouterr().out
    assert cli_main(["train", "--images", str(images), "--name", "plain", "--superclass", "square", "--steps", "2",
                     "--batch-size", "2", "--preview-every", "0", "--out", str(tmp_path / "out"), "--no-auto-beta"]) == 0
    assert "perfusion.beta_curve" not in pf.load_concept(tmp_path / "out" / "plain.safetensors").metadata
