"""Personal toy objects, their training sets, and the judge that decides whether an image shows one.

Two kinds, reported separately:
- **In range** (composites): two palette shapes in fixed colours, sizes and arrangement ("house": a red
  triangle on top of a white square). The base model of toy world v2 can draw each when it is spelled
  out, but no single word names it: the situation of a real Stable Diffusion and your teddy. Each has a
  superclass word, a named two-part object of the same arrangement (:mod:`.named`: "rocket" for the
  house), and says whether it may be mirrored.
- **Out of range** (sprites: teddy, stripebox, ring): colours and textures the toy VAE cannot render.

The judge is strict and can say no. A composite is recognised only when the image holds exactly its
two parts, in its colours and shapes, touching in its arrangement (mirrored only where allowed), with
its relative size. A sprite is recognised when its template is nearer than every plain shape × colour
template **and** correlates with the image at least its `min_correlation`. Every threshold is calibrated
on judge negatives (random palette blobs, one- and two-object scenes): false positives ≤ 2 %.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from . import checkers, pairs
from .named import MIRRORABLE, NAMED
from .pairs import MIRROR, Composite
from .world import COLOURS, IMAGE_SIZE, POSITION_PHRASES, POSITIONS, SHAPES, TRAIN_TEMPLATES, _grid, shape_mask

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
    backgrounds: tuple[str, ...]  # training backgrounds
    clashing: tuple[str, ...]  # backgrounds too close to a part's colour for the checkers to see the object
    draw: callable = None  # sprites: (cx, cy, side) -> [(mask, rgb)]
    composite: Composite | None = None
    mirrorable: bool = True  # a horizontal flip shows the same object (training may flip it)
    min_correlation: float = 0.75  # sprites: the judge's reject threshold, calibrated on random blobs
    known_as: str | None = None  # controls: the word the base model already draws this object from

    @property
    def in_range(self) -> bool:
        return self.composite is not None

    def readable_backgrounds(self) -> list[str]:
        return [c for c in COLOURS if c not in self.clashing]


def _composite(name, superclass, backgrounds, composite: Composite, mirrorable: bool) -> ToyConcept:
    return ToyConcept(name, superclass, backgrounds, (composite.colour_a, composite.colour_b),
                      composite=composite, mirrorable=mirrorable)


CONCEPTS = {
    # in range: drawable by the v2 base model when spelled out, named by no word
    "house": _composite("house", "rocket", ("blue", "green", "yellow"),
                        Composite("red", "triangle", 11.0, "above", "white", "square", 11.0), mirrorable=True),
    "lollipop": _composite("lollipop", "mushroom", ("white", "blue", "green"),
                           Composite("yellow", "circle", 11.0, "above", "black", "square", 9.0), mirrorable=True),
    "signpost": _composite("signpost", "arrow", ("white", "green", "black"),
                           Composite("blue", "square", 11.0, "left", "yellow", "triangle", 9.0), mirrorable=False),
    "duotone": _composite("duotone", "domino", ("white", "black", "yellow"),
                          Composite("green", "square", 9.0, "left", "red", "square", 9.0), mirrorable=False),
    # out of range: colours and textures the toy VAE cannot render
    "teddy": ToyConcept("teddy", "circle", ("white", "green", "blue"), ("black", "red"), draw=_teddy),
    "stripebox": ToyConcept("stripebox", "square", ("blue", "green", "black"), ("red", "white"), draw=_stripebox,
                            mirrorable=True),
    "ring": ToyConcept("ring", "circle", ("white", "black", "green"), ("blue", "yellow"), draw=_ring,
                       mirrorable=False, min_correlation=0.6),  # a ring at the left or right edge correlates 0.68
}
IN_RANGE = tuple(n for n, c in CONCEPTS.items() if c.in_range)
OUT_OF_RANGE = tuple(n for n, c in CONCEPTS.items() if not c.in_range)


def _control(name: str, word: str, superclass: str) -> ToyConcept:
    spec = NAMED[word]
    backgrounds = tuple(c for c in ("blue", "green", "yellow", "white", "black", "red")
                        if c not in (spec.colour_a, spec.colour_b))[:3]
    return dataclasses.replace(_composite(name, superclass, backgrounds, spec, mirrorable=word in MIRRORABLE),
                               known_as=word)


# Controls, which settle whether a concept's fidelity is limited by the recipe or by what the base model can
# render: objects the base model already draws from a word of their own, learned exactly like the concepts
# but under another named word as the superclass (so the superclass gives nothing of their look away).
# Not concepts: they are not part of the concepts' means, and the benchmark runs them only when asked.
CONTROLS = {
    "mushroom_control": _control("mushroom_control", "mushroom", superclass="lantern"),
    "rocket_control": _control("rocket_control", "rocket", superclass="tree"),
}


def get_concept(name: str) -> ToyConcept:
    """A toy concept or control by name."""
    return CONCEPTS[name] if name in CONCEPTS else CONTROLS[name]


def render_concept(name: str, position: str, background: str, side: float = 13.0, dx=0.0, dy=0.0,
                   mirrored: bool = False):
    """(uint8 image, bool mask) of the concept at a named position (composites keep their own sizes)."""
    concept = get_concept(name)
    if concept.in_range:
        scene = concept.composite.scene(position, background, dx, dy, mirrored)
        mask_a, mask_b = pairs.part_masks(scene)
        return pairs.render(scene), mask_a | mask_b
    cx, cy = POSITIONS[position]
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[background]
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for part, colour in concept.draw(cx + dx, cy + dy, side):
        img[part] = colour
        mask |= part
    return img, mask


def training_scenes(name: str, n: int = 6, seed: int = 0) -> list[dict]:
    """The scenes of a concept's training set: background, position, size and jitter per image."""
    concept = get_concept(name)
    rng = np.random.default_rng(seed)
    positions = list(POSITIONS)
    order = rng.permutation(len(positions))  # with backgrounds cycling too, no (background, position) repeats
    scenes = []
    for i in range(n):
        background = concept.backgrounds[i % len(concept.backgrounds)]
        position = positions[int(order[i % len(positions)])]
        scenes.append(dict(position=position, background=background, side=float(rng.uniform(12, 15)),
                           dx=float(rng.uniform(-1, 1)), dy=float(rng.uniform(-1, 1))))
    return scenes


FIXED_CAPTION = "a photo of a {{}} on a {bg} background"


def training_caption(scene: dict, rng: np.random.Generator, varied: bool = True) -> str:
    """A caption with "{}" for the concept: the world's own phrasings naming background and position
    (`varied`), or one fixed template naming the background only (the earlier recipe's captions)."""
    if not varied:
        return FIXED_CAPTION.format(bg=scene["background"])
    template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
    phrases = POSITION_PHRASES[scene["position"]]
    return template.format(obj="{}", pos=phrases[rng.integers(len(phrases))], bg=scene["background"])


def write_training_set(name: str, folder: Path, n: int = 6, seed: int = 0, varied_captions: bool = True) -> Path:
    """n images (PNG), masks (folder/masks/) and captions (.txt with "{}" for the concept)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    for i, scene in enumerate(training_scenes(name, n, seed)):
        img, mask = render_concept(name, **scene)
        Image.fromarray(img).save(folder / f"{name}_{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{name}_{i}.png")
        (folder / f"{name}_{i}.txt").write_text(training_caption(scene, rng, varied_captions) + "\n")
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


# Composites: parts drawn at one size have equivalent sides (px) within 1 of each other (a triangle may
# gain a row on the pixel grid); parts drawn at different sizes (:data:`pairs.PART_SIZES`, 2 px apart)
# differ by at least 0.5 at the extremes of jitter.
SAME_SIZE_TOLERANCE = 1.25
LARGER_MARGIN = 0.5


@dataclasses.dataclass(frozen=True)
class Fidelity:
    is_concept: bool  # the judge recognises the concept (strict, see the module docstring)
    correlation: float  # Pearson correlation with the concept template inside the object's box, in [-1, 1]
    reason: str = ""  # why not, when is_concept is False


def fidelity(img: np.ndarray, name: str) -> Fidelity:
    """Does the image show the concept? Strict, with a reason when it does not."""
    concept = get_concept(name)
    if concept.in_range:
        return composite_fidelity(img, concept.composite, concept.mirrorable)
    return _sprite_fidelity(img, name)


def composite_fidelity(img: np.ndarray, spec: Composite, mirrorable: bool) -> Fidelity:
    """Exactly the two parts of `spec`, in its colours and shapes, touching in its arrangement (mirrored
    only when `mirrorable`), with its relative size; also used for the world's named composites."""
    _, parts = checkers.read_parts(img)
    if len(parts) != 2:
        return Fidelity(False, 0.0, f"{len(parts)} parts")
    by_colour = {p.colour: p for p in parts}
    a, b = by_colour.get(spec.colour_a), by_colour.get(spec.colour_b)
    if a is None or b is None:
        return Fidelity(False, 0.0, "colours")
    correlation = _composite_correlation(img, spec, mirrorable, a, b)
    if (a.shape, b.shape) != (spec.shape_a, spec.shape_b):
        return Fidelity(False, correlation, "shapes")
    allowed = {spec.relation} | ({MIRROR.get(spec.relation, spec.relation)} if mirrorable else set())
    if checkers.relation(a, b) not in allowed or not checkers.touching(a, b):
        return Fidelity(False, correlation, "arrangement")
    difference = _equivalent_side(a) - _equivalent_side(b)
    if spec.size_a == spec.size_b:
        size_ok = abs(difference) < SAME_SIZE_TOLERANCE
    else:
        size_ok = np.sign(difference) == np.sign(spec.size_a - spec.size_b) and abs(difference) >= LARGER_MARGIN
    if not size_ok:
        return Fidelity(False, correlation, "relative size")
    return Fidelity(True, correlation)


def _equivalent_side(part: checkers.Part) -> float:
    """The side a part of its shape and pixel count has: its size, robust to one-pixel rasterisation."""
    return float(np.sqrt(part.pixels / _SHAPE_AREA[part.shape]))


_SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side²


def _composite_correlation(img: np.ndarray, spec: Composite, mirrorable: bool, a: checkers.Part,
                           b: checkers.Part) -> float:
    """Pearson correlation with the composite drawn where its two parts were found."""
    background, background_rgb = checkers.read_background(img)
    left = min(a.cx - a.width / 2, b.cx - b.width / 2)
    right = max(a.cx + a.width / 2, b.cx + b.width / 2)
    top = min(a.cy - a.height / 2, b.cy - b.height / 2)
    bottom = max(a.cy + a.height / 2, b.cy + b.height / 2)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    mirrored = mirrorable and checkers.relation(a, b) != spec.relation
    template = pairs.render(spec.scene("centre", background, dx=cx - 16.0, dy=cy - 16.0, mirrored=mirrored))
    template = template.astype(np.float32)
    template[(template == COLOURS[background]).all(-1)] = background_rgb
    xs, ys = _grid()
    region = (np.abs(xs - cx) <= (right - left) / 2 + 1) & (np.abs(ys - cy) <= (bottom - top) / 2 + 1)
    return _pearson(img.astype(np.float32)[region], template[region])


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    a, b = x.ravel() - x.mean(), y.ravel() - y.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def _sprite_fidelity(img: np.ndarray, name: str) -> Fidelity:
    background, background_rgb = checkers.read_background(img)
    mask = checkers.object_mask(img, background_rgb)
    if mask.sum() < 12:
        return Fidelity(False, 0.0, "no object")
    cx, cy, extent = _box(mask)
    if extent > MAX_OBJECT_EXTENT:  # no object, just texture across the image
        return Fidelity(False, 0.0, "no object")
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
    corr = _pearson(target, concept_t)
    if best != "concept":
        return Fidelity(False, corr, f"nearer a {best}")
    if corr < CONCEPTS[name].min_correlation:
        return Fidelity(False, corr, "low correlation")
    return Fidelity(True, corr)


def random_blob(rng: np.random.Generator) -> np.ndarray:
    """A judge negative: 2–4 overlapping palette discs and shapes of random colours on a background."""
    colours = list(COLOURS)
    background = colours[rng.integers(len(colours))]
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[background]
    cx, cy = rng.uniform(9, 23, size=2)
    for _ in range(rng.integers(2, 5)):
        colour = colours[rng.integers(len(colours))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        img[shape_mask(shape, cx + rng.uniform(-5, 5), cy + rng.uniform(-5, 5), rng.uniform(5, 12))] = COLOURS[colour]
    return img


def rendered_negatives(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """n rendered judge negatives, a third each: random blobs, one-object scenes, two-object scenes."""
    from . import world

    makers = (lambda: random_blob(rng), lambda: world.render(world.random_scene(rng)),
              lambda: pairs.render(pairs.random_scene(rng)))
    return [makers[i % 3]() for i in range(n)]
