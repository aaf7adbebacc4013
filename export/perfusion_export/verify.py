"""Checks run on every export before it is moved into place, all on CPU.

Each check returns measured figures (they go into perfusion_manifest.json) and raises
VerificationError when a bound is broken, which aborts the export and leaves nothing behind.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.hooks import ResolvedConcept, attach, build_edits, detach

from .layouts import Contract

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
MIN_CONCEPT_EFFECT = 1e-3
LEVELS = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_NP = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
       onnx.TensorProto.INT64: "int64"}


class VerificationError(PerfusionError):
    """An exported model broke a verified property; nothing was written."""


def session(path: Path, level: str = "enable_all") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_model(path: Path) -> None:
    """onnx.checker, full check (with shape inference), reading the external data."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"{path.name} fails onnx.checker: {exc}") from exc


def io_table(path: Path) -> dict:
    """The I/O contract as written in the file: names, element types, dims (ints or axis names)."""
    model = onnx.load(str(path), load_external_data=False)

    def row(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": _NP.get(t.elem_type, str(t.elem_type)), "dims": dims}

    return {"inputs": [row(v) for v in model.graph.input], "outputs": [row(v) for v in model.graph.output]}


def check_contract(path: Path, contract: Contract) -> dict:
    table = io_table(path)
    if table != contract.as_table():
        raise VerificationError(f"{path.name}: I/O {table} differs from the layout contract {contract.as_table()}")
    return table


def allowed_ops() -> set[str]:
    text = resources.files("perfusion_export").joinpath("data/tensorrt_onnx_ops.txt").read_text()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def check_ops(path: Path) -> list[str]:
    """Standard-domain ops from TensorRT's ONNX operator list only; no local functions."""
    model = onnx.load(str(path), load_external_data=False)
    allowed = allowed_ops()
    bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") or n.op_type not in allowed})
    if bad or model.functions:
        raise VerificationError(f"{path.name} uses ops outside TensorRT's ONNX list: {bad or 'local functions'}")
    return sorted({n.op_type for n in model.graph.node})


def check_gate_fp32(path: Path) -> dict:
    """In fp16 exports the gate (MatMul, Add, Sigmoid and their initializers) must stay fp32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    matmul = next(n for n in consumers["perfusion_gate.weight"] if n.op_type == "MatMul")
    add = next(n for n in consumers[matmul.output[0]] if n.op_type == "Add")
    sigmoid = next(n for n in consumers[add.output[0]] if n.op_type == "Sigmoid")
    found = {"perfusion_gate.weight": types["perfusion_gate.weight"], "perfusion_gate.bias": types["perfusion_gate.bias"],
             "MatMul": types.get(matmul.output[0]), "Add": types.get(add.output[0]),
             "Sigmoid": types.get(sigmoid.output[0])}
    wrong = {k: v for k, v in found.items() if v != onnx.TensorProto.FLOAT}
    if wrong:
        raise VerificationError(f"{path.name}: gate tensors not fp32: {wrong}")
    return {k: "float32" for k in found}


def shape_sets(factor: int) -> list[tuple[int, int, int, int]]:
    """(batch, latent height, latent width, tokens): batch 1–3, two latent sizes, 77 and 154 tokens."""
    return [(1, factor, factor, 77), (2, 2 * factor, factor, 154), (3, factor, 2 * factor, 77)]


def unet_inputs(batch, height, width, tokens, channels, dim, entries, per_sample_t: bool, seed=0):
    """Random latents and text, with every concept's i* at a few token positions so its gate opens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g)
    e = torch.randn(batch, tokens, dim, generator=g)
    for k, entry in enumerate(entries):
        e[:, 1 + 3 * k] = entry.concept.target_input.float()
        e[:, 2 + 3 * k] = 0.5 * entry.concept.target_input.float() + 0.5 * e[:, 2 + 3 * k]
    t = torch.full((batch,) if per_sample_t else (1,), 400.0)
    return x, t, e


def torch_unet(unet, x, t, e, entries=(), extra=(), layout: str = "optimum", competitive: bool = False):
    """The PyTorch reference: the hooks with each concept's baked strength, β and τ (and SDXL's added inputs,
    as the layout feeds them; `competitive`: competitive gates)."""
    from .components import added_kind, unet_inputs_as
    from .modules import added_cond_kwargs

    edits = build_edits(unet, [ResolvedConcept(s.concept, s.strength, s.beta, s.tau) for s in entries], competitive)
    handles = attach(edits)
    kind = added_kind(unet, layout)
    try:
        with torch.no_grad(), unet_inputs_as(unet, kind):
            if hasattr(unet, "down_blocks"):
                return unet(x, t, encoder_hidden_states=e, **added_cond_kwargs(unet, kind, list(extra))).sample.numpy()
            return unet(x, timesteps=t.expand(x.shape[0]), context=e).numpy()
    finally:
        detach(handles)


def unet_parity(unet, entries, path: Path, contract: Contract, precision: str, factor: int,
                layout: str = "optimum", competitive: bool = False) -> dict:
    """ORT vs the torch hooks at every shape set and both ORT optimisation levels; the concepts' effect."""
    from .components import added_inputs

    names = [p.name for p in contract.inputs]
    per_sample_t = contract.inputs[1].dims != (1,)
    sessions = {level: session(path, level) for level in LEVELS}
    figures, worst, effect = {}, 0.0, None
    for batch, h, w, tokens in shape_sets(factor):
        x, t, e = unet_inputs(batch, h, w, tokens, contract.inputs[0].dims[1], contract.inputs[2].dims[2],
                              entries, per_sample_t)
        extra = added_inputs(unet, layout, batch, h, w, seed=batch)
        ref = torch_unet(unet, x, t, e, entries, extra, layout, competitive)
        for level, sess in sessions.items():
            feed = (x.numpy(), t.numpy(), e.numpy()) + tuple(a.numpy() for a in extra)
            out = sess.run(None, dict(zip(names, feed)))[0]
            r = rel(out, ref)
            figures[f"b{batch}_{h}x{w}_t{tokens}_{level}"] = r
            worst = max(worst, r)
        if entries and effect is None:
            effect = rel(ref, torch_unet(unet, x, t, e, (), extra, layout))
    if worst > TOLERANCE[precision]:
        raise VerificationError(f"UNet ORT-vs-torch relative error {worst:.3g} exceeds {TOLERANCE[precision]:g} "
                                f"({precision}); per shape: {figures}")
    if entries and effect < MIN_CONCEPT_EFFECT:
        raise VerificationError(f"the concepts change the UNet output by only {effect:.3g} (< {MIN_CONCEPT_EFFECT:g})")
    return {"max_rel": worst, "per_shape": figures, "concept_effect_rel": effect}


def vae_parity(vae, folder: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    image = torch.rand(1, vae.config.in_channels, 8 * f, 8 * f, generator=g) * 2 - 1
    latent = torch.randn(1, vae.config.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        moments = vae.encoder(image)
        moments = vae.quant_conv(moments) if vae.quant_conv is not None else moments
        decoded = vae.decode(latent).sample
    enc = session(folder / "vae_encoder" / "model.onnx").run(None, {"sample": image.numpy()})[0]
    dec = session(folder / "vae_decoder" / "model.onnx").run(None, {"latent_sample": latent.numpy()})[0]
    figures = {"vae_encoder_rel": rel(enc, moments.numpy()), "vae_decoder_rel": rel(dec, decoded.numpy())}
    if max(figures.values()) > TOLERANCE["fp32"]:
        raise VerificationError(f"VAE ORT-vs-torch error too large: {figures}")
    return figures


def text_encoder_checks(text_encoder, rows, eos_token_id: int, tokenizer_dir: Path, path: Path, base_path: Path,
                        token_slots) -> dict:
    """Plain prompts bit-identical to the base export; concept prompts equal torch; pooling at the real EOS."""
    from transformers import CLIPTokenizer

    from .modules import extended_text_encoder

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))

    def ids(prompts):
        return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids.astype(np.int32)

    ours, base = session(path), session(base_path)
    names = [o.name for o in ours.get_outputs()]
    pooled_name = "text_embeds" if "text_embeds" in names else "pooler_output"
    plain = ids(["a photo of a dog", "", "a red circle on a blue background, centered"])
    same = all(np.array_equal(a, b) for a, b in zip(ours.run(None, {"input_ids": plain}), base.run(None, {"input_ids": plain})))
    if not same:
        raise VerificationError("the text encoder's outputs for plain prompts differ from the base model's export")
    figures = {"plain_prompts_bit_identical": True}
    filled = [s for s in token_slots if s.name is not None]
    if not filled:
        return figures
    prompts = ["a photo of " + " ".join(s.triggers) + " on the beach" for s in filled]
    prompts.append(" and ".join(" ".join(s.triggers) for s in filled))
    concept_ids = ids(prompts)
    for s in filled:
        row = ids(["a photo of " + " ".join(s.triggers)])[0]
        if not set(s.ids) <= set(row.tolist()):
            raise VerificationError(f"the exported tokenizer does not map {s.triggers} to ids {s.ids}")
    outputs = dict(zip(names, ours.run(None, {"input_ids": concept_ids})))
    hidden, pooled = outputs["last_hidden_state"], outputs[pooled_name]
    with torch.no_grad(), extended_text_encoder(text_encoder, rows, eos_token_id):
        ref = text_encoder(input_ids=torch.from_numpy(concept_ids).long(), output_hidden_states=True)
    eos_at = (concept_ids == eos_token_id).argmax(axis=1)
    pooled_at_eos = hidden[np.arange(len(concept_ids)), eos_at]
    if pooled_name == "text_embeds":  # the projection of the final-LayerNorm state at the first EOS
        with torch.no_grad():
            pooled_at_eos = text_encoder.text_projection(torch.from_numpy(pooled_at_eos)).numpy()
    from .modules import text_output

    states = [n for n in names if n.startswith("hidden_states.")]
    figures.update({
        "concept_prompts_hidden_rel": max([rel(hidden, ref.last_hidden_state.numpy())]
                                          + [rel(outputs[n], text_output(ref, n).numpy()) for n in states]),
        "concept_prompts_pooled_rel": rel(pooled, text_output(ref, pooled_name).numpy()),
        "pooled_at_eos_max_abs": float(np.abs(pooled - pooled_at_eos).max()),
    })
    if max(figures["concept_prompts_hidden_rel"], figures["concept_prompts_pooled_rel"]) > TOLERANCE["fp32"]:
        raise VerificationError(f"text encoder ORT-vs-torch error too large: {figures}")
    if figures["pooled_at_eos_max_abs"] > (1e-6 if pooled_name == "pooler_output" else 1e-4):
        raise VerificationError("the pooled output is not taken at the EOS token (legacy eos_token_id pooling)")
    return figures
