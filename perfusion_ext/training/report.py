"""A loss-curve PNG drawn with Pillow (no plotting dependency needed in the WebUI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.atomic import atomic_path


def write_loss_curve(losses: list[float], path: Path, size=(640, 320)) -> None:
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    margin = 40
    draw.rectangle([margin, 10, w - 10, h - margin], outline="black")
    if len(losses) >= 2:
        y = np.asarray(losses, dtype=np.float64)
        smooth = np.convolve(y, np.ones(min(10, len(y))) / min(10, len(y)), mode="valid")
        lo, hi = float(y.min()), float(y.max()) or 1.0
        span = (hi - lo) or 1.0

        def points(values, offset):
            xs = margin + (np.arange(len(values)) + offset) / max(len(y) - 1, 1) * (w - margin - 10)
            ys = (h - margin) - (values - lo) / span * (h - margin - 10)
            return list(zip(xs.tolist(), ys.tolist()))

        draw.line(points(y, 0), fill=(170, 170, 230), width=1)
        draw.line(points(smooth, (len(y) - len(smooth)) / 2), fill=(20, 20, 160), width=2)
        draw.text((margin + 4, 12), f"max {hi:.4f}", fill="black")
        draw.text((margin + 4, h - margin - 14), f"min {lo:.4f}", fill="black")
    draw.text((margin, h - margin + 8), f"loss over {len(losses)} steps", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
