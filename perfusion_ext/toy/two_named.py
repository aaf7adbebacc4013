"""Two named objects in one scene: "a rocket on the left and a mushroom on the right, blue background".

Why: two personal concepts in one prompt ("<house> on the left, <lollipop> on the right") can only work
if the base model can draw two separate objects, each from its own word, in one image; a real Stable
Diffusion can, the toy model had never seen it. Only layouts that fit a 32 px image are drawn: two
upright objects (the "above" composites, ≤ 11 px wide) side by side, or two flat ones (the "left"
composites, ≤ 11 px tall) one above the other. Each object is judged in its own half (:func:`halves`).
"""
from __future__ import annotations

import zlib

import numpy as np

from . import checkers, world
from .named import MIRRORABLE, NAMED
from .pairs import PairScene, render

# layout -> (place of the first-named object, place of the second)
LAYOUTS: dict[str, tuple[str, str]] = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
_FITS = {"horizontal": "above", "vertical": "left"}  # the composites' arrangement that fits each layout
TRAIN_TEMPLATES = (
    "a {a} {pa} and a {b} {pb}, {bg} background",
    "{bg} background, a {a} {pa}, a {b} {pb}",
    "a photo of a {a} {pa} and a {b} {pb} on a {bg} background",
    "{bg} background with a {a} {pa} and a {b} {pb}",
)
EVAL_TEMPLATES = ("a rendering of a {a} {pa} and a {b} {pb} on a plain {bg} background",)


def words_for(layout: str) -> list[str]:
    """The named objects that fit the layout."""
    return [w for w, spec in NAMED.items() if spec.relation == _FITS[layout]]


def is_held_out(a: str, b: str, background: str) -> bool:
    """About one (first, second, background) combination in five never appears in training (stable hash)."""
    return zlib.crc32(f"two-named|{a}|{b}|{background}".encode()) % 5 == 0


def random_scene(rng: np.random.Generator, held_out: bool = False) -> tuple[str, str, str, list[PairScene]]:
    """(layout, first word, second word, [two scenes]) from the training split (or the evaluation split)."""
    while True:
        layout = list(LAYOUTS)[rng.integers(len(LAYOUTS))]
        a, b = (str(w) for w in rng.choice(words_for(layout), size=2, replace=False))
        used = {NAMED[a].colour_a, NAMED[a].colour_b, NAMED[b].colour_a, NAMED[b].colour_b}
        options = [c for c in world.COLOURS if c not in used]
        background = options[rng.integers(len(options))]
        if is_held_out(a, b, background) == held_out:
            break
    scenes = []
    for word, place in zip((a, b), LAYOUTS[layout]):
        dx, dy = rng.uniform(-1.0, 1.0, size=2)
        mirrored = word in MIRRORABLE and rng.random() < 0.5
        scenes.append(NAMED[word].scene(place, background, float(dx), float(dy), mirrored))
    return layout, a, b, scenes


def render_two(scenes: list[PairScene]) -> np.ndarray:
    """uint8 H×W×3 image with both objects (the second drawn over the first's background)."""
    image, second = render(scenes[0]), render(scenes[1])
    drawn = (second != np.array(world.COLOURS[scenes[1].background], np.uint8)).any(-1)
    image[drawn] = second[drawn]
    return image


def caption(layout: str, a: str, b: str, background: str, rng: np.random.Generator, templates=TRAIN_TEMPLATES) -> str:
    template = templates[rng.integers(len(templates))]
    pa, pb = (world.POSITION_PHRASES[p][rng.integers(len(world.POSITION_PHRASES[p]))] for p in LAYOUTS[layout])
    return template.format(a=a, b=b, pa=pa, pb=pb, bg=background)


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, list[PairScene], str]]:
    """n (layout, first, second, scenes, caption) on held-out combinations in held-out phrasings."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layout, a, b, scenes = random_scene(rng, held_out=True)
        out.append((layout, a, b, scenes, caption(layout, a, b, scenes[0].background, rng, EVAL_TEMPLATES)))
    return out


def halves(image: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """The image twice, each with the other object's half painted in the background colour."""
    _, rgb = checkers.read_background(image)
    fill = rgb.round().astype(np.uint8)
    first, second = image.copy(), image.copy()
    middle = image.shape[1] // 2
    if layout == "horizontal":
        first[:, middle:], second[:, :middle] = fill, fill
    else:
        first[middle:], second[:middle] = fill, fill
    return first, second
