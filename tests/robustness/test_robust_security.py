"""Security: no code path loads a pickle, and no concept name, trash entry or link reaches outside the folders the
extension owns. (`--api-auth` and image paths of the REST API: test_robust_api.py.)"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import make_concept, tiny_ldm_unet
from robust_helpers import snapshot

from perfusion_ext.core import library
from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.webui.concepts import ConceptStore

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["perfusion_ext", "export", "benchmarks", "scripts", "install.py", "preload.py"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def pickle_uses(source: str, filename: str = "<string>") -> list[str]:
    """Every place in `source` that can unpickle: pickle-like imports, torch.load without weights_only=True,
    numpy.load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(f"{where} from {node.module} import ...")
            if node.module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                found.append(f"{where} from {node.module} import load (use torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: k.value for k in node.keywords}
            if owner in ("torch", "torch.serialization"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where} {owner}.load without weights_only=True")
            elif owner in ("np", "numpy"):
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where} {owner}.load with allow_pickle")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = """
import pickle
from joblib import load as jl
import torch, numpy as np
from torch import load
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
"""
    good = """
import torch, numpy as np
torch.load("x.pt", map_location="cpu", weights_only=True)
np.load("x.npy")
np.load("x.npy", allow_pickle=False)
json.load(f)
"""
    assert len(pickle_uses(bad)) == 6
    assert pickle_uses(good) == []


def test_no_code_loads_pickles():
    files = []
    for item in SCANNED:
        path = ROOT / item
        files += sorted(path.rglob("*.py")) if path.is_dir() else ([path] if path.is_file() else [])
    assert len(files) > 50
    found = [hit for f in files for hit in pickle_uses(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []


# ---- names and links stay inside the concepts folder --------------------------------------------------------
@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("security") / "teddy.safetensors"
    save_concept(make_concept(tiny_ldm_unet(), "teddy", seed=1), path)
    return path.read_bytes()


@pytest.fixture()
def world(tmp_path, good_bytes):
    """concepts/teddy.safetensors inside, outside/secret.safetensors (a valid concept) beside the folder."""
    concepts, outside = tmp_path / "concepts", tmp_path / "outside"
    concepts.mkdir()
    outside.mkdir()
    (concepts / "teddy.safetensors").write_bytes(good_bytes)
    (outside / "secret.safetensors").write_bytes(good_bytes)
    return concepts, outside


BAD_NAMES = ["../outside/secret", "..", ".", "/etc/passwd", "sub/../../outside/secret", "a\\b", "te\x00ddy",
             "\udcff\udcfe", "C:\\Windows", "", " ", "x" * 101, "~root", "$HOME", "*", "teddy.safetensors/.."]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_bad_names_never_resolve(world, name):
    concepts, outside = world
    before = snapshot(concepts.parent)
    store = ConceptStore(lambda: concepts)
    for call in (lambda: library.concept_path(concepts, name), lambda: store.load(name),
                 lambda: library.set_gate_defaults(concepts, name, beta=0.5),
                 lambda: library.rename_concept(concepts, "teddy", name),
                 lambda: library.duplicate_concept(concepts, "teddy", name), lambda: library.delete_concept(concepts, name)):
        with pytest.raises(PerfusionError, match=r"invalid concept name|unknown concept|outside"):
            call()
    assert snapshot(concepts.parent) == before


def test_a_link_inside_the_concepts_folder_that_leads_out_is_refused(world):
    concepts, outside = world
    (concepts / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (concepts / "linkdir").symlink_to(outside)
    (concepts / "inner.safetensors").symlink_to(concepts / "teddy.safetensors")  # a link that stays inside: fine
    before = snapshot(concepts.parent)
    store = ConceptStore(lambda: concepts)
    for name in ("link", "secret"):
        with pytest.raises(PerfusionError, match=r"points outside the concepts folder|unknown concept 'secret'"):
            store.load(name)
        with pytest.raises(PerfusionError, match=r"outside|unknown concept"):
            library.rename_concept(concepts, name, "mine")
        with pytest.raises(PerfusionError, match=r"outside|unknown concept"):
            library.delete_concept(concepts, name)
    assert store.load("inner").concept is not None
    cards = {e.name: e for e in store.entries()}
    assert cards["link"].concept is None and cards["link"].sha256 == ""  # listed, never read
    assert cards["link"].error.startswith("a link to a file outside the concepts folder; not loaded")
    assert "secret" not in cards  # links to folders are not followed
    assert snapshot(concepts.parent) == before


def test_trash_entries_cannot_reach_outside(world):
    concepts, outside = world
    entry = library.delete_concept(concepts, "teddy")
    manifest_path = entry / library.TRASH_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for bad_entry in ("../../outside", "/etc", ".."):
        with pytest.raises(PerfusionError, match="no trash entry"):
            library.restore_concept(concepts, bad_entry)
    for files in ([{"name": "teddy.safetensors", "from": "../outside/teddy.safetensors"}],  # put back outside
                  [{"name": "../../../outside/secret.safetensors", "from": "stolen.safetensors"}],  # take from outside
                  [{"name": "/etc/hostname", "from": "hostname"}]):
        manifest_path.write_text(json.dumps({**manifest, "files": files}))
        before = snapshot(concepts.parent)
        with pytest.raises(PerfusionError, match="names a place outside"):
            library.restore_concept(concepts, entry.name)
        assert snapshot(concepts.parent) == before
    manifest_path.write_text("{not json")
    with pytest.raises(PerfusionError, match=r"has an unreadable trash.json .*its files are still in"):
        library.restore_concept(concepts, entry.name)
    manifest_path.write_text(json.dumps(manifest))
    assert library.restore_concept(concepts, entry.name).name == "teddy.safetensors"


def test_a_diffusers_folder_with_pickled_weights_is_refused(tmp_path):
    """diffusers falls back to a component's .bin (a pickle) when it has no .safetensors; we never let it."""
    from robust_helpers import toy_pipeline

    from perfusion_ext.pipelines.loading import load_pipeline

    toy_pipeline().save_pretrained(tmp_path / "model", safe_serialization=False)
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(PerfusionError, match=r"model stores weights as pickles \(unet/diffusion_pytorch_model.bin"
                                             r".*; this tool never loads pickles"):
        load_pipeline(tmp_path / "model")
