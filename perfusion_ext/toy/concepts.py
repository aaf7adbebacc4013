"""Novel toy objects the base model never saw, their training sets, and a fidelity measure.

Each concept has internal structure (parts, two tones, stripes) and a superclass word the base model
knows. Fidelity asks: does the object in a generated image look like the concept? It renders the
concept and every base (shape, colour) at the detected object's box and checks which template is
nearest (classification), plus the pixel correlation with the concept template (a continuous score).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from . import checkers
from .world import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, _grid, shape_mask

BROWN = (150, 90, 40)
MAX_OBJECT_EXTENT = 22  # px; the largest toy object is 16 px, so anything wider is not one object


def _disc(cx, cy, r):
    xs, ys = _grid()
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def _teddy(cx, cy, side):
    """Brown round body, two ears, two black eyes."""
    r = side / 2
    layers = [(_disc(cx - 0.7 * r, cy - 0.75 * r, 0.38 * r), BROWN), (_disc(cx + 0.7 * r, cy - 0.75 * r, 0.38 * r), BROWN),
              (_disc(cx, cy + 0.1 * r, 0.85 * r), BROWN),
              (_disc(cx - 0.35 * r, cy - 0.05 * r, 0.15 * r + 0.6), COLOURS["black"]),
              (_disc(cx + 0.35 * r, cy - 0.05 * r, 0.15 * r + 0.6), COLOURS["black"])]
    return layers


def _stripebox(cx, cy, side):
    """A square with red and white horizontal stripes."""
    _, ys = _grid()
    square = shape_mask("square", cx, cy, side)
    stripes = (np.floor((ys - (cy - side / 2)) / max(side / 6, 1.5)) % 2) == 0
    return [(square, COLOURS["white"]), (square & stripes, COLOURS["red"])]


def _ring(cx, cy, side):
    """A ring, blue on the left half and yellow on the right, with a hole."""
    xs, _ = _grid()
    r = side / 2
    ring = _disc(cx, cy, r) & ~_disc(cx, cy, 0.45 * r)
    return [(ring & (xs < cx), COLOURS["blue"]), (ring & (xs >= cx), COLOURS["yellow"])]


@dataclasses.dataclass(frozen=True)
class ToyConcept:
    name: str
    superclass: str
    draw: callable
    backgrounds: tuple[str, ...]  # training backgrounds
    clashing: tuple[str, ...]  # backgrounds too close to a part's colour for the checkers to see the object

    def readable_backgrounds(self) -> list[str]:
        return [c for c in COLOURS if c not in self.clashing]


CONCEPTS = {
    "teddy": ToyConcept("teddy", "circle", _teddy, ("white", "green", "blue"), ("black", "red")),
    "stripebox": ToyConcept("stripebox", "square", _stripebox, ("blue", "green", "black"), ("red", "white")),
    "ring": ToyConcept("ring", "circle", _ring, ("white", "black", "green"), ("blue", "yellow")),
}


def render_concept(name: str, position: str, background: str, side: float = 13.0, dx=0.0, dy=0.0):
    """(uint8 image, bool mask) of the concept at a named position."""
    cx, cy = POSITIONS[position]
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[background]
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for part, colour in CONCEPTS[name].draw(cx + dx, cy + dy, side):
        img[part] = colour
        mask |= part
    return img, mask


def training_scenes(name: str, n: int = 6, seed: int = 0) -> list[dict]:
    """The scenes of a concept's training set: background, position, size and jitter per image."""
    concept = CONCEPTS[name]
    rng = np.random.default_rng(seed)
    positions = list(POSITIONS)
    scenes = []
    for i in range(n):
        background = concept.backgrounds[i % len(concept.backgrounds)]
        position = positions[int(rng.integers(len(positions)))]
        scenes.append(dict(position=position, background=background, side=float(rng.uniform(12, 15)),
                           dx=float(rng.uniform(-1, 1)), dy=float(rng.uniform(-1, 1))))
    return scenes


def write_training_set(name: str, folder: Path, n: int = 6, seed: int = 0) -> Path:
    """n images (PNG), masks (folder/masks/) and captions (.txt with "{}" for the concept)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    for i, scene in enumerate(training_scenes(name, n, seed)):
        img, mask = render_concept(name, **scene)
        Image.fromarray(img).save(folder / f"{name}_{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{name}_{i}.png")
        (folder / f"{name}_{i}.txt").write_text(f"a photo of a {{}} on a {scene['background']} background\n")
    return folder


def _box(mask):
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def _fit(name: str, cx: float, cy: float, extent: float) -> tuple[float, float, float]:
    """Centre and side to draw the concept with so that its bounding box is the detected one."""
    ref_side = 13.0
    _, mask = render_concept(name, "centre", "green", side=ref_side)
    rx, ry, ref_extent = _box(mask)
    scale = extent / ref_extent
    return cx - (rx - 16.0) * scale, cy - (ry - 16.0) * scale, ref_side * scale


def _template_on(draw_layers, background_rgb, shape=(IMAGE_SIZE, IMAGE_SIZE, 3)):
    img = np.empty(shape, np.float32)
    img[:] = background_rgb
    for part, colour in draw_layers:
        img[part] = colour
    return img


@dataclasses.dataclass(frozen=True)
class Fidelity:
    is_concept: bool  # the concept template is nearer than every base shape × colour template
    correlation: float  # Pearson correlation with the concept template inside the object's box, in [-1, 1]


def fidelity(img: np.ndarray, name: str) -> Fidelity:
    background, background_rgb = checkers.read_background(img)
    mask = checkers.object_mask(img, background_rgb)
    if mask.sum() < 12:
        return Fidelity(False, 0.0)
    cx, cy, extent = _box(mask)
    if extent > MAX_OBJECT_EXTENT:  # no object, just texture across the image
        return Fidelity(False, 0.0)
    xs, ys = _grid()
    half = extent / 2 + 1
    region = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    target = img.astype(np.float32)[region]
    concept_t = _template_on(CONCEPTS[name].draw(*_fit(name, cx, cy, extent)), background_rgb)[region]
    side = extent
    errors = {"concept": float(((target - concept_t) ** 2).mean())}
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            t = _template_on([(shape_mask(shape, cx, cy, side), rgb)], background_rgb)[region]
            errors[f"{colour} {shape}"] = float(((target - t) ** 2).mean())
    best = min(errors, key=errors.get)
    a, b = target.ravel() - target.mean(), concept_t.ravel() - concept_t.mean()
    corr = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
    return Fidelity(best == "concept", corr)
