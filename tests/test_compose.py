"""Composition preview: each concept alone (the others as their superclass word) and together, one seed."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_concept

from perfusion_ext.core.composition import compose_prompts
from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.pipelines.compose import compose


@pytest.fixture(scope="module")
def toy_and_concepts(tmp_path_factory):
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    pipe = tiny_random_pipeline(0)
    folder = tmp_path_factory.mktemp("concepts")
    concepts = {}
    for seed, (name, superclass) in enumerate((("house", "square"), ("kite", "triangle")), start=1):
        concepts[name] = make_concept(pipe.unet, name=name, seed=seed, family="toy", superclass=superclass)
        save_concept(concepts[name], folder / f"{name}.safetensors")
    return pipe, folder, concepts


def test_each_panel_replaces_the_other_tags_by_their_superclass(toy_and_concepts):
    _, _, concepts = toy_and_concepts
    prompt = "a <perfusion:house:0.8> on the left, a <perfusion:kite:beta=0.6> on the right, <perfusion:house>"
    assert compose_prompts(prompt, concepts) == [
        ("house", "a <perfusion:house:0.8> on the left, a triangle on the right, <perfusion:house>"),
        ("kite", "a square on the left, a <perfusion:kite:beta=0.6> on the right, square"),
        ("together", prompt)]
    with pytest.raises(PerfusionError, match="at least two known concepts"):
        compose_prompts("a <perfusion:house> and a <perfusion:ghost>", concepts)
    # a malformed tag counts as no concept; the message says why (seen in the WebUI tab: "got ['kite']" alone)
    with pytest.raises(PerfusionError, match=r"got \['kite'\]\. \(ignored <perfusion:house:abc>: "):
        compose_prompts("a <perfusion:house:abc> and a <perfusion:kite>", concepts)


def test_compose_renders_three_panels_at_one_seed(toy_and_concepts):
    from perfusion_ext.pipelines.generate import generate

    pipe, folder, _ = toy_and_concepts
    prompt = "a <perfusion:house> on the left, a <perfusion:kite> on the right"
    image, warnings = compose(pipe, prompt, folder, seed=4, num_inference_steps=2)
    assert image.size == (3 * 32, 32 + 14)
    # random concepts: only the gate inspector has something to say (their gates are shut on their own words)
    assert warnings and all("own token is only" in w or "the concept leaks there" in w for w in warnings)
    panels = [np.asarray(image)[14:, 32 * i:32 * (i + 1)] for i in range(3)]
    alone, _ = generate(pipe, "a <perfusion:house> on the left, a triangle on the right", concepts_dir=folder, seed=4,
                        num_inference_steps=2)
    assert np.array_equal(panels[0], np.asarray(alone[0]))
    assert not np.array_equal(panels[2], panels[0]) and not np.array_equal(panels[2], panels[1])
