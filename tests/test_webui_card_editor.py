"""The card editor's β/τ save against stand-ins of the WebUI's modules (no WebUI here): saving with the
pre-filled description must not freeze the card's facts line (with the old β/τ) as the user's description.
Found in a real A1111 v1.10.1: after ✎ → β 0.58 → Save, the card still said "β 0.7 τ 0.15"."""
from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
from conftest import make_concept, tiny_ldm_unet

import perfusion_ext as pf
from perfusion_ext.webui.concepts import ConceptStore
from perfusion_ext.webui.library_actions import LibraryActions

GLUE = ("perfusion_ext.webui.cards", "perfusion_ext.webui.card_editor")


class UserMetadataEditor:  # the parts of modules.ui_extra_networks_user_metadata the editor uses
    def __init__(self, ui, tabname, page):
        self.page = page

    def get_user_metadata(self, name):
        item = self.page.items.get(name, {})
        user_metadata = item.get("user_metadata", None)
        if not user_metadata:
            user_metadata = {"description": item.get("description", "")}
            item["user_metadata"] = user_metadata
        return user_metadata

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        return name, user_metadata.get("description", ""), "<table>", "<card>", user_metadata.get("notes", "")

    def write_user_metadata(self, name, metadata):
        path = Path(self.page.items[name]["filename"]).with_suffix(".json")
        path.write_text(json.dumps(metadata), encoding="utf-8")


class ExtraNetworksPage:
    def __init__(self, title):
        self.name = title.lower()
        self.items = {}

    def read_user_metadata(self, item):  # as the WebUI: a description in NAME.json replaces the card's
        path = Path(item["filename"]).with_suffix(".json")
        metadata = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if metadata.get("description") is not None:
            item["description"] = metadata["description"]
        item["user_metadata"] = metadata

    def find_preview(self, path):
        return None

    def find_description(self, path):
        return None

    def search_terms_from_path(self, path):
        return path

    def get_sort_keys(self, path):
        return {}


@pytest.fixture()
def editor(tmp_path, monkeypatch):
    pf.save_concept(make_concept(tiny_ldm_unet(), "teddy", seed=1), tmp_path / "teddy.safetensors")
    shared = types.SimpleNamespace(sd_model=None, opts=types.SimpleNamespace(samples_format="png"))
    fakes = {
        "gradio": types.ModuleType("gradio"),
        "modules": types.ModuleType("modules"),
        "modules.shared": shared,
        "modules.ui_extra_networks": types.SimpleNamespace(ExtraNetworksPage=ExtraNetworksPage, quote_js=json.dumps),
        "modules.ui_extra_networks_user_metadata": types.SimpleNamespace(UserMetadataEditor=UserMetadataEditor),
    }
    for name, module in fakes.items():
        if name.startswith("modules."):
            setattr(fakes["modules"], name.split(".")[1], module)
        monkeypatch.setitem(sys.modules, name, module)
    for name in GLUE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    cards = importlib.import_module("perfusion_ext.webui.cards")
    card_editor = importlib.import_module("perfusion_ext.webui.card_editor")
    store = ConceptStore(lambda: tmp_path)
    page = cards.ExtraNetworksPagePerfusion(store, library=lambda: LibraryActions(store))
    page.items = {item["name"]: item for item in page.list_items()}
    yield page, card_editor.PerfusionMetadataEditor(None, "txt2img", page)
    for name in GLUE:  # the next importer gets a fresh module, not one bound to these stand-ins
        sys.modules.pop(name, None)


def test_saving_beta_keeps_the_cards_facts_line_live(editor):
    page, ed = editor
    values = ed.put_values_into_components("teddy")
    assert "β 0.7 τ 0.15" in values[1]  # the editor shows the card's own description
    ed.save_perfusion_metadata("teddy", values[1], "my notes", 0.58, 0.18)
    assert page.store.load("teddy").concept.beta == pytest.approx(0.58)
    card = page.create_item("teddy")  # what the card shows after Save (extraNetworksRefreshSingleCard)
    assert "β 0.58 τ 0.18" in card["description"] and "β 0.7" not in card["description"]
    assert card["user_metadata"] == {"notes": "my notes"}
    page.items["teddy"] = card
    assert "β 0.58 τ 0.18" in ed.put_values_into_components("teddy")[1]  # reopened: the live line again


def test_a_description_the_user_wrote_is_kept(editor):
    page, ed = editor
    ed.save_perfusion_metadata("teddy", "my bear", "", 0.7, 0.15)
    card = page.create_item("teddy")
    assert card["description"] == "my bear"
    page.items["teddy"] = card
    assert ed.put_values_into_components("teddy")[1] == "my bear"


def test_continue_training_checks_the_images_as_the_rest_api_does(editor, tmp_path):
    """"Continue training" submitted its job without POST /train's request-time image check: images too small for
    the resolution were found only by the job, which failed later. Now they are named at once and no job starts."""
    import threading

    from PIL import Image

    from perfusion_ext.webui.jobs import JobManager

    page, ed = editor
    started = []
    manager = JobManager(lambda job: started.append(job.request.name), threading.Lock())
    page.jobs = lambda: manager
    small, big = tmp_path / "small", tmp_path / "big"
    for folder, side in ((small, 64), (big, 512)):
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (side, side), (90 * i, 40, 200)).save(folder / f"{i}.png")
    status = ed.continue_training("teddy", 10, str(small))
    assert "perfusion-error" in status and "2 image(s) cannot be used at resolution 512" in status, status
    assert "0.png: 64×64 px is below 256 px" in status and manager.list() == []
    status = ed.continue_training("teddy", 10, f"{small / '0.png'}, {big / '0.png'}")  # a listed file too small
    assert "1 image(s) cannot be used" in status and manager.list() == []
    status = ed.continue_training("teddy", 10, str(big))
    assert "queued: training teddy-2 from teddy" in status, status
    assert [job.request.name for job in manager.list()] == ["teddy-2"]
