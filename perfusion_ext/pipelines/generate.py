"""Generate images with a diffusers pipeline from prompts carrying `<perfusion:...>` tags."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..core import families
from ..core.clauses import encode_clauses
from ..core.concept import Concept
from ..core.errors import PerfusionError
from ..core.gate_report import gate_report
from ..core.hooks import activation
from ..core.layers import unet_family
from ..core.library import load_named
from ..core.tags import ConceptTag, parse_prompt, tag_text
from .encoding import model_hash, prompt_encoder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedPrompt:
    segments: list  # str / ConceptTag (only tags whose concept loaded)
    concepts: list[tuple[ConceptTag, Concept]]
    warnings: list[str]


def prepare_prompt(prompt: str, concepts_dir: str | Path | None, loaded: dict[str, Concept] | None = None) -> PreparedPrompt:
    """Parse tags and load their concepts; unknown names and bad tags become warnings, not errors."""
    parsed = parse_prompt(prompt)
    warnings = list(parsed.warnings)
    found: list[tuple[ConceptTag, Concept]] = []
    loaded = dict(loaded or {})
    for tag in parsed.tags:
        if tag.name not in loaded:
            try:
                if concepts_dir is None:
                    raise PerfusionError(f"unknown concept {tag.name!r}")
                loaded[tag.name] = load_named(concepts_dir, tag.name)
            except PerfusionError as exc:
                warnings.append(f"ignored <perfusion:{tag.name}>: {exc}")
                continue
        first = next((t for t, _ in found if t.name == tag.name), None)
        if first is not None and first.options() != tag.options():
            warning = (f"<perfusion:{tag.name}> appears with different options; one set of edits serves the whole "
                       f"prompt, so the first ({tag_text(first)}) is used")
            if warning not in warnings:
                warnings.append(warning)
        found.append((tag, loaded[tag.name]))
    names = {t.name for t, _ in found}
    segments = [s for s in parsed.segments if isinstance(s, str) or s.name in names]
    return PreparedPrompt(segments, found, warnings)


def concept_entries(prepared: PreparedPrompt) -> list[tuple[Concept, float, float | None, float | None]]:
    """One activation entry per distinct concept (the first tag's options win); β/τ at the first step."""
    seen, out = set(), []
    for tag, concept in prepared.concepts:
        if tag.name not in seen:
            seen.add(tag.name)
            out.append((concept, tag.strength, tag.beta, tag.tau))
    return out


def encoding_report(pipe, encoder, encoded, prepared: PreparedPrompt, competitive: bool = False) -> dict:
    """The gate inspector's report on the first prompt of `encoded` (encoded from `prepared`), with the gates
    the hooks use (`competitive`: each token's most similar concept's gate only)."""
    concepts = [(concept.name, concept, concept.beta if beta is None else beta, concept.tau if tau is None else tau)
                for concept, _, beta, tau in concept_entries(prepared)]
    texts = pipe.tokenizer.convert_ids_to_tokens([min(i, encoder.vocab_size - 1) for i in encoded.input_ids[0].tolist()])
    return gate_report(encoded.hidden[0], concepts, texts, encoded.concept_positions[0], competitive)


def scheduled_entries(prepared: PreparedPrompt) -> list[tuple]:
    """`concept_entries` with β/τ schedules kept whole (core.hooks.activation follows them step by step)."""
    seen, out = set(), []
    for tag, concept in prepared.concepts:
        if tag.name not in seen:
            seen.add(tag.name)
            out.append((concept, tag.strength, tag.beta_schedule or tag.beta, tag.tau_schedule or tag.tau))
    return out


def step_callback(edits, total_steps: int):
    """A diffusers `callback_on_step_end` that moves the gates to the next step's β/τ: after step i of N the
    next UNet call is step i + 1, at fraction (i + 1) / N."""
    def callback(pipe, step, timestep, callback_kwargs):
        total = getattr(pipe, "num_timesteps", None) or total_steps
        edits.set_progress((step + 1) / max(1, total))
        return callback_kwargs

    return callback


def sampling_defaults(pipe) -> dict:
    """The family's sampling defaults (core.families) plus the pipeline's native image size."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return dict(families.sampling_defaults(unet_family(pipe.unet)), height=size, width=size)


@torch.no_grad()
def encode_prepared(encoder, prepared: PreparedPrompt, clause_encoding: bool = False, min_tokens: int = 0):
    """The prompt's conditional encoding; `clause_encoding`: each further concept's clause as if the concepts
    before it were their superclass words (core.clauses)."""
    embeddings = {tag.name: concept.embeddings for tag, concept in prepared.concepts}
    if not clause_encoding:
        return encoder.encode([prepared.segments], embeddings, min_tokens)
    superclasses = {tag.name: concept.superclass for tag, concept in prepared.concepts}
    return encode_clauses(encoder, prepared.segments, embeddings, superclasses, min_tokens)


def generate(pipe, prompt: str, negative: str = "", concepts_dir=None, seed: int = 0, n: int = 1,
             loaded: dict[str, Concept] | None = None, competitive_gates: bool = False,
             clause_encoding: bool = False, **overrides):
    """Images for a prompt with tags; returns (PIL images, warnings). Never fails on a bad tag.
    `competitive_gates`: with several concepts, each token keeps only its most similar concept's gate (core.gated_edit).
    `clause_encoding`: with several concepts, each one's clause is encoded as if the concepts before it were their
    superclass words (core.clauses)."""
    prepared = prepare_prompt(prompt, concepts_dir, loaded)
    warnings = list(prepared.warnings)
    model_hash_ = model_hash(pipe) if prepared.concepts else ""
    for tag, concept in prepared.concepts:
        if concept.base_hash and concept.base_hash != model_hash_:
            warnings.append(f"<perfusion:{tag.name}> was trained on a different base model (like a Lora, it "
                            "usually still works on fine-tunes of its base)")
    if any(tag.hr_beta or tag.hr_tau for tag, _ in prepared.concepts):
        warnings.append("hr_beta=/hr_tau= apply to the WebUI's hires pass; this pipeline has none, so they are ignored")
    parsed_negative = parse_prompt(negative)
    if parsed_negative.tags or parsed_negative.warnings:
        warnings.append("tags in the negative prompt are ignored (as in the WebUI); removed them from it")
    negative_text = parsed_negative.text_with(lambda tag: "")
    encoder = prompt_encoder(pipe)
    cond = encode_prepared(encoder, prepared, clause_encoding)
    uncond = encoder.encode([[negative_text]], min_tokens=cond.hidden.shape[1])
    if uncond.hidden.shape[1] > cond.hidden.shape[1]:
        cond = encode_prepared(encoder, prepared, clause_encoding, min_tokens=uncond.hidden.shape[1])
    if prepared.concepts:  # the gate inspector's warnings (a leak, a gate shut on the concept's own token)
        warnings += encoding_report(pipe, encoder, cond, prepared, competitive_gates)["warnings"]
    embeds = {"prompt_embeds": cond.hidden, "negative_prompt_embeds": uncond.hidden}
    if cond.pooled is not None:  # SDXL: the pooled text_embeds too; an empty negative is zeros, as diffusers does
        zero = not negative_text.strip() and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
        embeds.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
        if zero:
            embeds.update(negative_prompt_embeds=torch.zeros_like(uncond.hidden),
                          negative_pooled_prompt_embeds=torch.zeros_like(uncond.pooled))
    settings = dict(sampling_defaults(pipe), **{k: v for k, v in overrides.items() if v is not None})
    for w in warnings:
        log.warning(w)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with activation(pipe.unet, scheduled_entries(prepared), competitive=competitive_gates) as edits:
        if edits.scheduled:  # per-step β/τ: the pipeline reports each finished step
            edits.set_progress(0.0)
            settings["callback_on_step_end"] = step_callback(edits, int(settings.get("num_inference_steps") or 1))
        result = pipe(**embeds, num_images_per_prompt=n, generator=generator, output_type="pil", **settings)
    return result.images, warnings
