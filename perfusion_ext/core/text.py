"""Encode prompts in which concept tags stand for learned token embeddings (diffusers CLIP encoders).

Each concept vector gets a placeholder token id just past the vocabulary (vocab_size + k), the id the
exporter later gives it in the exported token table. While encoding, a pre-hook on the token
embedding swaps placeholder ids for a valid id and a forward hook writes the concept vectors into
their rows, so gradients reach the vectors (training) and the text encoder itself is never modified.
Prompts longer than one CLIP window are encoded in chunks of 75 tokens (BOS + 75 + EOS each) and
concatenated along the token axis, as AUTOMATIC1111 does.

A family with several text encoders (SDXL: CLIP-L ‖ OpenCLIP-bigG) encodes with `MultiPromptEncoder`:
each encoder reads the same token ids, the UNet's context is their hidden states concatenated along the
width, and the pooled output (`text_embeds`) comes from the encoder the family names, at the first EOS
of the first chunk, computed here rather than by the text model (a legacy `eos_token_id = 2` config
pools at argmax(input_ids), which a concept id past the vocabulary would take over).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from .tags import ConceptTag

CHUNK = 75


@dataclasses.dataclass
class EncodedPrompts:
    hidden: torch.Tensor  # [B, 77 * chunks, d]
    concept_positions: list[dict[str, list[int]]]  # per prompt: concept name -> token positions
    input_ids: torch.Tensor | None = None  # [B, 77 * chunks]; concept vectors as ids >= vocab_size
    pooled: torch.Tensor | None = None  # [B, d_pooled]: the projected pooled output, for UNets that read it


LAYERS = ("last", "penultimate")


class TokenWindows:
    """A prompt's token ids in CLIP windows (BOS + 75 + EOS, padded), concept tags as their placeholder ids.

    Needs only the tokenizer: the PyTorch encoders run their text encoder on these windows, and the serving
    pipeline sends them to an exported one, so both read the same ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def words(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids if text.strip() else []

    def tokenize(self, segments, slots: dict[str, list[int]]) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids (no BOS/EOS) for str and ConceptTag segments; concept tags become their slot ids."""
        ids, where = [], {}
        for seg in segments:
            if isinstance(seg, ConceptTag):
                slot = slots.get(seg.name)
                if slot is None:
                    continue
                where.setdefault(seg.name, []).extend(range(len(ids), len(ids) + len(slot)))
                ids.extend(slot)
            else:
                ids.extend(self.words(seg))
        return ids, where

    def chunked(self, ids: list[int], n_chunks: int) -> list[int]:
        out = []
        for c in range(n_chunks):
            body = ids[c * CHUNK:(c + 1) * CHUNK]
            out += [self.bos] + body + [self.eos] + [self.pad] * (CHUNK - len(body))
        return out

    @staticmethod
    def position_in_chunks(p: int) -> int:
        chunk, offset = divmod(p, CHUNK)
        return chunk * (CHUNK + 2) + 1 + offset

    def windows(self, prompts: list, slots: dict[str, list[int]], min_tokens: int = 0
                ) -> tuple[torch.Tensor, list[dict[str, list[int]]]]:
        """([B, 77 * chunks] ids, per prompt: concept name -> token positions); at least `min_tokens` tokens."""
        tokenized = [self.tokenize(p if isinstance(p, list) else [p], slots) for p in prompts]
        n_chunks = max(1, -(-min_tokens // (CHUNK + 2)), max((len(ids) + CHUNK - 1) // CHUNK for ids, _ in tokenized))
        input_ids = torch.tensor([self.chunked(ids, n_chunks) for ids, _ in tokenized])
        positions = [{name: [self.position_in_chunks(p) for p in ps] for name, ps in where.items()}
                     for _, where in tokenized]
        return input_ids, positions


class PromptEncoder:
    """One text encoder. `layer`: the hidden state the UNet reads ("last": after the final LayerNorm;
    "penultimate": the second-to-last layer's output, as SDXL uses). `name`: the family's name for this
    encoder (`clip_l`, …): embeddings given per encoder pick theirs by it. `pooled`: also return the
    projected pooled output."""

    def __init__(self, tokenizer, text_encoder, layer: str = "last", name: str | None = None, pooled: bool = False):
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.layer, self.name, self.pooled = layer, name, pooled
        self.vocab_size = text_encoder.get_input_embeddings().num_embeddings
        self.token_windows = TokenWindows(tokenizer)
        self.eos = self.token_windows.eos

    @property
    def parts(self) -> list[PromptEncoder]:
        return [self]

    def vectors(self, embedding) -> torch.Tensor:
        """This encoder's vectors of a concept: the tensor itself, or its entry in a per-encoder dict."""
        if not isinstance(embedding, dict):
            return embedding
        return embedding[self.name] if self.name is not None else next(iter(embedding.values()))

    def word_vector(self, word: str) -> torch.Tensor:
        """[1, d_tok]: the mean input embedding of the word's tokens (the word itself for a one-token word)."""
        ids = self.token_windows.words(word)
        if not ids:
            raise ValueError(f"{word!r} has no tokens")
        table = self.text_encoder.get_input_embeddings().weight
        return table[torch.tensor(ids, device=table.device)].detach().mean(0, keepdim=True)

    def slots_for(self, embeddings: dict) -> tuple[dict[str, list[int]], torch.Tensor | None]:
        """Placeholder ids per concept name and the stacked vectors they stand for."""
        slots, vectors, next_id = {}, [], self.vocab_size
        for name, emb in embeddings.items():
            emb = self.vectors(emb)
            slots[name] = list(range(next_id, next_id + emb.shape[0]))
            next_id += emb.shape[0]
            vectors.append(emb)
        return slots, (torch.cat(vectors) if vectors else None)

    def encode(self, prompts: list, embeddings: dict | None = None, min_tokens: int = 0) -> EncodedPrompts:
        """prompts: lists of segments (str / ConceptTag). embeddings: concept name -> [n_vectors, d_tok], or
        concept name -> {encoder name: [n_vectors, d_tok]}.

        `min_tokens` pads to at least that many output tokens (so cond and uncond chunk counts match).
        """
        slots, table = self.slots_for(embeddings or {})
        input_ids, positions = self.token_windows.windows(prompts, slots, min_tokens)
        n_chunks = input_ids.shape[1] // (CHUNK + 2)
        device = self.text_encoder.device
        chunks, pooled = [], None
        with self.placeholder_embeddings(table):
            for c in range(n_chunks):
                window = input_ids[:, c * (CHUNK + 2):(c + 1) * (CHUNK + 2)].to(device)
                if self.layer == "last" and not self.pooled:
                    chunks.append(self.text_encoder(window).last_hidden_state)
                    continue
                out = self.text_encoder(window, output_hidden_states=True)
                chunks.append(out.last_hidden_state if self.layer == "last" else out.hidden_states[-2])
                if pooled is None and self.pooled:  # A1111 and diffusers pool the first window only
                    pooled = self._pool(out.last_hidden_state, window)
        return EncodedPrompts(torch.cat(chunks, dim=1), positions, input_ids, pooled)

    def _pool(self, last_hidden: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm state at each row's first EOS, through the text projection when there is one."""
        first_eos = (window == self.eos).int().argmax(dim=1)
        pooled = last_hidden[torch.arange(window.shape[0], device=last_hidden.device), first_eos]
        projection = getattr(self.text_encoder, "text_projection", None)
        return projection(pooled) if projection is not None else pooled

    @contextlib.contextmanager
    def placeholder_embeddings(self, table: torch.Tensor | None):
        """While active, ids >= vocab_size embed as rows of `table` (with gradient)."""
        if table is None:
            yield
            return
        embedding = self.text_encoder.get_input_embeddings()
        vocab = self.vocab_size
        state = {}

        def pre_hook(module, args):
            ids = args[0]
            state["mask"] = ids >= vocab
            state["index"] = (ids - vocab).clamp(min=0)
            return (torch.where(state["mask"], torch.zeros_like(ids), ids),)

        def post_hook(module, args, output):
            rows = table.to(device=output.device, dtype=output.dtype)[state["index"]]
            return torch.where(state["mask"][..., None], rows, output)

        handles = [embedding.register_forward_pre_hook(pre_hook), embedding.register_forward_hook(post_hook)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class MultiPromptEncoder:
    """Several text encoders over the same token ids: hidden states concatenated along the width (SDXL's
    2048-wide context from CLIP-L 768 ‖ OpenCLIP-bigG 1280), the pooled output from the encoder that has one."""

    def __init__(self, encoders: list[PromptEncoder]):
        self.encoders = list(encoders)
        self.tokenizer = self.encoders[0].tokenizer  # every encoder of a family tokenizes alike (CLIP's BPE)
        self.text_encoder = self.encoders[0].text_encoder
        self.vocab_size = self.encoders[0].vocab_size  # concept ids start here in every encoder

    @property
    def parts(self) -> list[PromptEncoder]:
        return list(self.encoders)

    def encode(self, prompts: list, embeddings: dict | None = None, min_tokens: int = 0) -> EncodedPrompts:
        """As `PromptEncoder.encode`; `embeddings` maps a concept to {encoder name: [n_vectors, d_tok]}."""
        results = [enc.encode(prompts, embeddings, min_tokens) for enc in self.encoders]
        first = results[0]
        for other in results[1:]:
            if other.hidden.shape[1] != first.hidden.shape[1] or other.concept_positions != first.concept_positions:
                raise ValueError("the text encoders tokenized the prompt differently; their tokenizers must agree")
        pooled = next((r.pooled for r in results if r.pooled is not None), None)
        return EncodedPrompts(torch.cat([r.hidden for r in results], dim=-1), first.concept_positions,
                              first.input_ids, pooled)
