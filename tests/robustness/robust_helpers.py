"""Shared pieces of the robustness tests: file snapshots ("nothing was lost"), hand-made bad files, and stand-ins
for the WebUI and FastAPI so the REST routes of `perfusion_ext.webui.api` run without either."""
from __future__ import annotations

import asyncio
import functools
import importlib
import struct
import sys
import types
import zlib
from pathlib import Path

import torch


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links not followed) with its bytes: equal snapshots mean nothing was lost."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height RGB pixels, with almost no pixel data: a decompression bomb's
    header without the bomb (nothing here ever decodes it)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on every module of `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---- a WebUI and FastAPI stand-in for the REST routes --------------------------------------------------
class JSONResponse:
    def __init__(self, status_code: int = 200, content=None):
        self.status_code, self.content = status_code, content


class HTTPException(Exception):
    def __init__(self, status_code: int, detail: str = "", headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


class Request:
    def __init__(self, body: bytes = b""):
        self._body = body

    async def body(self) -> bytes:
        return self._body


class FastAPI:
    """Records the routes `api.register` adds: (method, path) -> (endpoint, dependencies)."""

    def __init__(self):
        self.routes: dict[tuple[str, str], tuple] = {}

    def add_api_route(self, path, endpoint, methods, dependencies=()):
        for method in methods:
            self.routes[(method, path)] = (endpoint, list(dependencies))


class Depends:
    def __init__(self, dependency=None):
        self.dependency = dependency


class HTTPBasic:
    def __init__(self, auto_error: bool = True):
        self.auto_error = auto_error


class HTTPBasicCredentials:
    def __init__(self, username: str, password: str):
        self.username, self.password = username, password


class ApiHarness:
    """`perfusion_ext.webui.api` registered on a recording app, with the WebUI's `modules` and FastAPI stood in.

    `call(method, route, body=..., **params)` runs the endpoint (its auth dependency first) and returns
    (status, json) as a client would see them."""

    def __init__(self, monkeypatch, concepts: Path, images: Path, jobs=None, api_auth: str | None = None):
        shared = types.SimpleNamespace(
            sd_model=types.SimpleNamespace(), opts=types.SimpleNamespace(),
            cmd_opts=types.SimpleNamespace(api_auth=api_auth, perfusion_dir=str(concepts),
                                           perfusion_images_dir=str(images)),
            state=types.SimpleNamespace())
        fastapi = types.ModuleType("fastapi")
        fastapi.Depends, fastapi.FastAPI, fastapi.HTTPException, fastapi.Request = Depends, FastAPI, HTTPException, Request
        fakes = {
            "fastapi": fastapi,
            "fastapi.responses": types.SimpleNamespace(JSONResponse=JSONResponse),
            "fastapi.security": types.SimpleNamespace(HTTPBasic=HTTPBasic, HTTPBasicCredentials=HTTPBasicCredentials),
            "modules": types.ModuleType("modules"),
            "modules.shared": shared,
            "modules.paths": types.SimpleNamespace(models_path=str(concepts.parent), data_path=str(images.parent)),
            "modules.ui_extra_networks": types.SimpleNamespace(ExtraNetworksPage=object, quote_js=repr),
        }
        for name, module in fakes.items():
            if name.startswith("modules."):
                setattr(fakes["modules"], name.split(".")[1], module)
            monkeypatch.setitem(sys.modules, name, module)
        for name in ("perfusion_ext.webui.api", "perfusion_ext.webui.cards"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        self.api = importlib.import_module("perfusion_ext.webui.api")
        from perfusion_ext.webui import state
        from perfusion_ext.webui.concepts import ConceptStore

        monkeypatch.setattr(state, "_store", ConceptStore(lambda: concepts))
        monkeypatch.setattr(state, "_jobs", jobs)
        monkeypatch.setattr(state, "_activator", None)
        self.shared, self.app = shared, FastAPI()
        self.api.register(None, self.app)
        self.modules = list(fakes)

    def close(self):
        for name in ("perfusion_ext.webui.api", "perfusion_ext.webui.cards"):  # bound to these stand-ins
            sys.modules.pop(name, None)

    def call(self, method: str, route: str, body: bytes | None = None, credentials=None, **params):
        endpoint, deps = self.app.routes[(method, self.api.PREFIX + route)]
        try:
            for dep in deps:
                dep.dependency(credentials)
        except HTTPException as exc:
            return exc.status_code, {"detail": exc.detail}
        if "request" in endpoint.__code__.co_varnames[:endpoint.__code__.co_argcount]:
            params["request"] = Request(body or b"")
        result = asyncio.run(endpoint(**params))
        if isinstance(result, JSONResponse):
            return result.status_code, result.content
        return 200, result


@functools.cache
def toy_pipeline():
    """One tiny random toy pipeline for the whole run (building one takes seconds). Tests leave it as they found it."""
    from perfusion_ext.toy.plugin import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_concept(pipe, name: str, seed: int):
    """A random concept that fits the toy pipeline (family toy, superclass circle)."""
    from conftest import make_concept

    concept = make_concept(pipe.unet, name=name, seed=seed, family="toy", superclass="circle")
    concept.embeddings = {"clip_l": torch.randn(1, 128, generator=torch.Generator().manual_seed(seed))}
    return concept


def rss_mib() -> float | None:
    """This process's resident memory now, in MiB (None where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    """The most resident memory this process has used so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
