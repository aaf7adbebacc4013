"""`perfusion export refit DIR --concept FILE --slot K`: put a concept into one slot of a slot export.

Only initializers change, by name and with unchanged shapes (what TensorRT's refitter needs to swap
concepts without a rebuild): the gate, every baked K/V weight (the projection removal mixes all
slots), and for the optimum layout the slot's token-table rows and trigger words. The result equals a
fresh export with the same slot contents. Files are rewritten beside the originals and renamed over them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from perfusion_ext.core.concept import load_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.hooks import check_fits, resolve

from . import components, manifest, onnx_io, tokens
from . import slots as slot_store
from .bake import SlotEntry
from .exporter import _concept_info

TOKEN_TABLE_SUFFIX = "embeddings.token_embedding.weight"


def refit(folder, concept_file, slot: int, strength: float = 1.0, beta: float | None = None,
          tau: float | None = None) -> dict:
    """Replace slot `slot` of the export at `folder` with `concept_file`; returns the updated manifest."""
    folder = Path(folder)
    info = manifest.read(folder)
    if not info["slots"]["fixed"]:
        raise PerfusionError(f"{folder} was exported without --slots; only slot exports can be refitted.")
    count = info["slots"]["count"]
    entry, entries, layers = place(folder, info["concepts"], count, info["base_family"], concept_file, slot,
                                   strength, beta, tau)
    dtype = components.DTYPES[info["precision"]]
    writes = {info["files"]["unet"]: components.unet_tensors(layers, entries, count, dtype,
                                                             info.get("competitive_gates", False))}
    if "tokens" in info:  # every text encoder's table (SDXL: clip_l rows in text_encoder/, clip_g in _2/)
        for part, encoder in (info["tokens"].get("encoders") or {"text_encoder": None}).items():
            writes[info["files"][part]] = token_rows(folder, info, entry, part, encoder)
    rewrite(folder, writes, entry, folder)
    info["concepts"] = sorted([c for c in info["concepts"] if c["slot"] != slot] + [_concept_info(entry)],
                              key=lambda c: c["slot"])
    if "tokens" in info:
        _retoken(folder, info, entry)
    info["verification"] = {"note": f"slot {slot} refitted; figures of the original export no longer apply. "
                                    "A fresh export re-runs every check."}
    manifest.write(folder, info)
    return info


def place(slot_root: Path, concepts_info: list[dict], count: int, family: str, concept_file, slot: int,
          strength: float, beta: float | None, tau: float | None) -> tuple[SlotEntry, list[SlotEntry], dict]:
    """Check that the concept can go into `slot` (range, family and layers, a name no other slot has); returns
    its entry, every slot's entry with it in place, and the base K/V layers kept under `slot_root`."""
    if not 0 <= slot < count:
        raise PerfusionError(f"slot {slot} does not exist; this export has slots 0..{count - 1}.")
    concept = load_concept(concept_file)
    layers = slot_store.base_layers(slot_root)
    check_fits(concept, layers, family)
    others = [c for c in concepts_info if c["slot"] != slot]
    if concept.name in {c["name"] for c in others}:
        raise PerfusionError(f"concept {concept.name!r} already occupies another slot of this export.")
    (resolved,) = resolve([(concept, strength)], beta=beta, tau=tau)
    entry = SlotEntry(slot, concept, resolved.strength, resolved.beta, resolved.tau)
    return entry, sorted(slot_store.load_entries(slot_root, others) + [entry], key=lambda e: e.slot), layers


def rewrite(folder: Path, writes: dict[str, dict[str, torch.Tensor]], entry: SlotEntry, slot_root: Path) -> None:
    """Write each changed ONNX file (`writes`: path relative to `folder` -> initializers) and the slot's concept
    file (kept under `slot_root`) beside the originals, then rename them over them: a failure changes nothing."""
    scratch = folder / ".refit"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        for rel, tensors in writes.items():
            onnx_io.replace_initializers(folder / rel, tensors, scratch / rel)
        slot_store.store_concept(scratch, entry)
        for rel in writes:
            for name in (Path(rel).name, onnx_io.data_name(Path(rel))):
                os.replace(scratch / Path(rel).parent / name, folder / Path(rel).parent / name)
        os.replace(slot_store.slot_file(scratch, entry.slot), slot_store.slot_file(slot_root, entry.slot))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _slot_tokens(info: dict, slot: int) -> dict:
    return next(s for s in info["tokens"]["slots"] if s["slot"] == slot)


def token_rows(folder: Path, info: dict, entry: SlotEntry, part: str = "text_encoder",
                encoder: str | None = None) -> dict[str, torch.Tensor]:
    """The token table of text encoder `part` with the slot's rows replaced (zeros past the concept's vectors)."""
    path = folder / info["files"][part]
    model = onnx_io.load(path)
    name = next(n for n in model.graph.initializers if n.endswith(TOKEN_TABLE_SUFFIX))
    table = torch.from_numpy(np.array(model.graph.initializers[name].const_value.numpy()))
    embeddings = entry.concept.embeddings
    emb = embeddings[encoder] if encoder is not None else embeddings[next(iter(embeddings))]
    s = _slot_tokens(info, entry.slot)
    start = s["ids"][0]
    if emb.shape[0] > s["rows"]:
        raise PerfusionError(f"concept {entry.concept.name!r} has {emb.shape[0]} vectors; slot {entry.slot} holds "
                             f"{s['rows']}. Re-export with this concept among the --concept files.")
    table[start:start + s["rows"]] = 0
    table[start:start + emb.shape[0]] = emb.to(table.dtype)
    return {name: table}


def _retoken(folder: Path, info: dict, entry: SlotEntry) -> None:
    s = _slot_tokens(info, entry.slot)
    n = next(iter(entry.concept.embeddings.values())).shape[0]
    start = s["ids"][0]
    slot = tokens.TokenSlot(entry.slot, entry.concept.name, tokens.triggers_for(entry.concept.name, entry.slot, n),
                            list(range(start, start + n)), s["rows"])
    for part in info["tokens"].get("encoders") or {"text_encoder": None}:
        tokens.rename_tokens(folder / part.replace("text_encoder", "tokenizer"), dict(tokens.row_tokens(slot)))
    s.update(name=slot.name, triggers=slot.triggers, ids=slot.ids)
    for c in info["concepts"]:
        if c["slot"] == entry.slot:
            c.update(triggers=slot.triggers, token_ids=slot.ids)
