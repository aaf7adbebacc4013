"""The trainer's `Backend` over the SDXL model AUTOMATIC1111 has loaded (sgm's DiffusionEngine as A1111 1.10 patches it).

Duck-typed like the ldm backend (`backend.py`), so it is testable without the WebUI:
- Text: `sd_model.conditioner.embedders` holds the WebUI's wrappers of CLIP-L (FrozenCLIPEmbedderForSDXLWithCustomWords)
  and OpenCLIP-bigG (FrozenOpenCLIPEmbedder2WithCustomWords), input key "txt", then the size/crop embedders
  (ConcatTimestepEmbedderND on original_size_as_tuple, crop_coords_top_left, target_size_as_tuple). The context is
  the two readings concatenated in the conditioner's order (768 + 1280 = 2048): CLIP-L as the WebUI's own
  `encode_with_transformers` gives it (its hidden layer and clip-skip setting), bigG's penultimate state from sgm's
  `encode_with_transformer`. The embedders are called directly: the conditioner runs frozen ones under no_grad.
- Pooled: bigG's final state after ln_final at the first EOS of the first window, through its text projection. sgm
  pools at argmax(ids), which a concept's placeholder id (past the vocabulary) would take over; for plain prompts
  both pick the same token, and at generation A1111 writes the concept vectors over id 0, so both pool alike.
- `vector` (the UNet's `y`, 2816 wide on SDXL): in the conditioner's order, the pooled vector, then each size
  embedder applied to its pair of `time_ids` (original h, w; crop top, left; target h, w).
- Concept vectors enter both encoders through forward hooks on their raw token tables (PromptEncoder), so
  gradients reach `clip_l` and `clip_g` and nothing in the model is modified.
- Noise and target: DDPM on `sd_model.alphas_cumprod` (A1111 sets it from sgm's LegacyDDPMDiscretization); ε, or v
  where A1111 found V scaling (`parameterization`). Prediction: A1111's `apply_model(x, t, {"crossattn",
  "vector"})`, the UNet at discrete timesteps as the WebUI's samplers call it. Images: `encode_first_stage` (sgm
  multiplies by `scale_factor`; A1111's `get_first_stage_encoding` is the identity for SDXL).
"""
from __future__ import annotations

import types

import torch

from ..core import covariance, families
from ..core.errors import PerfusionError
from ..core.text import MultiPromptEncoder, PromptEncoder
from .backend import (
    WebuiBackend,
    WebuiTextEncoder,
    WebuiTokenizer,
    is_sgm,
    raw_token_embedding,
    refuse_unusable,
    text_encoder_module,
)

# the size/crop embedders' input keys and the columns of `time_ids` each one reads
SIZE_KEYS = {"original_size_as_tuple": slice(0, 2), "crop_coords_top_left": slice(2, 4),
             "target_size_as_tuple": slice(4, 6)}


class _OpenClipText:
    """Looks like a transformers CLIPTextModelWithProjection to PromptEncoder, over sgm's FrozenOpenCLIPEmbedder2
    (non-legacy, the layout SDXL's config uses): `hidden_states[-2]` is the penultimate state the WebUI reads,
    `last_hidden_state` the final state after ln_final, `text_projection` bigG's projection."""

    def __init__(self, clip):
        self.clip = clip
        self.wrapped = clip.wrapped
        self.embedding = raw_token_embedding(clip)
        if getattr(self.wrapped, "legacy", True) or getattr(self.wrapped, "layer", None) != "penultimate":
            raise PerfusionError("the loaded model's OpenCLIP text encoder is not read as SDXL reads it (penultimate "
                                 f"layer, non-legacy); got layer={getattr(self.wrapped, 'layer', None)!r}")

    def get_input_embeddings(self):
        return self.embedding

    @property
    def device(self):
        return self.embedding.weight.device

    def text_projection(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.wrapped.model.text_projection
        return proj(pooled) if isinstance(proj, torch.nn.Module) else pooled @ proj

    def __call__(self, ids, output_hidden_states=False):
        out = self.wrapped.encode_with_transformer(ids.to(self.device))
        return types.SimpleNamespace(last_hidden_state=self.wrapped.model.ln_final(out["last"]),
                                     hidden_states=(out["penultimate"], out["last"]))

    def short_reading(self, ids: torch.Tensor) -> torch.Tensor:
        """The penultimate state of ids [B, L ≤ 77] on L tokens only: sgm's encode_with_transformer with the
        positional table and causal mask cut to L (causal attention: the same states as in a 77-token window)."""
        model, width = self.wrapped.model, ids.shape[1]
        x = model.token_embedding(ids.to(self.device)) + model.positional_embedding[:width]
        out = self.wrapped.text_transformer_forward(x.permute(1, 0, 2), attn_mask=model.attn_mask[:width, :width])
        return out["penultimate"]


class WebuiSgmBackend(WebuiBackend):
    """Backend over A1111's loaded sgm DiffusionEngine (SDXL base and its fine-tunes, distilled SDXL UNets)."""

    def __init__(self, sd_model):
        refuse_unusable(sd_model)
        if not is_sgm(sd_model):
            raise PerfusionError("the loaded model is not SDXL (sgm): WebuiLdmBackend trains it")
        super().__init__(sd_model)
        family = families.get(self._family)
        if family.name != families.SDXL.name:
            raise PerfusionError(f"the loaded sgm model is {family.label}; the SDXL training backend trains SDXL")
        texts, self._vector_layout = self._read_conditioner(sd_model.conditioner, family)
        self.clip_l, self.clip_g = (clip for clip, _ in texts)
        self.prompt_encoder = MultiPromptEncoder([encoder for _, encoder in texts])
        self.device = self.prompt_encoder.text_encoder.device
        self.alphas_cumprod = torch.as_tensor(sd_model.alphas_cumprod).detach().double()
        self.vae_scale = 8  # image pixels per latent pixel; measured by encode_images

    @staticmethod
    def _read_conditioner(conditioner, family):
        """The text encoders (wrapper, PromptEncoder) in the family's order, and what `vector` is made of."""
        texts, layout = [], []
        for embedder in conditioner.embedders:
            key = getattr(embedder, "input_key", None)
            if key == "txt":
                if not (hasattr(embedder, "tokenize") and hasattr(embedder, "wrapped")):
                    raise PerfusionError(f"the conditioner's {type(embedder).__name__} is not wrapped by the WebUI "
                                         "(no tokenize); reload the checkpoint")
                if len(texts) == len(family.encoders):
                    raise PerfusionError(f"the loaded model has more than {len(family.encoders)} text encoders")
                name, width = family.encoders[len(texts)]
                openclip = not hasattr(embedder.wrapped, "transformer")
                reader = _OpenClipText(embedder) if openclip else WebuiTextEncoder(embedder)
                encoder = PromptEncoder(WebuiTokenizer(embedder), reader, layer="penultimate" if openclip else "last",
                                        name=name, pooled=name == family.pooled_encoder)
                got = encoder.text_encoder.get_input_embeddings().embedding_dim
                if got != width or openclip != (name == family.pooled_encoder):
                    raise PerfusionError(f"the loaded model's text encoder #{len(texts)} is {got} wide "
                                         f"({'OpenCLIP' if openclip else 'CLIP'}); {family.label} has {name} "
                                         f"({width}) there")
                texts.append((embedder, encoder))
                if getattr(embedder, "return_pooled", False):
                    layout.append(("pooled", None, None))
            elif key in SIZE_KEYS:
                layout.append(("size", embedder, SIZE_KEYS[key]))
            else:
                raise PerfusionError(f"the loaded model's conditioning reads {key!r}; the training tab trains SDXL "
                                     "base models (and their fine-tunes), whose conditioning is text, size and crop")
        if len(texts) != len(family.encoders) or [kind for kind, _, _ in layout].count("pooled") != 1:
            raise PerfusionError(f"the loaded model's conditioner is not SDXL's ({len(texts)} text encoders)")
        return texts, layout

    # ---- conditioning -------------------------------------------------------------------------------
    def vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's `y`: pooled ‖ Fourier embeddings of the size/crop pairs, in the conditioner's order."""
        time_ids = time_ids.to(pooled.device, torch.float32)
        parts = [pooled.float() if kind == "pooled" else embedder(time_ids[:, cols]).float()
                 for kind, embedder, cols in self._vector_layout]
        return torch.cat(parts, dim=1)

    def time_ids(self, n: int, latent_height: int, latent_width: int) -> torch.Tensor:
        """No crop, no resize: original = target = the image size the latents come from."""
        h, w = latent_height * self.vae_scale, latent_width * self.vae_scale
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(n, 6)

    # ---- the denoiser ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images):
        latents = super().encode_images(images)
        self.vae_scale = max(1, images.shape[-1] // latents.shape[-1])
        return latents

    def _coefficients(self, t, x):
        ac = self.alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.ndim - 1)))
        return ac.sqrt().to(x.dtype), (1 - ac).sqrt().to(x.dtype)

    def add_noise(self, latents, noise, t):
        a, s = self._coefficients(t, latents)
        return a * latents + s * noise

    def target(self, latents, noise, t):
        if getattr(self.sd_model, "parameterization", "eps") == "v":
            a, s = self._coefficients(t, latents)
            return a * noise - s * latents
        return noise

    def predict(self, noisy, t, context, pooled=None, time_ids=None):
        if pooled is None:
            raise ValueError("SDXL's UNet reads the pooled text embedding (and the size/crop time_ids); none was given")
        if time_ids is None:
            time_ids = self.time_ids(noisy.shape[0], noisy.shape[-2], noisy.shape[-1])
        dtype = self.unet_dtype
        cond = {"crossattn": context.to(dtype), "vector": self.vector(pooled, time_ids).to(dtype)}
        return self.sd_model.apply_model(noisy.to(dtype), t, cond).float()

    @property
    def num_train_timesteps(self):
        return int(self.alphas_cumprod.shape[0])

    def text_covariance(self) -> torch.Tensor:
        """C over the 2048-wide concatenation both encoders feed the UNet, estimated from the caption corpus and
        cached per encoder pair (the WebUI's modules) and reading."""
        g_reader = self.prompt_encoder.parts[1].text_encoder

        def encode(ids):  # each caption on its own width: CLIP-L takes short windows, bigG is cut to them
            with torch.no_grad():
                ids = ids.to(self.device)
                return torch.cat([self.clip_l.encode_with_transformers(ids).float(),
                                  g_reader.short_reading(ids).float()], dim=-1)

        modules = torch.nn.ModuleList([text_encoder_module(self.clip_l), text_encoder_module(self.clip_g)])
        return covariance.cached_covariance(modules, self.prompt_encoder.tokenizer, encode=encode,
                                            variant=families.get(self.family).encoder_layer)
