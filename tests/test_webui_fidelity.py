"""The WebUI side of the fidelity controls, without a WebUI: per-step β schedules and hr_beta driven by the
sampler's step callback, the gate inspector's line and warnings from the WebUI's conditioning, X/Y/Z axes."""
from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import make_concept, run_unet, tiny_ldm_unet, unet_inputs
from test_webui_glue import FakeEnv, FakeP

from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.gate_report import gate_line, gate_report
from perfusion_ext.core.hooks import ResolvedConcept, attach, build_edits, detach
from perfusion_ext.webui import sampling, xyz
from perfusion_ext.webui.activation import Activator
from perfusion_ext.webui.concepts import ConceptStore


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture()
def folder(tmp_path, unet):
    save_concept(make_concept(unet, "teddy", seed=1), tmp_path / "teddy.safetensors")
    save_concept(make_concept(unet, "ring", seed=2), tmp_path / "ring.safetensors")
    return tmp_path


class LayoutEnv(FakeEnv):
    """FakeEnv plus the WebUI's tokenization: one 77-token chunk, word i of the prompt at position i + 1."""

    def token_layout(self, prompt):
        words = prompt.split()
        texts = ["<|startoftext|>"] + [w + "</w>" for w in words] + ["<|endoftext|>"] * (76 - len(words))
        return texts, {w: [i + 1] for i, w in enumerate(words) if w.startswith("perfusion")}


def _constant(unet, concept, beta, tau, x, t, ctx, strength=1.0):
    handles = attach(build_edits(unet, [ResolvedConcept(concept, strength, beta, tau)]))
    try:
        return run_unet(unet, x, t, ctx)
    finally:
        detach(handles)


def test_step_callback_moves_beta_and_hires_uses_hr_beta(folder, unet):
    env = LayoutEnv(unet)
    act = Activator(ConceptStore(lambda: folder), env)
    teddy = act.store.load("teddy").concept
    x, t, ctx = unet_inputs(unet)
    before = run_unet(unet, x, t, ctx)
    constant = {beta: _constant(unet, teddy, beta, 0.2, x, t, ctx, 0.8) for beta in (0.75, 0.65, 0.9)}
    p = FakeP(["a <perfusion:teddy:0.8:beta=0.75@0,0.65@0.5:hr_beta=0.9:tau=0.2> x"], [""], batch_size=1,
              hr=["a <perfusion:teddy:0.8:beta=0.75@0,0.65@0.5:hr_beta=0.9:tau=0.2> x"])
    act.activate(p)
    assert act.edits.scheduled
    for step, beta in ((0, 0.75), (9, 0.75), (10, 0.65), (19, 0.65)):
        sampling.on_denoiser(act, step, 20, None)
        assert torch.equal(run_unet(unet, x, t, ctx), constant[beta]), step
    p.is_hr_pass = True
    act.activate(p)  # the hires pass: hr_beta, constant
    assert not act.edits.scheduled and act.pass_concepts["teddy"].gate_at(0.7) == (0.9, 0.2)
    assert torch.equal(run_unet(unet, x, t, ctx), constant[0.9])
    act.release()
    assert torch.equal(run_unet(unet, x, t, ctx), before)  # bit for bit


def test_schedule_before_its_first_point_uses_the_concept_default(folder, unet):
    act = Activator(ConceptStore(lambda: folder), LayoutEnv(unet))
    act.activate(FakeP(["<perfusion:teddy:beta=0.5@0.5>"], [""], batch_size=1))
    teddy = act.pass_concepts["teddy"]
    assert teddy.gate_at(0.0) == (teddy.concept.beta, teddy.concept.tau) and teddy.gate_at(0.5)[0] == 0.5
    act.release()


def _hidden_with(concept, where: dict[int, torch.Tensor], tokens=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens, concept.dim, generator=g) * 0.01
    for i, vec in where.items():
        hidden[0, i] = vec
    return hidden


def test_inspector_line_follows_the_formula_and_warns_on_a_leak(folder, unet):
    env = LayoutEnv(unet)
    act = Activator(ConceptStore(lambda: folder), env)
    p = FakeP(["a <perfusion:teddy:beta=0.6:tau=0.1> on white"], [""], batch_size=1)
    act.activate(p)
    word = act.pass_words["teddy"]
    assert p.prompts[0].split() == ["a", word, "on", "white"]
    teddy = act.pass_concepts["teddy"].concept
    i_star = teddy.target_input
    # the concept's own token (position 2) carries half of i*, the word "white" (position 4) all of it
    text_cond = _hidden_with(teddy, {2: 0.5 * i_star, 4: i_star})
    sampling.on_denoiser(act, 0, 20, text_cond)
    assert not act.inspect_pending
    line = p.extra_generation_params[sampling.GATES_KEY]
    g_white = 1 / (1 + math.exp(-(1.0 - 0.6) / 0.1))
    g_own = 1 / (1 + math.exp(-(0.5 - 0.6) / 0.1))
    assert line.startswith(f"teddy: own {g_own:.2f}, 'white' {g_white:.2f}")
    assert any("leaks" in w and "'white'" in w and "token 4" in w for w in env.warnings)
    assert any(f"own token is only {g_own:.2f} (s=0.50 < β=0.60)" in w for w in env.warnings)  # s 0.5 < β
    sampling.on_denoiser(act, 1, 20, text_cond)  # once per pass
    assert sum("leaks" in w for w in env.warnings) == 1 and sum("own token is only" in w for w in env.warnings) == 1
    act.release()


def test_gate_report_numbers_against_the_formula(unet):
    concept = make_concept(unet, "teddy", seed=4)
    u, i_star = concept.target_input_cinv.double(), concept.target_input.double()
    hidden = _hidden_with(concept, {1: i_star.float()}, seed=2)[0]
    report = gate_report(hidden, [("teddy", concept, 0.7, 0.15)], ["<|startoftext|>", "a</w>"], {"teddy": [1]})
    assert report["concepts"] == {"teddy": {"beta": 0.7, "tau": 0.15}}
    for token in report["tokens"]:
        s = float(hidden[token["index"]].double() @ u / (u @ i_star))
        assert token["s"]["teddy"] == pytest.approx(s, abs=1e-9)
        assert token["gate"]["teddy"] == pytest.approx(1 / (1 + math.exp(-(s - 0.7) / 0.15)), abs=1e-9)
    assert [t["text"] for t in report["tokens"][:3]] == ["<start>", "<perfusion:teddy>", "#2"]
    assert report["tokens"][1]["s"]["teddy"] == pytest.approx(1.0, abs=1e-6) and not report["warnings"]
    assert gate_line(report, {"teddy": [1]}, top=2).startswith("teddy: own 0.88, ")


def test_gate_report_equals_the_cli_inspector_on_the_same_encoding(tmp_path):
    import perfusion_ext as pf
    from perfusion_ext.core.tags import parse_prompt
    from perfusion_ext.core.text import PromptEncoder
    from perfusion_ext.pipelines.inspect import inspect_prompt
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    concept = make_concept(pipe.unet, name="teddy", family="toy", superclass="circle")
    concept.embeddings = {"clip_l": torch.randn(1, 128)}
    pf.save_concept(concept, tmp_path / "teddy.safetensors")
    stored = pf.load_concept(tmp_path / "teddy.safetensors")
    prompt = "a <perfusion:teddy:beta=0.5:tau=0.2> on a white background"
    cli = inspect_prompt(pipe, prompt, concepts_dir=tmp_path)
    encoded = PromptEncoder(pipe.tokenizer, pipe.text_encoder).encode([parse_prompt(prompt).segments],
                                                                    {"teddy": stored.embeddings["clip_l"]})
    texts = pipe.tokenizer.convert_ids_to_tokens(encoded.input_ids[0].tolist())
    ours = gate_report(encoded.hidden[0], [("teddy", stored, 0.5, 0.2)], texts, encoded.concept_positions[0])
    assert ours["concepts"] == cli["concepts"]
    for a, b in zip(ours["tokens"], cli["tokens"]):
        assert a["s"]["teddy"] == pytest.approx(b["s"]["teddy"], abs=1e-12)
        assert a["gate"]["teddy"] == pytest.approx(b["gate"]["teddy"], abs=1e-12)
    assert ours["warnings"] == cli["warnings"] and [t["text"] for t in ours["tokens"]] == [t["text"] for t in cli["tokens"]]


def test_inspector_never_breaks_sampling(folder, unet):
    class Broken(LayoutEnv):
        def token_layout(self, prompt):
            raise RuntimeError("tokenizer gone")

    act = Activator(ConceptStore(lambda: folder), Broken(unet))
    p = FakeP(["<perfusion:teddy>"], [""], batch_size=1)
    act.activate(p)
    sampling.on_denoiser(act, 0, 10, torch.zeros(1, 77, 768))
    assert sampling.GATES_KEY not in p.extra_generation_params
    act.release()


# ---- X/Y/Z plot axes ---------------------------------------------------------------------------
class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm = label, type, apply, confirm


def test_xyz_axes_register_once_and_rewrite_the_tags():
    module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Seed", int, None)])
    data = [types.SimpleNamespace(script_class=type("Script", (), {"__module__": "other"}), module=None),
            types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)]
    assert xyz.find_module(data) is module and xyz.find_module([]) is None
    assert xyz.register(module) == ["Perfusion β", "Perfusion τ", "Perfusion strength"]
    assert xyz.register(module) == []  # a UI reload adds nothing twice
    axes = {o.label: o for o in module.axis_options}
    assert axes["Perfusion β"].type is float
    p = types.SimpleNamespace(prompt="a <perfusion:teddy:0.8:beta=0.7@0,0.6@0.5> x", negative_prompt="",
                              hr_prompt=["<perfusion:ring>"], hr_negative_prompt="")
    axes["Perfusion β"].apply(p, 0.55, [0.55, 0.75])
    assert p.prompt == "a <perfusion:teddy:0.8:beta=0.55> x" and p.hr_prompt == ["<perfusion:ring:1:beta=0.55>"]
    axes["Perfusion strength"].apply(p, 0.25, [0.25])
    assert p.prompt == "a <perfusion:teddy:0.25:beta=0.55> x"
    axes["Perfusion β"].confirm(p, [0.5])
    with pytest.raises(RuntimeError, match="no <perfusion:NAME> tag"):
        axes["Perfusion β"].confirm(types.SimpleNamespace(prompt="plain", negative_prompt=""), [0.5])
    with pytest.raises(RuntimeError, match="> 0"):
        axes["Perfusion τ"].confirm(p, [0.1, 0.0])
