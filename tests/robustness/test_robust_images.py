"""Bad training images: usable oddities are converted with a note, unusable files are skipped with a note naming
the file and the reason, and training stops with a PerfusionError only when nothing usable is left. The loader
never changes or removes a file."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from robust_helpers import png_header, snapshot

from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.training.dataset import image_problem, load_images

RES = 32  # the toy resolution: images need a shorter side of 16 px


def _rgb(side=(40, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((side[1], side[0], 3)) * 255).astype(np.uint8))


def _good(folder, name="good.png", seed=0):
    _rgb(seed=seed).save(folder / name)


def _load(folder, masks=None):
    before = snapshot(folder)
    try:
        return load_images(folder, RES, masks)
    finally:
        assert snapshot(folder) == before  # nothing changed, nothing removed


def _notes(data) -> str:
    return "\n".join(data.notes)


def test_empty_folder(tmp_path):
    with pytest.raises(PerfusionError, match=r"images folder .* is empty: add 4–8 photos of your concept"):
        _load(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(PerfusionError, match=r"images folder .*nope does not exist or is not a folder"):
        load_images(tmp_path / "nope", RES)


def test_one_image_is_enough_to_train(tmp_path):
    _good(tmp_path)
    data = _load(tmp_path)
    assert len(data.images) == 1 and data.notes == []


def test_non_images_are_skipped_by_name(tmp_path):
    (tmp_path / "notes.doc").write_text("x")
    (tmp_path / "fake.png").write_text("this is text, not a PNG")
    (tmp_path / "caption.txt").write_text("a photo of {}")  # captions are not images and not reported
    _good(tmp_path)
    data = _load(tmp_path)
    assert len(data.images) == 1
    assert "notes.doc: skipped (not an image type: .png, .jpg" in _notes(data)
    assert "fake.png: skipped (unreadable or corrupt image: cannot identify image file" in _notes(data)
    (tmp_path / "good.png").unlink()
    with pytest.raises(PerfusionError, match=r"no usable image in .*\n  fake.png: skipped .*\n  notes.doc: skipped"):
        _load(tmp_path)


def test_truncated_files_are_skipped(tmp_path):
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        buf = io.BytesIO()
        _rgb((64, 64)).save(buf, format=fmt)
        (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _good(tmp_path)
    notes = _notes(_load(tmp_path))
    assert "cut.png: skipped (unreadable or corrupt image: image file is truncated" in notes
    assert "cut.jpg: skipped (unreadable or corrupt image: image file is truncated" in notes


def test_cmyk_16bit_palette_alpha_are_converted_with_notes(tmp_path):
    base = np.asarray(_rgb())
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    palette = Image.fromarray(base).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0  # palette index 0 transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    rgba = Image.fromarray(base).convert("RGBA")
    alpha = np.zeros((40, 40), np.uint8)
    alpha[8:32, 8:32] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "alpha.png")
    data = _load(tmp_path)
    notes = _notes(data)
    assert "cmyk.jpg: CMYK converted to RGB" in notes
    assert "deep.png: 16/32-bit image, scaled to 8 bits" in notes
    assert "palette.png: has transparency; alpha used as the subject mask" in notes
    assert "alpha.png: has transparency; alpha used as the subject mask, background set to grey" in notes
    masks = {im.path.name: im.mask for im in data.images}
    assert masks["alpha.png"][16, 16] == pytest.approx(1.0) and masks["alpha.png"][0, 0] == pytest.approx(0.0)
    assert all(im.pixels.shape == (3, RES, RES) and np.isfinite(im.pixels).all() for im in data.images)


def test_animated_images(tmp_path):
    frames = [_rgb(seed=i) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    _rgb(seed=7).save(tmp_path / "still.gif")
    data = _load(tmp_path)
    notes = _notes(data)
    # GIF was skipped as "not an image type"; now an animated one trains on its first frame, as an animated PNG does
    assert "anim.gif: 3 frames (animated or multi-page); the first is used" in notes
    assert "anim.png: 3 frames (animated or multi-page); the first is used" in notes
    assert "still.gif" not in notes  # a plain GIF: no note
    assert [im.path.name for im in data.images] == ["anim.gif", "anim.png", "still.gif"]
    gif, png = data.images[0].pixels, data.images[1].pixels  # the same first frame, the GIF's in 256 colours
    assert np.abs(gif - png).mean() < 0.15 < np.abs(gif - data.images[2].pixels).mean()  # 0.06 and 0.46 here


def test_exif_rotation_is_applied(tmp_path):
    img = _rgb((20, 40))  # 20 wide, 40 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90°: 40 wide, 20 high
    img.save(tmp_path / "rotated.jpg", exif=exif)
    data = _load(tmp_path)
    assert "rotated.jpg: rotated upright from its EXIF orientation" in _notes(data)
    assert data.images[0].original_size == (20, 40)  # (h, w) upright


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(PerfusionError, match=r"dot.png: skipped \(1×1 px is below 16 px; use images of at least 32 px\)"):
        _load(tmp_path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, for the 108 MP header
def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 megapixels claimed, a 100-byte file
    (tmp_path / "wide.png").write_bytes(png_header(12000, 9000))  # 108 MP: below PIL's error, above our limit
    with pytest.raises(PerfusionError, match=r"bomb.png: skipped \(over 100 megapixels, refused as a possible "
                                             r"decompression bomb; downscale it\)"):
        _load(tmp_path)
    _good(tmp_path)
    notes = _notes(_load(tmp_path))
    assert "wide.png: skipped (12000×9000 px is over 100 megapixels" in notes
    assert image_problem(tmp_path / "bomb.png", RES).startswith("over 100 megapixels")


def test_duplicates_are_skipped(tmp_path):
    _good(tmp_path, "a.png")
    _good(tmp_path, "b_copy.png")
    data = _load(tmp_path)
    assert "b_copy.png: skipped (duplicate of a.png)" in _notes(data) and len(data.images) == 1


def test_mixed_sizes_are_all_cropped_to_the_resolution(tmp_path):
    for i, side in enumerate(((40, 40), (80, 48), (48, 96), (300, 17))):
        _rgb(side, seed=i).save(tmp_path / f"{i}.png")
    data = _load(tmp_path)
    assert len(data.images) == 4 and data.notes == []
    assert all(im.pixels.shape == (3, RES, RES) for im in data.images)


def test_masks_that_do_not_match_their_images(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for seed, name in enumerate(("ok", "small", "shape", "corrupt", "none")):
        _rgb(seed=seed).save(images / f"{name}.png")
    Image.new("L", (40, 40), 255).save(masks / "ok.png")
    Image.new("L", (20, 20), 255).save(masks / "small.png")  # same shape, half the size: resized
    Image.new("L", (10, 40), 255).save(masks / "shape.png")  # another shape: cannot line up
    (masks / "corrupt.png").write_bytes(b"not a png")
    data = _load(images, masks)
    notes = _notes(data)
    assert "small.png: mask small.png resized from 20×20 to the image's 40×40 px" in notes
    assert "shape.png: mask shape.png is 10×40 px, the image 40×40 px (another shape); trained unmasked" in notes
    assert "corrupt.png: mask corrupt.png is unreadable (cannot identify image file" in notes
    assert f"none.png: no mask in {masks}; trained unmasked" in notes
    got = {im.path.name: im.mask for im in data.images}
    assert got["ok.png"] is not None and got["small.png"] is not None
    assert got["shape.png"] is None and got["corrupt.png"] is None and got["none.png"] is None
    with pytest.raises(PerfusionError, match=r"masks folder .*typo does not exist or is not a folder"):
        load_images(images, RES, tmp_path / "typo")
