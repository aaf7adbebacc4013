"""Bad concept files: every one is refused with a PerfusionError that says what is wrong and what to do, by the
loader, the WebUI's concept list (a broken card, never a crash), a tag (a warning, the image is generated without
it) and the library operations; no file is changed or lost, and the good concept beside it still works."""
from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_concept, run_unet, tiny_ldm_unet, unet_inputs
from robust_helpers import snapshot
from safetensors.torch import save as save_bytes
from test_webui_glue import FakeEnv, FakeP

from perfusion_ext.core import concept as concept_module
from perfusion_ext.core import library
from perfusion_ext.core.concept import load_concept, save_concept, tensor_hash
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.webui.activation import Activator
from perfusion_ext.webui.concepts import ConceptStore


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture(scope="module")
def good(unet, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "teddy.safetensors"
    save_concept(make_concept(unet, "teddy", seed=1), path)
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _with_metadata(good: bytes, **changes) -> bytes:
    header, payload = _split(good)
    header["__metadata__"].update(changes)
    return _join(header, payload)


def _without_metadata(good: bytes, key: str) -> bytes:
    header, payload = _split(good)
    header["__metadata__"].pop(key)
    return _join(header, payload)


def _tensors(good: bytes, edit) -> bytes:
    """The file re-saved with its tensors passed through `edit(dict) -> dict` (metadata kept)."""
    from safetensors.torch import load

    header, _ = _split(good)
    tensors = edit(dict(load(good)))
    return save_bytes(tensors, metadata=header["__metadata__"])


class Boom:
    """A pickle that would write a marker file if anything unpickled it."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def _pickle(good, tmp_path):
    boom = Boom()
    boom.marker = tmp_path / "PWNED"
    return pickle.dumps({"target_input": boom})


def _nan(tensors):
    tensors["target_input"] = tensors["target_input"].clone()
    tensors["target_input"][0] = float("nan")
    return tensors


def _inf(tensors):
    key = next(k for k in tensors if k.endswith("value_target"))
    tensors[key] = tensors[key].clone()
    tensors[key][3] = float("inf")
    return tensors


def _wrong_shape(tensors):
    tensors["target_input_cinv"] = tensors["target_input_cinv"][:-1].clone()
    return tensors


def _drop(name):
    def edit(tensors):
        tensors.pop(name)
        return tensors
    return edit


def _drop_layer_value(tensors):
    tensors.pop(next(k for k in sorted(tensors) if k.endswith("value_target")))
    return tensors


# id -> (make bytes from the good file's bytes, what the user is told)
CASES = {
    "file-empty": (lambda g, t: b"", r"not a readable safetensors file \(only 0 bytes: truncated or corrupt\)"),
    "file-3-bytes": (lambda g, t: b"abc", r"only 3 bytes: truncated"),
    "file-truncated-half": (lambda g, t: g[: len(g) // 2], r"not a readable safetensors file .*truncated"),
    "file-truncated-in-header": (lambda g, t: g[:40], r"its header claims \d+ bytes, the file has 40"),
    "file-random-bytes": (lambda g, t: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.uint8).tolist()),
                          r"not a readable safetensors file"),
    "file-huge-header-length": (lambda g, t: struct.pack("<Q", 2 ** 62) + g[8:],
                                r"its header claims 4611686018427387904 bytes"),
    "file-header-not-json": (lambda g, t: struct.pack("<Q", 8) + b"{{{{{{{{" + g[8:], r"not a readable safetensors file"),
    "file-header-json-array": (lambda g, t: struct.pack("<Q", 8) + b"[1,2,3] " + bytes(16),
                               r"not a readable safetensors file"),
    "file-header-not-utf8": (lambda g, t: g[:8] + g[8:20].replace(b'"', b"\xff", 1) + g[20:],
                             r"not a readable safetensors file"),
    "file-header-deeply-nested": (lambda g, t: struct.pack("<Q", 200_000) + b"[" * 200_000 + bytes(8),
                                  r"not a readable safetensors file"),
    "file-too-large-for-a-concept": (lambda g, t: g + bytes(2 << 20), r"is 2 MiB, too large for a concept"),
    "file-pickle-renamed": (_pickle, r"not a readable safetensors file"),
    "file-lora-not-a-concept": (lambda g, t: save_bytes({"lora_up.weight": torch.zeros(2, 2)}, metadata={"ss_x": "1"}),
                                r"not a Perfusion concept \(no perfusion.\* metadata\)\. Is it a Lora"),
    "file-missing-metadata": (lambda g, t: _without_metadata(g, "perfusion.superclass"),
                              r"lacks required metadata: perfusion.superclass"),
    "file-missing-target-input": (lambda g, t: _tensors(g, _drop("target_input")), r"missing the tensor 'target_input'"),
    "file-missing-embedding": (lambda g, t: _tensors(g, _drop("embedding.clip_l")),
                               r"needs embeddings for clip_l, found none"),
    "file-missing-value-target": (lambda g, t: _tensors(g, _drop_layer_value),
                                  r"layers without both key and value targets"),
    "file-wrong-shape": (lambda g, t: _tensors(g, _wrong_shape), r"must be vectors of the same length"),
    "file-nan-values": (lambda g, t: _tensors(g, _nan), r"contains NaN or infinite values"),
    "file-inf-values": (lambda g, t: _tensors(g, _inf), r"contains NaN or infinite values"),
    "file-unknown-family": (lambda g, t: _with_metadata(g, **{"perfusion.base_family": "sd9"}),
                            r"names an unknown base family 'sd9'"),
    "file-future-format-version": (lambda g, t: _with_metadata(g, **{"perfusion.format_version": "2"}),
                                   r"uses concept format version 2; this extension reads version 1\. Update"),
    "file-non-numeric-tau": (lambda g, t: _with_metadata(g, **{"perfusion.tau": "high"}),
                              r"non-numeric perfusion.beta/perfusion.tau"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_concept_file_is_refused_everywhere_and_nothing_is_lost(case, good, unet, tmp_path, monkeypatch):
    make, message = CASES[case]
    monkeypatch.setattr(concept_module, "MAX_CONCEPT_BYTES", 1 << 20)  # 64 MiB in use; 1 MiB keeps the test light
    folder = tmp_path / "concepts"
    folder.mkdir()
    (folder / "teddy.safetensors").write_bytes(good)
    (folder / "bad.safetensors").write_bytes(make(good, tmp_path))
    (folder / "bad.png").write_bytes(b"its card preview")
    before = snapshot(folder)

    with pytest.raises(PerfusionError, match=message):  # the loader (CLI, Python API)
        load_concept(folder / "bad.safetensors")
    store = ConceptStore(lambda: folder)
    with pytest.raises(PerfusionError, match=message):  # a tag's lookup in the WebUI
        store.load("bad")
    cards = {e.name: e for e in store.entries()}  # the concept list: a broken card with the reason
    assert cards["teddy"].concept is not None and cards["bad"].concept is None
    assert re.search(message, cards["bad"].error)

    env = FakeEnv(unet)  # a generation with the tag: a warning, the good concept still applied
    act = Activator(store, env)
    p = FakeP(["a <perfusion:bad> and <perfusion:teddy> on a beach"], [""], batch_size=1)
    act.activate(p)
    assert any(w.startswith("<perfusion:bad> skipped:") for w in env.warnings), env.warnings
    assert [c.name for c in env.registered.values()] == ["teddy"] and len(act.handles) == 32  # to_k, to_v of 16 attn2
    act.release()

    with pytest.raises(PerfusionError):  # library operations refuse it, and roll back
        library.set_gate_defaults(folder, "bad", beta=0.5)
    with pytest.raises(PerfusionError):
        library.rename_concept(folder, "bad", "renamed")
    with pytest.raises(PerfusionError):
        library.duplicate_concept(folder, "bad", "copy")
    assert snapshot(folder) == before
    assert not (tmp_path / "PWNED").exists()  # no pickle was ever run


def test_a_folder_named_like_a_concept_is_not_one(tmp_path, good):
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "teddy.safetensors").write_bytes(good)
    store = ConceptStore(lambda: tmp_path)
    with pytest.raises(PerfusionError, match="unknown concept 'dir'"):
        store.load("dir")
    assert [e.name for e in store.entries()] == ["teddy"]


def test_a_file_that_vanishes_or_cannot_be_read_is_a_warning(tmp_path, good, monkeypatch):
    (tmp_path / "teddy.safetensors").write_bytes(good)
    store = ConceptStore(lambda: tmp_path)
    real_open = open

    def unreadable(path, *args, **kwargs):
        if str(path).endswith("teddy.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unreadable)
    with pytest.raises(PerfusionError, match="cannot read teddy.safetensors: Permission denied"):
        store.load("teddy")


def test_wrong_family_is_refused_with_the_reason(tmp_path, unet):
    """A toy concept on an SD1 model (and an SD1 concept on an SD2 model): a warning naming both families."""
    sd2 = tiny_ldm_unet(context_dim=1024)
    save_concept(make_concept(unet, "teddy", seed=1), tmp_path / "teddy.safetensors")
    before = snapshot(tmp_path)
    x, t, ctx = unet_inputs(sd2)
    plain = run_unet(sd2, x, t, ctx)
    env = FakeEnv(sd2)
    act = Activator(ConceptStore(lambda: tmp_path), env)
    act.activate(FakeP(["<perfusion:teddy> on a beach"], [""], batch_size=1))
    assert any("<perfusion:teddy> skipped: trained for SD1; an SD2 model is loaded" in w for w in env.warnings)
    assert not act.handles and torch.equal(run_unet(sd2, x, t, ctx), plain)
    from perfusion_ext.core.hooks import activate

    with pytest.raises(PerfusionError, match="was trained for sd1; the loaded model is sd2"):
        with activate(sd2, [load_concept(tmp_path / "teddy.safetensors")]):
            pass
    assert snapshot(tmp_path) == before


def test_nul_and_odd_bytes_in_metadata_are_harmless(tmp_path, good):
    path = tmp_path / "teddy.safetensors"
    path.write_bytes(_with_metadata(good, **{"perfusion.name": "te\x00ddy\u202e", "modelspec.title": "\udcff"
                                             .encode("utf-8", "surrogatepass").decode("utf-8", "replace")}))
    concept = load_concept(path)
    assert concept.name == "te\x00ddy\u202e"  # kept verbatim; the file name is what tags and cards use
    assert tensor_hash(path) == tensor_hash_of(good)


def tensor_hash_of(data: bytes) -> str:
    import hashlib

    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()
