"""The prompt tag grammar, shared by the WebUI and the CLI: `<perfusion:NAME[:STRENGTH][:beta=B][:tau=T]>`.

A tag stands for the concept word at its position ("a photo of <perfusion:teddy> on the beach") and
activates the concept's K/V edits. Malformed tags are reported as warnings, never fatal: the
generation goes on without that concept.
"""
from __future__ import annotations

import dataclasses
import re

TAG_RE = re.compile(r"<perfusion:([^>]*)>", re.IGNORECASE)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class ConceptTag:
    name: str
    strength: float = 1.0
    beta: float | None = None
    tau: float | None = None
    start: int = 0  # span of the tag in the prompt
    end: int = 0


@dataclasses.dataclass
class ParsedPrompt:
    segments: list  # str pieces and ConceptTag objects, in prompt order
    tags: list[ConceptTag]
    warnings: list[str]

    def text_with(self, replace) -> str:
        """The prompt with every tag replaced by replace(tag) (malformed tags are dropped)."""
        return "".join(s if isinstance(s, str) else replace(s) for s in self.segments)


def parse_tag_body(body: str) -> ConceptTag:
    """Parse `NAME[:STRENGTH][:beta=B][:tau=T]`; raises ValueError with a message for the user."""
    parts = [p.strip() for p in body.split(":")]
    name = parts[0]
    if not NAME_RE.match(name):
        raise ValueError(f"invalid concept name {name!r} (letters, digits, space, _ . - only)")
    strength, options = 1.0, {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        try:
            if not eq:
                strength = float(part)
                continue
            if key not in ("beta", "tau", "strength", "w"):
                raise ValueError(f"unknown option {key!r} (use beta=, tau=)")
            number = float(value)
        except ValueError as exc:
            raise ValueError(f"bad option {part!r} in <perfusion:{body}>: {exc}") from None
        if key in ("strength", "w"):
            strength = number
        else:
            options[key] = number
    if "tau" in options and options["tau"] <= 0:
        raise ValueError(f"tau must be > 0 in <perfusion:{body}>")
    return ConceptTag(name, strength, options.get("beta"), options.get("tau"))


def parse_prompt(prompt: str) -> ParsedPrompt:
    segments, tags, warnings = [], [], []
    pos = 0
    for match in TAG_RE.finditer(prompt):
        segments.append(prompt[pos:match.start()])
        try:
            tag = dataclasses.replace(parse_tag_body(match.group(1)), start=match.start(), end=match.end())
        except ValueError as exc:
            warnings.append(f"ignored {match.group(0)}: {exc}")
        else:
            segments.append(tag)
            tags.append(tag)
        pos = match.end()
    segments.append(prompt[pos:])
    return ParsedPrompt([s for s in segments if s != ""], tags, warnings)


def format_tag(name: str, strength: float = 1.0, beta: float | None = None, tau: float | None = None) -> str:
    parts = [name] + ([f"{strength:g}"] if strength != 1.0 or beta is not None or tau is not None else [])
    parts += [f"beta={beta:g}"] if beta is not None else []
    parts += [f"tau={tau:g}"] if tau is not None else []
    return "<perfusion:" + ":".join(parts) + ">"
