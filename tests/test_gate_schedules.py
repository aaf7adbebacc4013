"""β/τ as controls: the schedule grammar (one for the WebUI, the CLI and the API), the hooks moving the gate
at the current sampling step, and the diffusers pipeline driving them step by step."""
from __future__ import annotations

import pytest
import torch
from conftest import make_concept, run_unet, unet_inputs

from perfusion_ext.core.concept import load_concept
from perfusion_ext.core.hooks import ResolvedConcept, attach, detach, prepare_edits, resolve
from perfusion_ext.core.tags import (
    ConceptTag,
    format_tag,
    parse_schedule,
    parse_tag_body,
    rewrite_tags,
    tag_text,
    value_at,
)


# ---- grammar ---------------------------------------------------------------------------------
def test_schedule_grammar_values_and_defaults():
    assert parse_schedule("0.7") == 0.7
    assert parse_schedule("0.75@0,0.65@0.5") == ((0.0, 0.75), (0.5, 0.65))
    assert parse_schedule("0.75, 0.65@0.5") == ((0.0, 0.75), (0.5, 0.65))  # a bare first value starts at 0
    assert parse_schedule("0.6@0.25") == ((0.25, 0.6),)  # before 0.25 the concept's default holds
    tag = parse_tag_body("teddy:0.8:beta=0.75@0,0.65@0.5:tau=0.2")
    assert (tag.strength, tag.beta, tag.tau) == (0.8, 0.75, 0.2)
    assert tag.beta_schedule == ((0.0, 0.75), (0.5, 0.65)) and tag.tau_schedule == ()
    assert tag.schedule("beta") == ((0.0, 0.75), (0.5, 0.65)) and tag.schedule("tau") == ((0.0, 0.2),)
    later = parse_tag_body("teddy:beta=0.6@0.3")
    assert later.beta is None and later.beta_schedule == ((0.3, 0.6),)
    # a plain number and a one-point schedule at 0 are the same tag as before schedules existed
    assert parse_tag_body("teddy:beta=0.6@0") == parse_tag_body("teddy:beta=0.6") == ConceptTag("teddy", 1.0, 0.6)
    hr = parse_tag_body("teddy:beta=0.7:hr_beta=0.8@0,0.9@0.5:hr_tau=0.1")
    assert hr.schedule("beta", hires=False) == ((0.0, 0.7),)
    assert hr.schedule("beta", hires=True) == ((0.0, 0.8), (0.5, 0.9))
    assert hr.schedule("tau", hires=True) == ((0.0, 0.1),) and hr.schedule("tau") == ()
    assert parse_tag_body("teddy:beta=0.7").schedule("beta", hires=True) == ((0.0, 0.7),)  # hires as first pass


@pytest.mark.parametrize("body,why", [
    ("teddy:beta=0.7@1", r"outside \[0, 1\)"),
    ("teddy:beta=0.7@-0.1", r"outside \[0, 1\)"),
    ("teddy:beta=0.7@0.5,0.6@0.5", "must ascend"),
    ("teddy:beta=0.7@0.5,0.6@0.2", "must ascend"),
    ("teddy:beta=0.7,0.6", "needs @FRACTION"),
    ("teddy:beta=0.7@x", "not a number"),
    ("teddy:beta=nan", "not a finite number"),
    ("teddy:tau=0.1@0,0@0.5", "tau must be > 0"),
    ("teddy:hr_tau=-1", "tau must be > 0"),
    ("teddy:gamma=1", "unknown option"),
])
def test_schedule_grammar_rejections(body, why):
    with pytest.raises(ValueError, match=why):
        parse_tag_body(body)


def test_value_at_and_round_trip():
    schedule = ((0.0, 0.75), (0.5, 0.65))
    assert [value_at(schedule, f, 0.7) for f in (0.0, 0.25, 0.4999, 0.5, 0.99)] == [0.75, 0.75, 0.75, 0.65, 0.65]
    assert [value_at(((0.3, 0.6),), f, 0.7) for f in (0.0, 0.29, 0.3, 0.9)] == [0.7, 0.7, 0.6, 0.6]
    assert value_at((), 0.5, 0.7) == 0.7
    for body in ("teddy", "teddy:0.5:beta=0.6:tau=0.2", "teddy:beta=0.75@0,0.65@0.5", "teddy:beta=0.6@0.3:tau=0.2@0.5",
                 "teddy:1:hr_beta=0.8@0,0.9@0.5", "teddy:0:beta=0.5:hr_tau=0.3"):
        tag = parse_tag_body(body)
        assert parse_tag_body(tag_text(tag)[len("<perfusion:"):-1]) == tag, body
    assert format_tag("teddy", beta=((0.0, 0.75), (0.5, 0.65))) == "<perfusion:teddy:1:beta=0.75@0,0.65@0.5>"


def test_rewrite_tags_sets_options_on_every_tag():
    prompt = "a <perfusion:teddy:0.5:beta=0.7@0,0.6@0.5:hr_beta=0.9> and <perfusion:ring> <lora:x:1> <perfusion:bad:q=1>"
    out, n = rewrite_tags(prompt, beta=0.55)
    assert n == 2
    assert "<perfusion:teddy:0.5:beta=0.55>" in out and "<perfusion:ring:1:beta=0.55>" in out
    assert "<lora:x:1>" in out and "<perfusion:bad:q=1>" in out
    out, n = rewrite_tags(prompt, strength=0.25)
    assert "<perfusion:teddy:0.25:beta=0.7@0,0.6@0.5:hr_beta=0.9>" in out and "<perfusion:ring:0.25>" in out
    assert rewrite_tags("no tags here", beta=0.5) == ("no tags here", 0)


# ---- hooks: the β in effect at the current step ------------------------------------------------
def _out(unet, entries, x, t, ctx, fraction=None):
    edits = prepare_edits(unet, entries)
    if fraction is not None:
        edits.set_progress(fraction)
    handles = attach(edits.edits)
    try:
        return run_unet(unet, x, t, ctx)
    finally:
        detach(handles)


def test_scheduled_gates_equal_constant_gates_at_each_step(ldm_unet):
    unet = ldm_unet
    a, b = make_concept(unet, "teddy", seed=1), make_concept(unet, "ring", seed=2)
    x, t, ctx = unet_inputs(unet)
    before = run_unet(unet, x, t, ctx)
    schedule = ((0.0, 0.75), (0.5, 0.65))
    entries = resolve([(a, 0.8, schedule, ((0.25, 0.3),)), (b, 1.0, 0.6, 0.2)])
    assert entries[0].beta_schedule == schedule and entries[0].tau == a.tau and entries[0].scheduled
    assert entries[1].beta_schedule == () and not entries[1].scheduled
    assert [entries[0].gate_at(f) for f in (0.0, 0.3, 0.5)] == [(0.75, a.tau), (0.75, 0.3), (0.65, 0.3)]
    for fraction, (beta_a, tau_a) in ((0.0, (0.75, a.tau)), (0.3, (0.75, 0.3)), (0.7, (0.65, 0.3))):
        scheduled = _out(unet, entries, x, t, ctx, fraction)
        constant = _out(unet, [ResolvedConcept(a, 0.8, beta_a, tau_a), ResolvedConcept(b, 1.0, 0.6, 0.2)], x, t, ctx)
        assert torch.equal(scheduled, constant), fraction
    edits = prepare_edits(unet, entries)
    module = next(iter(edits.edits))
    assert edits.edits[module].betas.tolist() == [0.75, 0.6]
    assert edits.set_progress(0.9) and not edits.set_progress(0.95)  # moved once, then nothing to do
    assert edits.edits[module].betas.tolist() == [0.65, 0.6] and edits.edits[module].taus.tolist() == [0.3, 0.2]
    assert torch.equal(run_unet(unet, x, t, ctx), before)  # nothing stays attached


def test_activation_context_follows_progress_and_restores_bit_for_bit(ldm_unet):
    from perfusion_ext.core.hooks import activation

    unet = ldm_unet
    concept = make_concept(unet, "teddy", seed=1)
    x, t, ctx = unet_inputs(unet)
    before = run_unet(unet, x, t, ctx)
    with pytest.raises(RuntimeError):
        with activation(unet, [(concept, 1.0, ((0.0, 0.9), (0.5, 0.4)), None)]) as edits:
            first = run_unet(unet, x, t, ctx)
            edits.set_progress(0.5)
            second = run_unet(unet, x, t, ctx)
            raise RuntimeError("sampling failed")
    assert not torch.equal(first, second)
    assert torch.equal(run_unet(unet, x, t, ctx), before)


# ---- the diffusers pipeline drives the schedule step by step -------------------------------------
def _spy_betas(pipe, record):
    """A forward pre-hook on the UNet that records the β of the first edited to_k at every UNet call."""
    from perfusion_ext.core.layers import cross_attention_layers

    to_k = next(iter(cross_attention_layers(pipe.unet).values())).to_k

    def spy(module, args):
        hooks = list(to_k._forward_hooks.values())
        edit = hooks[0].__closure__[0].cell_contents if hooks else None
        record.append(None if edit is None else round(float(edit.betas[0]), 6))

    return pipe.unet.register_forward_pre_hook(spy)


def test_generate_applies_the_beta_of_each_step(pipe, toy_teddy_dir):
    from perfusion_ext.pipelines.generate import generate

    record = []
    handle = _spy_betas(pipe, record)
    try:
        _, warnings = generate(pipe, "a <perfusion:teddy:beta=0.75@0,0.65@0.5,0.55@0.75> on the left", concepts_dir=toy_teddy_dir,
                               num_inference_steps=4, height=32, width=32)
        assert record == [0.75, 0.75, 0.65, 0.55]  # steps 0..3 of 4: fractions 0, .25, .5, .75
        record.clear()
        generate(pipe, "a <perfusion:teddy:beta=0.6@0.5> on the left", concepts_dir=toy_teddy_dir, num_inference_steps=4,
                 height=32, width=32)
        default = round(float(load_concept(toy_teddy_dir / "teddy.safetensors").beta), 6)
        assert record == [default, default, 0.6, 0.6]  # the concept's default before the first point
        record.clear()
        _, warnings = generate(pipe, "a <perfusion:teddy:beta=0.6:hr_beta=0.9> x", concepts_dir=toy_teddy_dir,
                               num_inference_steps=2, height=32, width=32)
        assert record == [0.6, 0.6] and any("hr_beta" in w for w in warnings)
    finally:
        handle.remove()


def test_scheduled_image_equals_constant_image_when_the_schedule_is_flat(pipe, toy_teddy_dir):
    from perfusion_ext.pipelines.generate import generate

    kw = dict(concepts_dir=toy_teddy_dir, num_inference_steps=3, height=32, width=32, seed=5)
    flat, _ = generate(pipe, "a <perfusion:teddy:beta=0.6@0,0.6@0.5> x", **kw)
    const, _ = generate(pipe, "a <perfusion:teddy:beta=0.6> x", **kw)
    moved, _ = generate(pipe, "a <perfusion:teddy:beta=0.6@0,-3@0.4> x", **kw)
    import numpy as np

    assert np.array_equal(np.asarray(flat[0]), np.asarray(const[0]))
    assert not np.array_equal(np.asarray(moved[0]), np.asarray(const[0]))
