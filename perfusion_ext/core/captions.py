"""A generator of varied, SD-style captions: the default corpus for estimating C = E[e eᵀ].

Deterministic for a seed. Broad on purpose (people, animals, objects, places, styles), since C
should describe the text encoder's general output distribution, not one domain.
"""
from __future__ import annotations

import numpy as np

SUBJECTS = (
    "man", "woman", "child", "old man", "girl", "boy", "dog", "cat", "horse", "bird", "car", "bicycle", "house",
    "castle", "tree", "flower", "mountain", "river", "city street", "robot", "dragon", "teddy bear", "cup of coffee",
    "bowl of fruit", "sailboat", "train", "guitar", "chair", "lamp", "book", "astronaut", "knight", "fox", "owl",
    "lighthouse", "bridge", "forest", "beach", "waterfall", "cake", "pizza", "shoe", "backpack", "clock", "vase",
)
ADJECTIVES = (
    "red", "blue", "green", "yellow", "white", "black", "golden", "wooden", "old", "small", "large", "cute", "shiny",
    "rusty", "colorful", "tiny", "giant", "ancient", "modern", "fluffy", "glass", "metal", "striped", "round",
)
SETTINGS = (
    "on the beach", "in a forest", "in the city", "on a table", "in the snow", "at sunset", "under the stars",
    "in a kitchen", "on a mountain top", "in the desert", "by the lake", "in a garden", "on the moon",
    "in a museum", "at night", "in the rain", "on a white background", "in a field of flowers", "underwater",
)
STYLES = (
    "a photo of", "a painting of", "a close-up photo of", "a watercolor painting of", "a 3d render of",
    "an illustration of", "a sketch of", "a cinematic shot of", "a portrait of", "a cartoon of", "a picture of",
)
SUFFIXES = (
    "", "", "", ", highly detailed", ", 4k", ", trending on artstation", ", soft lighting", ", oil on canvas",
    ", studio lighting", ", bokeh", ", by a famous artist", ", wide angle", ", pastel colors",
)


def with_article(word: str) -> str:
    """'an owl', 'a dog'."""
    return f"{'an' if word[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'} {word}"


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)

    def pick(options):
        return options[rng.integers(len(options))]

    captions = []
    for _ in range(n):
        subject = pick(SUBJECTS)
        if rng.random() < 0.6:
            subject = f"{pick(ADJECTIVES)} {subject}"
        text = f"{pick(STYLES)} {with_article(subject)}"
        if rng.random() < 0.8:
            text += f" {pick(SETTINGS)}"
        if rng.random() < 0.3:
            other = pick(SUBJECTS)
            text += f" with {with_article(other)}"
        captions.append(text + pick(SUFFIXES))
    return captions
