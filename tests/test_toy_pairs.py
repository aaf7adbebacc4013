"""Toy world v2: two-object scenes, their captions, the split, and the checkers reading them back."""
import numpy as np
import torch

from perfusion_ext.toy import checkers, pairs, world
from perfusion_ext.toy.evaluate import score_pairs
from perfusion_ext.toy.training_data import WorldV2Sampler


def test_pair_parts_touch_and_stay_in_the_image():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = pairs.random_scene(rng)
        mask_a, mask_b = pairs.part_masks(scene)
        assert mask_a.any() and mask_b.any() and not (mask_a & mask_b).any()
        # the parts' boxes share an edge along the relation's axis
        (ax, ay), (bx, by) = pairs.part_centres(scene)
        along = abs(ay - by) if scene.relation in ("above", "below") else abs(ax - bx)
        assert abs(along - (scene.size_a + scene.size_b) / 2) < 1e-9
        img = pairs.render(scene)
        assert img.shape == (32, 32, 3)
        assert len({scene.colour_a, scene.colour_b, scene.background}) == 3


def test_pair_split_and_phrasings():
    rng = np.random.default_rng(0)
    for _ in range(500):
        s = pairs.random_scene(rng)
        assert not pairs.combo_is_held_out(s.colour_a, s.shape_a, s.relation, s.colour_b, s.shape_b)
    prompts = pairs.held_out_prompts(120)
    assert len({p for _, p in prompts}) == 120
    assert all(any(t.split("{")[0] in p for t in pairs.EVAL_TEMPLATES) for _, p in prompts)
    assert not any(any(t.split("{")[0] in c for t in pairs.EVAL_TEMPLATES if t.split("{")[0]) for c in pairs.corpus(300))


def test_checkers_read_pairs_exactly():
    rng = np.random.default_rng(1)
    n = 2000
    both = position = 0
    for i in range(n):
        s = pairs.random_scene(rng, held_out=bool(i % 2))
        r = checkers.read_pair(pairs.render(s), s.colour_a, s.shape_a, s.relation, s.colour_b, s.shape_b)
        both += r.both_right
        position += r.position == s.position
        assert r.background == s.background
    assert both / n >= 0.99 and position / n >= 0.99


def test_pair_reader_rejects_wrong_relation_shape_and_colour():
    s = pairs.PairScene("red", "triangle", "above", "white", "square", "centre", "blue")
    img = pairs.render(s)
    assert checkers.read_pair(img, "red", "triangle", "above", "white", "square").both_right
    assert not checkers.read_pair(img, "red", "triangle", "below", "white", "square").relation_right
    assert not checkers.read_pair(img, "red", "circle", "above", "white", "square").shapes_right
    assert not checkers.read_pair(img, "green", "triangle", "above", "white", "square").colours_right
    # apart, not touching: the relation is not read as satisfied
    far = np.full((32, 32, 3), world.COLOURS["blue"], np.uint8)
    far[world.shape_mask("square", 6, 6, 8)] = world.COLOURS["red"]
    far[world.shape_mask("square", 6, 26, 8)] = world.COLOURS["white"]
    assert not checkers.read_pair(far, "red", "square", "above", "white", "square").relation_right


def test_score_pairs_accepts_either_side_for_next_to():
    s = pairs.PairScene("red", "square", "left", "white", "circle", "centre", "blue")
    mirrored = pairs.PairScene("red", "square", "right", "white", "circle", "centre", "blue")
    images = np.stack([pairs.render(mirrored)] * 2)
    scores = score_pairs(images, [s, s], ["a red square next to a white circle", "a red square left of a white circle"])
    assert scores["pair_both"] == 0.5


def test_colourless_caption_names_the_shape_only():
    scene = world.Scene("red", "circle", "left", "blue")
    text = world.caption_text(scene, world.TRAIN_TEMPLATES[0], "on the left", colourless=True)
    assert text == "a photo of a circle on the left on a blue background"


def test_world_v2_sampler_mixes_and_resumes_exactly():
    from transformers import CLIPTokenizer

    from perfusion_ext.toy.model import MODEL_DIR

    sampler = WorldV2Sampler(CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer"), "cpu", seed=4)
    texts = [sampler.scene_and_caption()[1] for _ in range(400)]
    pair_share = np.mean([any(f" {w} " in t for w in ("on top of", "above", "below", "under", "left of",
                                                      "right of", "next to")) for t in texts])
    assert 0.35 < pair_share < 0.65
    state = sampler.state()
    a_images, a_ids = sampler.sample(8)
    sampler.set_state(state)
    b_images, b_ids = sampler.sample(8)
    assert a_images.dtype == torch.uint8 and a_images.shape == (8, 32, 32, 3) and a_ids.shape == (8, 77)
    assert torch.equal(a_images, b_images) and torch.equal(a_ids, b_ids)
