"""The gated rank-1 edit of one K or V projection, for any number of concepts (docs/design.md, "The math").

For input tokens e, frozen weight W and concepts k with target input i*_k, u_k = C⁻¹ i*_k,
target output o*_k, strength w_k, gate (β_k, τ_k):

    α(e)   = G⁻¹ Uᵀ e                 (G_jk = u_j · i*_k; exact C⁻¹-orthogonal projection, no C needed)
    s_k(e) = (u_k · e) / E_k,  E_k = u_k · i*_k
    g_k(e) = sigmoid((s_k(e) − β_k) / τ_k)
    out(e) = W e + Σ_k w_k (g_k(e) o*_k − α_k(e) W i*_k)

For one concept α = s, the paper's formula. Gate and projection run in fp32 even for fp16/bf16
models (an fp16 gate measurably blurs the concept boundary), in fp64 for fp64 inputs (tests);
only the final delta is cast to the model's dtype.

Competitive gates (an option for prompts with several concepts): each token keeps only the gate of the
concept it is most similar to, g_k(e)·[s_k(e) = max_j s_j(e)] in place of g_k(e), so a concept's edit never
acts on another concept's word; the projection α still removes every i*_k. With equal β and τ that is the
token's most open gate; with different ones (a tag's `beta=`, auto-β defaults) a concept with a lower β
would otherwise open wider on another concept's own word than that concept does and take it over.

The fast path (inference): α and g depend only on the text and the concepts, not on the layer, so the
edits of one activation share them through a `CoefficientCache` (computed once per text tensor, not
once per projection, and once per prompt where a pipeline passes the same text at every step); each
projection then adds [w g | w α] @ [O* ; −(W I*)ᵀ], one MatMul with a weight kept until W changes.
Under autograd (training) nothing is cached.
"""
from __future__ import annotations

import dataclasses

import torch


class CoefficientCache:
    """The last text's [w g | w α] for one concept set, shared by the edits of one activation (inference only)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.text: torch.Tensor | None = None
        self.version = -1
        self.values: dict[tuple, torch.Tensor] = {}

    def lookup(self, e: torch.Tensor, key: tuple) -> torch.Tensor | None:
        if self.text is not e or self.version != version_of(e):
            return None
        return self.values.get(key)

    def store(self, e: torch.Tensor, key: tuple, value: torch.Tensor) -> None:
        version = version_of(e)
        if version is None:  # an inference-mode tensor has no version counter: nothing proves it unchanged
            return
        if self.text is not e or self.version != version:
            self.text, self.version, self.values = e, version, {}
        self.values[key] = value


def version_of(t: torch.Tensor) -> int | None:
    """The in-place modification counter of `t`, None for inference-mode tensors (they have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclasses.dataclass
class ProjectionEdit:
    """Everything one `to_k`/`to_v` needs for its concepts, stacked along the concept axis (n)."""

    target_inputs: torch.Tensor  # I*  [n, d]
    target_inputs_cinv: torch.Tensor  # U [n, d]
    target_outputs: torch.Tensor  # O* [n, out]
    strengths: torch.Tensor  # w [n]
    betas: torch.Tensor  # [n]
    taus: torch.Tensor  # [n]
    linear_gate: bool = False  # g = s: the ungated ROME update (tests, ablations)
    competitive: bool = False  # each token keeps only its most similar concept's gate (several concepts in one prompt)
    cache: CoefficientCache | None = None  # shared with the other edits of the same concepts (hooks)
    concept_key: tuple = ()  # which concepts, in which order: edits with equal keys share coefficients

    def __post_init__(self):
        tensors = {f.name: getattr(self, f.name).double() for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        gram = tensors["target_inputs_cinv"] @ tensors["target_inputs"].T  # G_jk = u_j · i*_k
        tensors["gram_inverse"] = torch.linalg.inv(gram)
        tensors["energies"] = torch.diagonal(gram).clone()  # E_k = u_k · i*_k
        self._master = tensors
        self._cast: dict[tuple, dict[str, torch.Tensor]] = {}
        self._combined: tuple | None = None  # (W, its version, dtype, device, [O* ; −(W I*)ᵀ])

    def _tensors(self, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._master.items()}
        return self._cast[key]

    def set_gates(self, betas, taus) -> None:
        """Move every concept's gate (β_k, τ_k), e.g. at a new sampling step; targets and projection stay."""
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1).clone()
        taus = torch.as_tensor(taus, dtype=torch.float64).reshape(-1).clone()
        if betas.shape != self.betas.shape or taus.shape != self.taus.shape:
            raise ValueError(f"set_gates needs {self.betas.numel()} values each, got {betas.numel()} and {taus.numel()}")
        if not bool((taus > 0).all()):
            raise ValueError("tau must be > 0")
        self.betas, self.taus = betas, taus
        self._master["betas"], self._master["taus"] = betas, taus
        for (dtype, device), cast in self._cast.items():
            cast["betas"], cast["taus"] = betas.to(device=device, dtype=dtype), taus.to(device=device, dtype=dtype)
        if self.cache is not None:
            self.cache.clear()

    @staticmethod
    def compute_dtype(e: torch.Tensor) -> torch.dtype:
        return torch.float64 if e.dtype == torch.float64 else torch.float32

    def coefficients(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, g): projection coefficients and gate values, [..., n] each, in fp32 (fp64 for fp64 e)."""
        dtype = self.compute_dtype(e)
        t = self._tensors(dtype, e.device)
        proj = e.to(dtype) @ t["target_inputs_cinv"].T  # u_k · e
        alpha = proj @ t["gram_inverse"].T
        return alpha, self.gate(proj / t["energies"])

    def similarity(self, e: torch.Tensor) -> torch.Tensor:
        """s_k(e) = (u_k · e) / E_k, [..., n]: 1 at the concept's own target input, 0 where u_k · e = 0."""
        t = self._tensors(self.compute_dtype(e), e.device)
        return (e.to(t["energies"].dtype) @ t["target_inputs_cinv"].T) / t["energies"]

    def gate(self, similarity: torch.Tensor) -> torch.Tensor:
        """g_k = sigmoid((s_k − β_k) / τ_k), or s_k itself for the ungated update; competitive gates keep only
        the gate of each token's most similar concept."""
        if self.linear_gate:
            gate = similarity
        else:
            t = self._tensors(similarity.dtype, similarity.device)
            gate = torch.sigmoid((similarity - t["betas"]) / t["taus"])
        return strongest_only(gate, similarity) if self.competitive else gate

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """P(e): the C⁻¹-orthogonal projection of e onto span{i*_k}."""
        alpha, _ = self.coefficients(e)
        return alpha @ self._tensors(alpha.dtype, e.device)["target_inputs"]

    def delta(self, e: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k (g_k o*_k − α_k W i*_k), shape [..., out], in the compute dtype."""
        if torch.is_grad_enabled():  # training: every tensor stays in the autograd graph
            alpha, gate = self.coefficients(e)
            t = self._tensors(alpha.dtype, e.device)
            w_target_inputs = t["target_inputs"] @ weight.to(alpha.dtype).T  # rows W i*_k, [n, out]
            strengths = t["strengths"]
            return (strengths * gate) @ t["target_outputs"] - (strengths * alpha) @ w_target_inputs
        return self.scaled_coefficients(e) @ self._combined_weight(weight, self.compute_dtype(e), e.device)

    def scaled_coefficients(self, e: torch.Tensor) -> torch.Tensor:
        """[w g | w α], [..., 2n]; from the shared cache when another edit of these concepts computed it."""
        key = (self.concept_key, self.competitive, e.dtype, e.device)
        cached = self.cache.lookup(e, key) if self.cache is not None else None
        if cached is None:
            alpha, gate = self.coefficients(e)
            strengths = self._tensors(alpha.dtype, e.device)["strengths"]
            cached = torch.cat([strengths * gate, strengths * alpha], dim=-1)
            if self.cache is not None:
                self.cache.store(e, key, cached)
        return cached

    def _combined_weight(self, weight: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """[O* ; −(W I*)ᵀ], [2n, out], rebuilt only when W is another tensor or was changed in place."""
        key = (version_of(weight), dtype, device)
        held = self._combined
        if held is None or held[0] is not weight or held[1:-1] != key or key[0] is None:
            t = self._tensors(dtype, device)
            # W may live elsewhere than e (Forge's low-VRAM mode casts CPU weights per call)
            combined = torch.cat([t["target_outputs"], -(t["target_inputs"] @ weight.to(device=device, dtype=dtype).T)])
            self._combined = (weight, *key, combined)
        return self._combined[-1]

    def apply(self, e: torch.Tensor, base_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The edited projection output, given the unedited one (W e, plus whatever patches made it)."""
        return base_output + self.delta(e, weight).to(base_output.dtype)


def strongest_only(gate: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """The gates [..., n] with all but the one of each token's most similar concept (largest s) set to 0 (ties keep
    theirs): competitive gates."""
    if gate.shape[-1] < 2:
        return gate
    return gate * (similarity == similarity.amax(dim=-1, keepdim=True)).to(gate.dtype)


def stack_edit(concepts, kind: str, layer: str, linear_gate: bool = False, cache: CoefficientCache | None = None,
               concept_key: tuple = (), competitive: bool = False) -> ProjectionEdit:
    """Build the ProjectionEdit of `layer` for `kind` ('key' or 'value').

    `concepts` holds (Concept, strength, beta, tau) tuples; every concept must carry the layer. Edits given
    one `cache` and equal `concept_key`s share their coefficients (the same concepts in the same order).
    `competitive`: each token keeps only its most similar concept's gate.
    """
    def stack(values):
        return torch.stack([v.double() for v in values])

    return ProjectionEdit(
        target_inputs=stack([c.target_input for c, *_ in concepts]),
        target_inputs_cinv=stack([c.target_input_cinv for c, *_ in concepts]),
        target_outputs=stack([c.targets(kind)[layer] for c, *_ in concepts]),
        strengths=torch.tensor([float(w) for _, w, _, _ in concepts], dtype=torch.float64),
        betas=torch.tensor([float(b) for _, _, b, _ in concepts], dtype=torch.float64),
        taus=torch.tensor([float(t) for _, _, _, t in concepts], dtype=torch.float64),
        linear_gate=linear_gate, cache=cache, concept_key=concept_key, competitive=competitive,
    )


def gate_edit(concepts, competitive: bool = False) -> ProjectionEdit:
    """A ProjectionEdit for reading similarities and gates only (no layer, no targets): the inspector's.
    `concepts` holds (Concept, beta, tau) tuples."""
    return ProjectionEdit(
        target_inputs=torch.stack([c.target_input.double() for c, _, _ in concepts]),
        target_inputs_cinv=torch.stack([c.target_input_cinv.double() for c, _, _ in concepts]),
        target_outputs=torch.zeros(len(concepts), 1, dtype=torch.float64),
        strengths=torch.ones(len(concepts), dtype=torch.float64),
        betas=torch.tensor([float(b) for _, b, _ in concepts], dtype=torch.float64),
        taus=torch.tensor([float(t) for _, _, t in concepts], dtype=torch.float64),
        competitive=competitive,
    )


def ema_update(current: torch.Tensor, observed: torch.Tensor, momentum: float = 0.99) -> torch.Tensor:
    """One EMA step of the target input: i* ← m·i* + (1 − m)·x (docs/design.md, momentum 0.99)."""
    return momentum * current + (1.0 - momentum) * observed
