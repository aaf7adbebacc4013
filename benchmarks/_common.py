"""Shared helpers for the benchmarks: README table splicing and a small Pillow scatter plot."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def splice_readme(marker: str, text: str, readme: Path = ROOT / "README.md") -> None:
    """Replace the block between <!-- marker:start --> and <!-- marker:end --> in the README."""
    content = readme.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(content):
        raise SystemExit(f"README has no <!-- {marker}:start/end --> block")
    readme.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), content), encoding="utf-8")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def scatter(points: list[tuple[float, float, str, tuple[int, int, int]]], path: Path, xlabel: str, ylabel: str,
            size=(720, 480), x_range=(0.0, 1.0), y_range=(0.0, 1.0)) -> None:
    """Points (x, y, label, colour) with labels; lines join points that share a label prefix; a point with an
    empty label is drawn small and unlabelled (context, not a result to read off)."""
    w, h = size
    m = 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, 20, w - 20, h - m], outline="black")

    def xy(px, py):
        fx = (px - x_range[0]) / (x_range[1] - x_range[0])
        fy = (py - y_range[0]) / (y_range[1] - y_range[0])
        return m + fx * (w - m - 20), (h - m) - fy * (h - m - 20)

    for k in range(5):
        vx = x_range[0] + k / 4 * (x_range[1] - x_range[0])
        vy = y_range[0] + k / 4 * (y_range[1] - y_range[0])
        d.text((xy(vx, 0)[0] - 8, h - m + 6), f"{vx:.2f}", fill="black")
        d.text((m - 34, xy(0, vy)[1] - 6), f"{vy:.2f}", fill="black")
    d.text((w // 2 - 40, h - 24), xlabel, fill="black")
    d.text((6, 4), ylabel, fill="black")
    series: dict[str, list] = {}
    for px, py, label, colour in points:
        cx, cy = xy(px, py)
        if not label:
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
            continue
        series.setdefault(label.split(" ")[0], []).append(((cx, cy), colour))
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        width = d.textlength(label)
        d.text((cx + 6 if cx + 6 + width < w else cx - 6 - width, cy - 6), label, fill=colour)
    for items in series.values():
        if len(items) > 1:
            d.line([p for p, _ in items], fill=items[0][1], width=1)
    img.save(path)


def random_concept(unet, seed: int = 1, name: str = "bench", family: str = "sd1", encoder: str = "clip_l"):
    """A concept with random targets for `unet` (its own text width): for timing, not for looks."""
    from perfusion_ext.core.concept import Concept
    from perfusion_ext.core.layers import cross_attention_layers

    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    d = next(iter(layers.values())).in_dim
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    i_star, i_super = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    keys = {n: (layer.to_k.weight.detach().double() @ i_super).float() for n, layer in layers.items()}
    values = {n: torch.randn(layer.out_dim, generator=g) for n, layer in layers.items()}
    return Concept(name=name, token=name, superclass="thing", base_family=family,
                   embeddings={encoder: torch.randn(1, d, generator=g)}, target_input=i_star.float(),
                   target_input_cinv=torch.linalg.solve(cov, i_star).float(), key_targets=keys, value_targets=values)
