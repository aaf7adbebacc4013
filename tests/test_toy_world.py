"""Toy world: renderer, checkers on ground truth, concept sprites and fidelity, CLIP tokenizer ids."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from perfusion_ext.toy import checkers, world
from perfusion_ext.toy.concepts import CONCEPTS, fidelity, render_concept, write_training_set


def test_render_is_deterministic_and_sized():
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    a, ca = world.training_batch(rng1, 16)
    b, cb = world.training_batch(rng2, 16)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb


def test_held_out_split():
    combos = world.all_combos()
    held = [c for c in combos if world.combo_is_held_out(*c)]
    assert len(combos) == 450 and 60 <= len(held) <= 110
    rng = np.random.default_rng(0)
    for _ in range(500):
        s = world.random_scene(rng)
        assert not world.combo_is_held_out(s.colour, s.shape, s.position, s.background)
    prompts = world.held_out_prompts(219)
    assert len({p for _, p in prompts}) >= 200
    assert all(any(t.split("{")[0] in p for t in world.EVAL_TEMPLATES) for _, p in prompts)


def test_checkers_read_ground_truth():
    rng = np.random.default_rng(1)
    hits = dict(background=0, colour=0, shape=0, position=0)
    n = 2000
    for i in range(n):
        s = world.random_scene(rng, held_out=bool(i % 2))
        r = checkers.read(world.render(s))
        hits["background"] += r.background == s.background
        hits["colour"] += r.colour == s.colour
        hits["shape"] += r.shape == s.shape
        hits["position"] += r.position == s.position
    assert all(v / n >= 0.99 for v in hits.values()), hits


def test_checker_reports_empty_image():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = world.COLOURS["blue"]
    r = checkers.read(img)
    assert r.background == "blue" and r.shape is None and r.position is None


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_fidelity_separates_concept_from_base_shapes(name):
    hits = total = 0
    for position in world.POSITIONS:
        for bg in CONCEPTS[name].readable_backgrounds():
            img, _ = render_concept(name, position, bg)
            f = fidelity(img, name)
            hits += f.is_concept
            total += 1
            assert f.correlation > 0.6
    assert hits == total
    rng = np.random.default_rng(2)
    false = sum(fidelity(world.render(world.random_scene(rng)), name).is_concept for _ in range(300))
    assert false == 0


def test_training_set_files(tmp_path):
    folder = write_training_set("ring", tmp_path / "ring", n=5)
    assert len(list(folder.glob("*.png"))) == 5 and len(list((folder / "masks").glob("*.png"))) == 5
    assert "{}" in (folder / "ring_0.txt").read_text()


def _open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_oc_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["_oc_tokenizer"] = module
    try:
        mod_spec.loader.exec_module(module)
    except ImportError as exc:
        pytest.skip(f"open_clip tokenizer module needs {exc}")
    return module.SimpleTokenizer()


def test_tokenizer_ids_equal_clip():
    from transformers import CLIPTokenizer

    from perfusion_ext.toy.model import MODEL_DIR

    ours = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    reference = _open_clip_tokenizer()
    prompts = ["a red triangle on the left, green background", "A Photo of a TEDDY bear, café!",
               "photo, yellow background, a small white circle at the top", "a stripebox on a blue background"]
    for p in prompts:
        assert ours(p, add_special_tokens=False).input_ids == reference.encode(p)
    assert ours("a").input_ids == [49406, 320, 49407]
