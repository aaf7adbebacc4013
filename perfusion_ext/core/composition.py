"""Composition preview prompts: a prompt with several concepts as each concept alone and all together.

"Alone" keeps the prompt and replaces every other concept's tag by that concept's superclass word, so
the only difference between the panels is which edits are active; rendered at one seed and put side by
side, they show whether a concept keeps its look next to another (the joint projection at work) or
bleeds into it. The CLI (`pipelines.compose`) and the WebUI tab render them.
"""
from __future__ import annotations

from .concept import Concept
from .errors import PerfusionError
from .tags import parse_prompt


def compose_prompts(prompt: str, concepts: dict[str, Concept]) -> list[tuple[str, str]]:
    """(label, prompt) per concept alone, then ("together", prompt); `concepts` maps tag names to their files."""
    parsed = parse_prompt(prompt)
    names = list(dict.fromkeys(t.name for t in parsed.tags if t.name in concepts))
    if len(names) < 2:
        ignored = "".join(f" ({w})" for w in parsed.warnings)  # a malformed tag counts as no concept: say why
        raise PerfusionError("a composition preview needs at least two known concepts in the prompt, got "
                             f"{names or 'none'}.{ignored}")

    def alone(keep: str) -> str:
        return parsed.text_with(lambda tag: prompt[tag.start:tag.end] if tag.name == keep else concepts[tag.name].superclass)

    return [(name, alone(name)) for name in names] + [("together", prompt)]
