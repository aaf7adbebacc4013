"""The `perfusion` extra network: the WebUI calls activate/deactivate around every batch.

Thin: the logic is in activation.Activator; this file adapts it to the WebUI (its extra-network base
class, its textual-inversion database, its tag stripper, its UNet replacements, its warnings).
"""
from __future__ import annotations

import logging

import torch
from modules import devices, extra_networks, sd_hijack, sd_unet, shared
from modules.textual_inversion.textual_inversion import Embedding

from ..core import families
from ..core.errors import PerfusionError
from .activation import Activator

log = logging.getLogger("perfusion")


FORGE_TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def forge_text_engines(model) -> list:
    """Forge's text engines (each with its own embedding database), or [] outside Forge."""
    return [e for e in (getattr(model, name, None) for name in FORGE_TEXT_ENGINES) if hasattr(e, "embeddings")]


class WebuiEnv:
    def unet(self):
        if shared.sd_model is None:
            raise RuntimeError("no model loaded")
        forge = getattr(shared.sd_model, "forge_objects", None)
        if forge is not None:  # Forge: the UNet patcher is rebuilt around sampling, its model module is shared
            return forge.unet.model.diffusion_model
        return shared.sd_model.model.diffusion_model

    def register_embedding(self, word, concept):
        self.register_vectors(word, concept.embeddings, str(concept.path) if concept.path else word)

    def register_vectors(self, word, vectors, filename):
        """A textual-inversion embedding `word` with `vectors` ({encoder key: [n, d]}, one key per text encoder)."""
        vectors = {k: v.to(devices.device, dtype=torch.float32) for k, v in vectors.items()}
        vec = next(iter(vectors.values())) if len(vectors) == 1 else vectors
        embedding = Embedding(vec, word)
        first = next(iter(vectors.values()))
        embedding.vectors = int(first.shape[0])
        embedding.shape = sum(int(v.shape[-1]) for v in vectors.values())
        embedding.filename = filename
        embedding.shorthash = None  # recorded as "Perfusion hashes", not "TI hashes"
        engines = forge_text_engines(shared.sd_model)
        if engines:  # Forge: one database per text engine, each picks its encoder's vectors (clip_l, clip_g)
            for engine in engines:
                engine.embeddings.register_embedding_by_name(embedding, word)
            return
        sd_hijack.model_hijack.embedding_db.register_embedding_by_name(embedding, shared.sd_model, word)

    def unregister_embedding(self, word):
        engines = forge_text_engines(shared.sd_model)
        if engines:
            for engine in engines:
                if word in engine.embeddings.word_embeddings:
                    engine.embeddings.register_embedding_by_name(None, word)
            return
        db = sd_hijack.model_hijack.embedding_db
        if word in db.word_embeddings and shared.sd_model is not None:
            db.register_embedding_by_name(None, shared.sd_model, word)

    def strip_tags(self, prompt):
        return extra_networks.parse_prompt(prompt)[0]

    def unet_replacement(self):
        current = getattr(sd_unet, "current_unet", None)
        if current is None:
            return None
        option = getattr(current, "option", None)
        return getattr(option, "label", None) or type(current).__name__

    def superclass_vectors(self, concept):
        """The concept's superclass word as embedding vectors shaped like the concept's ({encoder key: [n, d]}): the
        mean of the word's token embeddings, from the WebUI's own text encoders (SDXL: both, side by side)."""
        if forge_text_engines(shared.sd_model):
            raise PerfusionError("clause-wise encoding is not available in Forge yet (A1111 only)")
        model = shared.sd_model.cond_stage_model
        with torch.no_grad():
            mean = model.encode_embedding_init_text(concept.superclass, 75).float().mean(0)
        out, offset = {}, 0
        # the WebUI concatenates its encoders in the family's order (SDXL: clip_l, then clip_g); a concept read from
        # its file lists them in the file's order (clip_g first), so the family's order is walked
        for key in families.get(concept.base_family).encoder_names:
            vectors = concept.embeddings[key]
            width = int(vectors.shape[-1])
            out[key] = mean[offset:offset + width].expand(vectors.shape[0], width).clone()
            offset += width
        if offset != mean.numel():
            raise PerfusionError(f"the text encoders give {mean.numel()} numbers per token, the concept {offset}")
        return out

    def wrap_conditioning(self, make):
        """Replace the model's `get_learned_conditioning` by `make(original)`; returns the function that restores it."""
        model = shared.sd_model
        had_own = "get_learned_conditioning" in vars(model)
        original = model.get_learned_conditioning
        model.get_learned_conditioning = make(original)

        def restore():
            if had_own:
                model.get_learned_conditioning = original
            else:
                vars(model).pop("get_learned_conditioning", None)
        return restore

    def token_layout(self, prompt):
        """(a text per token of the WebUI's conditioning of `prompt`, {embedding word: positions}), from the
        WebUI's own tokenizer: 77-token chunks with start/end tokens, an embedding at offset + 1 of its chunk."""
        model = _tokenizing_model(shared.sd_model)
        if model is None:
            return [], {}
        chunks, _ = model.tokenize_line(prompt)
        tokenizer = getattr(model, "tokenizer", None) or getattr(getattr(model, "wrapped", None), "tokenizer", None)
        if tokenizer is None:
            try:  # SD2's OpenCLIP wrapper tokenizes with open_clip's module-level tokenizer
                import open_clip

                tokenizer = open_clip.tokenizer._tokenizer
            except Exception:  # noqa: BLE001 - labels fall back to token ids
                tokenizer = None
        texts, positions = [], {}
        for chunk in chunks:
            base = len(texts)
            texts += [_token_text(tokenizer, int(t)) for t in chunk.tokens]
            for fix in chunk.fixes:
                embedding = fix.embedding
                count = int(getattr(embedding, "vectors", 1) or 1)
                start = base + int(fix.offset) + 1
                positions.setdefault(embedding.name, []).extend(range(start, start + count))
        return texts, positions

    def inspector_enabled(self):
        return bool(getattr(shared.opts, "perfusion_gate_info", True))

    def defaults(self):
        return {"beta": float(getattr(shared.opts, "perfusion_default_beta", 0) or 0),
                "tau": float(getattr(shared.opts, "perfusion_default_tau", 0) or 0),
                "competitive_gates": bool(getattr(shared.opts, "perfusion_competitive_gates", False)),
                "clause_encoding": bool(getattr(shared.opts, "perfusion_clause_encoding", False))}

    def warn(self, p, message):
        warned = getattr(p, "_perfusion_warned", None)
        if warned is None:
            warned = p._perfusion_warned = set()
        if message in warned:
            return
        warned.add(message)
        log.warning("Perfusion: %s", message)
        p.comment(f"Perfusion: {message}")
        if getattr(shared.opts, "perfusion_warning_popup", True):
            try:
                import gradio as gr
                gr.Warning(f"Perfusion: {message}")
            except Exception:  # noqa: BLE001 - outside a gradio request (API) there is no popup
                pass

    def on_activate(self, p, activator):
        """Make sure the hooks go away when `p` is closed, even if sampling raised (deactivate is skipped then)."""
        if getattr(p, "_perfusion_close_wrapped", False):
            return
        original = p.close

        def close():
            try:
                activator.release()
            finally:
                original()

        p.close = close
        p._perfusion_close_wrapped = True


def _tokenizing_model(sd_model):
    """What splits a prompt into the WebUI's 77-token chunks: the hijacked text encoder (SD1/SD2), Forge's text
    engine, or the first encoder of A1111's SDXL conditioner (both SDXL encoders chunk a prompt alike)."""
    model = getattr(sd_model, "cond_stage_model", None)
    if hasattr(model, "tokenize_line"):
        return model
    candidates = forge_text_engines(sd_model) + list(getattr(model, "embedders", None) or [])
    return next((e for e in candidates if hasattr(e, "tokenize_line")), None)


def _token_text(tokenizer, token_id: int) -> str:
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # transformers' CLIPTokenizer (SD1)
        return str(tokenizer.convert_ids_to_tokens(token_id))
    decoder = getattr(tokenizer, "decoder", None)  # open_clip's SimpleTokenizer (SD2)
    return str(decoder.get(token_id, f"#{token_id}")) if isinstance(decoder, dict) else f"#{token_id}"


class ExtraNetworkPerfusion(extra_networks.ExtraNetwork):
    def __init__(self, activator: Activator):
        super().__init__("perfusion")
        self.activator = activator

    def activate(self, p, params_list):
        # params_list holds only the first prompt's tags; the activator reads every raw prompt itself
        self.activator.activate(p)

    def deactivate(self, p):
        self.activator.release()
