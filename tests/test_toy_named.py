"""Named composites of the toy world: one word each, distinct from every toy concept, judged strictly."""
import numpy as np
import pytest
from transformers import CLIPTokenizer

from perfusion_ext.toy import named, pairs
from perfusion_ext.toy.concepts import CONCEPTS, composite_fidelity
from perfusion_ext.toy.evaluate import score_named
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


def test_renders_are_judged_as_themselves_and_nothing_else():
    rng = np.random.default_rng(0)
    found = [(*named.random_scene(rng), "") for _ in range(200)]
    images = np.stack([pairs.render(scene) for _, scene, _ in found])
    assert score_named(images, found) == {"named": 1.0, "named_background": 1.0, "named_position": 1.0}
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
