"""Two-object training scenes composed from the subject's own images (`TrainConfig.pair_scenes`).

Why: trained on pictures of itself alone, a concept is only ever learned as the one object of its caption.
In a prompt with two concepts ("<a> on the left, <b> on the right") the second one is then lost: the words
before it move its encoding away from everything it was fitted on. A composed scene pastes the subject
(cut out by its mask) into one half of a picture the base model drew of another object in the other half
(a word its family draws by name, never the superclass), captioned "a dog on the left and a {} on the
right". The concept is learned in second place (and, in a third of the scenes, in first), where its
caption says it is. The loss covers the whole picture, so the edit also learns to leave the other object
as the base model draws it.

Scenes are built once, before training, from seeds derived from the run's seed: a resumed run rebuilds the
same ones. They are never mirrored (their captions say left and right).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..core import families
from ..core.captions import with_article
from ..core.errors import PerfusionError
from .dataset import Dataset, TrainingImage

# layout -> (where the first-named object is, where the second is); upright subjects go side by side, flat
# ones (wider than tall) one above the other, so that each fits its half of the picture
LAYOUTS = {"horizontal": ("on the left", "on the right"), "vertical": ("at the top", "at the bottom")}
CAPTION = "{a} {pa} and {b} {pb}"
FIRST_PLACE_EVERY = 3  # one scene in three puts the concept first, the others second
FILL = 0.9  # a subject larger than this share of its half is scaled down to it
MASK_THRESHOLD = 0.5
# A drawn picture is redrawn (another object and setting) when more than this share of the pasted subject has
# the colour of what lies under it, within SAME_COLOUR (pixels in [-1, 1]): a white part on a white background
# would vanish from the scene the concept is learned from.
HIDDEN_SHARE = 0.1
SAME_COLOUR = 0.2
MAX_DRAWS = 8


def with_setting(text: str, setting: str) -> str:
    """`text` with the setting after it ("…, blue background"); unchanged without one. (Two phrasings, with the
    setting first or last, did no better in a screen and cost fidelity alone: docs/quality_log.md.)"""
    return f"{text}, {setting}" if setting else text


def layout_of(mask: np.ndarray) -> str:
    """'vertical' for a subject wider than tall (the two objects stacked), else 'horizontal'."""
    rows, cols = np.nonzero(mask > MASK_THRESHOLD)
    return "vertical" if np.ptp(cols) > np.ptp(rows) else "horizontal"


def paste_in_half(background: np.ndarray, subject: np.ndarray, mask: np.ndarray, layout: str,
                  second: bool) -> tuple[np.ndarray, np.ndarray]:
    """`subject` [3, R, R] blended by `mask` [R, R] into the centre of one half of `background` [3, R, R]
    (the right or bottom half when `second`), shrunk to fit the half when it is larger; (the scene, the pasted
    mask [R, R])."""
    size = background.shape[-1]
    rows, cols = np.nonzero(mask > MASK_THRESHOLD)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    half_h, half_w = (size, size // 2) if layout == "horizontal" else (size // 2, size)
    scale = min(1.0, FILL * half_w / (right - left), FILL * half_h / (bottom - top))
    height, width = max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))
    crop = subject[:, top:bottom, left:right].transpose(1, 2, 0)
    pixels = np.stack([np.asarray(Image.fromarray(crop[..., c]).resize((width, height), Image.BILINEAR))
                       for c in range(3)])
    alpha = np.asarray(Image.fromarray(mask[top:bottom, left:right].astype(np.float32))
                       .resize((width, height), Image.BILINEAR)).clip(0.0, 1.0)
    centre_y, centre_x = half_h / 2, half_w / 2
    if second:
        centre_y, centre_x = (centre_y, centre_x + size // 2) if layout == "horizontal" else (centre_y + size // 2,
                                                                                             centre_x)
    y0, x0 = int(round(centre_y - height / 2)), int(round(centre_x - width / 2))
    out, coverage = background.copy(), np.zeros(background.shape[-2:], np.float32)
    region = out[:, y0:y0 + height, x0:x0 + width]
    region[:] = alpha * pixels + (1.0 - alpha) * region
    coverage[y0:y0 + height, x0:x0 + width] = alpha
    return out, coverage


def hidden_share(drawn: np.ndarray, scene: np.ndarray, coverage: np.ndarray) -> float:
    """The share of the pasted subject whose colour is that of the drawn picture under it: how much of it the
    background hides."""
    subject = coverage > MASK_THRESHOLD
    close = np.abs(scene - drawn).max(0) < SAME_COLOUR
    return float((close & subject).sum() / max(1, subject.sum()))


def compose(backend, dataset: Dataset, superclass: str, count: int, resolution: int, seed: int) -> list[TrainingImage]:
    """`count` two-object scenes: each subject image with a mask in turn, pasted beside the base model's own
    drawing of another object its family knows (backend.sample). Never the superclass itself: its key is the
    concept's locked key, so the two objects would look alike to the cross-attention and could not be told apart."""
    masked = [im for im in dataset.images if im.mask is not None and (im.mask > MASK_THRESHOLD).any()]
    if not masked:
        raise PerfusionError(
            "pair scenes paste the subject beside another object, so they need subject masks: give a masks folder "
            "(or images with transparency), or train without pair scenes")
    rng = np.random.default_rng(seed)
    scenes = []
    for k in range(count):
        image = masked[k % len(masked)]
        layout = layout_of(image.mask)
        second = k % FIRST_PLACE_EVERY != 0
        first_place, second_place = LAYOUTS[layout]
        other_place = first_place if second else second_place
        objects = [(w, setting) for w, setting in families.pair_objects(backend.family, layout) if w != superclass]
        for attempt in range(MAX_DRAWS):  # until the subject stands out from the drawn picture
            word, setting = objects[int(rng.integers(len(objects)))]
            other = with_article(word)
            drawn = backend.sample(with_setting(f"a photo of {other} {other_place}", setting),
                                   seed=seed * 1000 + k * MAX_DRAWS + attempt, size=resolution)
            pixels, coverage = paste_in_half(drawn, image.pixels, image.mask, layout, second)
            if hidden_share(drawn, pixels, coverage) <= HIDDEN_SHARE:
                break
        words = (other, "a {}") if second else ("a {}", other)
        caption = with_setting(CAPTION.format(a=words[0], pa=first_place, b=words[1], pb=second_place), setting)
        scenes.append(TrainingImage(Path(f"pair scene {k} ({image.path.name})"), pixels.astype(np.float32), None,
                                    caption, mirrorable=False))
    return scenes
