"""Clause-wise encoding: each concept's clause read as if the concepts before it were their superclass words.

Why: the text encoder is causal, so every token after a learned concept word carries that word's context.
In "a <house> on the left, a <lollipop> on the right" the lollipop's clause is encoded after the learned
house, a context none of the lollipop's training captions had, and measured on the toy world the lollipop
drawn second then takes the house's colours (0 of 8 images), while after a plain word it is drawn. So, for a
prompt with several concepts, the tokens from each further concept's first tag up to the next concept's
first tag (the last one: to the end, padding included) are taken from an encoding of the prompt in which
every tag before that clause stands for its concept's superclass word. The first clause and everything
before it are the prompt's own. With one concept nothing changes.

The superclass word enters as one vector per concept vector (the mean of the word's token embeddings; for a
one-token word, the word itself), so every encoding has the same token positions and the clauses splice
without any realignment. The pooled output (SDXL) stays the prompt's own.
"""
from __future__ import annotations

import dataclasses

from .tags import ConceptTag
from .text import EncodedPrompts

SUPERCLASS_SUFFIX = "\x00superclass"  # a name no tag can carry: the stand-in for an earlier concept


def encode_clauses(encoder, segments: list, embeddings: dict, superclasses: dict[str, str],
                   min_tokens: int = 0) -> EncodedPrompts:
    """One prompt's encoding (as `encoder.encode([segments], embeddings, min_tokens)`), clause by clause.

    `superclasses`: concept name -> its superclass word. `encoder`: a PromptEncoder or MultiPromptEncoder."""
    full = encoder.encode([segments], embeddings, min_tokens)

    def encode_variant(variant, earlier):
        stand_ins = {stand_in_name(name): stand_in(encoder, superclasses[name], embeddings[name]) for name in earlier}
        return encoder.encode([variant], {**embeddings, **stand_ins}, full.hidden.shape[1]).hidden

    hidden = splice_clauses(full.hidden, segments, embeddings, full.concept_positions[0], encode_variant)
    return dataclasses.replace(full, hidden=hidden)


def splice_clauses(hidden, segments: list, known, positions: dict[str, list[int]], encode_variant):
    """`hidden` [B, T, d] (the prompt's own encoding) with every further concept's clause taken from
    `encode_variant(variant segments, names of the concepts before it)` [B, ≥ T, d] (see `clause_variants`);
    `positions`: each concept's token positions in `hidden`. Unchanged (the same tensor) with one concept."""
    variants = clause_variants(segments, known)
    if not variants:
        return hidden
    out = hidden.clone()
    starts = [min(positions[name]) for name in variants[-1][1] + [variants[-1][2]]]
    for (variant, earlier, _), (start, end) in zip(variants, clause_spans(starts, out.shape[1])):
        out[:, start:end] = encode_variant(variant, earlier)[:, start:end]
    return out


def clause_variants(segments: list, known) -> list[tuple[list, list[str], str]]:
    """For every concept after the first (concepts: tags whose name is in `known`, in order of first tag):
    (the segments with every tag before its first tag renamed to `stand_in_name` of its concept, the concepts
    before it, its name). Whoever encodes a variant maps each stand-in name to the superclass word's vectors."""
    firsts = first_tags(segments, known)
    out = []
    for i in range(1, len(firsts)):
        before = firsts[i][0]
        variant = [dataclasses.replace(s, name=stand_in_name(s.name))
                   if isinstance(s, ConceptTag) and s.name in known and index < before else s
                   for index, s in enumerate(segments)]
        out.append((variant, [name for _, name in firsts[:i]], firsts[i][1]))
    return out


def stand_in_name(name: str) -> str:
    """The name under which a variant's tag stands for the concept's superclass word."""
    return name + SUPERCLASS_SUFFIX


def clause_spans(starts: list[int], length: int) -> list[tuple[int, int]]:
    """[start, end) token range of every concept's clause after the first, from the first token position of
    each concept in prompt order: up to the next concept's first token, the last one up to `length`."""
    bounds = list(starts) + [length]
    return [(bounds[i], bounds[i + 1]) for i in range(1, len(starts))]


def first_tags(segments: list, known) -> list[tuple[int, str]]:
    """(segment index, name) of each concept's first tag, in prompt order (names not in `known` skipped)."""
    seen, out = set(), []
    for index, s in enumerate(segments):
        if isinstance(s, ConceptTag) and s.name in known and s.name not in seen:
            seen.add(s.name)
            out.append((index, s.name))
    return out


def stand_in(encoder, word: str, embedding):
    """The superclass word as vectors shaped like the concept's (per encoder where the concept has several)."""
    def rows(part, vectors):
        return part.word_vector(word).to(vectors).expand(vectors.shape[0], -1)

    if isinstance(embedding, dict):
        return {part.name: rows(part, part.vectors(embedding)) for part in encoder.parts}
    (part,) = encoder.parts
    return rows(part, embedding)
