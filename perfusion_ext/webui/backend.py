"""The trainer's `Backend` over the model AUTOMATIC1111 has loaded (ldm LatentDiffusion, SD1/SD2), and what the
SDXL backend (`sgm_backend.WebuiSgmBackend`) shares with it.

Everything goes through the objects the WebUI already holds, duck-typed so it is testable without
the WebUI:
- `sd_model.cond_stage_model` is the WebUI's text wrapper (FrozenCLIPEmbedderWithCustomWords for SD1,
  FrozenOpenCLIPEmbedderWithCustomWords for SD2): `tokenize(texts)` gives ids without BOS/EOS,
  `encode_with_transformers(ids)` runs the encoder exactly as generation does (clip skip, SD2's
  penultimate layer), `id_start/id_end/id_pad` are its special ids.
- Concept vectors enter through forward hooks on the raw token-embedding table (the WebUI wraps it in
  EmbeddingsWithFixes, which calls the raw table), so gradients reach them and nothing is modified.
- Images: `get_first_stage_encoding(encode_first_stage(x))`; noise: `q_sample`; target: ε or
  `get_v` per `parameterization`; prediction: `apply_model`.
`WebuiBackend` holds the shared part (refusals: no model, Forge, inpainting/instruct UNets, other families;
the frozen model; first-stage encoding); SDXL (sgm) is refused here and trained by `WebuiSgmBackend`.
Prompt encoding, token lookup and the family's encoder names come from the shared `Backend` base.
"""
from __future__ import annotations

import types

import torch

from ..core import covariance, families
from ..core.errors import PerfusionError
from ..core.layers import unet_family
from ..core.text import PromptEncoder
from ..training.backend import Backend


def raw_token_embedding(clip) -> torch.nn.Embedding:
    """The vocabulary table of the WebUI's text encoder (unwrapping EmbeddingsWithFixes)."""
    wrapped = clip.wrapped
    if hasattr(wrapped, "transformer"):  # SD1, SDXL's CLIP-L: a transformers CLIPTextModel
        module = wrapped.transformer.get_input_embeddings()
    elif hasattr(wrapped, "model") and hasattr(wrapped.model, "token_embedding"):  # SD2, SDXL's bigG: open_clip
        module = wrapped.model.token_embedding
    else:
        raise PerfusionError(f"unsupported text encoder {type(wrapped).__name__}: Perfusion training needs SD1, SD2 "
                             "or SDXL")
    module = getattr(module, "wrapped", module)
    if not isinstance(module, torch.nn.Embedding):
        raise PerfusionError(f"the text encoder's token embedding is a {type(module).__name__}, not an Embedding")
    return module


def text_encoder_module(clip) -> torch.nn.Module:
    wrapped = clip.wrapped
    return wrapped.transformer if hasattr(wrapped, "transformer") else wrapped.model


def is_sgm(sd_model) -> bool:
    """An SDXL model in A1111 (sgm's DiffusionEngine, which has a `conditioner` instead of a cond stage)."""
    return bool(getattr(sd_model, "is_sdxl", False)) or hasattr(sd_model, "conditioner")


def trainable_labels() -> str:
    return ", ".join(f.label for f in families.FAMILIES.values() if f.webui_trainable)


def refuse_unusable(sd_model) -> None:
    """No model loaded, or Forge: neither backend can train (PerfusionError with what to do instead)."""
    if sd_model is None:
        raise PerfusionError("No Stable Diffusion checkpoint is loaded: load one in the WebUI first.")
    if hasattr(sd_model, "forge_objects"):  # Forge: text encoders run under inference mode, no ldm model
        info = getattr(sd_model, "sd_checkpoint_info", None)
        cli = (f'perfusion train --model "{getattr(info, "filename", None) or "CHECKPOINT.safetensors"}" '
               "--images DIR --name NAME --superclass WORD --out models/perfusion --device cuda")
        raise PerfusionError("Forge cannot train concepts in its own process (its text encoders run under "
                             "inference mode). Train with the command line tool on the same checkpoint file, "
                             f"then use the concept here: {cli}")


class WebuiTokenizer:
    """The interface PromptEncoder and the covariance code use, over the WebUI's tokenize()."""

    model_max_length = 77

    def __init__(self, clip):
        self.clip = clip
        self.bos_token_id, self.eos_token_id, self.pad_token_id = clip.id_start, clip.id_end, clip.id_pad

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None, **_ignored):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [list(x) for x in self.clip.tokenize(texts)]
        if add_special_tokens:
            limit = (max_length or self.model_max_length) - 2 if truncation else None
            ids = [[self.bos_token_id] + x[:limit] + [self.eos_token_id] for x in ids]
        return types.SimpleNamespace(input_ids=ids[0] if isinstance(text, str) else ids)


class WebuiTextEncoder:
    """Looks like a transformers text model to PromptEncoder; runs the WebUI's own encode path."""

    def __init__(self, clip):
        self.clip = clip
        self.embedding = raw_token_embedding(clip)

    def get_input_embeddings(self):
        return self.embedding

    @property
    def device(self):
        return self.embedding.weight.device

    def __call__(self, ids):
        return types.SimpleNamespace(last_hidden_state=self.clip.encode_with_transformers(ids.to(self.device)))


class WebuiBackend(Backend):
    """What the ldm and sgm backends share: the refusals, the frozen model, the first stage."""

    def __init__(self, sd_model):
        refuse_unusable(sd_model)
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        if getattr(self.unet, "in_channels", 4) != 4:
            raise PerfusionError(
                f"The loaded model's UNet takes {self.unet.in_channels} input channels (an inpainting or "
                f"instruct model); train concepts on a regular {trainable_labels()} checkpoint."
            )
        self._family = unet_family(self.unet)
        if not families.get(self._family).webui_trainable:
            raise PerfusionError(f"the loaded model is {self._family}; the training tab trains "
                                 f"{trainable_labels()} concepts")
        self.unet_dtype = next(self.unet.parameters()).dtype

    def frozen_modules(self):
        return [self.sd_model]

    @torch.no_grad()
    def encode_images(self, images):
        first_stage = self.sd_model.first_stage_model
        dtype = next(first_stage.parameters()).dtype
        x = images.to(self.device, dtype)
        return self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(x)).float()

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if getattr(self.sd_model, "parameterization", "eps") == "v" else "epsilon"


class WebuiLdmBackend(WebuiBackend):
    """Backend over A1111's loaded ldm LatentDiffusion (SD1, SD2)."""

    def __init__(self, sd_model):
        refuse_unusable(sd_model)
        if is_sgm(sd_model) or not hasattr(sd_model, "cond_stage_model"):
            raise PerfusionError("the loaded model is SDXL (sgm), not ldm: WebuiSgmBackend trains it")
        super().__init__(sd_model)
        clip = sd_model.cond_stage_model
        self.clip = clip
        self.tokenizer = WebuiTokenizer(clip)
        self.text_encoder = WebuiTextEncoder(clip)
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.text_encoder)
        self.device = self.text_encoder.device

    def add_noise(self, latents, noise, t):
        return self.sd_model.q_sample(latents, t, noise=noise)

    def target(self, latents, noise, t):
        if getattr(self.sd_model, "parameterization", "eps") == "v":
            return self.sd_model.get_v(latents, noise, t)
        return noise

    def predict(self, noisy, t, context, pooled=None, time_ids=None):
        out = self.sd_model.apply_model(noisy.to(self.unet_dtype), t, context.to(self.unet_dtype))
        return out.float()

    @property
    def num_train_timesteps(self):
        return int(self.sd_model.num_timesteps)

    def text_covariance(self) -> torch.Tensor:
        """C of this text encoder: the reference LAION C for SD1's CLIP ViT-L/14 when available, else estimated."""
        if families.get(self.family).reference_covariance:
            try:
                return covariance.reference_covariance_sd15()
            except PerfusionError:
                pass  # perfusion-pytorch not installed: estimate from the caption corpus (cached per encoder)

        def encode(ids):
            # the WebUI's encoders expect full 77-token windows (SD2's causal mask is fixed-size)
            width = ids.shape[1]
            padded = torch.full((ids.shape[0], 77), self.tokenizer.pad_token_id, dtype=ids.dtype)
            padded[:, :width] = ids
            with torch.no_grad():
                return self.clip.encode_with_transformers(padded.to(self.device))[:, :width].float()

        return covariance.cached_covariance(text_encoder_module(self.clip), self.tokenizer, encode=encode)
