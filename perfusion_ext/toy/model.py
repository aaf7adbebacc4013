"""Architecture and sampling settings of the toy Stable-Diffusion model (diffusers layout).

The toy model is a real `StableDiffusionPipeline`: CLIP BPE tokenizer and `CLIPTextModel`,
`AutoencoderKL` (32×32 RGB ↔ 16×16×4), `UNet2DConditionModel` with cross-attention, a DDIM
scheduler. It is trained from scratch by `python -m perfusion_ext.toy.train_base`.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

MODEL_DIR = Path(__file__).parent / "model"
TEXT_DIM = 128

# v-prediction on a zero-terminal-SNR cosine schedule with "trailing" spacing: sampling starts from
# pure noise at t=999, so the model must draw the background from the text (with a non-zero terminal
# SNR, training leaks each image's mean colour into the last step and the model takes it from the noise).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
    steps_offset=1,  # unused by "trailing" spacing; set so diffusers does not warn
)
SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0, guidance_rescale=0.7)


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=TEXT_DIM,
    )


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(text_encoder_config())


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def build_unet() -> UNet2DConditionModel:
    """SD-style UNet at 16×16 latents; two transformer layers at 4×4 and mid for spatial wording."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(48, 96, 128),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=16,
        cross_attention_dim=TEXT_DIM,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)
