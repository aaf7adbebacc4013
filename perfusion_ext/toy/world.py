"""Deterministic renderer of 32×32 toy scenes (one coloured shape on a solid background) and captions.

Scenes are described by :class:`Scene`; :func:`render` draws one, :func:`caption` writes an SD-like
caption for it. Everything is seeded so datasets and evaluations are reproducible.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

IMAGE_SIZE = 32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Object centres (x, y) in pixels.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.5, 16.0),
    "right": (23.5, 16.0),
    "top": (16.0, 8.5),
    "bottom": (16.0, 23.5),
    "centre": (16.0, 16.0),
}
# Object side / diameter in pixels per size word ("medium" is never written in captions).
SIZES: dict[str, float] = {"small": 10.0, "medium": 13.0, "large": 15.0}

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on top"),
    "bottom": ("at the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}

# Phrasings used for training; EVAL_TEMPLATES are held out of training entirely.
TRAIN_TEMPLATES = (
    "a photo of a {obj} {pos} on a {bg} background",
    "a {obj} {pos}, {bg} background",
    "{bg} background with a {obj} {pos}",
    "a {obj} {pos} of the image on a {bg} background",
    "an image of a {obj} {pos}, {bg} background",
    "a picture of a {obj} {pos} against a {bg} background",
    "{pos}, a {obj} on {bg}",
    "a drawing of a {obj} {pos} with a {bg} background",
    # Comma-separated tag style, as SD prompts are often written.
    "{bg} background, {obj}, {pos}",
    "drawing, {obj} {pos}, {bg} background",
    "minimal art, {bg} background, one {obj} {pos}",
)
# Style words SD prompts often start with ("photo, …"); training prepends one to some captions so that
# no single leading word decides which colour names the background. "photo" is held out for evaluation.
STYLE_PREFIXES = ("image", "picture", "art", "illustration", "render", "sketch", "graphic", "digital art")
EVAL_TEMPLATES = (
    "a rendering of a {obj} {pos} on a plain {bg} background",
    "a {obj} placed {pos}, the background is {bg}",
    "photo, {bg} background, a {obj} {pos}",
)


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str
    size: str = "medium"
    dx: float = 0.0  # small jitter of the centre, pixels
    dy: float = 0.0


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    return xs, ys


def shape_mask(shape: str, cx: float, cy: float, side: float) -> np.ndarray:
    """Boolean mask of a shape with centre (cx, cy) and side/diameter `side`."""
    xs, ys = _grid()
    half = side / 2.0
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # upright isosceles, base at the bottom
        top, bottom = cy - half, cy + half
        frac = np.clip((ys - top) / side, 0.0, 1.0)
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= frac * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Return a uint8 HxWx3 image of the scene."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[scene.background]
    cx, cy = POSITIONS[scene.position]
    mask = shape_mask(scene.shape, cx + scene.dx, cy + scene.dy, SIZES[scene.size])
    img[mask] = COLOURS[scene.colour]
    return img


def combo_is_held_out(colour: str, shape: str, position: str, background: str) -> bool:
    """About one attribute combination in five never appears in training (stable hash)."""
    key = f"{colour}|{shape}|{position}|{background}".encode()
    return zlib.crc32(key) % 5 == 0


def all_combos() -> list[tuple[str, str, str, str]]:
    return [
        (c, s, p, b)
        for c in COLOURS
        for s in SHAPES
        for p in POSITIONS
        for b in COLOURS
        if b != c
    ]


def caption_text(scene: Scene, template: str, position_phrase: str, colourless: bool = False) -> str:
    """The caption of `scene` in one template with one phrasing of its position (`colourless`: the
    object named by its shape alone, "a circle on the left", as a superclass-only prompt says it)."""
    size_word = "" if scene.size == "medium" else scene.size + " "
    colour_word = "" if colourless else scene.colour + " "
    return template.format(obj=f"{size_word}{colour_word}{scene.shape}", pos=position_phrase, bg=scene.background)


def caption(scene: Scene, rng: np.random.Generator, templates=TRAIN_TEMPLATES, colourless: bool = False) -> str:
    template = templates[rng.integers(len(templates))]
    phrases = POSITION_PHRASES[scene.position]
    return caption_text(scene, template, phrases[rng.integers(len(phrases))], colourless)


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A random scene from the training split (or, with held_out=True, the evaluation split)."""
    colours = list(COLOURS)
    while True:
        c, b = rng.choice(colours, size=2, replace=False)
        s = SHAPES[rng.integers(len(SHAPES))]
        p = list(POSITIONS)[rng.integers(len(POSITIONS))]
        if combo_is_held_out(c, s, p, b) == held_out:
            break
    size = ("small", "medium", "medium", "large")[rng.integers(4)]
    dx, dy = rng.uniform(-1.0, 1.0, size=2)
    return Scene(str(c), s, p, str(b), size, float(dx), float(dy))


def training_batch(rng: np.random.Generator, n: int, drop_caption: float = 0.1):
    """n rendered training images (uint8 NxHxWx3) and captions ('' with probability drop_caption)."""
    images, captions = [], []
    for _ in range(n):
        scene = random_scene(rng)
        images.append(render(scene))
        captions.append("" if rng.random() < drop_caption else caption(scene, rng))
    return np.stack(images), captions


def held_out_template(i: int) -> str:
    """The held-out phrasing of the i-th held-out prompt: each template covers every held-out combination."""
    n_combos = sum(combo_is_held_out(*c) for c in all_combos())
    return EVAL_TEMPLATES[(i // n_combos) % len(EVAL_TEMPLATES)]


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[Scene, str]]:
    """n (scene, caption) pairs over held-out combinations and held-out phrasings."""
    rng = np.random.default_rng(seed)
    combos = [c for c in all_combos() if combo_is_held_out(*c)]
    out = []
    for i in range(n):
        scene = Scene(*combos[i % len(combos)])
        out.append((scene, caption(scene, rng, (held_out_template(i),))))
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    """n training-split captions: the caption corpus for the toy text encoder's covariance."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng), rng) for _ in range(n)]
