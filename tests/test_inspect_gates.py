"""The gate inspector: exact similarities and gates per token, the leak warning, the pinned JSON shape."""
import json
import math

import pytest
import torch
from conftest import make_concept

import perfusion_ext as pf
from perfusion_ext.cli import main as cli_main
from perfusion_ext.core.tags import parse_prompt
from perfusion_ext.core.text import PromptEncoder
from perfusion_ext.pipelines.inspect import format_report, inspect_prompt, mean_leak

PROMPT = "a <perfusion:teddy> on a white background"


def encoding(pipe, concept, prompt=PROMPT):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    return encoder.encode([parse_prompt(prompt).segments], {"teddy": concept.embeddings["clip_l"]})


def concept_locked_to(pipe, position_of, tmp_path):
    """A concept whose i* is the prompt's encoding at one token, u = i* (C = I)."""
    concept = make_concept(pipe.unet, name="teddy", family="toy", superclass="circle")
    concept.embeddings = {"clip_l": torch.randn(1, 128)}
    encoded = encoding(pipe, concept)
    index = position_of(encoded)
    concept.target_input = encoded.hidden[0, index].detach().clone()
    concept.target_input_cinv = concept.target_input.clone()
    pf.save_concept(concept, tmp_path / "teddy.safetensors")
    return concept, encoded, index


def test_similarity_is_one_on_the_locked_token_and_gates_follow_the_formula(pipe, tmp_path):
    concept, encoded, own = concept_locked_to(pipe, lambda e: e.concept_positions[0]["teddy"][0], tmp_path)
    report = inspect_prompt(pipe, PROMPT, concepts_dir=tmp_path)
    assert len(report["tokens"]) == encoded.hidden.shape[1] == 77
    assert report["concepts"] == {"teddy": {"beta": concept.beta, "tau": concept.tau}}
    token = report["tokens"][own]
    assert token["text"] == "<perfusion:teddy>" and token["s"]["teddy"] == pytest.approx(1.0, abs=1e-6)
    stored = pf.load_concept(tmp_path / "teddy.safetensors")  # as the file stores them
    i_star, u = stored.target_input.double(), stored.target_input_cinv.double()
    hidden = encoding(pipe, stored).hidden[0].detach().double()
    for t in report["tokens"]:
        s = float(hidden[t["index"]] @ u / (u @ i_star))
        assert t["s"]["teddy"] == pytest.approx(s, abs=1e-9)
        gate = 1 / (1 + math.exp(-(t["s"]["teddy"] - concept.beta) / concept.tau))
        assert t["gate"]["teddy"] == pytest.approx(gate, abs=1e-9)
    assert [t["text"] for t in report["tokens"][:7]] == ["<start>", "a", "<perfusion:teddy>", "on", "a",
                                                         "white", "background"]
    assert not report["warnings"]
    assert 0 <= mean_leak(report, "teddy") < 1


def test_tag_options_set_beta_and_tau(pipe, tmp_path):
    concept_locked_to(pipe, lambda e: e.concept_positions[0]["teddy"][0], tmp_path)
    report = inspect_prompt(pipe, "a <perfusion:teddy:1:beta=0.4:tau=0.05> on a white background", concepts_dir=tmp_path)
    assert report["concepts"]["teddy"] == {"beta": 0.4, "tau": 0.05}


def test_leak_onto_another_word_is_warned(pipe, tmp_path):
    concept_locked_to(pipe, lambda e: 5, tmp_path)  # i* = the encoding of "white"
    report = inspect_prompt(pipe, PROMPT, concepts_dir=tmp_path)
    assert report["tokens"][5]["text"] == "white" and report["tokens"][5]["s"]["teddy"] == pytest.approx(1.0, abs=1e-6)
    assert any("leaks" in w and "'white'" in w for w in report["warnings"])
    assert "mean gate on other tokens" in format_report(report)


def test_a_gate_shut_on_the_concepts_own_token_is_warned(pipe, tmp_path):
    # i* twice the own token's encoding (u = i*): s there is exactly 0.5, below β 0.7, so its gate is
    # sigmoid(-0.2 / 0.15) ≈ 0.21
    concept, encoded, own = concept_locked_to(pipe, lambda e: e.concept_positions[0]["teddy"][0], tmp_path)
    concept.target_input = 2 * encoded.hidden[0, own].detach().clone()
    concept.target_input_cinv = concept.target_input.clone()
    pf.save_concept(concept, tmp_path / "teddy.safetensors")
    report = inspect_prompt(pipe, PROMPT, concepts_dir=tmp_path)
    assert report["tokens"][own]["s"]["teddy"] == pytest.approx(0.5, abs=1e-5)
    gate = 1 / (1 + math.exp(-(0.5 - concept.beta) / concept.tau))
    shut = [w for w in report["warnings"] if "own token is only" in w]
    assert len(shut) == 1 and f"only {gate:.2f} (s=0.50 < β={concept.beta:.2f})" in shut[0]
    # open on its own token (s = 1): no such warning
    concept_locked_to(pipe, lambda e: e.concept_positions[0]["teddy"][0], tmp_path)
    assert not any("own token is only" in w for w in inspect_prompt(pipe, PROMPT, concepts_dir=tmp_path)["warnings"])


def test_cli_inspect_prompt_json_and_file(pipe, tmp_path, capsys, monkeypatch):
    import perfusion_ext.pipelines.loading as loading

    concept_locked_to(pipe, lambda e: e.concept_positions[0]["teddy"][0], tmp_path)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pipe)
    assert cli_main(["inspect", "--model", "toy", "--concepts", str(tmp_path), "--prompt", PROMPT, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"tokens", "concepts"}
    assert set(report["tokens"][0]) == {"index", "text", "s", "gate"}
    assert cli_main(["inspect", str(tmp_path / "teddy.safetensors")]) == 0
    assert "teddy" in capsys.readouterr().out
    assert cli_main(["inspect"]) != 0


def test_competitive_gates_leave_each_token_its_most_similar_concepts_gate(pipe, tmp_path, capsys, monkeypatch):
    import perfusion_ext.pipelines.loading as loading

    concept_locked_to(pipe, lambda e: e.concept_positions[0]["teddy"][0], tmp_path)
    ring = make_concept(pipe.unet, name="ring", family="toy", superclass="circle")
    ring.embeddings = {"clip_l": torch.randn(1, 128)}
    encoded = encoding(pipe, ring, "a <perfusion:teddy> on a white background")
    ring.target_input = encoded.hidden[0, 4].detach().clone()  # "a", "teddy", "on", "a": the ring sits on "a"
    ring.target_input_cinv = ring.target_input.clone()
    pf.save_concept(ring, tmp_path / "ring.safetensors")
    prompt = "a <perfusion:teddy> on a <perfusion:ring> and a white background"
    plain = inspect_prompt(pipe, prompt, concepts_dir=tmp_path)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pipe)
    assert cli_main(["inspect", "--concepts", str(tmp_path), "--prompt", prompt, "--json", "--competitive-gates"]) == 0
    competitive = json.loads(capsys.readouterr().out)
    assert [t["s"] for t in competitive["tokens"]] == [t["s"] for t in plain["tokens"]]
    for mine, theirs in zip(competitive["tokens"], plain["tokens"]):
        nearest = max(theirs["s"], key=theirs["s"].get)
        assert mine["gate"][nearest] == theirs["gate"][nearest]
        assert all(mine["gate"][n] == 0.0 for n in theirs["s"] if theirs["s"][n] < theirs["s"][nearest])
    # the teddy's own token keeps only the teddy's gate
    teddy = next(t for t in competitive["tokens"] if t["text"] == "<perfusion:teddy>")
    assert teddy["gate"]["ring"] == 0.0 and teddy["gate"]["teddy"] > 0.5
