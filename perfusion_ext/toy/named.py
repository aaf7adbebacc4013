"""Named composites: two-part objects the toy world has one word for ("a rocket": a white triangle on top
of a blue square), in fixed colours, shapes, sizes and arrangement.

Why they exist: a real Stable Diffusion draws thousands of objects from one word each, so your teddy is a
new direction in a space it already renders from a single token. A toy model that only ever drew two-part
objects from two noun phrases has no such space: a concept is one token, and one token had never produced
two parts, so Perfusion, textual inversion and even the spelled-out prompt failed on two-part concepts.
With named composites in the world, the concepts' superclasses are named composites of the same
arrangement ("rocket" for the house), as "teddy" is the superclass of your teddy. None of them is a toy
concept: the concepts stay unnamed.
"""
from __future__ import annotations

import zlib

import numpy as np

from . import world
from .pairs import Composite, PairScene

_FIRST_WORDS: dict[str, Composite] = {
    "rocket": Composite("white", "triangle", 11.0, "above", "blue", "square", 11.0),
    "tree": Composite("green", "triangle", 11.0, "above", "black", "square", 9.0),
    "lantern": Composite("green", "circle", 9.0, "above", "yellow", "square", 11.0),
    "mushroom": Composite("red", "circle", 11.0, "above", "white", "square", 9.0),
    "tower": Composite("blue", "square", 11.0, "above", "red", "square", 11.0),
    "bell": Composite("yellow", "triangle", 11.0, "above", "green", "circle", 9.0),
    "arrow": Composite("black", "square", 11.0, "left", "white", "triangle", 9.0),
    "flag": Composite("yellow", "square", 11.0, "left", "blue", "square", 9.0),
    "domino": Composite("black", "square", 9.0, "left", "white", "square", 9.0),
    "glasses": Composite("blue", "circle", 9.0, "left", "black", "circle", 9.0),
}
# Three more words per arrangement of the first ten, in other colour pairs: each colour used ten times,
# never a concept's pair or its swap, a mirror image of another word, or a pair that a word of a similar
# arrangement has (the judge's size tolerance would read one as the other). With ten words the model had
# learnt ten fixed looks; a concept is a new word asking for a new colour pair in a known arrangement,
# which only a model that has learnt many colour pairs per arrangement, one word each, renders from one token.
ADDED_WORDS: dict[str, Composite] = {
    "kite": Composite("black", "triangle", 11.0, "above", "yellow", "square", 11.0),  # as rocket
    "lamp": Composite("blue", "triangle", 11.0, "above", "red", "square", 11.0),
    "robot": Composite("white", "triangle", 11.0, "above", "green", "square", 11.0),
    "hat": Composite("black", "triangle", 11.0, "above", "blue", "square", 9.0),  # as tree
    "candle": Composite("yellow", "triangle", 11.0, "above", "red", "square", 9.0),
    "key": Composite("white", "triangle", 11.0, "above", "yellow", "square", 9.0),
    "boat": Composite("black", "circle", 9.0, "above", "red", "square", 11.0),  # as lantern
    "car": Composite("blue", "circle", 9.0, "above", "green", "square", 11.0),
    "cup": Composite("yellow", "circle", 9.0, "above", "white", "square", 11.0),
    "drum": Composite("green", "circle", 11.0, "above", "black", "square", 9.0),  # as mushroom
    "clock": Composite("blue", "circle", 11.0, "above", "yellow", "square", 9.0),
    "chair": Composite("white", "circle", 11.0, "above", "red", "square", 9.0),
    "bottle": Composite("black", "square", 11.0, "above", "green", "square", 11.0),  # as tower
    "shoe": Composite("white", "square", 11.0, "above", "yellow", "square", 11.0),
    "book": Composite("red", "square", 11.0, "above", "blue", "square", 11.0),
    "door": Composite("red", "triangle", 11.0, "above", "green", "circle", 9.0),  # as bell
    "window": Composite("yellow", "triangle", 11.0, "above", "black", "circle", 9.0),
    "bird": Composite("white", "triangle", 11.0, "above", "blue", "circle", 9.0),
    "fish": Composite("red", "square", 11.0, "left", "white", "triangle", 9.0),  # as arrow
    "cat": Composite("black", "square", 11.0, "left", "green", "triangle", 9.0),
    "dog": Composite("red", "square", 11.0, "left", "yellow", "triangle", 9.0),
    "apple": Composite("blue", "square", 11.0, "left", "white", "square", 9.0),  # as flag
    "cake": Composite("black", "square", 11.0, "left", "green", "square", 9.0),
    "bus": Composite("blue", "square", 11.0, "left", "yellow", "square", 9.0),
    "truck": Composite("green", "square", 9.0, "left", "black", "square", 9.0),  # as domino
    "plane": Composite("yellow", "square", 9.0, "left", "red", "square", 9.0),
    "ship": Composite("red", "square", 9.0, "left", "white", "square", 9.0),
    "fork": Composite("white", "circle", 9.0, "left", "green", "circle", 9.0),  # as glasses
    "spoon": Composite("red", "circle", 9.0, "left", "black", "circle", 9.0),
    "bowl": Composite("yellow", "circle", 9.0, "left", "blue", "circle", 9.0),
}
NAMED: dict[str, Composite] = {**_FIRST_WORDS, **ADDED_WORDS}
_MIRRORABLE_FIRST = frozenset({"rocket", "tree", "lantern", "mushroom", "tower", "bell", "glasses"})


def arrangement(spec: Composite) -> tuple:
    """Everything of a composite but its colours: the words that share it differ only in their colour pair."""
    return spec.shape_a, spec.size_a, spec.relation, spec.shape_b, spec.size_b


# A word may be drawn mirrored where the first word of its arrangement may.
MIRRORABLE = frozenset(w for w, spec in NAMED.items()
                       if any(arrangement(spec) == arrangement(_FIRST_WORDS[m]) for m in _MIRRORABLE_FIRST))
# Size words scale both parts ("a small rocket"), as size words scale the one-object shapes; without them
# "a small <concept>" was a prompt the model had never seen for any named object, and drew one square.
# Captions without a size word draw the object at scale 1, as often as both size words together.
SIZE_SCALES: dict[str, float] = {"small": 0.85, "": 1.0, "large": 1.15}
_SIZE_DRAWS = ("small", "", "", "large")


def backgrounds(word: str) -> list[str]:
    """Palette backgrounds that differ from both parts' colours (the checkers could not see a part on its own colour)."""
    spec = NAMED[word]
    return [c for c in world.COLOURS if c not in (spec.colour_a, spec.colour_b)]


def is_held_out(word: str, position: str, background: str) -> bool:
    """About one (word, position, background) combination in five never appears in training (stable hash)."""
    return zlib.crc32(f"named|{word}|{position}|{background}".encode()) % 5 == 0


def random_scene(rng: np.random.Generator, held_out: bool = False) -> tuple[str, PairScene]:
    """(word, scene) of a random named composite from the training split (or the evaluation split)."""
    words = list(NAMED)
    while True:
        word = words[rng.integers(len(words))]
        options = backgrounds(word)
        background = options[rng.integers(len(options))]
        position = list(world.POSITIONS)[rng.integers(len(world.POSITIONS))]
        if is_held_out(word, position, background) == held_out:
            break
    mirrored = word in MIRRORABLE and rng.random() < 0.5
    dx, dy = rng.uniform(-1.0, 1.0, size=2)
    scale = SIZE_SCALES[_SIZE_DRAWS[rng.integers(len(_SIZE_DRAWS))]]
    return word, NAMED[word].scene(position, background, float(dx), float(dy), mirrored, scale)


def size_word(word: str, scene: PairScene) -> str:
    """The size word a scene of `word` was drawn at ("" at scale 1)."""
    scale = scene.size_a / NAMED[word].size_a
    return min(SIZE_SCALES, key=lambda w: abs(SIZE_SCALES[w] - scale))


def caption(word: str, scene: PairScene, rng: np.random.Generator, templates=world.TRAIN_TEMPLATES) -> str:
    """The one-object templates with the word as the object ("a small rocket on the left, green background")."""
    template = templates[rng.integers(len(templates))]
    phrases = world.POSITION_PHRASES[scene.position]
    obj = f"{size_word(word, scene)} {word}".strip()
    return template.format(obj=obj, pos=phrases[rng.integers(len(phrases))], bg=scene.background)


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[str, PairScene, str]]:
    """n (word, scene, caption): held-out (word, position, background) combinations in held-out phrasings."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        word, scene = random_scene(rng, held_out=True)
        out.append((word, scene, caption(word, scene, rng, (world.EVAL_TEMPLATES[i % len(world.EVAL_TEMPLATES)],))))
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    """n training-split captions of named composites (for the covariance corpus)."""
    rng = np.random.default_rng(seed)
    return [caption(*random_scene(rng), rng) for _ in range(n)]
