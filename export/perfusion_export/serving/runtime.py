"""One request through a concept library: tags -> token ids -> text -> coefficients -> sampling -> image.

`LibraryPipeline` holds everything a request needs that is not a network: the library's slots (each
concept's i*, u, default gate), the tokenizer and the scheduler. The three networks are callables on
numpy arrays, so the same code runs with local ONNX Runtime sessions (`perfusion generate --model REPO`,
tests) and inside Triton's pipeline model, where they are BLS calls into the batched models.

Tags are those of the WebUI and the CLI (`<perfusion:NAME[:STRENGTH][:beta=…][:tau=…]>`, schedules
included). Unlike `perfusion generate`, which drops an unknown tag with a warning, a service answers an
unknown concept with an error: the client asked for something this library does not hold.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from perfusion_ext.core.clauses import splice_clauses, stand_in_name
from perfusion_ext.core.concept import load_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.hooks import ResolvedConcept, resolve
from perfusion_ext.core.tags import parse_prompt
from perfusion_ext.core.text import CHUNK, TokenWindows

from ..sampling import denoise, initial_latents, to_uint8
from .library import coefficient_channels

LIBRARY_JSON = "library.json"
SLOTS_FOLDER = "perfusion_slots"
MAX_STEPS = 200
MAX_PIXELS = 4096 * 4096

# text_encoder(input_ids [B, 77k] int32) -> [B, 77k, d]; unet(sample, timestep [B], context [B, T, d + 2N]) ->
# noise; vae_decoder(latents) -> image in [-1, 1]
Runner = Callable[..., np.ndarray]


class LibraryPipeline:
    """The per-request half of a library engine (see module docstring)."""

    def __init__(self, library_dir, text_encoder: Runner, unet: Runner, vae_decoder: Runner):
        from diffusers import schedulers
        from transformers import CLIPTokenizer

        self.folder = Path(library_dir)
        self.info = json.loads((self.folder / LIBRARY_JSON).read_text(encoding="utf-8"))
        self.n_slots = int(self.info["slots"])
        self.concepts = {c["name"]: (c, load_concept(self.folder / SLOTS_FOLDER / f"slot{c['slot']}.safetensors"))
                         for c in self.info["concepts"]}
        self.windows = TokenWindows(CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer")))
        self.scheduler_config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        self.scheduler_class = getattr(schedulers, self.scheduler_config["_class_name"])
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder

    @property
    def defaults(self) -> dict:
        """steps, guidance, width, height, guidance_rescale: what `perfusion generate` uses for this model."""
        return dict(self.info["defaults"])

    def active_concepts(self, prompt: str) -> tuple[list, list[tuple[int, ResolvedConcept]], dict[str, list[int]]]:
        """(segments, [(slot, concept as the tag asks)], name -> token ids) for a prompt's tags; an unknown
        name or a malformed tag is an error naming what the library holds."""
        parsed = parse_prompt(prompt)
        if parsed.warnings:
            raise PerfusionError("; ".join(parsed.warnings))
        active, ids, seen = [], {}, set()
        for tag in parsed.tags:
            if tag.name not in self.concepts:
                held = ", ".join(sorted(self.concepts)) or "no concepts"
                raise PerfusionError(f"unknown concept {tag.name!r}: this library holds {held}.")
            if tag.name in seen:
                continue
            seen.add(tag.name)
            info, concept = self.concepts[tag.name]
            (resolved,) = resolve([(concept, tag.strength, tag.beta_schedule or tag.beta,
                                    tag.tau_schedule or tag.tau)], beta=info["beta"], tau=info["tau"])
            active.append((info["slot"], resolved))
            ids[tag.name] = list(info["token_ids"])
        return parsed.segments, active, ids

    def encode(self, segments: list, negative: str, ids: dict[str, list[int]]) -> np.ndarray:
        """[negative; positive] text, both padded to the same number of 77-token windows; with the library's
        clause-wise encoding, each further concept's clause of the positive prompt read after the superclass
        words of the concepts before it (core.clauses)."""
        positive, positions = self.windows.windows([segments], ids)
        negative_ids, _ = self.windows.windows([[negative]], {}, min_tokens=positive.shape[1])
        if negative_ids.shape[1] > positive.shape[1]:
            positive, positions = self.windows.windows([segments], ids, min_tokens=negative_ids.shape[1])
        hidden = self._run_text(torch.cat([negative_ids, positive]))
        if not self.info.get("clause_encoding", False):
            return hidden

        def encode_variant(variant, earlier):
            # a superclass is one token: the stand-in of a concept with n vectors is that token n times
            stand_ins = {stand_in_name(n): self.superclass_ids(n) * len(ids[n]) for n in earlier}
            variant_ids, _ = self.windows.windows([variant], {**ids, **stand_ins}, min_tokens=hidden.shape[1])
            return torch.from_numpy(self._run_text(variant_ids))

        positive_hidden = splice_clauses(torch.from_numpy(hidden[1:]), segments, ids, positions[0], encode_variant)
        return np.concatenate([hidden[:1], positive_hidden.numpy()])

    def superclass_ids(self, name: str) -> list[int]:
        """The token of a concept's superclass word (training takes only one-token superclass words)."""
        word = self.concepts[name][1].superclass
        ids = self.windows.words(word)
        if len(ids) != 1:
            raise PerfusionError(f"clause-wise encoding needs a one-token superclass word; {name!r} has {word!r}")
        return ids

    def _run_text(self, input_ids: torch.Tensor) -> np.ndarray:
        """The text encoder over [B, 77k] ids, window by window."""
        both, window = input_ids.to(torch.int32).numpy(), CHUNK + 2
        return np.concatenate([self.text_encoder(both[:, c:c + window]) for c in range(0, both.shape[1], window)],
                              axis=1)

    def check_settings(self, steps: int, guidance: float, width: int, height: int) -> None:
        multiple = int(self.info["size_multiple"])
        if not 1 <= steps <= MAX_STEPS:
            raise PerfusionError(f"steps must be between 1 and {MAX_STEPS}, got {steps}.")
        if not np.isfinite(guidance) or guidance < 0:
            raise PerfusionError(f"guidance must be a finite number ≥ 0, got {guidance}.")
        for label, value in (("width", width), ("height", height)):
            if value < multiple or value % multiple:
                raise PerfusionError(f"{label} must be a positive multiple of {multiple}, got {value}.")
        if width * height > MAX_PIXELS:
            raise PerfusionError(f"{width}×{height} is larger than this service allows ({MAX_PIXELS} pixels).")

    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None) -> np.ndarray:
        """One image, [H, W, 3] uint8; equal to `perfusion generate` of the same prompt and seed."""
        d = self.defaults
        steps = int(d["steps"] if steps is None else steps)
        guidance = float(d["guidance"] if guidance is None else guidance)
        width, height = int(width or d["width"]), int(height or d["height"])
        self.check_settings(steps, guidance, width, height)
        segments, active, ids = self.active_concepts(prompt)
        negative = parse_prompt(negative_prompt).text_with(lambda tag: "")  # tags in a negative prompt: ignored
        text = torch.from_numpy(self.encode(segments, negative, ids))
        if guidance <= 1.0:
            text = text[1:]
        scheduled = any(r.scheduled for _, r in active)
        competitive = bool(self.info.get("competitive_gates", False))
        channels = coefficient_channels(text, active, self.n_slots, competitive=competitive)
        context = np.ascontiguousarray(torch.cat([text, channels], dim=-1).numpy())

        def predict(sample, t, index):
            nonlocal context
            if scheduled:
                channels = coefficient_channels(text, active, self.n_slots, fraction=index / steps,
                                                competitive=competitive)
                context = np.ascontiguousarray(torch.cat([text, channels], dim=-1).numpy())
            return self.unet(sample.astype(np.float32), np.full(len(sample), t, dtype=np.float32), context)

        factor = int(self.info["vae_factor"])
        scheduler = self.scheduler_class.from_config(self.scheduler_config)  # one per request: schedulers keep state
        latents = initial_latents(scheduler, steps, int(seed), (1, int(self.info["latent_channels"]),
                                                                height // factor, width // factor))
        latents = denoise(scheduler, latents, predict, guidance, float(d.get("guidance_rescale", 0.0)))
        decoded = self.vae_decoder((latents / float(self.info["vae_scaling_factor"])).numpy().astype(np.float32))
        return to_uint8(decoded)[0]


def local_pipeline(repository, threads: int = 0) -> LibraryPipeline:
    """The repository's pipeline on local ONNX Runtime sessions, without a server (tests, `perfusion generate`)."""
    import onnxruntime as ort

    repository = Path(repository)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3

    def runner(name: str, inputs: tuple[str, ...], output: str) -> Runner:
        session = ort.InferenceSession(str(repository / name / "1" / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        return lambda *arrays: session.run([output], dict(zip(inputs, arrays)))[0]

    return LibraryPipeline(repository / "pipeline" / "library",
                           runner("text_encoder", ("input_ids",), "last_hidden_state"),
                           runner("unet", ("sample", "timestep", "encoder_hidden_states"), "out_sample"),
                           runner("vae_decoder", ("latent_sample",), "sample"))
