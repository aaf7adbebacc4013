"""Pair scenes (training.pair_scenes): the subject pasted beside the base model's superclass, in one half."""
from pathlib import Path

import numpy as np
import pytest

from perfusion_ext.cli.main import build_parser
from perfusion_ext.core import families
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.training import pair_scenes
from perfusion_ext.training.config import PAPER_RECIPE, TrainConfig
from perfusion_ext.training.dataset import Dataset, TrainingImage, load_images
from perfusion_ext.training.trainer import ConceptTrainer

SIZE = 32


def subject(top, left, height, width, value=0.5):
    """A [3, 32, 32] image of -1 with a block of `value` and the block's mask."""
    pixels = np.full((3, SIZE, SIZE), -1.0, np.float32)
    pixels[:, top:top + height, left:left + width] = value
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[top:top + height, left:left + width] = 1.0
    return pixels, mask


class DrawingBackend:
    """Draws every prompt as a flat picture of 0.25 and remembers what it was asked."""

    family = "sd1"

    def __init__(self):
        self.prompts = []

    def sample(self, prompt, seed, size):
        self.prompts.append((prompt, seed, size))
        return np.full((3, size, size), 0.25, np.float32)


def test_layout_puts_tall_subjects_side_by_side_and_wide_ones_one_above_the_other():
    assert pair_scenes.layout_of(subject(4, 10, 20, 8)[1]) == "horizontal"
    assert pair_scenes.layout_of(subject(10, 4, 8, 20)[1]) == "vertical"


@pytest.mark.parametrize("layout,second", [("horizontal", True), ("horizontal", False), ("vertical", True)])
def test_the_subject_lands_centred_in_its_half_and_nothing_else_changes(layout, second):
    pixels, mask = subject(2, 3, 8, 6)
    background = np.zeros((3, SIZE, SIZE), np.float32)
    out, coverage = pair_scenes.paste_in_half(background, pixels, mask, layout, second)
    rows, cols = np.nonzero(out[0] == 0.5)
    assert (np.nonzero(coverage == 1.0)[0] == rows).all()
    assert len(rows) == 8 * 6  # the block at its own size, every pixel of it
    centre_y, centre_x = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    half = SIZE // 2
    expected = {("horizontal", True): (16, 24), ("horizontal", False): (16, 8), ("vertical", True): (24, 16)}
    assert (centre_y, centre_x) == expected[layout, second]
    untouched = np.ones((SIZE, SIZE), bool)
    untouched[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = False
    assert (out[:, untouched] == 0).all()  # the subject's own background is not pasted
    if layout == "horizontal":
        assert (cols >= half).all() if second else (cols < half).all()


def test_a_subject_larger_than_its_half_is_shrunk_to_fit():
    pixels, mask = subject(2, 2, 28, 28)
    out, _ = pair_scenes.paste_in_half(np.zeros((3, SIZE, SIZE), np.float32), pixels, mask, "horizontal", True)
    cols = np.nonzero((out[0] > 0.1).any(0))[0]
    assert cols.min() >= SIZE // 2 and cols.max() - cols.min() + 1 <= round(pair_scenes.FILL * SIZE / 2)


def test_compose_builds_captioned_unmirrored_scenes_mostly_in_second_place():
    pixels, mask = subject(4, 10, 20, 8)
    dataset = Dataset([TrainingImage(Path("a.png"), pixels, mask, None)], [])
    backend = DrawingBackend()
    scenes = pair_scenes.compose(backend, dataset, "dog", 6, SIZE, seed=2)
    others = [s.caption.replace("a {}", "").replace(" on the left", "").replace(" on the right", "")
              .replace(" and ", "").replace(", ", "") for s in scenes]
    assert all(o.removeprefix("an ").removeprefix("a ") in families.COMMON_OBJECTS for o in others)
    assert "a dog" not in others  # never the superclass: its key is the concept's locked key
    assert scenes[0].caption.startswith("a {} on the left and ")
    assert all(s.caption.endswith(" and a {} on the right") for k, s in enumerate(scenes) if k % 3)
    assert not any(s.mirrorable for s in scenes) and all(s.mask is None for s in scenes)
    # the base model draws the other object where the caption puts it, with seeds derived from the run's
    assert backend.prompts[0] == (f"a photo of {others[0]} on the right", 2000, SIZE)
    assert backend.prompts[1] == (f"a photo of {others[1]} on the left", 2000 + pair_scenes.MAX_DRAWS, SIZE)
    assert all(s.pixels.shape == (3, SIZE, SIZE) and s.pixels.dtype == np.float32 for s in scenes)


def test_a_subject_the_drawn_background_would_hide_is_drawn_again():
    pixels, mask = subject(4, 10, 20, 8, value=0.25)  # the colour DrawingBackend paints everything
    drawn = np.full((3, SIZE, SIZE), 0.25, np.float32)
    scene, coverage = pair_scenes.paste_in_half(drawn, pixels, mask, "horizontal", True)
    assert pair_scenes.hidden_share(drawn, scene, coverage) == 1.0
    backend = DrawingBackend()
    pair_scenes.compose(backend, Dataset([TrainingImage(Path("a.png"), pixels, mask, None)], []), "dog", 1, SIZE, 0)
    assert len(backend.prompts) == pair_scenes.MAX_DRAWS  # every draw hid it; the last one is kept
    visible = subject(4, 10, 20, 8, value=-0.5)[0]
    scene, coverage = pair_scenes.paste_in_half(drawn, visible, mask, "horizontal", True)
    assert pair_scenes.hidden_share(drawn, scene, coverage) == 0.0


def test_a_setting_follows_the_caption():
    assert pair_scenes.with_setting("a cat on the left", "blue background") == "a cat on the left, blue background"
    assert pair_scenes.with_setting("a cat on the left", "") == "a cat on the left"


def test_compose_without_masks_says_what_to_do():
    pixels, _ = subject(4, 10, 20, 8)
    dataset = Dataset([TrainingImage(Path("a.png"), pixels, None, None)], [])
    with pytest.raises(PerfusionError, match="masks folder"):
        pair_scenes.compose(DrawingBackend(), dataset, "owl", 2, SIZE, seed=0)


def test_the_trainer_adds_the_scenes_and_never_mirrors_them(random_toy_backend, tmp_path):
    from perfusion_ext.toy.concepts import write_training_set

    images = write_training_set("house", tmp_path / "house", n=2)
    cfg = TrainConfig(name="house", superclass="square", steps=1, batch_size=4, preview_every=0, seed=1,
                      masks_dir=str(images / "masks"), pair_scenes=2, flip=True).resolved(
        random_toy_backend.family, random_toy_backend.device)
    trainer = ConceptTrainer(random_toy_backend, cfg, load_images(images, 32, masks_dir=images / "masks"))
    assert len(trainer.dataset.images) == 4 and [im.mirrorable for im in trainer.dataset.images] == [True, True,
                                                                                                       False, False]
    again = ConceptTrainer(random_toy_backend, cfg, load_images(images, 32, masks_dir=images / "masks"))
    # a resumed run rebuilds the same scenes (its data order indexes them)
    assert all(np.array_equal(a.pixels, b.pixels) and a.caption == b.caption
               for a, b in zip(trainer.dataset.images, again.dataset.images))
    assert not trainer._flips([2, 3] * 16).any()
    assert trainer._flips([0, 1] * 16).any()  # the subject's own images still are
    assert np.isfinite(trainer.train_step())


def test_the_toy_model_pairs_its_own_named_objects_that_fit_the_layout():
    import perfusion_ext.toy  # noqa: F401  (registers the plug-in)
    from perfusion_ext.toy import world
    from perfusion_ext.toy.named import NAMED

    side_by_side = families.pair_objects("toy", "horizontal")
    assert side_by_side and all(NAMED[w].relation == "above" for w, _ in side_by_side)
    assert all(NAMED[w].relation == "left" for w, _ in families.pair_objects("toy", "vertical"))
    # always on a background it stands out from: without a background word the toy model paints blotches
    for word, setting in side_by_side:
        colour = setting.removesuffix(" background")
        assert colour in world.COLOURS and colour not in (NAMED[word].colour_a, NAMED[word].colour_b)


def test_cli_flag_and_the_paper_recipe():
    args = build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog",
                                      "--pair-scenes", "6"])
    assert args.pair_scenes == 6 and TrainConfig("x", "dog").pair_scenes == 0 and PAPER_RECIPE["pair_scenes"] == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog",
                                   "--pair-scenes", "-1"])
