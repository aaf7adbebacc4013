"""Training batches of the toy world drawn and rendered on the training device.

The numpy renderer (:mod:`.world`) draws one scene at a time, which is fine on a CPU and far too slow
to feed a GPU. Here scenes are sampled as index tensors, rendered in one vectorised pass
(pixel-identical to :func:`world.render`) and captioned from the sampled indices, tokenized per batch
(a table of every caption tokenized up front took 40 s to build, for a few ms saved per batch).
The scene distribution equals :func:`world.random_scene`'s: uniform over the training attribute
combinations, sizes small/medium/medium/large, centre jitter uniform in ±1 px; a share of captions
(`prefix_share`) starts with a style word ("sketch, …").
"""
from __future__ import annotations

import json

import numpy as np
import torch

from . import named, pairs, two_named, world

_SIZE_NAMES = tuple(world.SIZES)  # small, medium, large
_SIZE_DRAW = torch.tensor([_SIZE_NAMES.index(s) for s in ("small", "medium", "medium", "large")])
_SHAPE_NAMES = world.SHAPES


def render_batch(colour, shape, position, background, size, dx, dy) -> torch.Tensor:
    """Vectorised :func:`world.render`: index tensors (into COLOURS, SHAPES, POSITIONS, COLOURS, SIZES)
    and float64 jitter → uint8 N×H×W×3 on their device.

    Centres and edges are computed in float64 and rounded to float32 once, as numpy does for the
    Python floats in :func:`world.shape_mask`, so the pixels match exactly.
    """
    device = colour.device
    n = colour.shape[0]
    coords = torch.arange(world.IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    xs, ys = coords.view(1, 1, -1), coords.view(1, -1, 1)
    centres = torch.tensor(list(world.POSITIONS.values()), dtype=torch.float64, device=device)[position]
    side64 = torch.tensor(list(world.SIZES.values()), dtype=torch.float64, device=device)[size]
    half64 = side64 / 2.0
    cx64, cy64 = centres[:, 0] + dx, centres[:, 1] + dy

    def f32(v):
        return v.float().view(n, 1, 1)

    cx, cy, half, side = f32(cx64), f32(cy64), f32(half64), f32(side64)
    top, bottom = f32(cy64 - half64), f32(cy64 + half64)
    circle = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    square = ((xs - cx).abs() <= half) & ((ys - cy).abs() <= half)
    frac = ((ys - top) / side).clamp(0.0, 1.0)
    triangle = (ys >= top) & (ys <= bottom) & ((xs - cx).abs() <= frac * half)
    masks = torch.stack([circle, square, triangle], dim=1)  # order of world.SHAPES
    mask = masks[torch.arange(n, device=device), shape]
    palette = torch.tensor(list(world.COLOURS.values()), dtype=torch.uint8, device=device)
    return torch.where(mask[..., None], palette[colour][:, None, None], palette[background][:, None, None])


class SceneSampler:
    """Random training scenes with captions, as tensors on `device`; its generator state checkpoints."""

    def __init__(self, tokenizer, device, seed: int = 0, drop_caption: float = 0.1, prefix_share: float = 0.3):
        self.device = torch.device(device)
        self.drop_caption = drop_caption
        self.prefix_share = prefix_share
        colours, positions = list(world.COLOURS), list(world.POSITIONS)
        combos = [c for c in world.all_combos() if not world.combo_is_held_out(*c)]
        self.combos = torch.tensor(
            [[colours.index(c), _SHAPE_NAMES.index(s), positions.index(p), colours.index(b)] for c, s, p, b in combos],
            device=self.device,
        )
        self.combo_names = combos
        self.tokenizer = tokenizer
        phrase_counts = [len(world.POSITION_PHRASES[p]) for p in positions]
        self.phrase_counts = torch.tensor(phrase_counts, device=self.device)
        self.max_phrases = max(phrase_counts)
        self.prefixes = ("",) + tuple(f"{word}, " for word in world.STYLE_PREFIXES)  # prefix 0 is none
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def _randint(self, high, n):
        return torch.randint(0, high, (n,), generator=self.generator, device=self.device)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images N×H×W×3, token ids N×77) of n random training scenes."""
        combo_index = self._randint(len(self.combos), n)
        colour, shape, position, background = self.combos[combo_index].unbind(1)
        size = _SIZE_DRAW.to(self.device)[self._randint(len(_SIZE_DRAW), n)]
        jitter = torch.rand((2, n), generator=self.generator, device=self.device, dtype=torch.float64) * 2 - 1
        images = render_batch(colour, shape, position, background, size, jitter[0], jitter[1])
        template = self._randint(len(world.TRAIN_TEMPLATES), n)
        u = torch.rand(n, generator=self.generator, device=self.device)
        phrase = (u * self.phrase_counts[position]).long().clamp(max=self.max_phrases - 1)
        prefix = torch.randint(1, len(self.prefixes), (n,), generator=self.generator, device=self.device)
        prefix = torch.where(torch.rand(n, generator=self.generator, device=self.device) < self.prefix_share, prefix, 0)
        dropped = torch.rand(n, generator=self.generator, device=self.device) < self.drop_caption
        captions = [
            "" if drop else self._caption(*index)
            for drop, index in zip(dropped.tolist(), zip(*(t.tolist() for t in (combo_index, size, template, phrase, prefix))))
        ]
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return images, ids.to(self.device)

    def _caption(self, combo: int, size: int, template: int, phrase: int, prefix: int) -> str:
        colour, shape, position, background = self.combo_names[combo]
        scene = world.Scene(colour, shape, position, background, _SIZE_NAMES[size])
        phrases = world.POSITION_PHRASES[position]
        return self.prefixes[prefix] + world.caption_text(scene, world.TRAIN_TEMPLATES[template], phrases[phrase])

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class WorldV2Sampler:
    """Training scenes of the second toy world: one-object scenes (some named without their colour,
    "a circle on the left") mixed with two-object scenes (:mod:`.pairs`) and, with `named_share`, the named
    two-part objects of :mod:`.named` ("a rocket on the left") and, with `two_named_share`, two of them in one
    scene (:mod:`.two_named`), rendered by numpy on the CPU and tokenized per batch. Its numpy generator
    state checkpoints as JSON bytes in a uint8 tensor."""

    def __init__(self, tokenizer, device, seed: int = 0, pair_share: float = 0.5, colourless_share: float = 0.15,
                 drop_caption: float = 0.1, prefix_share: float = 0.3, named_share: float = 0.0,
                 two_named_share: float = 0.0):
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.pair_share, self.colourless_share, self.named_share = pair_share, colourless_share, named_share
        self.two_named_share = two_named_share
        self.drop_caption, self.prefix_share = drop_caption, prefix_share
        self.rng = np.random.default_rng(seed)

    def scene_and_caption(self):
        rng = self.rng
        draw = rng.random()
        if draw < self.two_named_share:
            layout, a, b, scenes = two_named.random_scene(rng)
            image, text = two_named.render_two(scenes), two_named.caption(layout, a, b, scenes[0].background, rng)
        elif draw < self.two_named_share + self.named_share:
            word, scene = named.random_scene(rng)
            image, text = pairs.render(scene), named.caption(word, scene, rng)
        elif draw < self.two_named_share + self.named_share + self.pair_share:
            scene = pairs.random_scene(rng)
            image, text = pairs.render(scene), pairs.caption(scene, rng)
        else:
            scene = world.random_scene(rng)
            image, text = world.render(scene), world.caption(scene, rng, colourless=rng.random() < self.colourless_share)
        if rng.random() < self.prefix_share:
            text = f"{world.STYLE_PREFIXES[rng.integers(len(world.STYLE_PREFIXES))]}, {text}"
        return image, ("" if rng.random() < self.drop_caption else text)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images N×H×W×3, token ids N×77) of n random training scenes."""
        images, captions = zip(*(self.scene_and_caption() for _ in range(n)))
        ids = self.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return torch.from_numpy(np.stack(images)).to(self.device), ids.to(self.device)

    def state(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self.rng.bit_generator.state).encode()), dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> None:
        self.rng.bit_generator.state = json.loads(bytes(state.tolist()).decode())
