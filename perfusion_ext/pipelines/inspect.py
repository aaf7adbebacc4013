"""The gate inspector: for every token of an encoded prompt, each active concept's similarity s and gate g.

It explains why a concept did or did not appear: its gate should be open on its own token and shut on
every other one. A gate higher on another token than on the concept's own (a colour word, padding)
is the leak that makes a concept bleed into the rest of the prompt, and a gate below one half on its own
token means it will hardly show; the report warns about both, and so does every generation.
"""
from __future__ import annotations

import torch

from ..core.concept import Concept
from .encoding import prompt_encoder
from .generate import encode_prepared, encoding_report, prepare_prompt


@torch.no_grad()
def inspect_prompt(pipe, prompt: str, concepts_dir=None, loaded: dict[str, Concept] | None = None,
                   competitive_gates: bool = False, clause_encoding: bool = False) -> dict:
    """{"tokens": [{"index", "text", "s": {NAME: float}, "gate": {NAME: float}}],
    "concepts": {NAME: {"beta", "tau"}}, "warnings": [...]} for the prompt's conditional encoding; the gates
    as `generate` with the same `competitive_gates` and `clause_encoding` applies them."""
    prepared = prepare_prompt(prompt, concepts_dir, loaded)
    encoder = prompt_encoder(pipe)  # SDXL: both encoders, the 2048-wide context the UNet reads
    report = encoding_report(pipe, encoder, encode_prepared(encoder, prepared, clause_encoding), prepared,
                             competitive_gates)
    report["warnings"] = list(prepared.warnings) + report["warnings"]
    return report


def mean_leak(report: dict, name: str) -> float:
    """Mean gate of concept `name` over every token that is not its own (padding included)."""
    others = [t["gate"][name] for t in report["tokens"] if t["text"] != f"<perfusion:{name}>"]
    return sum(others) / max(1, len(others))


def format_report(report: dict, max_tokens: int | None = None) -> str:
    """A plain-text table: one row per token up to the last non-padding one, s and g per concept."""
    names = list(report["concepts"])
    tokens = report["tokens"]
    last = max((t["index"] for t in tokens if t["text"] != "<end>"), default=0) + 1
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
