"""The concept library: stored β/τ, rename, duplicate, delete to the trash, restore, aliases. Every operation
keeps the tensor hash, and none loses a file, also when it fails at any step (every step is taken back)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import make_concept, tiny_ldm_unet

import perfusion_ext as pf
from perfusion_ext.core import library
from perfusion_ext.core.concept import load_concept, tensor_hash, update_metadata
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.library import (
    TRASH_DIR,
    concept_path,
    delete_concept,
    duplicate_concept,
    list_trash,
    load_named,
    read_aliases,
    rename_concept,
    restore_concept,
    set_gate_defaults,
)


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture()
def folder(tmp_path, unet):
    """teddy with a preview, a description, WebUI user metadata and a run folder; ring beside it."""
    pf.save_concept(make_concept(unet, "teddy", seed=1), tmp_path / "teddy.safetensors")
    pf.save_concept(make_concept(unet, "ring", seed=2), tmp_path / "ring.safetensors")
    (tmp_path / "teddy.png").write_bytes(b"png-teddy")
    (tmp_path / "teddy.json").write_text('{"notes": "mine"}')
    (tmp_path / "teddy.txt").write_text("a teddy")
    run = tmp_path / "teddy.run"
    (run / "checkpoints").mkdir(parents=True)
    pf.save_concept(make_concept(unet, "teddy", seed=3), run / "checkpoints" / "teddy-step000050.safetensors")
    (run / "checkpoints" / "teddy-step000050.png").write_bytes(b"png-50")
    (run / "log.json").write_text("{}")
    return tmp_path


def snapshot(root: Path, trash: bool = True) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (trash or TRASH_DIR not in p.relative_to(root).parts)}


def contents(root: Path) -> set[str]:
    return set(snapshot(root).values())


def test_set_gate_defaults_rewrites_only_the_header(folder):
    before = tensor_hash(folder / "teddy.safetensors")
    set_gate_defaults(folder, "teddy", beta=0.62)
    concept = load_named(folder, "teddy")
    assert concept.beta == 0.62 and concept.tau == pytest.approx(0.15)
    set_gate_defaults(folder, "teddy", tau=0.2)
    concept = load_named(folder, "teddy")
    assert (concept.beta, concept.tau) == (0.62, 0.2)
    assert tensor_hash(folder / "teddy.safetensors") == before  # infotexts keep resolving
    for bad in ({"tau": 0}, {"tau": -1}, {"beta": float("nan")}):
        with pytest.raises(PerfusionError):
            set_gate_defaults(folder, "teddy", **bad)
    assert load_named(folder, "teddy").beta == 0.62


def test_update_metadata_refuses_to_write_a_broken_concept(folder):
    before = (folder / "teddy.safetensors").read_bytes()
    with pytest.raises(PerfusionError):
        update_metadata(folder / "teddy.safetensors", {"perfusion.format_version": "99"})
    assert (folder / "teddy.safetensors").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_rename_moves_everything_keeps_the_hash_and_the_old_name(folder):
    short = tensor_hash(folder / "teddy.safetensors")
    old = contents(folder)
    target = rename_concept(folder, "teddy", "bear")
    assert target == (folder / "bear.safetensors").resolve()
    concept = load_concept(target)
    assert (concept.name, concept.token, concept.metadata["modelspec.title"]) == ("bear", "bear", "bear")
    assert tensor_hash(target) == short
    names = {p.name for p in folder.iterdir()}
    assert {"bear.safetensors", "bear.png", "bear.json", "bear.txt", "bear.run", "ring.safetensors"} <= names
    assert not {"teddy.safetensors", "teddy.png", "teddy.run"} & names
    assert (folder / "bear.run" / "checkpoints" / "bear-step000050.safetensors").is_file()
    assert (folder / "bear.run" / "checkpoints" / "bear-step000050.png").read_bytes() == b"png-50"
    assert old <= contents(folder)  # nothing lost: the old file sits in the trash byte for byte
    assert read_aliases(folder) == {"teddy": "bear"}
    assert load_named(folder, "teddy").name == "bear"  # an old prompt still finds it
    assert [e["reason"] for e in list_trash(folder)] == ["renamed to bear"]
    rename_concept(folder, "bear", "cub")
    assert read_aliases(folder) == {"teddy": "cub", "bear": "cub"}
    assert load_named(folder, "teddy").name == "cub"
    with pytest.raises(PerfusionError, match="already exist"):
        rename_concept(folder, "cub", "ring")
    with pytest.raises(PerfusionError, match="invalid concept name"):
        rename_concept(folder, "cub", "../x")


def test_duplicate_copies_the_file_and_its_previews(folder):
    copy = duplicate_concept(folder, "teddy", "teddy 2")
    assert load_concept(copy).name == "teddy 2" and tensor_hash(copy) == tensor_hash(folder / "teddy.safetensors")
    assert (folder / "teddy 2.png").read_bytes() == b"png-teddy" and not (folder / "teddy 2.run").exists()
    assert load_named(folder, "teddy").name == "teddy"


def test_delete_goes_to_the_trash_and_restores(folder):
    old = snapshot(folder)
    entry = delete_concept(folder, "teddy")
    assert entry.parent == (folder / TRASH_DIR).resolve()
    assert {p.name for p in folder.iterdir()} == {"ring.safetensors", TRASH_DIR}
    assert set(old.values()) <= contents(folder)
    with pytest.raises(PerfusionError, match="unknown concept 'teddy'"):
        concept_path(folder, "teddy")  # nothing in the trash resolves by name
    assert [p.name for p in library.list_concepts(folder)] == ["ring.safetensors"]
    listed = list_trash(folder)
    assert listed[0]["name"] == "teddy" and {f["name"] for f in listed[0]["files"]} >= {"teddy.safetensors",
                                                                                       "teddy.run"}
    restore_concept(folder, listed[0]["entry"])
    assert snapshot(folder, trash=False) == old and list_trash(folder) == []


def test_delete_drops_aliases_to_the_deleted_concept_and_restore_brings_them_back(folder):
    rename_concept(folder, "teddy", "bear")
    entry = delete_concept(folder, "bear")
    assert read_aliases(folder) == {}
    with pytest.raises(PerfusionError, match="unknown concept"):
        load_named(folder, "teddy")
    restore_concept(folder, entry.name)
    assert read_aliases(folder) == {"teddy": "bear"} and load_named(folder, "teddy").name == "bear"


class FailAt:
    """Make the n-th call of a function raise (later calls, e.g. the rollback's, work)."""

    def __init__(self, original, n):
        self.original, self.n, self.calls = original, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(f"simulated failure at call {self.n}")
        return self.original(*args, **kwargs)


OPERATIONS = {
    "rename": lambda folder: rename_concept(folder, "teddy", "bear"),
    "delete": lambda folder: delete_concept(folder, "teddy"),
    "duplicate": lambda folder: duplicate_concept(folder, "teddy", "copy"),
}
FAULTS = {
    "rename": (os, "rename"), "write_aliases": (library, "_write_aliases"), "metadata": (library, "update_metadata"),
    "record": (library, "_record"), "copy": (library.shutil, "copy2"), "trash": (library, "trash_entry"),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failure_at_any_step_loses_nothing_and_changes_nothing(folder, monkeypatch, operation, fault):
    module, attribute = FAULTS[fault]
    before = snapshot(folder, trash=False)
    for n in range(1, 40):
        failing = FailAt(getattr(module, attribute), n)
        monkeypatch.setattr(module, attribute, failing)
        try:
            OPERATIONS[operation](folder)
        except PerfusionError as exc:
            assert "every file is back" in str(exc) or "simulated" in str(exc)
            assert snapshot(folder, trash=False) == before, (fault, n)  # all taken back, byte for byte
            assert not any(p.suffix == ".safetensors" for p in (folder / TRASH_DIR).rglob("*")), (fault, n)
        else:
            assert failing.calls < n  # the fault never fired: the operation completed
            assert set(before.values()) <= contents(folder)  # and lost nothing
            break
        finally:
            monkeypatch.setattr(module, attribute, failing.original)
    else:
        pytest.fail("the operation never completed")
