"""`perfusion export refit REPO --concept FILE --slot K [--server URL]`: a concept into a library slot.

Only the slot's rows change (its UNet K/V rows, its token-table rows, its entry in library.json), with
the same shapes, so nothing is rebuilt; files are written beside the originals and renamed over them.
With `--server`, the running Triton reloads the text encoder and the UNet, then the pipeline (which
reads library.json): Triton keeps serving the old version of a model until the new one is ready, so no
request is lost. A request already running when its pipeline reloads finishes with the slots it began with.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from perfusion_ext.core.errors import PerfusionError

from .. import manifest
from ..refit import place, rewrite, token_rows
from . import library
from .repository import slot_concept, write_json
from .runtime import LIBRARY_JSON

RELOAD_ORDER = ("text_encoder", "unet", "pipeline")


def refit_library(folder, concept_file, slot: int, beta: float | None = None, tau: float | None = None,
                  server: str | None = None) -> dict:
    """Put `concept_file` into slot `slot` of the Triton repository at `folder`; returns the updated manifest."""
    import torch

    from ..tokens import TokenSlot

    folder = Path(folder)
    info = manifest.read(folder)
    if info.get("layout") != "triton":
        raise PerfusionError(f"{folder} is not a Triton library repository.")
    lib = folder / "pipeline" / "library"
    lib_info = json.loads((lib / LIBRARY_JSON).read_text(encoding="utf-8"))
    entry, entries, layers = place(lib, lib_info["concepts"], lib_info["slots"], info["base_family"], concept_file,
                                   slot, 1.0, beta, tau)
    token_slot = next(s for s in lib_info["token_slots"] if s["slot"] == slot)
    vectors = next(iter(entry.concept.embeddings.values())).shape[0]
    if vectors > token_slot["rows"]:
        raise PerfusionError(f"concept {entry.concept.name!r} has {vectors} token vectors; the slots of this library "
                             f"hold {token_slot['rows']}. Export the library again with this concept among --concept.")
    writes = {info["files"]["unet"]: library.unet_tensors(layers, entries, lib_info["slots"], torch.float32),
              info["files"]["text_encoder"]: token_rows(folder, info, entry)}
    rewrite(folder, writes, entry, lib)
    ids = list(range(token_slot["ids"][0], token_slot["ids"][0] + vectors))
    placed = slot_concept(entry, TokenSlot(slot, entry.concept.name, [], ids, token_slot["rows"]))
    lib_info["concepts"] = sorted([c for c in lib_info["concepts"] if c["slot"] != slot] + [placed],
                                  key=lambda c: c["slot"])
    write_json(lib / LIBRARY_JSON, lib_info)
    info["concepts"] = lib_info["concepts"]
    info["verification"] = {"note": f"slot {slot} refitted; a fresh export re-runs every check."}
    manifest.write(folder, info)
    if server:
        reload_models(server)
    return info


def reload_models(server: str, models=RELOAD_ORDER, timeout: float = 300.0) -> None:
    """Ask a running Triton (model control mode explicit) to load the changed models again, in order."""
    for model in models:
        url = f"{server.rstrip('/')}/v2/repository/models/{model}/load"
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=timeout).read()
        except (urllib.error.URLError, OSError) as exc:
            detail = exc.read().decode(errors="replace") if isinstance(exc, urllib.error.HTTPError) else exc
            raise PerfusionError(f"the files are refitted, but reloading {model!r} on {server} failed ({detail}); "
                                 f"reload it by hand: curl -X POST {url}") from exc
