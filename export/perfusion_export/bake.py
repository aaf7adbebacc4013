"""The gated edit folded into weights: one gate at the text input, one MatMul per K/V.

The gate depends only on the text token e, so it is computed once for every concept slot k:

    g(e) = sigmoid(e·A + b),   A[:, k] = u_k / (E_k τ_k),   b_k = −β_k / τ_k

and every attn2 `to_k`/`to_v` becomes a MatMul of e_aug = [e | g(e)] with the baked weight

    [ (W − W Qᵀ)ᵀ ; w_k o*_k rows ]     Qᵀ = I*ᵀ diag(w) G⁻¹ U   (the C⁻¹-projection removal)

which is exactly `ProjectionEdit` (perfusion_ext.core.gated_edit): W e + Σ_k w_k (g_k o*_k − α_k W i*_k) with
α = G⁻¹ U e. The strength w_k scales both the gate column and the projection removal. Computed in
float64 and cast once, so the removal cancels exactly where it should (W' i*_k = (1 − w_k) W i*_k).
"""
from __future__ import annotations

import dataclasses

import torch

from perfusion_ext.core.concept import Concept


@dataclasses.dataclass(frozen=True)
class SlotEntry:
    """A concept placed in gate slot `slot`, with the strength, β and τ baked for it."""

    slot: int
    concept: Concept
    strength: float
    beta: float
    tau: float


# An empty slot's gate bias: its gate is sigmoid(−1e4) = 0 for every token, so with competitive gates it never
# outranks a concept (its K/V rows are zero, so without them its gate value does not matter).
EMPTY_SLOT_BIAS = -1e4


def gate_parameters(entries: list[SlotEntry], n_slots: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [d, N], b [N]) in float64; empty slots have zero weights and a gate shut by EMPTY_SLOT_BIAS (their K/V
    rows are zero too)."""
    weight = torch.zeros(dim, n_slots, dtype=torch.float64)
    bias = torch.full((n_slots,), EMPTY_SLOT_BIAS, dtype=torch.float64)
    for e in entries:
        u = e.concept.target_input_cinv.double()
        energy = u @ e.concept.target_input.double()
        weight[:, e.slot] = u / (energy * e.tau)
        bias[e.slot] = -e.beta / e.tau
    return weight, bias


def gate_scales(entries: list[SlotEntry], n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ [N], β [N]) in float64, for competitive gates, which rank the slots by s = logit·τ + β; empty slots get
    τ = 1, β = 0, so their s is their shut gate's logit, EMPTY_SLOT_BIAS."""
    tau = torch.ones(n_slots, dtype=torch.float64)
    beta = torch.zeros(n_slots, dtype=torch.float64)
    for e in entries:
        tau[e.slot], beta[e.slot] = e.tau, e.beta
    return tau, beta


def baked_weight(weight: torch.Tensor, layer: str, kind: str, entries: list[SlotEntry], n_slots: int) -> torch.Tensor:
    """The [d + N, out] MatMul weight of one projection (`kind` 'key' or 'value') of attn2 `layer`."""
    w = weight.detach().double()  # [out, d]
    present = [e for e in entries if layer in e.concept.key_targets]
    extension = torch.zeros(n_slots, w.shape[0], dtype=torch.float64)
    if present:
        inputs = torch.stack([e.concept.target_input.double() for e in present])  # I* [n, d]
        cinv = torch.stack([e.concept.target_input_cinv.double() for e in present])  # U [n, d]
        strengths = torch.tensor([e.strength for e in present], dtype=torch.float64)
        gram_inverse = torch.linalg.inv(cinv @ inputs.T)  # G_jk = u_j · i*_k
        w = w - (w @ inputs.T) @ (strengths[:, None] * (gram_inverse @ cinv))
        for e, s in zip(present, strengths):
            extension[e.slot] = s * e.concept.targets(kind)[layer].double()
    return torch.cat([w.T, extension], dim=0)
