"""Prompt glue for the WebUI, free of WebUI imports (unit-tested in CI).

The WebUI strips every `<name:...>` tag from the prompt before conditioning. A Perfusion tag stands
for the concept word at its position, so the prompts the WebUI is about to encode are rebuilt from
the raw ones with each tag replaced by a unique word under which the concept's learned embedding is
registered in the WebUI's textual-inversion database. The word contains a short hash of the
concept's tensors: a concept retrained under the same name gives a new word, so the WebUI's cached
conditioning (keyed by the prompt text) is never reused for it.
"""
from __future__ import annotations

import dataclasses
import re

from ..tags import TAG_RE, ConceptTag, parse_tag_body

INFOTEXT_KEY = "Perfusion hashes"
_LETTERS = "abcdefghijklmnop"  # hex digit -> letter, so the word is one run of letters for CLIP's tokenizer


def concept_word(name: str, tensor_sha256: str) -> str:
    """The prompt word that carries a concept's embedding, e.g. `perfusionteddyqkdafm`."""
    slug = re.sub(r"[^a-z]", "", name.lower())[:20]
    tail = "".join(_LETTERS[int(c, 16)] for c in tensor_sha256[:6].lower())
    return f"perfusion{slug}{tail}"


@dataclasses.dataclass
class Occurrence:
    tag: ConceptTag
    where: str  # "prompt", "negative prompt", "hires prompt", ...


@dataclasses.dataclass
class Collected:
    """Every Perfusion tag of a batch: first occurrence per name (case-insensitive), in prompt order."""

    tags: dict[str, ConceptTag]  # name as written -> tag (first occurrence wins)
    warnings: list[str]


def scan(prompt: str) -> tuple[list[ConceptTag], list[str]]:
    """Valid tags and warnings (malformed ones) of one prompt."""
    tags, warnings = [], []
    for match in TAG_RE.finditer(prompt or ""):
        try:
            tags.append(dataclasses.replace(parse_tag_body(match.group(1)), start=match.start(), end=match.end()))
        except ValueError as exc:
            warnings.append(f"ignored {match.group(0)}: {exc}")
    return tags, warnings


def collect(prompt_lists: dict[str, list[str]]) -> Collected:
    """Tags across every prompt of a batch. Differing options for one name keep the first, with a warning."""
    tags: dict[str, ConceptTag] = {}
    warnings: list[str] = []
    seen_warnings = set()
    for where, prompts in prompt_lists.items():
        for prompt in prompts or []:
            found, warns = scan(prompt)
            for w in warns:
                if w not in seen_warnings:
                    seen_warnings.add(w)
                    warnings.append(w)
            for tag in found:
                first = tags.get(tag.name)
                if first is None:
                    tags[tag.name] = tag
                elif (first.strength, first.beta, first.tau) != (tag.strength, tag.beta, tag.tau):
                    w = (f"<perfusion:{tag.name}> appears with different options in one batch; the hooks are shared "
                         f"by the whole batch, so the first ({_options(first)}) is used")
                    if w not in seen_warnings:
                        seen_warnings.add(w)
                        warnings.append(w)
    return Collected(tags, warnings)


def _options(tag: ConceptTag) -> str:
    parts = [f"strength {tag.strength:g}"]
    parts += [f"beta {tag.beta:g}"] if tag.beta is not None else []
    parts += [f"tau {tag.tau:g}"] if tag.tau is not None else []
    return ", ".join(parts)


def replace_tags(prompt: str, words: dict[str, str]) -> str:
    """Replace every Perfusion tag by its concept word (spaced); tags without a word are removed.

    Other extra-network tags (<lora:...>) are left for the WebUI to strip.
    """
    def sub(match):
        try:
            name = parse_tag_body(match.group(1)).name
        except ValueError:
            return ""
        word = words.get(name)
        return f" {word} " if word else ""

    return TAG_RE.sub(sub, prompt or "")


def format_hashes(hashes: dict[str, str]) -> str:
    """`teddy: 0123456789ab, dog: ...` (names lose ':' and ',' so the value parses back)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h[:12]}" for name, h in hashes.items())


def parse_hashes(text: str) -> dict[str, str]:
    out = {}
    for part in (text or "").split(","):
        name, sep, value = part.partition(":")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip().lower()
    return out


def remap_pasted(prompt: str, hashes: dict[str, str], resolve) -> str:
    """Rewrite tag names whose recorded hash belongs to a file with another name.

    `resolve(name, short_hash) -> name or None`: the name of the file to use (None: leave as is).
    """
    def sub(match):
        try:
            tag = parse_tag_body(match.group(1))
        except ValueError:
            return match.group(0)
        short = hashes.get(tag.name)
        if not short:
            return match.group(0)
        new = resolve(tag.name, short)
        if not new or new == tag.name:
            return match.group(0)
        body = match.group(1)
        return match.group(0).replace(body, new + body[len(body.split(":", 1)[0]):], 1)

    return TAG_RE.sub(sub, prompt or "")
