"""torch modules that give each exported component its exact ONNX signature.

Parameter names become ONNX initializer names, so they are chosen to be stable: the gate is
`perfusion_gate.weight` / `perfusion_gate.bias` and each baked projection is
`unet.<attn2 path>.to_k.baked_weight` (stored [d + N, out], the orientation MatMul consumes, so the
exporter's optimizer never folds a Transpose into an anonymous initializer). Refit finds them by name.
"""
from __future__ import annotations

import contextlib

import torch

from perfusion_ext.core.gated_edit import strongest_only
from perfusion_ext.core.layers import is_diffusers_unet

GATE_WEIGHT, GATE_BIAS = "perfusion_gate.weight", "perfusion_gate.bias"
GATE_TAU, GATE_BETA = "perfusion_gate.tau", "perfusion_gate.beta"  # competitive gates only: s from the gate's logit


def baked_name(module_path: str, proj: str) -> str:
    return f"unet.{module_path}.{proj}.baked_weight"


class GatedTextInput(torch.nn.Module):
    """e_aug = Concat(e, Sigmoid(e·A + b)): MatMul, Add, Sigmoid, Concat once for the whole UNet, in fp32.

    Competitive gates keep only the gate of each token's most similar concept: its similarity comes back from
    the gate's logit as s = logit·τ + β (Mul, Add), then ReduceMax, Equal, Cast and Mul pick it. An empty
    slot's τ = 1 and β = 0 give it s = −1e4 (its shut gate's logit), so it never outranks a concept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, competitive: bool = False,
                 tau: torch.Tensor | None = None, beta: torch.Tensor | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
        self.bias = torch.nn.Parameter(bias.float(), requires_grad=False)
        self.competitive = competitive
        if competitive:
            if tau is None or beta is None:
                raise ValueError("competitive gates need every slot's tau and beta")
            self.tau = torch.nn.Parameter(tau.float(), requires_grad=False)
            self.beta = torch.nn.Parameter(beta.float(), requires_grad=False)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        logit = e @ self.weight + self.bias
        gate = torch.sigmoid(logit)
        if self.competitive:
            gate = strongest_only(gate, logit * self.tau + self.beta)
        return torch.cat([e, gate], dim=-1)


class ExtendedProjection(torch.nn.Module):
    """Stands in for an attn2 to_k/to_v Linear (no bias in SD): x_aug @ baked_weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.baked_weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x, *args, **kwargs):
        return x @ self.baked_weight


@contextlib.contextmanager
def swapped_projections(unet: torch.nn.Module, weights: dict[tuple[str, str], torch.Tensor]):
    """Replace attn2 to_k/to_v by ExtendedProjection for the block; the originals come back after.

    weights: (module_path, 'to_k'|'to_v') -> [d + N, out]. Swapping in place (not deep-copying) keeps
    the peak memory of an SD1.5 export at one UNet.
    """
    originals = []
    try:
        for (path, proj), weight in weights.items():
            attn = unet.get_submodule(path)
            originals.append((attn, proj, getattr(attn, proj)))
            setattr(attn, proj, ExtendedProjection(weight))
        yield unet
    finally:
        for attn, proj, module in reversed(originals):
            setattr(attn, proj, module)


class UNetForExport(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, added…]) -> noise prediction, fp32 I/O whatever the inner dtype.

    With a gate, the text input is augmented once, in fp32, before the (possibly fp16) UNet. `added`: the
    SDXL UNet's extra inputs, "text_time" (text_embeds, time_ids: optimum's) or "vector" (sgm's `y`, what
    NVIDIA's WebUI extension feeds; run inside `vector_conditioning`).
    """

    def __init__(self, unet: torch.nn.Module, gate: GatedTextInput | None, dtype: torch.dtype,
                 added: str | None = None):
        super().__init__()
        self.unet = unet
        self.perfusion_gate = gate
        self.dtype = dtype
        self.added = added

    def forward(self, sample, timestep, encoder_hidden_states, added_0=None, added_1=None):
        e = encoder_hidden_states
        if self.perfusion_gate is not None:
            e = self.perfusion_gate(e)
        x, e = sample.to(self.dtype), e.to(self.dtype)
        extra = [t.to(self.dtype) for t in (added_0, added_1) if t is not None]  # torch.export: no *args
        kwargs = added_cond_kwargs(self.unet, self.added, extra)
        if is_diffusers_unet(self.unet):
            out = self.unet(x, timestep, encoder_hidden_states=e, return_dict=False, **kwargs)[0]
        else:
            out = self.unet(x, timesteps=timestep, context=e)
        return out.float()


def pooled_width(unet) -> int:
    """The pooled text width inside a text_time UNet's vector (SDXL: 2816 − 6 × 256 = 1280)."""
    cfg = unet.config
    return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim


def added_cond_kwargs(unet, added: str | None, extra: list) -> dict:
    """diffusers' `added_cond_kwargs` from the exported extra inputs. For "vector", `y` is split into the pooled
    part and the already-embedded sizes, which pass `add_time_proj` unchanged inside `vector_conditioning`."""
    if added is None:
        return {}
    if added == "text_time":
        return {"added_cond_kwargs": {"text_embeds": extra[0], "time_ids": extra[1]}}
    y, width = extra[0], pooled_width(unet)
    return {"added_cond_kwargs": {"text_embeds": y[:, :width], "time_ids": y[:, width:]}}


@contextlib.contextmanager
def vector_conditioning(unet):
    """For the block, the UNet's `add_time_proj` passes its input through: time_ids may then carry sizes that
    are already Fourier-embedded (sgm's `y` after the pooled part), restored afterwards."""
    original = unet.add_time_proj
    unet.add_time_proj = torch.nn.Identity()
    try:
        yield unet
    finally:
        unet.add_time_proj = original


def vector_from(unet, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """sgm's `y` for these inputs: the pooled projection followed by the embedded sizes (diffusers' add_embeds)."""
    embedded = unet.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
    return torch.cat([text_embeds, embedded.to(text_embeds.dtype)], dim=-1)


class TextEncoderForExport(torch.nn.Module):
    """input_ids (int32) -> the named outputs: (last_hidden_state, pooler_output) by default; SDXL's encoders
    also every `hidden_states.i`, and `text_embeds` (the projected pooled output) for the one with a projection."""

    def __init__(self, text_encoder, outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")):
        super().__init__()
        self.model = text_encoder
        self.outputs = tuple(outputs)

    def forward(self, input_ids):
        hidden = any(n.startswith("hidden_states.") for n in self.outputs)
        out = self.model(input_ids=input_ids.long(), output_hidden_states=hidden)
        return tuple(text_output(out, name).float() for name in self.outputs)


def text_output(out, name: str) -> torch.Tensor:
    """One named output of a transformers text-model call (`hidden_states.3` indexes the hidden states)."""
    if name.startswith("hidden_states."):
        return out.hidden_states[int(name.split(".")[1])]
    return getattr(out, name)


@contextlib.contextmanager
def extended_text_encoder(text_encoder, rows: torch.Tensor | None, eos_token_id: int):
    """The text encoder with `rows` appended to its token table and pooling at the real EOS id.

    CLIP configs of SD1.5/SDXL carry the legacy eos_token_id = 2, with which transformers pools at
    argmax(input_ids): a concept id above EOS would hijack the pooled output. Restored afterwards.
    """
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
    embeddings = text_model.embeddings
    old_table, old_eos = embeddings.token_embedding, text_model.eos_token_id
    try:
        if rows is not None and len(rows):
            base = old_table.weight.detach()
            table = torch.cat([base, rows.to(base.dtype)])
            embeddings.token_embedding = torch.nn.Embedding.from_pretrained(table, freeze=True)
        text_model.eos_token_id = eos_token_id
        yield text_encoder
    finally:
        embeddings.token_embedding = old_table
        text_model.eos_token_id = old_eos


class VaeEncoderForExport(torch.nn.Module):
    """sample [B, 3, H, W] -> latent_parameters (mean ‖ logvar), what optimum's VAE encoder returns."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class VaeDecoderForExport(torch.nn.Module):
    """latent_sample (unscaled) -> sample in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]
