"""Named composites of the toy world: one word each, distinct from every toy concept, judged strictly."""
import numpy as np
import pytest
from transformers import CLIPTokenizer

from perfusion_ext.toy import named, pairs, two_named
from perfusion_ext.toy.concepts import CONCEPTS, composite_fidelity
from perfusion_ext.toy.evaluate import score_named, score_two_named
from perfusion_ext.toy.model import MODEL_DIR
from perfusion_ext.toy.pairs import MIRROR
from perfusion_ext.toy.training_data import WorldV2Sampler


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")


def test_every_word_is_one_token_and_no_concept_is_named(tokenizer):
    concept_specs = {CONCEPTS[c].composite for c in CONCEPTS if CONCEPTS[c].in_range}
    for word, spec in named.NAMED.items():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
        assert word not in CONCEPTS
        mirrored = pairs.Composite(spec.colour_a, spec.shape_a, spec.size_a, MIRROR.get(spec.relation, spec.relation),
                                   spec.colour_b, spec.shape_b, spec.size_b)
        assert spec not in concept_specs and mirrored not in concept_specs, word


def test_added_words_take_new_colour_pairs_in_the_first_words_arrangements():
    arrangements = {}
    for spec in named.NAMED.values():
        arrangements.setdefault(named.arrangement(spec), []).append((spec.colour_a, spec.colour_b))
    assert len(arrangements) == 10 and all(len(pairs_) == 4 for pairs_ in arrangements.values())
    assert all(len(set(pairs_)) == 4 for pairs_ in arrangements.values())
    for name in (c for c in CONCEPTS if CONCEPTS[c].in_range):  # neither the concept's colours nor their swap
        spec = CONCEPTS[name].composite
        taken = arrangements[named.arrangement(spec)]
        assert (spec.colour_a, spec.colour_b) not in taken and (spec.colour_b, spec.colour_a) not in taken, name


def test_renders_are_judged_as_themselves_and_nothing_else():
    rng = np.random.default_rng(0)
    found = [(*named.random_scene(rng), "") for _ in range(200)]
    images = np.stack([pairs.render(scene) for _, scene, _ in found])
    assert score_named(images, found) == {"named": 1.0, "named_background": 1.0, "named_position": 1.0,
                                          "named_first_words": 1.0, "named_added_words": 1.0}
    for (word, _, _), image in zip(found, images):
        others = [w for w in named.NAMED if w != word]
        assert not any(composite_fidelity(image, named.NAMED[w], w in named.MIRRORABLE).is_concept for w in others)
        assert not any(composite_fidelity(image, CONCEPTS[c].composite, CONCEPTS[c].mirrorable).is_concept
                       for c in CONCEPTS if CONCEPTS[c].in_range)


def test_a_non_mirrorable_word_drawn_mirrored_is_rejected():
    word = next(w for w in named.NAMED if w not in named.MIRRORABLE and named.NAMED[w].relation == "left")
    scene = named.NAMED[word].scene("centre", named.backgrounds(word)[0], mirrored=True)
    found = [(word, scene, "")]
    assert score_named(pairs.render(scene)[None], found)["named"] == 0.0


def test_held_out_combinations_never_reach_training(tokenizer):
    rng = np.random.default_rng(1)
    for _ in range(300):
        word, scene = named.random_scene(rng)
        assert not named.is_held_out(word, scene.position, scene.background)
        assert scene.background not in (scene.colour_a, scene.colour_b)
    for word, scene, prompt in named.held_out_prompts(40):
        assert named.is_held_out(word, scene.position, scene.background) and word in prompt


def test_sampler_share(tokenizer):
    everything = WorldV2Sampler(tokenizer, "cpu", seed=0, pair_share=0.0, named_share=1.0, drop_caption=0.0,
                                prefix_share=0.0)
    captions = [everything.scene_and_caption()[1] for _ in range(50)]
    assert all(any(f" {w} " in f" {c} ".replace(",", " ") for w in named.NAMED) for c in captions), captions
    none = WorldV2Sampler(tokenizer, "cpu", seed=0, pair_share=0.5, named_share=0.0)
    assert not any(any(f" {w} " in f" {c} ".replace(",", " ") for w in named.NAMED)
                   for c in (none.scene_and_caption()[1] for _ in range(200)))


def test_size_words_scale_both_parts_and_are_judged_alike():
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(200):
        word, scene = named.random_scene(rng)
        size = named.size_word(word, scene)
        seen.add(size)
        assert scene.size_a / named.NAMED[word].size_a == pytest.approx(named.SIZE_SCALES[size])
        assert scene.size_b / named.NAMED[word].size_b == pytest.approx(named.SIZE_SCALES[size])
        words = named.caption(word, scene, rng).replace(",", " ").split()
        assert [w for w in words if w in named.SIZE_SCALES] == ([size] if size else [])
        assert composite_fidelity(pairs.render(scene), named.NAMED[word], word in named.MIRRORABLE).is_concept
    assert seen == set(named.SIZE_SCALES)


def test_two_named_objects_fit_and_each_half_is_judged_as_its_own_word(tokenizer):
    rng = np.random.default_rng(3)
    found = []
    for _ in range(100):
        layout, a, b, scenes = two_named.random_scene(rng)
        assert a != b and {a, b} <= set(two_named.words_for(layout))
        assert not two_named.is_held_out(a, b, scenes[0].background)
        text = two_named.caption(layout, a, b, scenes[0].background, rng)
        assert text.index(a) < text.index(b) and scenes[0].background in text
        first, second = pairs.part_masks(scenes[0]), pairs.part_masks(scenes[1])
        assert not ((first[0] | first[1]) & (second[0] | second[1])).any()  # the objects never overlap
        found.append((layout, a, b, scenes, text))
    images = np.stack([two_named.render_two(f[3]) for f in found])
    assert score_two_named(images, found) == {"two_named_both": 1.0, "two_named_background": 1.0}
    swapped = [(layout, b, a, scenes, text) for layout, a, b, scenes, text in found]
    assert score_two_named(images, swapped)["two_named_both"] == 0.0
    assert all(two_named.is_held_out(a, b, s[0].background) for _, a, b, s, _ in two_named.held_out_prompts(20))


def test_two_named_share_of_the_sampler(tokenizer):
    sampler = WorldV2Sampler(tokenizer, "cpu", seed=0, pair_share=0.0, named_share=0.0, two_named_share=1.0,
                             drop_caption=0.0, prefix_share=0.0)
    captions = [sampler.scene_and_caption()[1] for _ in range(30)]
    assert all(sum(f" {w} " in f" {c} ".replace(",", " ") for w in named.NAMED) == 2 for c in captions), captions
