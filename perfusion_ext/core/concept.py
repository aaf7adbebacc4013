"""Concept files, format v1 (docs/design.md, "The concept file"): read, write, validate.

One safetensors file per concept. Tensors:
    embedding.<encoder>                     [n_vectors, d_tok]   learned token embedding(s)
    target_input                            [d]                  i* (EMA of the concept's encoding)
    target_input_cinv                       [d]                  u = C⁻¹ i*
    layers.<ldm attn2 path>.key_target      [out]                o*_K (locked to the superclass)
    layers.<ldm attn2 path>.value_target    [out]                o*_V (trained)
Storage dtypes (see README): the per-layer targets and embeddings in fp16 (they are plain
activations), i* and u in fp32 (u = C⁻¹ i* can exceed fp16's range and drives the gate).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from . import families
from .atomic import atomic_path, atomic_save_safetensors
from .errors import PerfusionError

FORMAT_VERSION = "1"
REQUIRED_METADATA = ("format_version", "name", "token", "superclass", "base_family")
DEFAULT_BETA, DEFAULT_TAU = 0.7, 0.15
_KIND_SUFFIX = {"key": "key_target", "value": "value_target"}


@dataclasses.dataclass
class Concept:
    """A trained Perfusion concept, tensors in fp32 in memory whatever the file stored."""

    name: str
    token: str
    superclass: str
    base_family: str
    embeddings: dict[str, torch.Tensor]
    target_input: torch.Tensor
    target_input_cinv: torch.Tensor
    key_targets: dict[str, torch.Tensor]
    value_targets: dict[str, torch.Tensor]
    beta: float = DEFAULT_BETA
    tau: float = DEFAULT_TAU
    base_hash: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # every other key, verbatim
    path: Path | None = None

    def targets(self, kind: str) -> dict[str, torch.Tensor]:
        return self.key_targets if kind == "key" else self.value_targets

    @property
    def layers(self) -> list[str]:
        return sorted(self.key_targets)

    @property
    def dim(self) -> int:
        return int(self.target_input.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors, cast to their storage dtypes."""
        out = {f"embedding.{enc}": emb.to(torch.float16) for enc, emb in self.embeddings.items()}
        out["target_input"] = self.target_input.float()
        out["target_input_cinv"] = self.target_input_cinv.float()
        for kind in ("key", "value"):
            for layer, t in self.targets(kind).items():
                out[f"layers.{layer}.{_KIND_SUFFIX[kind]}"] = t.to(torch.float16)
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def file_metadata(self) -> dict[str, str]:
        meta = dict(self.metadata)
        meta.update({
            "perfusion.format_version": FORMAT_VERSION,
            "perfusion.name": self.name,
            "perfusion.token": self.token,
            "perfusion.superclass": self.superclass,
            "perfusion.base_family": self.base_family,
            "perfusion.base_hash": self.base_hash,
            "perfusion.beta": repr(float(self.beta)),
            "perfusion.tau": repr(float(self.tau)),
        })
        meta.setdefault("modelspec.sai_model_spec", "1.0.0")
        meta.setdefault("modelspec.title", self.name)
        meta.setdefault("modelspec.architecture", families.get(self.base_family).concept_architecture)
        return meta


def save_concept(concept: Concept, path: str | os.PathLike) -> Path:
    """Write the concept atomically (temp file + rename): an interrupted save never truncates a file."""
    path = Path(path)
    validate_structure(concept, source=str(path))
    atomic_save_safetensors(concept.tensors(), path, metadata=concept.file_metadata())
    return path


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
MAX_CONCEPT_BYTES = 64 << 20  # an SDXL concept is about 0.2 MiB; a larger file is something else


def _header_length(f, path: Path) -> int:
    """The safetensors header length at the start of the open file `f`, checked against the file's size, so
    a truncated or foreign file is a PerfusionError here and never a huge read or seek."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise PerfusionError(f"{path.name} is not a readable safetensors file (only {size} bytes: truncated or corrupt). "
                             "Copy it again from its source or retrain the concept.")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise PerfusionError(f"{path.name} is not a readable safetensors file (its header claims {header_len} bytes, "
                             f"the file has {size}: truncated or corrupt, or not a safetensors file). "
                             "Copy it again from its source or retrain the concept.")
    return header_len


def tensor_hash(path: str | os.PathLike) -> str:
    """sha256 over the tensor bytes only (not the header), so editing metadata never changes it."""
    path = Path(path)
    with open(path, "rb") as f:
        header_len = _header_length(f, path)
        f.seek(8 + header_len)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_metadata(path: str | os.PathLike, updates: dict[str, str | None],
                    target: str | os.PathLike | None = None) -> Path:
    """Write `path` with its metadata changed (a None value removes the key) to `target` (default: in place),
    atomically. Only the header is rewritten: the tensor bytes are copied verbatim, so the tensor hash that
    infotexts record stays the same. The result is validated as a concept before it replaces anything."""
    path = Path(path)
    target = Path(target) if target is not None else path
    with open(path, "rb") as f:
        header_len = _header_length(f, path)
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as exc:
            raise PerfusionError(f"{path.name} is not a readable safetensors file (its header is not JSON: {exc}). "
                                 "Copy it again from its source or retrain the concept.") from None
        if not isinstance(header, dict):
            raise PerfusionError(f"{path.name} is not a readable safetensors file (its header is not a JSON object).")
        data = f.read()
    metadata = dict(header.get("__metadata__") or {})
    for key, value in updates.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = str(value)
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.write(data)
        load_concept(tmp)  # refuse to write anything that is not a valid concept
    return target


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise PerfusionError(f"Concept file {path} does not exist. Check the name and the concepts folder.")
    # Read into memory, not memory-mapped: a file truncated by another process while mapped would crash the
    # process (SIGBUS), and safetensors' mapped loads keep ~2 KB each (measured: +2 MiB per 1000 loads).
    try:
        with open(path, "rb") as f:
            header_len = _header_length(f, path)  # the same message as tensor_hash for a truncated or foreign file
            try:
                header = json.loads(f.read(header_len))
                metadata = header.get("__metadata__") or {}
            except (ValueError, AttributeError, RecursionError):
                header, metadata = None, None
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise PerfusionError(f"{path.name} is not a readable safetensors file (its header is not a safetensors "
                                     "header: truncated or corrupt). Copy it again from its source or retrain the concept.")
            if not any(k.startswith("perfusion.") for k in metadata):
                return {}, metadata  # not a concept (load_concept says so): its tensors are never read
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONCEPT_BYTES:
                raise PerfusionError(f"{path.name} is {size >> 20} MiB, too large for a concept (they are under 1 MiB); "
                                     "it is not loaded.")
            f.seek(0)
            data = f.read()
    except OSError as exc:
        raise PerfusionError(f"cannot read {path.name}: {exc.strerror or exc}.") from exc
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for every corruption
        raise PerfusionError(
            f"{path.name} is not a readable safetensors file (truncated or corrupt: {exc}). "
            "Copy it again from its source or retrain the concept."
        ) from exc
    return tensors, metadata


def load_concept(path: str | os.PathLike) -> Concept:
    """Read and validate a concept file; raises PerfusionError with a fix for anything wrong."""
    path = Path(path)
    tensors, metadata = _read_file(path)
    name = path.name
    if not any(k.startswith("perfusion.") for k in metadata):
        raise PerfusionError(
            f"{name} is a safetensors file but not a Perfusion concept (no perfusion.* metadata). "
            "Is it a Lora or an embedding? Put it in its own models folder."
        )
    missing = [k for k in REQUIRED_METADATA if f"perfusion.{k}" not in metadata]
    if missing:
        raise PerfusionError(f"{name} lacks required metadata: {', '.join('perfusion.' + k for k in missing)}.")
    version = metadata["perfusion.format_version"]
    if version != FORMAT_VERSION:
        raise PerfusionError(
            f"{name} uses concept format version {version}; this extension reads version {FORMAT_VERSION}. "
            "Update the extension (newer format) or retrain the concept."
        )
    family = metadata["perfusion.base_family"]
    if family not in families.FAMILIES:
        raise PerfusionError(f"{name} names an unknown base family {family!r}; known: {', '.join(families.names())}.")
    for key in ("target_input", "target_input_cinv"):
        if key not in tensors:
            raise PerfusionError(f"{name} is missing the tensor {key!r}; the file is incomplete. Retrain the concept.")
    embeddings = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("embedding.")}
    key_targets, value_targets = {}, {}
    for k, v in tensors.items():
        if k.startswith("layers."):
            layer, _, suffix = k[len("layers."):].rpartition(".")
            if suffix == "key_target":
                key_targets[layer] = v.float()
            elif suffix == "value_target":
                value_targets[layer] = v.float()
            else:
                raise PerfusionError(f"{name} has an unexpected tensor {k!r}.")
    parsed = {f"perfusion.{k}" for k in REQUIRED_METADATA + ("base_hash", "beta", "tau")}
    extra = {k: v for k, v in metadata.items() if k not in parsed}
    try:
        beta = float(metadata.get("perfusion.beta", DEFAULT_BETA))
        tau = float(metadata.get("perfusion.tau", DEFAULT_TAU))
    except ValueError as exc:
        raise PerfusionError(f"{name} has a non-numeric perfusion.beta/perfusion.tau: {exc}.") from exc
    concept = Concept(
        name=metadata["perfusion.name"], token=metadata["perfusion.token"],
        superclass=metadata["perfusion.superclass"], base_family=family,
        embeddings=embeddings, target_input=tensors["target_input"].float(),
        target_input_cinv=tensors["target_input_cinv"].float(),
        key_targets=key_targets, value_targets=value_targets, beta=beta, tau=tau,
        base_hash=metadata.get("perfusion.base_hash", ""), metadata=extra, path=path,
    )
    validate_structure(concept, source=name)
    return concept


def validate_structure(concept: Concept, source: str) -> None:
    """Checks that need no model: required tensors present and shapes consistent with each other."""
    if concept.base_family not in families.FAMILIES:
        raise PerfusionError(f"{source}: unknown base family {concept.base_family!r}; "
                             f"known: {', '.join(families.names())}.")
    expected = families.get(concept.base_family).encoder_names
    if sorted(concept.embeddings) != sorted(expected):
        raise PerfusionError(
            f"{source}: a {concept.base_family} concept needs embeddings for {', '.join(expected)}, "
            f"found {', '.join(sorted(concept.embeddings)) or 'none'}. The file is incomplete or mislabelled."
        )
    for enc, emb in concept.embeddings.items():
        if emb.ndim != 2 or emb.shape[0] < 1:
            raise PerfusionError(f"{source}: embedding.{enc} must be [n_vectors, dim], got {list(emb.shape)}.")
    d = concept.target_input.shape
    if len(d) != 1 or concept.target_input_cinv.shape != d:
        raise PerfusionError(
            f"{source}: target_input {list(d)} and target_input_cinv {list(concept.target_input_cinv.shape)} "
            "must be vectors of the same length."
        )
    if not concept.key_targets:
        raise PerfusionError(f"{source}: no layers.*.key_target tensors; the file edits nothing.")
    if sorted(concept.key_targets) != sorted(concept.value_targets):
        only = set(concept.key_targets) ^ set(concept.value_targets)
        raise PerfusionError(f"{source}: layers without both key and value targets: {', '.join(sorted(only))}.")
    for layer in concept.key_targets:
        k, v = concept.key_targets[layer], concept.value_targets[layer]
        if k.ndim != 1 or k.shape != v.shape:
            raise PerfusionError(f"{source}: layer {layer} key/value targets must be equal-length vectors, "
                                 f"got {list(k.shape)} and {list(v.shape)}.")
    for t in [concept.target_input, concept.target_input_cinv, *concept.key_targets.values(),
              *concept.value_targets.values(), *concept.embeddings.values()]:
        if not torch.isfinite(t).all():
            raise PerfusionError(f"{source}: contains NaN or infinite values; retrain or use an earlier checkpoint.")
    if float(concept.target_input @ concept.target_input_cinv) <= 0:
        raise PerfusionError(f"{source}: target_input · target_input_cinv must be positive (u = C⁻¹ i*).")


def describe(path: str | os.PathLike) -> dict:
    """Everything `perfusion inspect` shows, as plain data."""
    path = Path(path)
    concept = load_concept(path)
    tensors, metadata = _read_file(path)
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "tensor_sha256": tensor_hash(path),
        "metadata": metadata,
        "layers": concept.layers,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in sorted(tensors.items())},
    }


def format_description(info: dict) -> str:
    meta = info["metadata"]
    lines = [f"{info['file']}  ({info['size_bytes'] / 1024:.1f} KiB, tensors sha256 {info['tensor_sha256'][:12]})"]
    lines += [f"  {k} = {v if len(v) < 120 else v[:117] + '...'}" for k, v in sorted(meta.items())]
    lines.append(f"  {len(info['layers'])} edited attn2 layers:")
    for k, v in info["tensors"].items():
        lines.append(f"    {k:70s} {str(v['shape']):>12s} {v['dtype']}")
    return "\n".join(lines)
