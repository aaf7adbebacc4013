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
