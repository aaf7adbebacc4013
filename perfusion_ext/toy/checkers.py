"""Analytic readers of toy images: the toy world's exact "CLIP".

Each reader takes a uint8 HxWx3 image (generated or rendered) and returns an attribute name,
or None when the image holds no readable object.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .world import COLOURS, POSITIONS

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], np.float32)
# A pixel belongs to the object when it is this far (RGB Euclidean) from the background colour.
_OBJECT_DISTANCE = 90.0
_MIN_OBJECT_PIXELS = 12
# Fill ratio of the object's bounding box: circle π/4, square 1, triangle 1/2.
_SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclasses.dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    position: str | None


def nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def read_background(img: np.ndarray) -> tuple[str, np.ndarray]:
    """Background = the palette colour most border pixels are nearest to; also returns its mean RGB."""
    img = img.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    labels = np.argmin(((border[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
    best = int(np.bincount(labels, minlength=len(_PALETTE)).argmax())
    return _PALETTE_NAMES[best], border[labels == best].mean(0)


def object_mask(img: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    dist = np.sqrt(((img.astype(np.float32) - background_rgb) ** 2).sum(-1))
    return dist > _OBJECT_DISTANCE


def read_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    return min(_SHAPE_FILL, key=lambda s: abs(_SHAPE_FILL[s] - fill))


def read_position(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    # The triangle's centroid sits below its box centre, so use the bounding-box centre.
    cx = (xs.min() + xs.max() + 1) / 2.0
    cy = (ys.min() + ys.max() + 1) / 2.0
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def read(img: np.ndarray) -> Reading:
    background, background_rgb = read_background(img)
    mask = object_mask(img, background_rgb)
    if mask.sum() < _MIN_OBJECT_PIXELS:
        return Reading(background, None, None, None)
    colour = nearest_colour(np.median(img[mask].astype(np.float32), axis=0))
    return Reading(background, colour, read_shape(mask), read_position(mask))


# ---- scenes of several objects ------------------------------------------------------------------
# A colour region counts as a part from this many pixels (a 9 px triangle has ~40).
_MIN_PART_PIXELS = 10


@dataclasses.dataclass(frozen=True)
class Part:
    colour: str
    shape: str
    cx: float  # bounding-box centre, pixels
    cy: float
    width: int
    height: int
    pixels: int


def read_part_shape(mask: np.ndarray) -> str:
    """Shape of a small, possibly blurred part.

    Triangle: its top third is much narrower than its bottom third (this survives a blurred apex, which
    fools a fill ratio). Square or circle: fill ratio, and for near-full boxes the box's corner pixels —
    a 9 px circle on the pixel grid can fill 94 % of its box, its corners cut by one pixel only.
    """
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    widths = mask[y0:y1 + 1, x0:x1 + 1].sum(1).astype(np.float32)
    third = max(1, len(widths) // 3)
    if widths[:third].mean() < 0.6 * widths[-third:].mean():
        return "triangle"
    fill = mask.sum() / ((y1 - y0 + 1) * (x1 - x0 + 1))
    corners = int(mask[y0, x0]) + int(mask[y0, x1]) + int(mask[y1, x0]) + int(mask[y1, x1])
    return "square" if (corners >= 2 and fill > 0.8) or fill > 0.95 else "circle"


def _part(mask: np.ndarray, colour: str) -> Part:
    ys, xs = np.nonzero(mask)
    return Part(colour, read_part_shape(mask), (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0,
                int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1), int(mask.sum()))


def read_parts(img: np.ndarray) -> tuple[str, list[Part]]:
    """(background, the object's parts, one per palette colour, largest first).

    Every non-background pixel is assigned its nearest palette colour; a colour with at least
    `_MIN_PART_PIXELS` pixels is a part. Blurred edges between two colours fall below that count.
    """
    background, background_rgb = read_background(img)
    mask = object_mask(img, background_rgb)
    if mask.sum() < _MIN_PART_PIXELS:
        return background, []
    pixels = img[mask].astype(np.float32)
    labels = np.argmin(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
    parts = []
    for index in np.flatnonzero(np.bincount(labels, minlength=len(_PALETTE)) >= _MIN_PART_PIXELS):
        part_mask = np.zeros(mask.shape, bool)
        part_mask[mask] = labels == index
        parts.append(_part(part_mask, _PALETTE_NAMES[index]))
    return background, sorted(parts, key=lambda p: -p.pixels)


def relation(a: Part, b: Part) -> str:
    """Where part a is relative to part b: along the axis their centres differ most."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left" if dx < 0 else "right"


def touching(a: Part, b: Part, gap: float = 2.0) -> bool:
    """The two bounding boxes are at most `gap` pixels apart on both axes."""
    return (abs(a.cx - b.cx) <= (a.width + b.width) / 2 + gap
            and abs(a.cy - b.cy) <= (a.height + b.height) / 2 + gap)


def group_position(parts: list[Part]) -> str:
    """The named position nearest the parts' joint bounding box, allowing for the inward shift that
    keeps a wide or tall pair inside the image (see :func:`pairs.group_centre`)."""
    from .pairs import group_centre  # pairs imports world only; imported here to keep checkers a leaf

    left = min(p.cx - p.width / 2 for p in parts)
    right = max(p.cx + p.width / 2 for p in parts)
    top = min(p.cy - p.height / 2 for p in parts)
    bottom = max(p.cy + p.height / 2 for p in parts)
    width, height = right - left, bottom - top
    cx, cy = (left + right) / 2, (top + bottom) / 2

    def distance(position: str) -> float:
        px, py = group_centre(position, width, height)
        return (px - cx) ** 2 + (py - cy) ** 2

    return min(POSITIONS, key=distance)


@dataclasses.dataclass(frozen=True)
class PairReading:
    background: str
    parts: tuple[Part, ...]
    colours_right: bool  # both named colours are parts
    shapes_right: bool
    relation_right: bool  # with touching boxes
    position: str | None

    @property
    def both_right(self) -> bool:
        return self.colours_right and self.shapes_right and self.relation_right


def read_pair(img: np.ndarray, colour_a: str, shape_a: str, relation_ab: str | tuple[str, ...],
              colour_b: str, shape_b: str) -> PairReading:
    """Read a two-object image against what was asked: A (colour_a, shape_a) `relation_ab` B.

    `relation_ab` may be a tuple of accepted relations ("next to" accepts left and right).
    """
    background, parts = read_parts(img)
    by_colour = {p.colour: p for p in parts}
    a, b = by_colour.get(colour_a), by_colour.get(colour_b)
    accepted = (relation_ab,) if isinstance(relation_ab, str) else relation_ab
    found = a is not None and b is not None
    return PairReading(
        background=background,
        parts=tuple(parts),
        colours_right=found,
        shapes_right=found and a.shape == shape_a and b.shape == shape_b,
        relation_right=found and relation(a, b) in accepted and touching(a, b),
        position=group_position([a, b]) if found else None,
    )


def read_alignment(img: np.ndarray) -> tuple[str, str | None]:
    """(background, position) of whatever object the image holds — one shape, a pair or a sprite — with
    the position read from the joint bounding box of its parts (None when the image holds no object)."""
    background, parts = read_parts(img)
    return background, (group_position(parts) if parts else None)
