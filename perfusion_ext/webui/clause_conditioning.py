"""Clause-wise encoding inside the WebUI's own conditioning, free of WebUI imports (unit-tested in CI).

The same rule as `core.clauses` (see there for why): in a prompt with several concepts, the tokens from each
further concept's first word up to the next concept's first word (the last one: to the end, padding
included) are taken from an encoding of the prompt in which every concept word before that clause is its
stand-in word, an embedding holding the concept's superclass word (the mean of its token embeddings, as
many vectors as the concept has). The WebUI tokenizes, chunks and weights (emphasis) the variant exactly as
the prompt, since the stand-in has the concept's vector count, so the clauses splice position by position.

`ClauseConditioning` wraps the model's `get_learned_conditioning(texts)` while a pass is active: every text
with two or more concept words is encoded once more per further concept (all variants of a call in one
batch), the rest go through untouched. The WebUI's SDXL output (a dict) keeps its pooled `vector`.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable

from ..core.clauses import clause_spans

log = logging.getLogger("perfusion")
STAND_IN_PREFIX = "perfusionsuperclass"


def stand_in_word(concept_word: str) -> str:
    """The word whose embedding is the concept's superclass (one run of letters, like the concept word)."""
    return STAND_IN_PREFIX + concept_word.removeprefix("perfusion")


def variant_text(text: str, earlier_words: list[str], before: int) -> str:
    """`text` with each of `earlier_words` before character `before` replaced by its stand-in word."""
    head = text[:before]
    for word in earlier_words:
        head = re.sub(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", stand_in_word(word), head)
    return head + text[before:]


def clause_variants(text: str, words: list[str], positions: dict[str, list[int]]) -> list[tuple[str, int]]:
    """(variant text, first token of its clause) for every concept after the first one in `text`.

    `words`: the concept words of this pass; `positions`: the WebUI's token positions of each embedding word in
    the text's conditioning (the first is where the clause starts)."""
    present = sorted((min(positions[w]), w) for w in words if positions.get(w))
    out = []
    for i in range(1, len(present)):
        start, word = present[i]
        match = re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text)
        if match is None:  # the word reached the conditioning without being written (cannot happen in A1111)
            continue
        out.append((variant_text(text, [w for _, w in present[:i]], match.start()), start))
    return out


class ClauseConditioning:
    """`get_learned_conditioning` with clause-wise encoding for the concept `words` of a pass.

    `original(texts)`: the model's own function; `layout(text)`: {embedding word: token positions} in the
    WebUI's conditioning of `text`."""

    def __init__(self, original: Callable, layout: Callable, words: list[str]):
        self.original, self.layout, self.words = original, layout, list(words)
        self.applied = 0  # texts whose clauses were re-encoded (for the generation info and the tests)

    def __call__(self, texts):
        out = self.original(texts)
        try:
            return self._splice(texts, out)
        except Exception:
            log.warning("Perfusion: clause-wise encoding skipped for this prompt", exc_info=True)
            return out

    def _splice(self, texts, out):
        plans = [clause_variants(text, self.words, self.layout(text)) if sum(w in text for w in self.words) > 1
                 else [] for text in texts]
        variants = [v for plan in plans for v, _ in plan]
        if not variants:
            return out
        batch = copy.copy(texts)  # keeps the WebUI's attributes of the batch (size, negative prompt, ...)
        batch[:] = variants
        encoded = _hidden(self.original(batch))
        hidden, k = _hidden(out).clone(), 0
        for row, plan in enumerate(plans):
            starts = [start for _, start in plan]
            spans = clause_spans([0] + starts, min(hidden.shape[1], encoded.shape[1]))
            for start, end in spans:
                hidden[row, start:end] = encoded[k, start:end].to(hidden)
                k += 1
        self.applied += sum(bool(plan) for plan in plans)
        return {**out, "crossattn": hidden} if isinstance(out, dict) else hidden


def _hidden(conditioning):
    """The per-token conditioning [B, T, d] (SD1/SD2: the tensor itself, SDXL: its 'crossattn')."""
    return conditioning["crossattn"] if isinstance(conditioning, dict) else conditioning
