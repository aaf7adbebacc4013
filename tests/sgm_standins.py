"""Stand-ins of the SDXL model AUTOMATIC1111 1.10 holds (sgm's DiffusionEngine as A1111 patches and hijacks it),
loaded from a tiny single-file SDXL checkpoint (`tiny_families.sdxl_single_file`), so the same weights also load as
a diffusers pipeline (the CLI's path) for comparison. No WebUI and no sgm package here: these classes have the
attributes and call signatures the backend uses, with sgm's and A1111's semantics:

- sgm's FrozenCLIPEmbedder (transformers CLIP-L, `layer="hidden"`, `layer_idx` = the penultimate layer) and
  FrozenOpenCLIPEmbedder2 (an OpenCLIP text tower: token_embedding, positional_embedding, transformer.resblocks of
  nn.MultiheadAttention blocks in LND layout, ln_final, text_projection, causal attn_mask; non-legacy: a dict with
  "penultimate", "last" and "pooled" at argmax(ids)), their token tables wrapped like A1111's EmbeddingsWithFixes;
- A1111's wrappers of both (tokenize, encode_with_transformers, id_start/id_end/id_pad, 75-token chunks with
  BOS/EOS and padding, bigG's padding id 0 after the first EOS, the pooled output of the first chunk);
- sgm's ConcatTimestepEmbedderND, GeneralConditioner (frozen embedders under no_grad; crossattn/vector by ndim),
  OpenAIWrapper (`y=vector`) and A1111's patched apply_model / get_learned_conditioning / get_first_stage_encoding;
- the UNet: ldm's UNetModel at the file's sizes with sgm's `label_emb` (Linear, SiLU, Linear over the vector).
"""
from __future__ import annotations

import collections

import numpy as np
import torch
from torch import nn

VAE_CONFIG = dict(ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=16,
                  z_channels=4, double_z=True)  # tiny_families._ldm_vae_state's sizes


class EmbeddingsWithFixes(nn.Module):  # A1111's wrapper of a token table (no textual-inversion fixes pending)
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


# ---- sgm's text embedders ----------------------------------------------------------------------------------
class ResidualAttentionBlock(nn.Module):  # open_clip's, LND layout
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(collections.OrderedDict(
            c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipText(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int, mlp: int = 64, context: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, width))
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu_(1), persistent=False)


class SgmClipL(nn.Module):
    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.transformer, self.tokenizer = transformer, tokenizer
        self.layer, self.layer_idx = "hidden", transformer.config.num_hidden_layers - 1  # SDXL: 11 of 12


class SgmOpenClip2(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layer, self.layer_idx, self.legacy, self.return_pooled = "penultimate", 1, False, True

    def encode_with_transformer(self, text):
        x = (self.model.token_embedding(text) + self.model.positional_embedding).permute(1, 0, 2)
        out = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        final = self.model.ln_final(out["last"])
        out["pooled"] = final[torch.arange(final.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return out

    def text_transformer_forward(self, x, attn_mask=None):
        out, blocks = {}, self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                out["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=attn_mask)
        out["last"] = x.permute(1, 0, 2)
        return out


# ---- A1111's wrappers ----------------------------------------------------------------------------------------
class A1111TextWrapper(nn.Module):
    """Prompt → 75-token chunks (BOS + tokens + EOS + padding), each encoded, concatenated; pooled of chunk 0."""

    def __init__(self, wrapped, tokenizer, id_pad):
        super().__init__()
        self.wrapped, self.tokenizer = wrapped, tokenizer
        self.id_start, self.id_end, self.id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, id_pad
        self.input_key, self.return_pooled = "txt", getattr(wrapped, "return_pooled", False)

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def forward(self, texts):
        tokenized = self.tokenize(texts)
        n_chunks = max(1, *(-(-len(ids) // 75) for ids in tokenized))
        zs = []
        for c in range(n_chunks):
            rows = []
            for ids in tokenized:
                body = ids[c * 75:(c + 1) * 75]
                row = [self.id_start] + body + [self.id_end] * (76 - len(body))
                first_end = row.index(self.id_end)
                rows.append(row[:first_end + 1] + [self.id_pad] * (76 - first_end))
            zs.append(self.encode_with_transformers(torch.tensor(rows)))
        z = torch.hstack(zs)
        return (z, zs[0].pooled) if self.return_pooled else z


class A1111ClipL(A1111TextWrapper):  # FrozenCLIPEmbedderForSDXLWithCustomWords (sdxl_clip_l_skip off)
    def encode_with_transformers(self, tokens):
        out = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        return out.hidden_states[self.wrapped.layer_idx] if self.wrapped.layer == "hidden" else out.last_hidden_state


class A1111OpenClip2(A1111TextWrapper):  # FrozenOpenCLIPEmbedder2WithCustomWords
    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        z.pooled = d["pooled"]
        return z


# ---- conditioner, UNet wrapper, first stage, the engine ----------------------------------------------------------
class SizeEmbedder(nn.Module):  # sgm's ConcatTimestepEmbedderND
    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key, self.return_pooled = outdim, input_key, False

    def forward(self, x):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class Conditioner(nn.Module):  # sgm's GeneralConditioner.forward
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=()):
        out = {}
        for embedder in self.embedders:
            with torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                key = {2: "vector", 3: "crossattn"}[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                out[key] = torch.cat((out[key], emb), {"vector": 1, "crossattn": 2}[key]) if key in out else emb
        return out


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


class FirstStage(nn.Module):  # sgm's AutoencoderKL encode: a posterior sample
    def __init__(self):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Encoder

        self.encoder, self.quant_conv = Encoder(**VAE_CONFIG), nn.Conv2d(8, 8, 1)

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x))).sample()


class FakeDiffusionEngine(nn.Module):
    is_sdxl, is_sdxl_inpaint = True, False

    def __init__(self, unet, conditioner, first_stage, parameterization="eps"):
        super().__init__()
        self.model, self.conditioner, self.first_stage_model = OpenAIWrapper(unet), conditioner, first_stage
        self.cond_stage_model = conditioner  # what A1111's hijack sets for two text encoders
        self.scale_factor, self.parameterization = 0.13025, parameterization
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2  # LegacyDDPMDiscretization
        self.alphas_cumprod = torch.asarray(np.cumprod(1 - betas), dtype=torch.float32)

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)

    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, x):
        return x

    def get_learned_conditioning(self, prompts, width=1024, height=1024):
        n = len(prompts)
        size = torch.tensor([height, width], dtype=torch.float32).repeat(n, 1)
        return self.conditioner({"txt": prompts, "original_size_as_tuple": size, "target_size_as_tuple": size,
                                 "crop_coords_top_left": torch.zeros(n, 2)})


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def engine_from_single_file(path, tokenizer, clip_l_config, heads_g: int, time_dim: int,
                            parameterization="eps") -> FakeDiffusionEngine:
    """The A1111 SDXL model of `tiny_families.sdxl_single_file(path, pipe)`: the pipeline's tokenizer and CLIP-L
    config, bigG's head count, the size embedders' width (`addition_time_embed_dim`)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    state = load_file(str(path))
    unet_state = _strip(state, "model.diffusion_model.")
    vector, hidden = unet_state["label_emb.0.0.weight"].shape[1], unet_state["label_emb.0.0.weight"].shape[0]
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                     num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                     use_linear_in_transformer=True, transformer_depth=1, context_dim=2048, legacy=False,
                     num_classes="continuous")
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(vector, hidden), nn.SiLU(), nn.Linear(hidden, hidden)))
    unet.load_state_dict(unet_state)

    clip_l = CLIPTextModel(clip_l_config)
    l_state = _strip(state, "conditioner.embedders.0.transformer.")
    if not hasattr(clip_l, "text_model"):  # transformers 5 dropped the text_model level the files (and A1111's 4.30) have
        l_state = _strip(l_state, "text_model.")
    clip_l.load_state_dict(l_state)
    g_state = _strip(state, "conditioner.embedders.1.model.")
    layers = 1 + max(int(k.split(".")[2]) for k in g_state if k.startswith("transformer.resblocks."))
    vocab, width = g_state["token_embedding.weight"].shape
    bigg = OpenClipText(vocab, width, heads_g, layers, mlp=g_state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    bigg.load_state_dict(g_state)
    first_stage = FirstStage()
    first_stage.load_state_dict({k: v for k, v in _strip(state, "first_stage_model.").items()
                                 if k.startswith(("encoder.", "quant_conv."))})  # the decoder is not needed

    # A1111's hijack: token tables wrapped, embedders wrapped
    emb = getattr(clip_l, "text_model", clip_l).embeddings
    emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding)
    bigg.token_embedding = EmbeddingsWithFixes(bigg.token_embedding)
    embedders = [A1111ClipL(SgmClipL(clip_l, tokenizer), tokenizer, id_pad=tokenizer.eos_token_id),
                 A1111OpenClip2(SgmOpenClip2(bigg), tokenizer, id_pad=0),
                 *(SizeEmbedder(time_dim, key) for key in ("original_size_as_tuple", "crop_coords_top_left",
                                                          "target_size_as_tuple"))]
    engine = FakeDiffusionEngine(unet, Conditioner(embedders), first_stage, parameterization).eval()
    engine.requires_grad_(False)
    return engine
