"""Bad `<perfusion:...>` tags never break a generation: the WebUI (Activator) and the CLI/Python API (`generate`)
both make the image without the bad tag and say why in a warning; no hook is left behind."""
from __future__ import annotations

import re
import time

import pytest
from conftest import make_concept, tiny_ldm_unet
from robust_helpers import hook_count, snapshot, toy_concept, toy_pipeline
from test_webui_glue import FakeEnv, FakeP

from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.hooks import activate
from perfusion_ext.core.tags import parse_prompt
from perfusion_ext.pipelines.generate import generate
from perfusion_ext.webui.activation import Activator
from perfusion_ext.webui.concepts import ConceptStore

STEPS = {"num_inference_steps": 1}


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture(scope="module")
def webui_folder(unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("webui")
    save_concept(make_concept(unet, "teddy", seed=1), folder / "teddy.safetensors")
    return folder


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    pipe = toy_pipeline()
    save_concept(toy_concept(pipe, "teddy", 1), folder / "teddy.safetensors")
    save_concept(toy_concept(pipe, "ring", 2), folder / "ring.safetensors")
    return folder


BAD_TAGS = [  # (id, tag, what the user is told)
    ("tag-unknown-name", "<perfusion:nope>", r"unknown concept 'nope'"),
    ("tag-empty-name", "<perfusion:>", r"invalid concept name '' \(letters, digits, space, _ \. - only\)"),
    ("tag-path-name", "<perfusion:../../etc/passwd>", r"invalid concept name '\.\./\.\./etc/passwd'"),
    ("tag-absolute-name", "<perfusion:/etc/passwd>", r"invalid concept name '/etc/passwd'"),
    ("tag-nul-in-name", "<perfusion:te\x00ddy>", r"invalid concept name 'te\\x00ddy'"),
    ("tag-bad-strength", "<perfusion:teddy:abc>", r"bad option 'abc' .*strength: 'abc' is not a number"),
    ("tag-nan-strength", "<perfusion:teddy:nan>", r"strength: 'nan' is not a finite number"),
    ("tag-inf-strength", "<perfusion:teddy:1e400>", r"strength: '1e400' is not a finite number"),
    ("tag-huge-strength", "<perfusion:teddy:1e30>", r"strength: 1e\+30 is outside \[-100, 100\]"),
    ("tag-bad-beta", "<perfusion:teddy:beta=oops>", r"beta: 'oops' is not a number"),
    ("tag-nan-beta", "<perfusion:teddy:beta=nan>", r"beta: 'nan' is not a finite number"),
    ("tag-tau-zero", "<perfusion:teddy:tau=0>", r"tau must be > 0"),
    ("tag-tau-negative", "<perfusion:teddy:tau=-1>", r"tau must be > 0"),
    ("tag-schedule-descending", "<perfusion:teddy:beta=0.7@0.5,0.6@0.2>", r"fractions must ascend, got 0.5 then 0.2"),
    ("tag-schedule-fraction-outside", "<perfusion:teddy:beta=0.7@1.5>", r"fraction 1.5 is outside \[0, 1\)"),
    ("tag-unknown-option", "<perfusion:teddy:gamma=1>", r"unknown option 'gamma'"),
    ("tag-unclosed", "<perfusion:teddy on a beach", r"unclosed tag '<perfusion:teddy on a beach.*': no '>' ends it"),
]


@pytest.mark.parametrize("tag,message", [pytest.param(t, m, id=i) for i, t, m in BAD_TAGS])
def test_bad_tag_in_the_webui_warns_and_the_generation_goes_on(tag, message, unet, webui_folder):
    before, hooks = snapshot(webui_folder), hook_count(unet)
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: webui_folder), env)
    p = FakeP([f"a photo of {tag} in the snow"], [""], batch_size=1)
    act.activate(p)
    assert any(re.search(message, w) for w in env.warnings), env.warnings
    assert not act.handles and not env.registered
    assert p.prompts[0].startswith("a photo of") and p.prompts[0].endswith("in the snow")
    act.release()
    assert hook_count(unet) == hooks and snapshot(webui_folder) == before


@pytest.mark.parametrize("tag,message", [pytest.param(t, m, id=i) for i, t, m in BAD_TAGS])
def test_bad_tag_in_the_cli_warns_and_the_image_is_made(tag, message, toy_folder):
    pipe = toy_pipeline()
    hooks = hook_count(pipe.unet)
    images, warnings = generate(pipe, f"a red {tag} on the left", concepts_dir=toy_folder, **STEPS)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert any(re.search(message, w) for w in warnings), warnings
    assert hook_count(pipe.unet) == hooks


@pytest.mark.parametrize("strength,message", [
    pytest.param(1e30, r"strength: 1e\+30 is outside \[-100, 100\] \(concept 'teddy'\)", id="api-huge-strength"),
    pytest.param(-101, r"strength: -101 is outside \[-100, 100\]", id="api-negative-strength"),
    pytest.param(float("nan"), r"strength: nan is not a finite number", id="api-nan-strength"),
    pytest.param(float("inf"), r"strength: inf is not a finite number", id="api-inf-strength"),
    pytest.param("abc", r"strength: 'abc' is not a number", id="api-text-strength"),
])
def test_strength_via_the_python_api_is_bounded_like_a_tags(unet, strength, message):
    """`activate(unet, concepts, strength=…)` and a (concept, strength) entry refuse what a tag refuses, with the
    tag's bound and words, before any hook is attached (1e30 overflowed the edit: a black image)."""
    concept, hooks = make_concept(unet, "teddy", seed=1), hook_count(unet)
    for concepts, kwargs in (([concept], {"strength": strength}), ([(concept, strength)], {})):
        with pytest.raises(PerfusionError, match=message):
            with activate(unet, concepts, **kwargs):
                pass
        assert hook_count(unet) == hooks
    with activate(unet, [concept], strength=-100):  # the bound itself is allowed, as in a tag
        assert hook_count(unet) == hooks + 32


def test_hundreds_of_tags(unet, webui_folder, toy_folder):
    tags = " ".join(f"<perfusion:teddy:{0.5 + i / 1000:g}> <perfusion:ghost{i}>" for i in range(150))
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: webui_folder), env)
    started = time.perf_counter()
    act.activate(FakeP([f"a {tags} b"], [""], batch_size=1))
    assert time.perf_counter() - started < 10
    assert len(act.handles) == 32  # one concept, however often it is named
    assert sum("different options" in w for w in env.warnings) == 1
    assert sum("unknown concept 'ghost" in w for w in env.warnings) == 150
    act.release()
    images, warnings = generate(toy_pipeline(), f"a {tags} b", concepts_dir=toy_folder, **STEPS)
    assert len(images) == 1 and sum("different options" in w for w in warnings) == 1


def test_the_same_concept_twice_with_different_options(unet, webui_folder, toy_folder):
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: webui_folder), env)
    act.activate(FakeP(["<perfusion:teddy:0.5> and <perfusion:teddy:0.9:beta=0.6>"], [""], batch_size=1))
    assert any("appears with different options in one batch; the hooks are shared by the whole batch, so the first "
               "(strength 0.5) is used" in w for w in env.warnings), env.warnings
    assert act.pass_concepts["teddy"].strength == 0.5
    act.release()
    _, warnings = generate(toy_pipeline(), "<perfusion:teddy:0.5> and <perfusion:teddy:0.9:beta=0.6>",
                           concepts_dir=toy_folder, **STEPS)
    assert any("appears with different options; one set of edits serves the whole prompt, so the first "
               "(<perfusion:teddy:0.5>) is used" in w for w in warnings), warnings
    _, warnings = generate(toy_pipeline(), "<perfusion:teddy:0.5> and <perfusion:teddy:0.5>", concepts_dir=toy_folder,
                           **STEPS)
    # the same options twice: nothing to say about the tags (a random concept's shut gate is the inspector's)
    assert not [w for w in warnings if "own token is only" not in w and "the concept leaks there" not in w]


def test_tags_in_the_negative_prompt(unet, webui_folder, toy_folder):
    env = FakeEnv(unet)
    act = Activator(ConceptStore(lambda: webui_folder), env)
    p = FakeP(["a cat"], ["blurry <perfusion:teddy>"], batch_size=1)
    act.activate(p)  # the WebUI: the concept word goes into the negative prompt, the edits apply
    word = next(iter(env.registered))
    assert p.negative_prompts[0].split() == ["blurry", word] and len(act.handles) == 32
    act.release()
    images, warnings = generate(toy_pipeline(), "a red circle", negative="blurry <perfusion:teddy>",
                                concepts_dir=toy_folder, **STEPS)
    assert len(images) == 1
    assert "tags in the negative prompt are ignored (as in the WebUI); removed them from it" in warnings


def test_parser_never_raises_on_these():
    for text in ("<perfusion:" * 200, ">" * 50 + "<perfusion:a:" * 50, "<perfusion:a:b:c:d:e:f:g>" * 100, "\x00<\udcff>"):
        parsed = parse_prompt(text)
        assert isinstance(parsed.warnings, list)
