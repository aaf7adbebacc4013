"""`perfusion export --layout triton --library N`: a Triton model repository serving a concept library.

    REPO/perfusion_manifest.json        what was exported and verified
    REPO/text_encoder/                  token table with every slot's concept rows      (batched)
    REPO/unet/                          the library layout of `library.py`               (batched)
    REPO/vae_decoder/                                                                    (batched)
    REPO/pipeline/1/model.py            BLS: tags, coefficients, scheduler loop, decode  (Python backend)
    REPO/pipeline/library/              library.json, tokenizer, scheduler, slot concepts, base K/V (refit)

Two flavours of the three networks: `onnxruntime` (Triton's onnxruntime_onnx platform, what NGC's
containers run, and where TensorRT is one execution-accelerator line away) and `python` (each ONNX model
inside a Python-backend model through ONNX Runtime, for servers built without the onnxruntime backend,
such as the one in the `nvidia-pytriton` wheel).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from perfusion_ext.core import families
from perfusion_ext.core.atomic import atomic_write_json
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.layers import cross_attention_layers, model_family
from perfusion_ext.pipelines.generate import sampling_defaults

from .. import components, layouts, manifest, onnx_io, tokens, verify
from .. import slots as slot_store
from ..bake import SlotEntry
from ..exporter import _base_hash, _concepts, slot_entries
from ..exporter import check_options as check_export_options
from ..modules import UNetForExport, baked_name, swapped_projections
from ..staging import check_destination, staged
from . import library, triton_config
from .runtime import LIBRARY_JSON

BACKENDS = ("onnxruntime", "python")
MAX_LIBRARY = 4096
NETWORKS = ("text_encoder", "unet", "vae_decoder")


def unet_contract(unet, n_slots: int) -> layouts.Contract:
    """Per-sample timesteps (requests at different steps share a batch); the text carries 2N coefficient channels."""
    cfg = unet.config
    return layouts.Contract(
        (layouts.Port("sample", "float32", ("batch_size", cfg.in_channels, "height", "width")),
         layouts.Port("timestep", "float32", ("batch_size",)),
         layouts.Port("encoder_hidden_states", "float32",
                      ("batch_size", "sequence_length", components.text_dim(unet) + 2 * n_slots))),
        (layouts.Port("out_sample", "float32", ("batch_size", cfg.out_channels, "height", "width")),),
    )


def export_unet(unet, entries: list[SlotEntry], n_slots: int, opset: int, path: Path) -> list[str]:
    tensors = library.unet_tensors(cross_attention_layers(unet), entries, n_slots, torch.float32)
    lookup = {layer.module_path for layer in cross_attention_layers(unet).values()}
    weights = {(p, proj): tensors[baked_name(p, proj)] for p in lookup for proj in ("to_k", "to_v")}
    f = components.latent_factor(unet)
    args = (torch.randn(2, unet.config.in_channels, 2 * f, 3 * f), torch.tensor([500.0, 20.0]),
            torch.randn(2, 154, components.text_dim(unet) + 2 * n_slots))
    contract = unet_contract(unet, n_slots)
    with swapped_projections(unet, weights):
        onnx_io.export_module(UNetForExport(unet, None, torch.float32).eval(), args, contract, opset, path)
    return sorted(tensors)


def check_options(n_slots: int, backend: str, n_concepts: int) -> None:
    if not 1 <= n_slots <= MAX_LIBRARY:
        raise PerfusionError(f"--library must be between 1 and {MAX_LIBRARY}, got {n_slots}.")
    if n_concepts > n_slots:
        raise PerfusionError(f"{n_concepts} concepts do not fit in a library of {n_slots}; raise --library.")
    if backend not in BACKENDS:
        raise PerfusionError(f"unknown --triton-backend {backend!r}; choose {' or '.join(BACKENDS)}.")


def export_library(model, concepts=(), out="triton_repo", *, n_slots: int = 16, backend: str = "onnxruntime",
                   opset: int = 18, pipeline_instances: int = 4, overwrite: bool = False,
                   verify_export: bool = True, tensorrt: bool = False, competitive_gates: bool = False,
                   clause_encoding: bool = False) -> dict:
    """Write a Triton model repository for `model` with a library of `n_slots` concept slots, the first filled
    with `concepts` (paths or Concept objects); `competitive_gates`: every request's concepts get competitive
    gates; `clause_encoding`: every request's prompt is encoded clause by clause (core.clauses). Returns the
    manifest."""
    check_export_options("optimum", "fp32", opset, None, 0)
    check_options(n_slots, backend, len(concepts))
    if tensorrt and backend != "onnxruntime":
        raise PerfusionError("--triton-tensorrt needs --triton-backend onnxruntime (TensorRT runs inside Triton's "
                             "onnxruntime backend).")
    out = Path(out)
    check_destination(out, overwrite)
    loaded = [c for c, _ in _concepts(concepts)]
    if isinstance(model, (str, Path)):
        from perfusion_ext.pipelines.loading import load_pipeline

        pipe = load_pipeline(model)
    else:
        pipe = model
    family = model_family(cross_attention_layers(pipe.unet))
    fam = families.get(family)
    if not fam.exportable or len(fam.encoder_names) != 1 or fam.encoder_layer != "last":
        raise PerfusionError(f"a Triton library of {fam.label} is not supported yet; serve SD1, SD2 or toy models "
                             "(SDXL's two text encoders and added conditioning are not in the serving pipeline).")
    entries = slot_entries(pipe.unet, [(c, 1.0) for c in loaded], None, None)
    with staged(out, overwrite) as tmp:
        info = _write(pipe, entries, n_slots, backend, opset, pipeline_instances, tmp, family, tensorrt,
                      competitive_gates, clause_encoding)
        info["base_hash"] = _base_hash(pipe)
        if verify_export:
            info["verification"] = {"unet": library_unet_parity(pipe.unet, entries, n_slots,
                                                                  tmp / "unet" / "1" / "model.onnx", competitive_gates)}
        manifest.write(tmp, info)
    return info


def _write(pipe, entries, n_slots, backend, opset, instances, tmp: Path, family: str, tensorrt: bool,
           competitive: bool, clause_encoding: bool) -> dict:
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    lib = tmp / "pipeline" / "library"
    vocab = te.get_input_embeddings().num_embeddings
    rows_per_slot = max([1] + [next(iter(e.concept.embeddings.values())).shape[0] for e in entries])
    token_slots, rows = tokens.token_layout(vocab, te.config.hidden_size, family, entries, n_slots, rows_per_slot)
    logging.getLogger(__name__).info("exporting a Triton library of %d slots (%s backend)", n_slots, backend)
    initializers = export_unet(unet, entries, n_slots, opset, tmp / "unet" / "1" / "model.onnx")
    components.export_text_encoder(te, rows, pipe.tokenizer.eos_token_id, opset,
                                   tmp / "text_encoder" / "1" / "model.onnx")
    components.export_vae_decoder(vae, opset, tmp / "vae_decoder" / "1" / "model.onnx")
    pipe.tokenizer.save_pretrained(str(lib / "tokenizer"))
    pipe.scheduler.save_pretrained(str(lib / "scheduler"))
    slot_store.save(lib, unet, entries)
    defaults = sampling_defaults(pipe)
    lib_info = {
        "slots": n_slots, "rows_per_slot": rows_per_slot, "vocab_size": vocab, "base_family": family,
        "vae_factor": components.vae_factor(vae), "latent_channels": unet.config.in_channels,
        "size_multiple": components.vae_factor(vae) * components.latent_factor(unet),
        "vae_scaling_factor": vae.config.scaling_factor,
        "defaults": {"steps": defaults["num_inference_steps"], "guidance": defaults["guidance_scale"],
                     "guidance_rescale": defaults.get("guidance_rescale", 0.0),
                     "width": defaults["width"], "height": defaults["height"]},
        "token_slots": [{"slot": s.slot, "ids": s.ids, "rows": s.n_rows} for s in token_slots],
        "concepts": [slot_concept(e, s) for e, s in zip(entries, token_slots)], "competitive_gates": competitive,
        "clause_encoding": clause_encoding,
    }
    write_json(lib / LIBRARY_JSON, lib_info)
    dims = {"text": te.config.hidden_size, "context": components.text_dim(unet) + 2 * n_slots,
            "latent": unet.config.in_channels, "image": vae.config.out_channels}
    triton_config.write_repository(tmp, backend, dims, instances, tensorrt)
    return {"format_version": manifest.FORMAT_VERSION, "layout": "triton", "triton_backend": backend,
            "tensorrt": tensorrt, "competitive_gates": competitive, "clause_encoding": clause_encoding,
            "base_family": family, "opset": opset, "precision": "fp32",
            "library": {"slots": n_slots, "rows_per_slot": rows_per_slot, "unet_initializers": initializers},
            "files": {name: f"{name}/1/model.onnx" for name in NETWORKS},
            "tokens": {"slots": lib_info["token_slots"]},
            "io": {"unet": unet_contract(unet, n_slots).as_table()},
            "concepts": lib_info["concepts"], "tools": manifest.tool_versions()}


def slot_concept(entry: SlotEntry, token_slot: tokens.TokenSlot) -> dict:
    """A filled slot as library.json lists it: name, ids in the token table, default gate."""
    return {"slot": entry.slot, "name": entry.concept.name, "token_ids": token_slot.ids,
            "beta": entry.beta, "tau": entry.tau, "base_hash": entry.concept.base_hash}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(data, path)  # a refit's library.json is read by a live server


def library_unet_parity(unet, entries: list[SlotEntry], n_slots: int, path: Path, competitive: bool = False) -> dict:
    """ORT library UNet vs the PyTorch hooks for the empty set, each concept alone and all together, at several
    strengths; per-sample timesteps; `competitive`: with competitive gates on both sides."""
    from perfusion_ext.core.hooks import ResolvedConcept

    sess = verify.session(path)
    subsets = [[]] + [[e] for e in entries] + ([list(entries)] if len(entries) > 1 else [])
    figures, worst = {}, 0.0
    f = components.latent_factor(unet)
    for i, subset in enumerate(subsets):
        strength = (1.0, 0.6)[i % 2]
        subset = [SlotEntry(e.slot, e.concept, strength, e.beta, e.tau) for e in subset]
        x, _, e = verify.unet_inputs(2, f, 2 * f, 77, unet.config.in_channels, components.text_dim(unet), subset,
                                     False, seed=i)
        t = torch.tensor([700.0, 30.0])
        active = [(s.slot, ResolvedConcept(s.concept, s.strength, s.beta, s.tau)) for s in subset]
        context = torch.cat([e, library.coefficient_channels(e, active, n_slots, competitive=competitive)], dim=-1)
        out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.numpy()})[0]
        ref = verify.torch_unet(unet, x, t, e, subset, competitive=competitive)
        name = "+".join(s.concept.name for s in subset) or "none"
        figures[f"{name}@{strength}"] = r = verify.rel(out, ref)
        worst = max(worst, r)
    if worst > verify.TOLERANCE["fp32"]:
        raise verify.VerificationError(f"library UNet ORT-vs-torch relative error {worst:.3g}; per set: {figures}")
    return {"max_rel": worst, "per_set": figures}
