"""Tiny random SD2 and SDXL pipelines: the real diffusers/transformers classes and topology, small sizes.

The text width is what identifies a family (SD2 1024, SDXL 768 + 1280 = 2048), so the encoders keep
their real widths; everything that does not decide the family is small: one or two layers, narrow MLPs,
a tokenizer with the first 4,000 of CLIP's BPE merges (a 4,514-token vocabulary instead of 49,408, so a
1024/1280-wide token table stays a few MB), UNets of the real block layout at 32/64 channels, a 2×
VAE. Text-encoder configs carry the legacy `eos_token_id = 2` that real SD2/SDXL configs carry.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TOY_TOKENIZER = Path(__file__).resolve().parents[1] / "perfusion_ext" / "toy" / "model" / "tokenizer"
N_MERGES = 4000


def tiny_tokenizer_files(folder: Path, pad: str | None = None) -> Path:
    """CLIP's BPE restricted to its first N_MERGES merges: ids of every word it can build are CLIP's own."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((TOY_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOY_TOKENIZER / "merges.txt").read_text(encoding="utf-8").split("\n")[1:N_MERGES + 1]
    by_id = sorted(vocab, key=vocab.get)[:512 + N_MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(by_id)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eos = "<|endoftext|>"
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": eos, "unk_token": eos, "pad_token": pad or eos, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_tokenizer(tmp: Path, pad: str | None = None):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_tokenizer_files(tmp, pad)))


def _clip_config(tokenizer, width: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection or width,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the legacy ids real SD2/SDXL configs carry
    )


def tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=scaling_factor)


def sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                         timestep_spacing="leading")


def tiny_sd2_pipeline(tmp: Path, prediction_type: str = "epsilon", seed: int = 0):
    """SD2's architecture: OpenCLIP-H-style CLIPTextModel (1024 wide, gelu, "!" padding), linear-projection
    transformers, 4 levels × 2 layers (16 attn2 blocks), epsilon or v-prediction."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(tmp / "tokenizer", pad="!")
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 1024, 16, "gelu", projection=512)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=1024,
        attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionPipeline(vae=tiny_vae(0.18215).eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=sd_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet(cross_attention_dim: int = 2048, pooled_dim: int = 1280, time_embed_dim: int = 8,
                   transformer_layers=(1, 1, 2)):
    """SDXL's UNet layout: no attention at the first level, text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=transformer_layers,
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4, 4), use_linear_projection=True,
        norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
    ).eval()


def tiny_sdxl_refiner_unet():
    """The SDXL refiner's UNet layout: OpenCLIP-bigG alone (1280 wide), 5 time ids (sizes, crop, aesthetic score)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, transformer_layers_per_block=1,
        cross_attention_dim=1280, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=1280 + 5 * 8,
    ).eval()


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0, transformer_layers=(1, 1, 2)):
    """SDXL's architecture: CLIP-L (768) ‖ OpenCLIP-bigG (1280, with projection) penultimate layers into a
    2048-wide context, pooled text_embeds and size/crop time_ids, Euler sampling as SDXL ships it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(tmp / "tokenizer")
    tokenizer_2 = tiny_tokenizer(tmp / "tokenizer_2", pad="!")
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 768, 12, "quick_gelu")).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 1280, 20, "gelu", projection=1280)).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025).eval(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=tiny_sdxl_unet(transformer_layers=transformer_layers), scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomize_zero_init(model):
    """ldm zero-initialises output convs and attention projections; a random model must not be inert."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)


def _ldm_vae_state(prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """ldm's AutoencoderKL at tiny_vae's sizes (encoder, decoder, quant convs), as a state dict."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    cfg = dict(ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=16,
               z_channels=4, double_z=True)
    parts = {"encoder": Encoder(**cfg), "decoder": Decoder(**cfg), "quant_conv": torch.nn.Conv2d(8, 8, 1),
             "post_quant_conv": torch.nn.Conv2d(4, 4, 1)}
    return {f"{prefix}{name}.{k}": v for name, module in parts.items() for k, v in module.state_dict().items()}


def _open_clip_text_state(prefix: str, vocab: int, width: int, layers: int, mlp: int = 64) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's state dict (the keys SD2's and SDXL's checkpoints carry), random values."""
    g = torch.Generator().manual_seed(7)

    def r(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    out = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(77, width, scale=0.01),
           "ln_final.weight": 1 + r(width), "ln_final.bias": r(width), "text_projection": r(width, width),
           "logit_scale": torch.tensor(4.6)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        out.update({
            block + "ln_1.weight": 1 + r(width), block + "ln_1.bias": r(width),
            block + "attn.in_proj_weight": r(3 * width, width), block + "attn.in_proj_bias": r(3 * width),
            block + "attn.out_proj.weight": r(width, width), block + "attn.out_proj.bias": r(width),
            block + "ln_2.weight": 1 + r(width), block + "ln_2.bias": r(width),
            block + "mlp.c_fc.weight": r(mlp, width), block + "mlp.c_fc.bias": r(mlp),
            block + "mlp.c_proj.weight": r(width, mlp), block + "mlp.c_proj.bias": r(width),
        })
    return {prefix + k: v for k, v in out.items()}


def tiny_ldm_sd2_unet(seed: int = 0):
    """ldm's UNetModel with SD2's options (linear projections) at `tiny_sd2_pipeline`'s sizes."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                     use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False).eval()
    _randomize_zero_init(unet)
    return unet


def sd2_single_file(path: Path, vocab: int, seed: int = 0) -> Path:
    """A single-file SD2 checkpoint in the original (ldm) layout, written from ldm's own UNet and VAE classes
    and OpenCLIP's text keys (one more text layer than diffusers keeps, as SD2's penultimate-layer models
    have), at the sizes of `tiny_sd2_pipeline` (whose folder then serves as the diffusers configs)."""
    from safetensors.torch import save_file

    state = {f"model.diffusion_model.{k}": v for k, v in tiny_ldm_sd2_unet(seed).state_dict().items()}
    state.update(_ldm_vae_state())
    state.update(_open_clip_text_state("cond_stage_model.model.", vocab, 1024, layers=3))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def sdxl_single_file(path: Path, pipe, seed: int = 0) -> Path:
    """A single-file SDXL checkpoint in Stability's (sgm) layout at the sizes of `tiny_sdxl_pipeline(...,
    transformer_layers=(1, 1, 1))`: the UNet from ldm's class (the same module names sgm uses) plus sgm's
    `label_emb` for the pooled/size vector, CLIP-L as transformers keys (`conditioner.embedders.0.transformer.`),
    OpenCLIP-bigG as OpenCLIP keys (`conditioner.embedders.1.model.`), the ldm VAE."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                     num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                     use_linear_in_transformer=True, transformer_depth=1, context_dim=2048, legacy=False)
    _randomize_zero_init(unet)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    vector = pipe.unet.config.projection_class_embeddings_input_dim
    g = torch.Generator().manual_seed(seed + 1)
    for name, shape in (("0.0.weight", (128, vector)), ("0.0.bias", (128,)), ("0.2.weight", (128, 128)),
                        ("0.2.bias", (128,))):
        state[f"model.diffusion_model.label_emb.{name}"] = torch.randn(*shape, generator=g) * 0.05
    state.update(_ldm_vae_state())
    state.update({"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in pipe.text_encoder.state_dict().items()})  # transformers 4's key names, as files have
    state.update(_open_clip_text_state("conditioner.embedders.1.model.", len(pipe.tokenizer_2), 1280,
                                       layers=pipe.text_encoder_2.config.num_hidden_layers))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def small_covariance_corpus(tmp_path_factory):
    """Module fixture body: a 300-caption covariance corpus and a private cache, so C is estimated in seconds
    (later calls read the cache). Use as `small_corpus = pytest.fixture(scope="module", autouse=True)(...)`."""
    from perfusion_ext.core import captions, covariance

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERFUSION_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(covariance, "caption_corpus", lambda: captions.caption_corpus(300))
        yield
