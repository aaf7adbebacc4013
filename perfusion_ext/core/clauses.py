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
    firsts = first_tags(segments, embeddings)
    if len(firsts) < 2:
        return full
    hidden = full.hidden.clone()
    starts = [min(full.concept_positions[0][name]) for _, name in firsts] + [hidden.shape[1]]
    for i in range(1, len(firsts)):
        before = firsts[i][0]
        variant = [dataclasses.replace(s, name=s.name + SUPERCLASS_SUFFIX)
                   if isinstance(s, ConceptTag) and s.name in embeddings and index < before else s
                   for index, s in enumerate(segments)]
        stand_ins = {name + SUPERCLASS_SUFFIX: stand_in(encoder, superclasses[name], embeddings[name])
                     for _, name in firsts[:i]}
        clause = encoder.encode([variant], {**embeddings, **stand_ins}, hidden.shape[1])
        hidden[:, starts[i]:starts[i + 1]] = clause.hidden[:, starts[i]:starts[i + 1]]
    return dataclasses.replace(full, hidden=hidden)


def first_tags(segments: list, embeddings: dict) -> list[tuple[int, str]]:
    """(segment index, name) of each concept's first tag, in prompt order (tags without vectors skipped)."""
    seen, out = set(), []
    for index, s in enumerate(segments):
        if isinstance(s, ConceptTag) and s.name in embeddings and s.name not in seen:
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
