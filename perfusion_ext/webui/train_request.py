"""Validate a training request (REST body or training-tab fields) into a TrainRequest. No WebUI imports.

Every problem is an ApiError with an HTTP status and a message for the user: 400/422 for a bad body,
403 for a server path outside the allowed folders, never a 500. Defaults and limits are the trainer's
(`training.config`), the accepted image types the dataset loader's (`training.dataset.IMAGE_SUFFIXES`).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
from pathlib import Path

from ..core import families
from ..core.tags import NAME_RE
from ..training.config import LIMITS, TrainConfig, field_defaults
from ..training.dataset import IMAGE_SUFFIXES, image_problem

SUPERCLASS_RE = re.compile(r"^[A-Za-z][A-Za-z'\-]{0,39}$")
WEBUI_FAMILY = families.DEFAULT_FAMILY  # defaults for requests before a model is known
MAX_IMAGES = 200
MAX_IMAGE_BYTES = 32 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class TrainRequest:
    """A checked request: where the images come from, plus a value for every training.config.LIMITS field
    (`req.steps`, `req.resolution`, …), so a new trainer setting reaches the API and the tab by itself."""

    name: str
    superclass: str
    image_paths: list[Path]  # files or one folder, already checked
    image_bytes: list[bytes]  # decoded uploads
    numbers: dict[str, int | float | None]  # LIMITS field -> value
    masks_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    description: str = ""
    init_from: str | None = None  # a concept name: continue training it (resolved when the job starts)

    def __getattr__(self, key: str):  # only called for names that are not fields
        numbers = self.__dict__.get("numbers") or {}
        if key in numbers:
            return numbers[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def to_config(self, previews: bool = True, init_path: Path | None = None) -> TrainConfig:
        numbers = dict(self.numbers)
        if not previews:
            numbers["preview_every"] = 0
        return TrainConfig(name=self.name, superclass=self.superclass, description=self.description,
                           masks_dir=str(self.masks_dir) if self.masks_dir else None,
                           init_from=str(init_path) if init_path else None, **numbers)


KNOWN = {"name", "superclass", "images", "images_dir", "masks_dir", "resume", "overwrite", "description", "init_from",
         *LIMITS}


def _number(body: dict, key: str, default):
    if key not in body or body[key] is None:
        return default
    kind, lo, hi = LIMITS[key]
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(422, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if not lo <= value <= hi:
        raise ApiError(422, f"{key} must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _server_path(text: str, roots: list[Path] | None, what: str) -> Path:
    if "\x00" in text:
        raise ApiError(422, f"{what} contains a NUL character; it is not a path")
    try:
        path = Path(text).expanduser()
        if roots is not None:
            if not path.is_absolute():
                path = roots[0] / path
            inside = _inside(path, roots)
        exists = path.exists()
    except (OSError, RuntimeError, ValueError) as exc:  # a name too long, ~unknownuser, a loop of links
        raise ApiError(422, f"{what} {text[:200]!r} is not a usable path: {exc}") from None
    if roots is not None and not inside:
        allowed = ", ".join(str(r) for r in roots)
        raise ApiError(403, f"{what} {text!r} is outside the folders the API may read ({allowed}); "
                            "copy the images there or send them as base64")
    if not exists:
        raise ApiError(422, f"{what} {text!r} does not exist on the server")
    return path


B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def _looks_like_base64(text: str) -> bool:
    """data: URLs, or long runs of base64 characters (an image is never a short string)."""
    return text.startswith("data:") or (len(text) >= 64 and B64_RE.match(text) is not None and len(text) % 4 == 0)


def decode_image(text: str, index: int) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    if len(payload) // 4 * 3 > MAX_IMAGE_BYTES + 3:  # refused before decoding anything
        raise ApiError(413, f"images[{index}] is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"images[{index}] is neither a server path nor valid base64") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(413, f"images[{index}] is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.DecompressionBombError:
        raise ApiError(422, f"images[{index}] is too large in pixels (refused as a possible decompression bomb)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(422, f"images[{index}] is base64 but not an image PIL can read") from None
    return data


def check_images(req: TrainRequest) -> None:
    """Refuse (422) images that cannot be trained at the request's resolution, naming each file and why, so an
    API client learns it when it sends the request, not from a job that fails later. Files listed one by one
    (and uploads) must each be usable; a folder needs at least one usable image (the trainer skips the rest, as
    the CLI does). Only headers are read: a file corrupt beyond its header is still skipped by the trainer."""
    resolution = req.resolution
    listed = [(p.name, p) for p in req.image_paths if not p.is_dir()]
    listed += [(f"images upload {i}", data) for i, data in enumerate(req.image_bytes)]
    bad = [(label, why) for label, source in listed if (why := image_problem(source, resolution))]
    for folder in (p for p in req.image_paths if p.is_dir()):
        try:
            files = sorted(f for f in folder.iterdir()
                           if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise ApiError(422, f"the images folder {folder.name!r} cannot be read: {exc.strerror or exc}") from None
        if not files:
            raise ApiError(422, f"the images folder {folder.name!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        problems = [(f.name, image_problem(f, resolution)) for f in files]
        if all(why for _, why in problems):
            bad += problems
    if bad:
        raise ApiError(422, f"{len(bad)} image(s) cannot be used at resolution {resolution}: "
                            + "; ".join(f"{label}: {why}" for label, why in bad)
                            + f". Send images of at least {resolution} px on their shorter side, or a lower resolution.")


def parse_train_request(body, allowed_roots: list[Path] | None, defaults: dict | None = None,
                        family: str = WEBUI_FAMILY) -> TrainRequest:
    """`allowed_roots=None` trusts any server path (the UI tab); the REST API passes its allowed folders.

    Missing numbers take `defaults`, then the trainer's defaults for `family`."""
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}")
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name.strip()) or name.strip() in (".", ".."):
        raise ApiError(422, "name is required: 1-100 letters, digits, space, _ . - (no paths)")
    name = name.strip()
    superclass = body.get("superclass")
    if not isinstance(superclass, str) or not SUPERCLASS_RE.match(superclass.strip()):
        raise ApiError(422, "superclass is required: one plain word such as 'dog', 'bear', 'toy'")
    for flag in ("resume", "overwrite"):
        if flag in body and not isinstance(body[flag], bool):
            raise ApiError(422, f"{flag} must be true or false")
    resume = bool(body.get("resume", False))
    images = body.get("images") or []
    if body.get("images_dir") and isinstance(images, list):
        images = images + [body["images_dir"]]
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        raise ApiError(422, "images must be a list of server paths or base64-encoded images")
    if not images:
        raise ApiError(422, "images is required (server paths inside the allowed folder, or base64 images)")
    if len(images) > MAX_IMAGES:
        raise ApiError(422, f"at most {MAX_IMAGES} images")
    paths, blobs = [], []
    for i, item in enumerate(images):
        if _looks_like_base64(item):
            blobs.append(decode_image(item, i))
            continue
        path = _server_path(item, allowed_roots, f"images[{i}]")
        if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ApiError(422, f"images[{i}] {item!r} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths.append(path)
    if sum(p.is_dir() for p in paths) and (len(paths) > 1 or blobs):
        raise ApiError(422, "give either one images folder or a list of image files/base64 images, not both")
    masks = body.get("masks_dir")
    if masks is not None and not isinstance(masks, str):
        raise ApiError(422, "masks_dir must be a server path")
    masks_dir = _server_path(masks, allowed_roots, "masks_dir") if masks else None
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 2000:
        raise ApiError(422, "description must be a string of at most 2000 characters")
    init_from = body.get("init_from") or None
    if init_from is not None and (not isinstance(init_from, str) or not NAME_RE.match(init_from.strip())):
        raise ApiError(422, "init_from must be the name of a concept in the concepts folder")
    if init_from is not None and resume:
        raise ApiError(422, "give either resume (continue this name's run) or init_from (start from a concept)")
    d = {**field_defaults(family), **(defaults or {})}
    values = {key: _number(body, key, d[key]) for key in LIMITS}
    if values["micro_batch"] is not None and values["batch_size"] % values["micro_batch"]:
        raise ApiError(422, f"micro_batch ({values['micro_batch']}) must divide batch_size ({values['batch_size']})")
    step = families.get(family).resolution_step
    if values["resolution"] % step:
        raise ApiError(422, f"resolution must be a multiple of {step}, got {values['resolution']}")
    return TrainRequest(name=name, superclass=superclass.strip(), image_paths=paths, image_bytes=blobs,
                        numbers=values, masks_dir=masks_dir, resume=resume,
                        overwrite=bool(body.get("overwrite", False)), description=description,
                        init_from=init_from.strip() if init_from else None)
