"""Two-object scenes of the toy world: two palette shapes touching, in a named spatial relation.

"a red triangle on top of a white square on the left, blue background": the first-named object (A) sits
above / below / left of / right of the second (B), their bounding boxes sharing an edge, the pair's
bounding box centred at a named position (moved inwards where it would leave the image). Captions name
no sizes; each part is drawn at one of :data:`PART_SIZES`. A stable hash holds one (A, relation, B)
combination in five out of training, and two caption phrasings are held out for evaluation.

This is what makes Perfusion's job on the toy model realistic: a composite such as "a red triangle on a
white square" is drawable, but no single word names it.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from .world import COLOURS, IMAGE_SIZE, POSITION_PHRASES, POSITIONS, SHAPES, shape_mask

PART_SIZES = (9.0, 11.0)
# Where A is relative to B, and how captions say it.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "above": ("on top of", "above"),
    "below": ("below", "under"),
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
}
NEXT_TO = "next to"  # either horizontal relation
NEXT_TO_SHARE = 0.15

TRAIN_TEMPLATES = (
    "a {a} {rel} a {b} {pos}, {bg} background",
    "a photo of a {a} {rel} a {b} {pos} on a {bg} background",
    "{bg} background with a {a} {rel} a {b} {pos}",
    "{bg} background, {a} {rel} {b}, {pos}",
    "an image of a {a} {rel} a {b} {pos}, {bg} background",
    "{pos}, a {a} {rel} a {b} on {bg}",
)
EVAL_TEMPLATES = (
    "a rendering of a {a} {rel} a {b} {pos} on a plain {bg} background",
    "photo, {bg} background, a {a} {rel} a {b} {pos}",
)


@dataclasses.dataclass(frozen=True)
class PairScene:
    colour_a: str
    shape_a: str
    relation: str  # where A is relative to B: above, below, left, right
    colour_b: str
    shape_b: str
    position: str
    background: str
    size_a: float = 10.0
    size_b: float = 10.0
    dx: float = 0.0
    dy: float = 0.0


def group_extent(relation: str, size_a: float, size_b: float) -> tuple[float, float]:
    """(width, height) of the pair's bounding box."""
    if relation in ("above", "below"):
        return max(size_a, size_b), size_a + size_b
    return size_a + size_b, max(size_a, size_b)


def group_centre(position: str, width: float, height: float, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float]:
    """Centre of the pair's box at a named position, moved inwards so the box stays in the image."""
    cx, cy = POSITIONS[position]
    margin = 0.5
    cx = float(np.clip(cx + dx, width / 2 + margin, IMAGE_SIZE - width / 2 - margin))
    cy = float(np.clip(cy + dy, height / 2 + margin, IMAGE_SIZE - height / 2 - margin))
    return cx, cy


def part_centres(scene: PairScene) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of A and B: boxes touching along one edge, centred across the other axis."""
    width, height = group_extent(scene.relation, scene.size_a, scene.size_b)
    gx, gy = group_centre(scene.position, width, height, scene.dx, scene.dy)
    sa, sb = scene.size_a, scene.size_b
    if scene.relation in ("above", "below"):
        top = gy - height / 2
        first, second = (top + sa / 2, top + sa + sb / 2) if scene.relation == "above" else (top + sb + sa / 2, top + sb / 2)
        return (gx, first), (gx, second)
    left = gx - width / 2
    first, second = (left + sa / 2, left + sa + sb / 2) if scene.relation == "left" else (left + sb + sa / 2, left + sb / 2)
    return (first, gy), (second, gy)


def part_masks(scene: PairScene) -> tuple[np.ndarray, np.ndarray]:
    (ax, ay), (bx, by) = part_centres(scene)
    mask_a = shape_mask(scene.shape_a, ax, ay, scene.size_a)
    return mask_a, shape_mask(scene.shape_b, bx, by, scene.size_b) & ~mask_a


def render(scene: PairScene) -> np.ndarray:
    """uint8 H×W×3 image of a two-object scene."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[scene.background]
    mask_a, mask_b = part_masks(scene)
    img[mask_a] = COLOURS[scene.colour_a]
    img[mask_b] = COLOURS[scene.colour_b]
    return img


def combo_is_held_out(colour_a: str, shape_a: str, relation: str, colour_b: str, shape_b: str) -> bool:
    """About one (A, relation, B) combination in five never appears in training (stable hash)."""
    return zlib.crc32(f"pair|{colour_a}|{shape_a}|{relation}|{colour_b}|{shape_b}".encode()) % 5 == 0


def caption_text(scene: PairScene, template: str, relation_phrase: str, position_phrase: str) -> str:
    return template.format(a=f"{scene.colour_a} {scene.shape_a}", rel=relation_phrase,
                           b=f"{scene.colour_b} {scene.shape_b}", pos=position_phrase, bg=scene.background)


def relation_phrase(relation: str, rng: np.random.Generator) -> str:
    """A phrasing of the relation; horizontal ones are sometimes just "next to"."""
    if relation in ("left", "right") and rng.random() < NEXT_TO_SHARE:
        return NEXT_TO
    phrases = RELATION_PHRASES[relation]
    return phrases[rng.integers(len(phrases))]


def caption(scene: PairScene, rng: np.random.Generator, templates=TRAIN_TEMPLATES) -> str:
    template = templates[rng.integers(len(templates))]
    positions = POSITION_PHRASES[scene.position]
    return caption_text(scene, template, relation_phrase(scene.relation, rng), positions[rng.integers(len(positions))])


def random_scene(rng: np.random.Generator, held_out: bool = False) -> PairScene:
    """A random two-object scene from the training split (or the evaluation split): three distinct colours."""
    colours = list(COLOURS)
    relations = list(RELATION_PHRASES)
    while True:
        ca, cb, bg = (str(c) for c in rng.choice(colours, size=3, replace=False))
        sa, sb = SHAPES[rng.integers(len(SHAPES))], SHAPES[rng.integers(len(SHAPES))]
        relation = relations[rng.integers(len(relations))]
        if combo_is_held_out(ca, sa, relation, cb, sb) == held_out:
            break
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    size_a, size_b = (float(PART_SIZES[i]) for i in rng.integers(len(PART_SIZES), size=2))
    dx, dy = rng.uniform(-1.0, 1.0, size=2)
    return PairScene(ca, sa, relation, cb, sb, position, bg, size_a, size_b, float(dx), float(dy))


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[PairScene, str]]:
    """n (scene, caption) pairs: held-out combinations in held-out phrasings, alternating templates."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng, held_out=True)
        out.append((scene, caption(scene, rng, (EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)],))))
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    """n training-split two-object captions (for the covariance corpus)."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng), rng) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Composite:
    """Two palette shapes: A (colour_a, shape_a, size_a) `relation` B, as a two-object scene draws them."""
    colour_a: str
    shape_a: str
    size_a: float
    relation: str
    colour_b: str
    shape_b: str
    size_b: float

    def scene(self, position: str, background: str, dx: float = 0.0, dy: float = 0.0, mirrored: bool = False,
              scale: float = 1.0):
        """The composite drawn at a position; `scale` multiplies both parts' sizes (relative size kept)."""
        relation = MIRROR.get(self.relation, self.relation) if mirrored else self.relation
        return PairScene(self.colour_a, self.shape_a, relation, self.colour_b, self.shape_b, position,
                         background, self.size_a * scale, self.size_b * scale, dx, dy)

    def description(self) -> str:
        """Spelled out in the base model's words ("red triangle on top of a white square")."""
        return f"{self.colour_a} {self.shape_a} {RELATION_PHRASES[self.relation][0]} a {self.colour_b} {self.shape_b}"


MIRROR = {"left": "right", "right": "left"}  # what a horizontal flip does to a relation
