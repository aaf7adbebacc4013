"""Vectorised toy renderer and the device-side training sampler: exact pixels, captions that match the
images, the training split only, reproducible and checkpointable."""
import collections

import numpy as np
import pytest
import torch

from perfusion_ext.toy import checkers, world
from perfusion_ext.toy.train_base import load_toy_tokenizer
from perfusion_ext.toy.training_data import SceneSampler, render_batch


def _indices(scenes, attribute, names):
    return torch.tensor([list(names).index(getattr(s, attribute)) for s in scenes])


def test_render_batch_is_pixel_identical_to_the_numpy_renderer():
    rng = np.random.default_rng(7)
    scenes = [world.random_scene(rng, held_out=bool(i % 3 == 0)) for i in range(600)]
    images = render_batch(
        _indices(scenes, "colour", world.COLOURS), _indices(scenes, "shape", world.SHAPES),
        _indices(scenes, "position", world.POSITIONS), _indices(scenes, "background", world.COLOURS),
        _indices(scenes, "size", world.SIZES),
        torch.tensor([s.dx for s in scenes], dtype=torch.float64), torch.tensor([s.dy for s in scenes], dtype=torch.float64),
    )
    assert images.dtype == torch.uint8 and images.shape == (600, 32, 32, 3)
    assert np.array_equal(images.numpy(), np.stack([world.render(s) for s in scenes]))


@pytest.fixture(scope="module")
def sampler_and_tokenizer():
    tokenizer = load_toy_tokenizer()
    return SceneSampler(tokenizer, "cpu", seed=3), tokenizer


def _caption_candidates(reading):
    """Every training caption (spaces removed) of the scene the checkers read, any size, template,
    position phrase and style prefix."""
    out = set()
    for size in world.SIZES:
        scene = world.Scene(reading.colour, reading.shape, reading.position, reading.background, size)
        for template in world.TRAIN_TEMPLATES:
            for phrase in world.POSITION_PHRASES[reading.position]:
                text = world.caption_text(scene, template, phrase)
                for prefix in ("",) + tuple(f"{w}, " for w in world.STYLE_PREFIXES):
                    out.add((prefix + text).replace(" ", ""))
    return out


@pytest.mark.slow
def test_sampler_captions_describe_their_images(sampler_and_tokenizer):
    sampler, tokenizer = sampler_and_tokenizer
    images, ids = sampler.sample(1500)
    assert images.shape == (1500, 32, 32, 3) and ids.shape == (1500, 77)
    texts = [tokenizer.decode(row[(row != tokenizer.bos_token_id) & (row != tokenizer.eos_token_id)]) for row in ids]
    prefixed = 0
    combos = collections.Counter()
    for image, text in zip(images.numpy()[:400], texts[:400]):
        reading = checkers.read(image)
        assert not world.combo_is_held_out(reading.colour, reading.shape, reading.position, reading.background)
        if not text:
            continue
        assert text.replace(" ", "") in _caption_candidates(reading), text
    for text in texts:
        prefixed += any(text.startswith(f"{w} ,") for w in world.STYLE_PREFIXES)
    for image in images.numpy():
        r = checkers.read(image)
        combos[(r.colour, r.shape, r.position, r.background)] += 1
    n_empty = sum(not t for t in texts)
    assert 0.06 <= n_empty / 1500 <= 0.14  # drop_caption 0.1 (classifier-free guidance)
    assert 0.22 <= prefixed / (1500 - n_empty) <= 0.38  # prefix_share 0.3
    assert len(combos) >= 300  # ~360 training combinations, roughly uniform


@pytest.mark.slow
def test_sampler_is_reproducible_and_resumes_from_its_state(sampler_and_tokenizer):
    sampler, _ = sampler_and_tokenizer
    state = sampler.state()
    a_images, a_ids = sampler.sample(64)
    sampler.set_state(state)
    b_images, b_ids = sampler.sample(64)
    assert torch.equal(a_images, b_images) and torch.equal(a_ids, b_ids)
    c_images, _ = sampler.sample(64)
    assert not torch.equal(a_images, c_images)
