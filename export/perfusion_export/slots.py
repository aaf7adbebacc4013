"""What a slot export keeps so that `refit` can recompute any slot exactly as a fresh export would.

The baked weight W − W Qᵀ mixes all concepts (Q holds their joint projection), so replacing one slot
needs the unedited W and every other slot's concept: `perfusion_slots/base_kv.safetensors` holds the
attn2 to_k/to_v weights (fp32, keyed by canonical layer name; `layers.json` maps names to module
paths), and `slot<K>.safetensors` each slot's concept file, byte for byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perfusion_ext.core.concept import load_concept, save_concept
from perfusion_ext.core.layers import CrossAttentionLayer, cross_attention_layers

from .bake import SlotEntry

FOLDER = "perfusion_slots"
BASE = "base_kv.safetensors"
LAYERS = "layers.json"  # canonical attn2 name -> module path, in model order


def slot_file(folder: Path, slot: int) -> Path:
    return Path(folder) / FOLDER / f"slot{slot}.safetensors"


def save(folder: Path, unet, entries: list[SlotEntry]) -> None:
    (folder / FOLDER).mkdir(parents=True, exist_ok=True)
    tensors, paths = {}, []
    for name, layer in cross_attention_layers(unet).items():
        for proj in ("to_k", "to_v"):
            tensors[f"{name}.{proj}"] = getattr(layer, proj).weight.detach().float().contiguous()
        paths.append([name, layer.module_path])
    save_file(tensors, str(folder / FOLDER / BASE))  # no metadata: safetensors writes it in hash order
    (folder / FOLDER / LAYERS).write_text(json.dumps(paths, indent=1) + "\n", encoding="utf-8")
    for e in entries:
        store_concept(folder, e)


def store_concept(folder: Path, entry: SlotEntry) -> None:
    """Keep the slot's concept file byte for byte (refit recomputes from exactly what was baked)."""
    target = slot_file(folder, entry.slot)
    target.parent.mkdir(parents=True, exist_ok=True)
    if entry.concept.path is not None and Path(entry.concept.path).is_file():
        shutil.copyfile(entry.concept.path, target)
    else:
        save_concept(entry.concept, target)


def base_layers(folder: Path) -> dict[str, CrossAttentionLayer]:
    """The unedited attn2 projections, as CrossAttentionLayer objects (for check_fits and baking)."""
    layers = {}
    paths = json.loads((Path(folder) / FOLDER / LAYERS).read_text(encoding="utf-8"))
    with safe_open(str(Path(folder) / FOLDER / BASE), framework="pt") as f:
        for name, module_path in paths:
            projs = []
            for proj in ("to_k", "to_v"):
                w = f.get_tensor(f"{name}.{proj}")
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                linear.weight = torch.nn.Parameter(w, requires_grad=False)
                projs.append(linear)
            layers[name] = CrossAttentionLayer(name, module_path, *projs)
    return layers


def load_entries(folder: Path, concepts_info: list[dict]) -> list[SlotEntry]:
    return [SlotEntry(c["slot"], load_concept(slot_file(folder, c["slot"])), c.get("strength", 1.0), c["beta"],
                      c["tau"])
            for c in concepts_info]
