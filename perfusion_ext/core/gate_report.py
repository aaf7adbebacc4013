"""Per-token gates of active concepts, from an encoded prompt however it was encoded (torch only).

For every token e of the conditioning and every concept k: s_k(e) = (u_k · e) / (u_k · i*_k) and
g_k(e) = sigmoid((s_k(e) − β_k) / τ_k) — `core.gated_edit.gate_edit` computes both, exactly as the hooks
do. A gate higher on another token than on the concept's own is the leak that makes a concept bleed into
the rest of the prompt. The WebUI feeds this the conditioning it produced; `pipelines.inspect` does the
same for diffusers prompts.
"""
from __future__ import annotations

import torch

from .gated_edit import gate_edit

SPECIAL = {"<|startoftext|>": "<start>", "<|endoftext|>": "<end>", "<start_of_text>": "<start>",
           "<end_of_text>": "<end>"}


def token_label(text: str) -> str:
    text = SPECIAL.get(text, text)
    return text[:-4] if text.endswith("</w>") else text


@torch.no_grad()
def gate_report(hidden: torch.Tensor, concepts: list[tuple], texts: list[str],
                positions: dict[str, list[int]]) -> dict:
    """`hidden` [T, d]: one prompt's conditioning; `concepts`: (name, Concept, beta, tau); `texts`: a label per
    token (missing ones become `#i`); `positions`: each concept's own token indices.

    Returns {"tokens": [{"index", "text", "s": {NAME: float}, "gate": {NAME: float}}],
    "concepts": {NAME: {"beta", "tau"}}, "warnings": [...]} — the shape `perfusion inspect --json` prints."""
    hidden = hidden.detach().to("cpu", torch.float64)
    names = [name for name, *_ in concepts]
    if concepts:
        edit = gate_edit([(concept, beta, tau) for _, concept, beta, tau in concepts])
        similarity = edit.similarity(hidden)
        gate = edit.gate(similarity)
    else:
        similarity = gate = torch.zeros(hidden.shape[0], 0, dtype=torch.float64)
    own = {i: f"<perfusion:{name}>" for name, where in positions.items() for i in where}
    tokens = []
    for i in range(hidden.shape[0]):
        text = own.get(i) or (token_label(texts[i]) if i < len(texts) else f"#{i}")
        tokens.append({"index": i, "text": text,
                       "s": {n: float(similarity[i, k]) for k, n in enumerate(names)},
                       "gate": {n: float(gate[i, k]) for k, n in enumerate(names)}})
    report = {"tokens": tokens, "concepts": {n: {"beta": float(b), "tau": float(t)} for n, _, b, t in concepts},
              "warnings": []}
    report["warnings"] = leak_warnings(report, positions)
    return report


def leak_warnings(report: dict, positions: dict[str, list[int]]) -> list[str]:
    """One warning per concept whose gate is higher on another token than on its own."""
    out = []
    tokens = report["tokens"]
    for name in report["concepts"]:
        mine = [i for i in positions.get(name, []) if i < len(tokens)]
        others = [t for t in tokens if t["index"] not in mine]
        if not mine or not others:
            continue
        own = max(tokens[i]["gate"][name] for i in mine)
        worst = max(others, key=lambda t: t["gate"][name])
        if worst["gate"][name] > own:
            out.append(f"<perfusion:{name}>'s gate is higher on token {worst['index']} ({worst['text']!r}, "
                       f"g={worst['gate'][name]:.3f}) than on its own token (g={own:.3f}): the concept leaks there")
    return out


def gate_line(report: dict, positions: dict[str, list[int]], top: int = 3) -> str:
    """A compact line for the generation info: each concept's gate on its own token and the `top` highest
    elsewhere, e.g. `teddy: own 0.88, 'white' 0.31, '<end>' 0.05 | ring: own 0.79, ...`."""
    parts = []
    tokens = report["tokens"]
    for name in report["concepts"]:
        mine = [i for i in positions.get(name, []) if i < len(tokens)]
        own = max((tokens[i]["gate"][name] for i in mine), default=None)
        others, seen = [], set()  # the highest gate of each distinct token text (padding repeats one text)
        for t in sorted((t for t in tokens if t["index"] not in mine), key=lambda t: -t["gate"][name]):
            if t["text"] not in seen and len(others) < top:
                seen.add(t["text"])
                others.append(t)
        items = ([f"own {own:.2f}"] if own is not None else []) + [f"{t['text']!r} {t['gate'][name]:.2f}" for t in others]
        parts.append(f"{name}: " + ", ".join(items))
    return " | ".join(parts)
