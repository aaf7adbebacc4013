"""Load and check a concept's training images before any compute is spent.

Policy: files that cannot be used (unreadable, not an image, too small, duplicates) are skipped
with a message naming each file and the reason; odd but usable ones (CMYK, 16-bit, palette,
EXIF-rotated, alpha) are converted with a note. Training stops with a clear error only when no
usable image is left (or the folder is missing/empty). An image's alpha channel becomes its
subject mask unless a masks folder is given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import PerfusionError

# Every front end uses this list. Animated GIF/PNG/WebP and multi-page TIFF train on their first frame (with a note).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Larger images are refused from their header, before any pixel is decoded (a decompression bomb: a small file that
# decodes to gigabytes). 100 megapixels passes every camera photo up to 12000×8000 px.
MAX_PIXELS = 100_000_000


@dataclasses.dataclass
class TrainingImage:
    path: Path
    pixels: np.ndarray  # float32 [3, R, R] in [-1, 1]
    mask: np.ndarray | None  # float32 [R, R] in [0, 1], or None
    caption: str | None  # optional template from NAME.txt beside the image ("{}" marks the concept)
    original_size: tuple[int, int] | None = None  # (h, w) of the file, for SDXL's size conditioning
    crop_top_left: tuple[int, int] = (0, 0)  # where the square crop starts in the image scaled to `resolution`
    mirrorable: bool = True  # False for composed scenes whose caption says left and right (pair_scenes)


@dataclasses.dataclass
class Dataset:
    images: list[TrainingImage]
    notes: list[str]  # conversions and skips, one line per file


def minimum_side(resolution: int) -> int:
    """The shortest side an image needs to train at `resolution`: smaller ones are skipped."""
    return max(16, resolution // 2)


def _too_large(size: tuple[int, int]) -> str | None:
    if size[0] * size[1] <= MAX_PIXELS:
        return None
    return (f"{size[0]}×{size[1]} px is over {MAX_PIXELS // 1_000_000} megapixels, refused as a possible "
            "decompression bomb; downscale it")


def image_problem(source: str | Path | bytes, resolution: int) -> str | None:
    """Why an image (a file or its bytes) cannot be trained at `resolution`, read from its header only (no pixel
    is decoded); None when it looks usable. What `load_images` would skip it for, checked up front."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            size = img.size  # an EXIF rotation changes neither its shorter side nor its pixel count
    except Image.DecompressionBombError:
        return f"over {MAX_PIXELS // 1_000_000} megapixels, refused as a possible decompression bomb; downscale it"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"unreadable or corrupt image: {exc}"
    too_large = _too_large(size)
    if too_large:
        return too_large
    need = minimum_side(resolution)
    if min(size) < need:
        return f"{size[0]}×{size[1]} px is below {need} px; use images of at least {resolution} px"
    return None


def _load_mask(path: Path, size: tuple[int, int], name: str, notes: list[str]) -> Image.Image | None:
    """The subject mask for an image of `size` (w, h) in mode L, or None with a note when it cannot be used."""
    try:
        with Image.open(path) as raw:
            problem = _too_large(raw.size)
            if problem:
                notes.append(f"{name}: mask {path.name} skipped ({problem}); trained unmasked")
                return None
            raw.load()
            mask = ImageOps.exif_transpose(raw).convert("L")
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        notes.append(f"{name}: mask {path.name} is unreadable ({exc}); trained unmasked")
        return None
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        if abs(mw * h - mh * w) > 0.01 * mh * w:  # another shape: it cannot line up with the image
            notes.append(f"{name}: mask {path.name} is {mw}×{mh} px, the image {w}×{h} px (another shape); "
                         "trained unmasked")
            return None
        notes.append(f"{name}: mask {path.name} resized from {mw}×{mh} to the image's {w}×{h} px")
        mask = mask.resize(size, Image.BILINEAR)
    return mask


def pixels_of(img: Image.Image, resolution: int) -> np.ndarray:
    """An RGB image as training pixels: its centred square crop at `resolution`, float32 [3, R, R] in [-1, 1]."""
    pixels = np.asarray(_square(img, resolution, Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return pixels.transpose(2, 0, 1).copy()


def _square(img: Image.Image, size: int, resample) -> Image.Image:
    return ImageOps.fit(img, (size, size), method=resample, centering=(0.5, 0.5))


def _crop_top_left(width: int, height: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred square crop after scaling the shorter side to `size` (what `_square` keeps)."""
    scale = size / min(width, height)
    return (max(0, round(height * scale) - size) // 2, max(0, round(width * scale) - size) // 2)


def _to_rgb(img: Image.Image, name: str, notes: list[str]) -> tuple[Image.Image, Image.Image | None]:
    """RGB image plus an alpha mask when the image has transparency."""
    alpha = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        notes.append(f"{name}: 16/32-bit image, scaled to 8 bits")
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = img.getchannel("A")
        if np.asarray(alpha).min() < 255:
            notes.append(f"{name}: has transparency; alpha used as the subject mask, background set to grey")
            grey = Image.new("RGB", img.size, (127, 127, 127))
            grey.paste(img.convert("RGB"), mask=alpha)
            return grey, alpha
        alpha = None
    if img.mode == "CMYK":
        notes.append(f"{name}: CMYK converted to RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, alpha


def load_images(folder: str | Path, resolution: int, masks_dir: str | Path | None = None) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise PerfusionError(f"images folder {folder} does not exist or is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PerfusionError(f"images folder {folder} is empty: add 4–8 photos of your concept.")
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise PerfusionError(f"masks folder {masks_dir} does not exist or is not a folder.")
    notes, images, seen = [], [], {}
    min_side = minimum_side(resolution)
    for path in files:
        if path.suffix.lower() == ".txt":
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            notes.append(f"{path.name}: skipped (not an image type: {', '.join(IMAGE_SUFFIXES)})")
            continue
        try:
            with Image.open(path) as raw:
                too_large = _too_large(raw.size)
                if too_large:
                    notes.append(f"{path.name}: skipped ({too_large})")
                    continue
                raw.load()
                if getattr(raw, "n_frames", 1) > 1:
                    notes.append(f"{path.name}: {raw.n_frames} frames (animated or multi-page); the first is used")
                rotated = ImageOps.exif_transpose(raw)
                if rotated is not raw and raw.getexif().get(0x0112, 1) != 1:
                    notes.append(f"{path.name}: rotated upright from its EXIF orientation")
                img, alpha = _to_rgb(rotated, path.name, notes)
        except Image.DecompressionBombError:
            notes.append(f"{path.name}: skipped (over {MAX_PIXELS // 1_000_000} megapixels, refused as a possible "
                         "decompression bomb; downscale it)")
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            notes.append(f"{path.name}: skipped (unreadable or corrupt image: {exc})")
            continue
        if min(img.size) < min_side:
            notes.append(f"{path.name}: skipped ({img.size[0]}×{img.size[1]} px is below {min_side} px; "
                         f"use images of at least {resolution} px)")
            continue
        digest = hashlib.sha256(np.asarray(img).tobytes()).hexdigest()
        if digest in seen:
            notes.append(f"{path.name}: skipped (duplicate of {seen[digest]})")
            continue
        seen[digest] = path.name
        mask_img = alpha
        if masks_dir is not None:
            candidates = sorted(Path(masks_dir).glob(path.stem + ".*"))
            if not candidates:
                notes.append(f"{path.name}: no mask in {masks_dir}; trained unmasked")
                mask_img = None
            else:
                mask_img = _load_mask(candidates[0], img.size, path.name, notes)
        pixels = pixels_of(img, resolution)
        mask = None
        if mask_img is not None:
            mask = np.asarray(_square(mask_img.convert("L"), resolution, Image.BILINEAR), dtype=np.float32) / 255.0
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        images.append(TrainingImage(path, pixels, mask, caption, (img.height, img.width),
                                    _crop_top_left(img.width, img.height, resolution)))
    if not images:
        raise PerfusionError(f"no usable image in {folder}:\n  " + "\n  ".join(notes))
    return Dataset(images, notes)
