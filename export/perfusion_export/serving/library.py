"""A concept library: N slots in one UNet, any subset of them active per request.

For a request with active concepts S (strengths w_k, gates β_k/τ_k) every attn2 K/V output is

    W e + Σ_{k∈S} w_k (g_k(e) o*_k − α_k(e) W i*_k),     α_S = G_S⁻¹ U_S e

— the multi-concept edit of `perfusion_ext.core.gated_edit`, nothing approximated. The coefficients
c_o[k] = w_k g_k(e) and c_a[k] = w_k α_k(e) (zero outside S) depend only on the text, so the text side
computes them once per request, and the UNet reads them as 2N extra channels of `encoder_hidden_states`:
every K/V projection is one MatMul of [e | c_o | c_a] with [Wᵀ ; O* ; −(W I*)ᵀ]. Requests with different
concepts batch together, and putting a concept into a slot rewrites only that slot's rows.
"""
from __future__ import annotations

import torch

from perfusion_ext.core.gated_edit import gate_edit
from perfusion_ext.core.hooks import ResolvedConcept

from ..bake import SlotEntry
from ..modules import baked_name


def library_weight(weight: torch.Tensor, layer: str, kind: str, entries: list[SlotEntry], n_slots: int) -> torch.Tensor:
    """The [d + 2N, out] MatMul weight of one projection (`kind` 'key' or 'value'): Wᵀ, then o*_k in row d + k,
    then −(W i*_k) in row d + N + k. Empty slots (and concepts without this layer) keep zero rows."""
    w = weight.detach().double()  # [out, d]
    targets = torch.zeros(n_slots, w.shape[0], dtype=torch.float64)
    removals = torch.zeros(n_slots, w.shape[0], dtype=torch.float64)
    for e in entries:
        if layer in e.concept.key_targets:
            targets[e.slot] = e.concept.targets(kind)[layer].double()
            removals[e.slot] = -(w @ e.concept.target_input.double())
    return torch.cat([w.T, targets, removals], dim=0)


def unet_tensors(layers, entries: list[SlotEntry], n_slots: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every library initializer of the UNet by its ONNX name (`layers`: cross_attention_layers or the base K/V)."""
    out = {}
    for name, layer in layers.items():
        for proj, kind in (("to_k", "key"), ("to_v", "value")):
            w = getattr(layer, proj).weight
            out[baked_name(layer.module_path, proj)] = library_weight(w, name, kind, entries, n_slots).to(dtype)
    return out


def coefficient_channels(context: torch.Tensor, active: list[tuple[int, ResolvedConcept]], n_slots: int,
                         fraction: float = 0.0, competitive: bool = False) -> torch.Tensor:
    """[B, T, 2N] float32: c_o = w g(e) in channels k, c_a = w α(e) in channels N + k, zero outside the active
    (slot, concept) pairs; gates at `fraction` of the sampling steps (β/τ schedules), competitive among the
    active concepts with `competitive`. The gates and the joint projection are the PyTorch hooks' own
    (`gate_edit`: fp32 for fp32 text)."""
    out = torch.zeros(*context.shape[:-1], 2 * n_slots, dtype=torch.float32)
    if not active:
        return out
    edit = gate_edit([(r.concept, *r.gate_at(fraction)) for _, r in active], competitive)
    alpha, gate = edit.coefficients(context.float())
    strengths = torch.tensor([r.strength for _, r in active], dtype=alpha.dtype)
    slots = torch.tensor([slot for slot, _ in active])
    out[..., slots] = (strengths * gate).float()
    out[..., n_slots + slots] = (strengths * alpha).float()
    return out
