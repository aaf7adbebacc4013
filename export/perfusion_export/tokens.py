"""Concept token ids, the rows they add to the token table, and the exported tokenizer's trigger words.

Concept vectors get ids just past the vocabulary, in slot order, as `PromptEncoder` gives them in
torch (vocab_size + k for one vector per concept), so an id means the same thing in both. With
`--slots N` every slot reserves the same number of rows, so a refit never changes a table's shape;
an empty slot's rows are zero and its trigger is a placeholder (`<perfusion-slot-K>`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from transformers import AddedToken

from perfusion_ext.core import families

from .bake import SlotEntry


@dataclasses.dataclass
class TokenSlot:
    slot: int
    name: str | None  # concept name, None when empty
    triggers: list[str]  # one added token per vector: <name>, <name>_1, …
    ids: list[int]
    n_rows: int  # rows of the token table this slot owns (≥ len(ids))


def triggers_for(name: str | None, slot: int, n_vectors: int) -> list[str]:
    base = f"<{name}>" if name is not None else f"<perfusion-slot-{slot}>"
    return [base] + [f"{base}_{j}" for j in range(1, n_vectors)]


def token_layout(vocab_size: int, dim: int, family: str, entries: list[SlotEntry], n_slots: int,
                 fixed_rows: int | None, encoder: str | None = None) -> tuple[list[TokenSlot], torch.Tensor]:
    """Slots' ids and the rows to append to `encoder`'s token table (default: the family's first encoder).
    fixed_rows: rows per slot (slot mode) or None (as many as vectors). Every encoder of a family gets the
    same ids (their vocabularies are CLIP's), each with its own vectors."""
    encoder = encoder or families.get(family).encoder_names[0]
    by_slot = {e.slot: e for e in entries}
    slots, rows, next_id = [], [], vocab_size
    for k in range(n_slots):
        entry = by_slot.get(k)
        emb = entry.concept.embeddings[encoder].float() if entry else torch.zeros(0, dim)
        n_rows = fixed_rows if fixed_rows is not None else emb.shape[0]
        block = torch.zeros(n_rows, dim)
        block[:emb.shape[0]] = emb
        n_used = emb.shape[0] if entry else n_rows
        slots.append(TokenSlot(k, entry.concept.name if entry else None,
                               triggers_for(entry.concept.name if entry else None, k, n_used),
                               list(range(next_id, next_id + n_used)), n_rows))
        rows.append(block)
        next_id += n_rows
    table = torch.cat(rows) if rows else torch.zeros(0, dim)
    return slots, table


def row_tokens(slot: TokenSlot) -> list[tuple[int, str]]:
    """(id, added token) for every row a slot owns; rows past its vectors get a padding token."""
    pads = [f"<perfusion-slot-{slot.slot}>_pad{j}" for j in range(len(slot.ids), slot.n_rows)]
    out = list(zip(slot.ids, slot.triggers))
    start = slot.ids[0] if slot.ids else None
    return out + [(start + len(slot.ids) + j, p) for j, p in enumerate(pads)]


def write_tokenizer(tokenizer, tokens: list[tuple[int, str]], folder: Path) -> None:
    """Save the tokenizer with one added token per concept row, at exactly the rows' ids."""
    tok = copy.deepcopy(tokenizer)
    for expect, token in sorted(tokens):
        tok.add_tokens([AddedToken(token, normalized=False, special=False)])
        got = tok.convert_tokens_to_ids(token)
        if got != expect:
            raise RuntimeError(f"tokenizer gave {token!r} id {got}, expected {expect}")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        data.pop(key, None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def rename_tokens(folder: Path, renames: dict[int, str]) -> None:
    """Refit: give existing added-token ids new trigger words (tokenizer.json edited in place)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        if token["id"] in renames:
            token["content"] = renames[token["id"]]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
