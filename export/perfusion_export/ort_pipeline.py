"""Sample an exported `optimum` folder with ONNX Runtime: what `perfusion generate --model DIR` runs.

Concept tags `<perfusion:NAME…>` in prompts become the concept's trigger tokens (the strength, β and τ
were baked at export, so tag options are ignored with a warning). Prompts longer than 75 tokens are
encoded in 77-token chunks exactly like `PromptEncoder`, and the loop mirrors diffusers'
StableDiffusionPipeline (classifier-free guidance, guidance rescale, the folder's scheduler), so the
same seed gives the same image as the PyTorch pipeline with the concept hooks. SDXL exports (two text
encoders) mirror StableDiffusionXLPipeline: both encoders' penultimate hidden states concatenated, the
second's `text_embeds` of the first chunk, `time_ids` (size, crop (0, 0), size), zeros for an empty
negative prompt.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from perfusion_ext.core import families
from perfusion_ext.core.clauses import splice_clauses, stand_in_name
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.tags import parse_prompt
from perfusion_ext.core.text import CHUNK, TokenWindows

from . import manifest as manifest_io
from .sampling import denoise, initial_latents, to_uint8


def is_export(folder) -> bool:
    """True for a folder written by `perfusion export` (the generate command dispatches on this)."""
    return (Path(folder) / manifest_io.MANIFEST).is_file()


def providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build offers."""
    available = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def replace_tags(prompt: str, info: dict) -> str:
    """`<perfusion:NAME…>` -> the concept's trigger tokens; unknown concepts are dropped with a warning."""
    triggers = {c["name"]: c.get("triggers") for c in info["concepts"]}
    parsed = parse_prompt(prompt)
    for w in parsed.warnings:
        warnings.warn(w, stacklevel=2)

    def replace(tag):
        if not triggers.get(tag.name):
            warnings.warn(f"concept {tag.name!r} is not baked into this export; the tag is ignored", stacklevel=2)
            return ""
        if tag.strength != 1.0 or tag.beta is not None or tag.tau is not None:
            warnings.warn(f"<perfusion:{tag.name}> options are ignored: strength, beta and tau were baked at export",
                          stacklevel=2)
        return " ".join(triggers[tag.name])

    return parsed.text_with(replace)


def encode_clauses(pipe: OrtStableDiffusion, prompt: str, ids: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """One prompt's context [T, d] (`hidden`, its token `ids` [T]) with each further concept's clause encoded from
    the prompt in which the concepts before it are their superclass word, once per trigger token (a superclass
    is one token, so positions stay); the pooled output stays the prompt's own."""
    concepts = {c["name"]: c for c in pipe.info["concepts"] if c.get("triggers")}
    positions = {name: np.flatnonzero(np.isin(ids, c["token_ids"])).tolist() for name, c in concepts.items()}
    known = {name for name, where in positions.items() if where}
    stand_ins = {stand_in_name(name): name for name in known}

    def word(tag) -> str:
        if tag.name in stand_ins:
            concept = concepts[stand_ins[tag.name]]
            return " ".join([superclass_word(pipe, concept)] * len(concept["triggers"]))
        return " ".join(concepts[tag.name]["triggers"]) if tag.name in known else ""

    def encode_variant(variant, earlier):
        text = "".join(s if isinstance(s, str) else word(s) for s in variant)
        return torch.from_numpy(pipe.encode_with_pooled([text], len(ids))[0])

    segments = parse_prompt(prompt).segments
    return splice_clauses(torch.from_numpy(hidden[None]), segments, known, positions, encode_variant)[0].numpy()


def superclass_word(pipe: OrtStableDiffusion, concept: dict) -> str:
    """The concept's superclass word from the manifest, checked to be one token of the export's tokenizer."""
    word = concept.get("superclass")
    if word is None:
        raise PerfusionError(f"{pipe.folder} was exported before clause-wise encoding (its manifest names no "
                             "superclass words); export it again to use --clause-encoding")
    if len(pipe.tokenizer(word, add_special_tokens=False).input_ids) != 1:
        raise PerfusionError(f"clause-wise encoding needs a one-token superclass word; {concept['name']!r} has {word!r}")
    return word


class OrtStableDiffusion:
    """The exported components as ORT sessions, plus tokenizer and scheduler from the folder."""

    def __init__(self, folder, execution_providers: list[str] | None = None, threads: int = 0):
        from diffusers import schedulers
        from transformers import CLIPTokenizer

        self.folder = Path(folder)
        self.info = manifest_io.read(self.folder)
        if self.info["layout"] != "optimum":
            raise PerfusionError(f"{folder} is a {self.info['layout']!r} export; generating needs the optimum layout "
                                 "(text encoder, VAE and tokenizer).")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        chosen = execution_providers or providers()
        self.family = families.get(self.info["base_family"])
        self.encoders = list(self.info.get("tokens", {}).get("encoders") or {"text_encoder": None})
        self.sessions = {part: ort.InferenceSession(str(self.folder / part / "model.onnx"), options, providers=chosen)
                         for part in (*self.encoders, "unet", "vae_decoder")}
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer"))
        self.pad_ids = {part: CLIPTokenizer.from_pretrained(str(self.folder / part.replace("text_encoder", "tokenizer")))
                        .pad_token_id for part in self.encoders[1:]}
        index = json.loads((self.folder / "model_index.json").read_text())
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", False))
        config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler = getattr(schedulers, config["_class_name"]).from_pretrained(str(self.folder / "scheduler"))
        self.unet_config = json.loads((self.folder / "unet" / "config.json").read_text())
        self.vae_config = json.loads((self.folder / "vae_decoder" / "config.json").read_text())

    def token_ids(self, prompts: list[str], min_tokens: int = 0) -> np.ndarray:
        return TokenWindows(self.tokenizer).windows(prompts, {}, min_tokens)[0].numpy().astype(np.int32)

    def encode(self, prompts: list[str]) -> np.ndarray:
        return self.encode_with_pooled(prompts)[0]

    def encode_with_pooled(self, prompts: list[str], min_tokens: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """The UNet's context (every encoder's chosen hidden state, concatenated) and the pooled `text_embeds`
        of the first chunk where the model reads one (SDXL), else None. Every tokenizer of a family gives
        the same ids (CLIP's BPE; tokenizer_2 differs only in padding, which the causal encoders never see
        before the EOS)."""
        ids = self.token_ids(prompts, min_tokens)
        hidden, pooled = [], None
        for part in self.encoders:
            te = self.sessions[part]
            names = [o.name for o in te.get_outputs()]
            states = [n for n in names if n.startswith("hidden_states.")]
            want = states[-2] if self.family.encoder_layer == "penultimate" and states else "last_hidden_state"
            chunks = []
            for c in range(0, ids.shape[1], CHUNK + 2):
                out = dict(zip(names, te.run(None, {"input_ids": self._padded(ids[:, c:c + CHUNK + 2], part)})))
                chunks.append(out[want])
                if c == 0 and "text_embeds" in out:
                    pooled = out["text_embeds"]
            hidden.append(np.concatenate(chunks, axis=1))
        return np.concatenate(hidden, axis=-1), pooled

    def _padded(self, window: np.ndarray, part: str) -> np.ndarray:
        """The window with this encoder's own padding id after the first EOS (bigG's tokenizer pads with "!")."""
        pad_id = self.pad_ids.get(part)
        if pad_id is None:
            return window
        out = window.copy()
        eos = self.tokenizer.eos_token_id
        for row in out:
            first = int(np.argmax(row == eos))
            row[first + 1:] = pad_id
        return out

    def unet(self, sample: np.ndarray, t, context: np.ndarray, added: tuple = ()) -> np.ndarray:
        session = self.sessions["unet"]
        names = [i.name for i in session.get_inputs()]
        per_sample = session.get_inputs()[1].shape != [1]
        timestep = np.full((sample.shape[0],) if per_sample else (1,), float(t), dtype=np.float32)
        feed = (sample.astype(np.float32), timestep, context) + tuple(a.astype(np.float32) for a in added)
        return session.run(None, dict(zip(names, feed)))[0]


def generate_onnx(folder, prompt: str | list[str], *, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                  n: int = 1, guidance_scale: float = 7.5, guidance_rescale: float = 0.0, height: int | None = None,
                  width: int | None = None, execution_providers: list[str] | None = None,
                  pipeline: OrtStableDiffusion | None = None, clause_encoding: bool = False) -> list[Image.Image]:
    """Images for `prompt` (tags allowed) from the exported folder, `n` per prompt, seeded like diffusers;
    `clause_encoding`: each prompt encoded clause by clause (core.clauses)."""
    pipe = pipeline or OrtStableDiffusion(folder, execution_providers)
    raw = [p for p in ([prompt] if isinstance(prompt, str) else list(prompt)) for _ in range(n)]
    prompts = [replace_tags(p, pipe.info) for p in raw]
    negatives = [replace_tags(negative_prompt, pipe.info)] * len(prompts)
    cfg = guidance_scale > 1.0
    context, pooled = pipe.encode_with_pooled(negatives + prompts if cfg else prompts)  # one chunk count for both
    if clause_encoding:
        first = len(negatives) if cfg else 0
        ids = pipe.token_ids(prompts, context.shape[1])
        for row, text in enumerate(raw):
            context[first + row] = encode_clauses(pipe, text, ids[row], context[first + row])
    factor = 2 ** (len(pipe.vae_config["block_out_channels"]) - 1)
    size = pipe.unet_config["sample_size"] * factor
    h, w = (height or size) // factor, (width or size) // factor
    added = ()
    if pooled is not None:  # SDXL: text_embeds and time_ids (original = target = the image size, crop (0, 0))
        if cfg and not negative_prompt.strip() and pipe.force_zeros_for_empty_prompt:
            context[:len(prompts)] = 0
            pooled[:len(prompts)] = 0
        ids = np.array([[h * factor, w * factor, 0, 0, h * factor, w * factor]] * len(context), dtype=np.float32)
        added = (pooled, ids)
    latents = initial_latents(pipe.scheduler, steps, seed, (len(prompts), pipe.unet_config["in_channels"], h, w))
    latents = denoise(pipe.scheduler, latents, lambda x, t, _: pipe.unet(x, t, context, added),
                      guidance_scale, guidance_rescale)
    decoded = pipe.sessions["vae_decoder"].run(
        None, {"latent_sample": (latents / pipe.vae_config["scaling_factor"]).numpy().astype(np.float32)})[0]
    return [Image.fromarray(img) for img in to_uint8(decoded)]
