"""The "Perfusion" page of the Extra Networks tabs: one card per concept file in the concepts folder.

Preview from training (NAME.png next to the file), description, superclass and training facts from
the file's metadata, click-to-insert, and the card editor (card_editor.py: the stored β and τ, rename,
duplicate, delete to the trash, continue training). A card of another family than the loaded model is
greyed out with the reason, never hidden.
"""
from __future__ import annotations

import html
import json
import os

from modules import shared, ui_extra_networks
from modules.ui_extra_networks import quote_js

from ..core import families
from ..core.layers import unet_family
from ..core.tags import format_tag
from .concepts import ConceptStore, Entry, drop_folder_buttons, mismatch_reason


def current_family() -> str | None:
    model = shared.sd_model
    if model is None:
        return None
    try:
        forge = getattr(model, "forge_objects", None)  # Forge: the UNet sits behind its patcher
        return unet_family(forge.unet.model.diffusion_model if forge is not None else model.model.diffusion_model)
    except Exception:  # noqa: BLE001 - an architecture we do not know
        return None


def facts(entry: Entry) -> str:
    c = entry.concept
    if c is None:
        return f"unusable: {entry.error}"
    meta = c.metadata
    parts = [f"{c.superclass}", families.label(c.base_family)]
    if meta.get("perfusion.steps"):
        parts.append(f"{meta['perfusion.steps']} steps")
    if meta.get("perfusion.images"):
        parts.append(f"{meta['perfusion.images']} images")
    parts.append(f"β {c.beta:g} τ {c.tau:g}")
    return " · ".join(parts)


def generated_description(entry: Entry, reason: str | None) -> str:
    """The card's description when the user wrote none: the facts line (live β/τ), the file's description and
    the reason it does not fit the loaded model."""
    c = entry.concept
    description = (c.metadata.get("modelspec.description", "") if c else "") or ""
    description = f"{facts(entry)}\n{description}".strip()
    return f"⚠ {reason}\n{description}" if reason else description


def concept_json(entry: Entry, family: str | None = "unset") -> dict:
    family = current_family() if family == "unset" else family
    c = entry.concept
    reason = mismatch_reason(c.base_family, family) if c else entry.error
    return {
        "name": entry.name, "filename": str(entry.path), "hash": entry.sha256, "short_hash": entry.short_hash,
        "superclass": c.superclass if c else None, "base_family": c.base_family if c else None,
        "beta": c.beta if c else None, "tau": c.tau if c else None, "compatible": c is not None and reason is None,
        "reason": reason, "tag": format_tag(entry.name), "description": c.metadata.get("modelspec.description") if c else None,
        "steps": c.metadata.get("perfusion.steps") if c else None,
    }


class ExtraNetworksPagePerfusion(ui_extra_networks.ExtraNetworksPage):
    def __init__(self, store: ConceptStore, library=None, jobs=None):
        super().__init__("Perfusion")
        self.store = store
        self.library = library  # () -> library_actions.LibraryActions, for the card editor
        self.jobs = jobs  # () -> jobs.JobManager ("continue training")
        self.allow_negative_prompt = False

    def create_user_metadata_editor(self, ui, tabname):
        from .card_editor import PerfusionMetadataEditor

        return PerfusionMetadataEditor(ui, tabname, self)

    def generated_description(self, name) -> str | None:
        """What the card of `name` shows when the user wrote no description (None: no such concept)."""
        entry = next((e for e in self.store.entries() if e.name == name), None)
        if entry is None:
            return None
        c = entry.concept
        return generated_description(entry, mismatch_reason(c.base_family, current_family()) if c else entry.error)

    def refresh(self):
        pass  # entries() rescans the folder on every listing (cached per file by mtime/size)

    def create_item(self, name, index=None, enable_filter=True):
        entry = next((e for e in self.store.entries() if e.name == name), None)
        return None if entry is None else self._item(entry, index, current_family())

    def _item(self, entry: Entry, index, family):
        path, _ = os.path.splitext(str(entry.path))
        c = entry.concept
        reason = (mismatch_reason(c.base_family, family) if c else entry.error)
        file_meta = dict(c.metadata) if c else {}
        if c:
            file_meta.update({"perfusion.name": c.name, "perfusion.superclass": c.superclass,
                              "perfusion.base_family": c.base_family, "perfusion.beta": str(c.beta),
                              "perfusion.tau": str(c.tau), "tensor sha256": entry.sha256})
        description = generated_description(entry, reason)
        strength = float(getattr(shared.opts, "perfusion_default_strength", 1.0) or 1.0)
        item = {
            "name": entry.name,
            "filename": str(entry.path),
            "shorthash": entry.short_hash,
            "preview": self.find_preview(path),
            "description": self.find_description(path) or description,
            "search_terms": [self.search_terms_from_path(str(entry.path)), entry.sha256,
                             c.superclass if c else ""],
            "local_preview": f"{path}.{shared.opts.samples_format}",
            "metadata": file_meta,
            "sort_keys": {"default": index, **self.get_sort_keys(str(entry.path))},
            "prompt": quote_js(format_tag(entry.name, strength)),
            "negative_prompt": quote_js(""),  # a click inserts into the positive prompt only
            "perfusion_reason": reason,
        }
        self.read_user_metadata(item)
        if reason and not item.get("user_metadata", {}).get("description"):
            item["description"] = description
        return item

    def list_items(self):
        family = current_family()
        for index, entry in enumerate(self.store.entries()):
            yield self._item(entry, index, family)

    def create_item_html(self, tabname, item, template=None):
        out = super().create_item_html(tabname, item, template)
        reason = item.get("perfusion_reason")
        if reason and isinstance(out, str) and out:
            out = out.replace('<div class="card"', f'<div class="card perfusion-incompatible" title="{html.escape(reason)}"', 1)
        return out

    def create_dirs_view_html(self, tabname):
        # training runs (NAME.run/checkpoints, NAME.run/previews) are no concepts: no folder buttons for them.
        # The "Tree" view needs nothing: the WebUI leaves out folders that hold no listed item.
        return drop_folder_buttons(super().create_dirs_view_html(tabname))

    def allowed_directories_for_previews(self):
        return [str(self.store.folder)]


def metadata_json(entry: Entry) -> str:
    return json.dumps(concept_json(entry), indent=2)
