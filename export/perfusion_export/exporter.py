"""`export_pipeline`: a Stable Diffusion pipeline plus concepts -> a verified ONNX folder.

Everything that can be refused is checked before a byte is written (options, concept files, the
concepts' fit to the model); the export is built in a temp folder, verified, and renamed into place.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from perfusion_ext.core import families
from perfusion_ext.core.concept import Concept, load_concept, tensor_hash
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.fingerprint import base_hash
from perfusion_ext.core.hooks import check_fits, resolve
from perfusion_ext.core.layers import cross_attention_layers, model_family

from . import components, layouts, manifest, tokens, verify
from . import slots as slot_store
from .bake import SlotEntry

log = logging.getLogger(__name__)
OPSETS = (18, 19)  # dynamo at 17 writes an invalid model; opset 20 emits Gelu, which TensorRT 9 rejects


def check_options(layout: str, precision: str, opset: int, n_slots: int | None, n_concepts: int) -> None:
    if layout not in layouts.LAYOUTS:
        raise PerfusionError(f"unknown layout {layout!r}; choose one of {', '.join(layouts.LAYOUTS)}.")
    if precision not in layouts.PRECISIONS:
        raise PerfusionError(f"unknown precision {precision!r}; choose fp32 or fp16.")
    if opset not in OPSETS:
        raise PerfusionError(f"opset {opset} is not supported: use 18 (default) or 19 (17 makes an invalid "
                             "dynamo export, 20 emits Gelu which TensorRT 9 parsers reject).")
    if n_slots is not None and not 1 <= n_slots <= 64:
        raise PerfusionError(f"--slots must be between 1 and 64, got {n_slots}.")
    if n_slots is not None and n_concepts > n_slots:
        raise PerfusionError(f"{n_concepts} concepts do not fit in {n_slots} slots; raise --slots.")


def _concepts(items) -> list:
    out = []
    for item in items:
        concept, strength = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(concept, Concept):
            concept = load_concept(concept)
        out.append((concept, float(strength)))
    names = [c.name for c, _ in out]
    if len(set(names)) != len(names):
        raise PerfusionError(f"the same concept name appears twice: {names}; each concept needs its own trigger.")
    return out


def slot_entries(unet, concepts, beta, tau) -> list[SlotEntry]:
    """Validate every concept against the UNet (family first) and place them in slots 0..n-1."""
    layers = cross_attention_layers(unet)
    family = model_family(layers)
    resolved = resolve(concepts, beta=beta, tau=tau)
    for r in resolved:
        check_fits(r.concept, layers, family)
    return [SlotEntry(k, r.concept, r.strength, r.beta, r.tau) for k, r in enumerate(resolved)]


def _model_name(model) -> str:
    """A named model (`toy`) keeps its name; a folder or file gives its stem; a loaded pipeline is `model`."""
    if not isinstance(model, (str, Path)):
        return "model"
    named = families.plugin(str(model))
    return str(model) if named is not None and named.model_dir is not None else (Path(str(model)).stem or "model")


def export_pipeline(model, concepts=(), out="export", *, layout: str = "optimum", precision: str = "fp32",
                    opset: int = 18, slots: int | None = None, beta: float | None = None, tau: float | None = None,
                    verify_export: bool = True, overwrite: bool = False, model_name: str | None = None,
                    competitive_gates: bool = False) -> dict:
    """Export `model` ('toy', a diffusers folder, a .safetensors file, or a loaded pipeline) with `concepts`
    (paths, Concept objects or (Concept, strength) pairs) baked in; `competitive_gates`: each token keeps only
    the gate of its most similar concept, as `activate(..., competitive=True)`. Returns the manifest.
    """
    from .staging import check_destination, staged

    check_options(layout, precision, opset, slots, len(concepts))
    out = Path(out)
    check_destination(out, overwrite)
    loaded = _concepts(concepts)
    if isinstance(model, (str, Path)):
        from perfusion_ext.pipelines.loading import load_pipeline

        pipe = load_pipeline(model)
    else:
        pipe = model
    family = model_family(cross_attention_layers(pipe.unet))
    if not families.get(family).exportable:
        supported = ", ".join(f.label for f in families.FAMILIES.values() if f.exportable)
        raise PerfusionError(f"{families.label(family)} export is not supported; export {supported} models.")
    entries = slot_entries(pipe.unet, loaded, beta, tau)
    n_slots = slots if slots is not None else len(entries)
    name = model_name or _model_name(model)
    with staged(out, overwrite) as tmp:
        info = _write(pipe, entries, n_slots, slots is not None, layout, precision, opset, name, tmp, family,
                      verify_export, competitive_gates)
        manifest.write(tmp, info)
    return info


def _write(pipe, entries, n_slots, slot_mode, layout, precision, opset, name, tmp: Path, family, verify_export,
           competitive: bool) -> dict:
    unet_rel = layouts.unet_path(layout, name)
    unet_file = tmp / unet_rel
    log.info("exporting the UNet (%s, %s, %d concept slots)", layout, precision, n_slots)
    baked = components.export_unet(pipe.unet, entries, n_slots, layout, precision, opset, unet_file, competitive)
    contract = components.unet_contract(pipe.unet, layout)
    info = {
        "format_version": manifest.FORMAT_VERSION, "layout": layout, "precision": precision, "opset": opset,
        "base_family": family, "base_hash": _base_hash(pipe), "model_name": name,
        "files": {"unet": unet_rel}, "io": {"unet": contract.as_table()},
        "slots": {"count": n_slots, "fixed": slot_mode, "initializers": baked}, "competitive_gates": competitive,
        "concepts": [_concept_info(e) for e in entries], "tools": manifest.tool_versions(),
    }
    token_slots, rows = None, None
    if layout == "optimum":
        token_slots, rows = _write_pipeline_parts(pipe, entries, n_slots, slot_mode, opset, tmp, info)
    if slot_mode:
        slot_store.save(tmp, pipe.unet, entries)
    if verify_export:
        info["verification"] = _verify(pipe, entries, tmp, unet_file, contract, layout, precision, opset,
                                       token_slots, rows, competitive)
    return info


def _concept_info(e: SlotEntry) -> dict:
    c = e.concept
    return {"slot": e.slot, "name": c.name, "superclass": c.superclass, "strength": e.strength, "beta": e.beta,
            "tau": e.tau, "base_hash": c.base_hash, "file": c.path.name if c.path else None,
            "tensor_sha256": tensor_hash(c.path) if c.path else None}


def _base_hash(pipe) -> str:
    """The hash concepts record as `perfusion.base_hash` (text encoder + attn2 K/V); '' without a text encoder."""
    if getattr(pipe, "text_encoder", None) is None:
        return ""
    return base_hash(pipe.text_encoder, pipe.unet)


def rows_per_slot(entries, slot_mode: bool) -> int | None:
    if not slot_mode:
        return None
    return max([1] + [next(iter(e.concept.embeddings.values())).shape[0] for e in entries])


def encoder_parts(pipe, family: str) -> list[dict]:
    """One entry per text encoder of the family: its component names, embedding name and exported outputs."""
    fam = families.get(family)
    parts = []
    for i, name in enumerate(fam.encoder_names):
        suffix = "" if i == 0 else f"_{i + 1}"
        te = getattr(pipe, f"text_encoder{suffix}")
        if te is None:
            raise PerfusionError(f"this {fam.label} pipeline has no text_encoder{suffix}; export needs every encoder.")
        hidden = te.config.num_hidden_layers if fam.encoder_layer != "last" else None
        projection = getattr(te, "text_projection", None) is not None and fam.pooled_encoder == name
        parts.append({"folder": f"text_encoder{suffix}", "tokenizer": f"tokenizer{suffix}", "encoder": name,
                      "text_encoder": te, "tokenizer_obj": getattr(pipe, f"tokenizer{suffix}"),
                      "outputs": layouts.text_encoder_outputs(hidden, projection)})
    return parts


def _write_pipeline_parts(pipe, entries, n_slots, slot_mode, opset, tmp: Path, info: dict):
    parts = encoder_parts(pipe, info["base_family"])
    vocabs = {p["text_encoder"].get_input_embeddings().num_embeddings for p in parts}
    if len(vocabs) != 1:
        raise PerfusionError(f"the text encoders' vocabularies differ ({sorted(vocabs)}); concept ids must agree.")
    vocab = vocabs.pop()
    eos = pipe.tokenizer.eos_token_id
    token_slots, rows = None, {}
    for part in parts:
        te = part["text_encoder"]
        token_slots, rows[part["folder"]] = tokens.token_layout(
            vocab, te.config.hidden_size, info["base_family"], entries, n_slots, rows_per_slot(entries, slot_mode),
            encoder=part["encoder"])
        log.info("exporting %s (%d concept rows)", part["folder"], len(rows[part["folder"]]))
        components.export_text_encoder(te, rows[part["folder"]], eos, opset, tmp / part["folder"] / "model.onnx",
                                       part["outputs"])
        tokens.write_tokenizer(part["tokenizer_obj"], [r for s in token_slots for r in tokens.row_tokens(s)],
                               tmp / part["tokenizer"])
        config = te.config.to_dict()
        config.update(eos_token_id=eos, vocab_size=vocab + len(rows[part["folder"]]))  # pooling at the real EOS
        _json(tmp / part["folder"] / "config.json", config)
        info["files"][part["folder"]] = f"{part['folder']}/model.onnx"
        info["io"][part["folder"]] = components.text_encoder_contract(te, part["outputs"]).as_table()
    log.info("exporting the VAE")
    components.export_vae(pipe.vae, opset, tmp)
    _json(tmp / "unet" / "config.json", dict(pipe.unet.config))
    for part in ("vae_encoder", "vae_decoder"):
        _json(tmp / part / "config.json", dict(pipe.vae.config))
    pipe.scheduler.save_pretrained(str(tmp / "scheduler"))
    _json(tmp / "model_index.json", _model_index(pipe, info["base_family"]))
    cfg = pipe.vae.config
    info["files"].update({k: f"{k}/model.onnx" for k in ("vae_encoder", "vae_decoder")})
    info["io"].update({
        "vae_encoder": layouts.vae_encoder_contract(cfg.in_channels, cfg.latent_channels).as_table(),
        "vae_decoder": layouts.vae_decoder_contract(cfg.out_channels, cfg.latent_channels).as_table(),
    })
    info["tokens"] = {"vocab_size": vocab, "eos_token_id": eos,
                      "encoders": {p["folder"]: p["encoder"] for p in parts},
                      "slots": [{"slot": s.slot, "name": s.name, "triggers": s.triggers, "ids": s.ids,
                                 "rows": s.n_rows} for s in token_slots]}
    for c, s in zip(info["concepts"], [s for s in token_slots if s.name is not None]):
        c.update(triggers=s.triggers, token_ids=s.ids)
    return token_slots, rows


def _model_index(pipe, family: str) -> dict:
    index = {"_class_name": families.get(family).pipeline_class, "requires_safety_checker": False}
    for key, value in dict(pipe.config).items():
        if key == "force_zeros_for_empty_prompt":
            index[key] = bool(value)
        if key.startswith("_") or not isinstance(value, (list, tuple)):
            continue
        index[key] = list(value) if key not in ("safety_checker", "feature_extractor", "image_encoder") else [None, None]
    return index


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in data.items() if not k.startswith("_name_or_path")}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def _verify(pipe, entries, tmp: Path, unet_file: Path, contract, layout, precision, opset, token_slots, rows,
            competitive: bool = False) -> dict:
    log.info("verifying (onnx.checker, I/O contract, op allow-list, ORT parity)")
    figures = {}
    files = sorted(tmp.rglob("*.onnx"))
    for f in files:
        verify.check_model(f)
        figures.setdefault("ops", {})[str(f.relative_to(tmp))] = verify.check_ops(f)
    verify.check_contract(unet_file, contract)
    figures["unet"] = verify.unet_parity(pipe.unet, entries, unet_file, contract, precision,
                                         components.latent_factor(pipe.unet), layout, competitive)
    if precision == "fp16" and entries:
        figures["gate_dtypes"] = verify.check_gate_fp32(unet_file)
    if layout == "optimum":
        vae = pipe.vae.config
        parts = encoder_parts(pipe, model_family(cross_attention_layers(pipe.unet)))
        for part in parts:
            verify.check_contract(tmp / part["folder"] / "model.onnx",
                                  components.text_encoder_contract(part["text_encoder"], part["outputs"]))
        for part, c in (("vae_encoder", layouts.vae_encoder_contract(vae.in_channels, vae.latent_channels)),
                        ("vae_decoder", layouts.vae_decoder_contract(vae.out_channels, vae.latent_channels))):
            verify.check_contract(tmp / part / "model.onnx", c)
        scratch = tmp / ".verify"
        try:
            for part in parts:
                te, eos = part["text_encoder"], pipe.tokenizer.eos_token_id
                base_te = scratch / part["folder"] / "model.onnx"
                components.export_text_encoder(te, None, eos, opset, base_te, part["outputs"])
                figures[part["folder"]] = verify.text_encoder_checks(
                    te, rows[part["folder"]], eos, tmp / part["tokenizer"], tmp / part["folder"] / "model.onnx",
                    base_te, token_slots)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        figures["vae"] = verify.vae_parity(pipe.vae, tmp)
    return figures
