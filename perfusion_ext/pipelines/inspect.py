"""The gate inspector: for every token of an encoded prompt, each active concept's similarity s and gate g.

It explains why a concept did or did not appear: its gate should be open on its own token and shut on
every other one. A gate higher on another token than on the concept's own (a colour word, padding)
is the leak that makes a concept bleed into the rest of the prompt; the report warns about it.
"""
from __future__ import annotations

import torch

from ..core import families
from ..core.concept import Concept
from ..core.gated_edit import gate_edit
from ..core.text import PromptEncoder
from .generate import concept_entries, prepare_prompt


@torch.no_grad()
def inspect_prompt(pipe, prompt: str, concepts_dir=None, loaded: dict[str, Concept] | None = None) -> dict:
    """{"tokens": [{"index", "text", "s": {NAME: float}, "gate": {NAME: float}}],
    "concepts": {NAME: {"beta", "tau"}}, "warnings": [...]} for the prompt's conditional encoding."""
    prepared = prepare_prompt(prompt, concepts_dir, loaded)
    warnings = list(prepared.warnings)
    entries = concept_entries(prepared)
    names = [concept.name for concept, *_ in entries]
    settings = {concept.name: (concept.beta if beta is None else beta, concept.tau if tau is None else tau)
                for concept, _, beta, tau in entries}
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    embeddings = {tag.name: concept.embeddings[families.get(concept.base_family).encoder_names[0]]
                  for tag, concept in prepared.concepts}
    encoded = encoder.encode([prepared.segments], embeddings)
    hidden = encoded.hidden[0].double().cpu()
    if entries:
        edit = gate_edit([(concept, *settings[concept.name]) for concept, *_ in entries])
        similarity = edit.similarity(hidden)
        gate = edit.gate(similarity)
    else:
        similarity = gate = torch.zeros(hidden.shape[0], 0, dtype=torch.float64)
    own = {i: f"<perfusion:{name}>" for name, where in encoded.concept_positions[0].items() for i in where}
    tokens = []
    for i, token_id in enumerate(encoded.input_ids[0].tolist()):
        text = own.get(i) or pipe.tokenizer.convert_ids_to_tokens(token_id).replace("</w>", "")
        tokens.append({"index": i, "text": text,
                       "s": {n: float(similarity[i, k]) for k, n in enumerate(names)},
                       "gate": {n: float(gate[i, k]) for k, n in enumerate(names)}})
    for k, name in enumerate(names):
        mine = encoded.concept_positions[0].get(name, [])
        others = [i for i in range(len(tokens)) if i not in mine]
        if mine and others:
            worst = max(others, key=lambda i: gate[i, k])
            if gate[worst, k] > max(gate[i, k] for i in mine):
                warnings.append(f"<perfusion:{name}>'s gate is higher on token {worst} ({tokens[worst]['text']!r}, "
                                f"g={float(gate[worst, k]):.2f}) than on its own token "
                                f"(g={float(max(gate[i, k] for i in mine)):.2f}): the concept leaks there")
    concepts = {n: {"beta": float(settings[n][0]), "tau": float(settings[n][1])} for n in names}
    return {"tokens": tokens, "concepts": concepts, "warnings": warnings}


def mean_leak(report: dict, name: str) -> float:
    """Mean gate of concept `name` over every token that is not its own (padding included)."""
    others = [t["gate"][name] for t in report["tokens"] if t["text"] != f"<perfusion:{name}>"]
    return sum(others) / max(1, len(others))


def format_report(report: dict, max_tokens: int | None = None) -> str:
    """A plain-text table: one row per token up to the last non-padding one, s and g per concept."""
    names = list(report["concepts"])
    tokens = report["tokens"]
    last = max((t["index"] for t in tokens if t["text"] not in ("<|endoftext|>",)), default=0) + 1
    shown = tokens[:min(len(tokens), max_tokens or last + 1)]
    header = f"{'#':>3}  {'token':<24}" + "".join(f"{'s ' + n:>14}{'g ' + n:>14}" for n in names)
    lines = [header]
    for t in shown:
        lines.append(f"{t['index']:>3}  {t['text'][:24]:<24}"
                     + "".join(f"{t['s'][n]:>14.3f}{t['gate'][n]:>14.3f}" for n in names))
    for n, c in report["concepts"].items():
        lines.append(f"{n}: β={c['beta']:g} τ={c['tau']:g}, mean gate on other tokens {mean_leak(report, n):.3f}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
