"""REST routes under /perfusion/v1, registered on app start.

Extension routes are not covered by the WebUI's --api-auth, so they enforce it themselves: with
--api-auth set, every route needs HTTP Basic credentials from that list. Invalid bodies get a 4xx
with a message. Training requests become server-side jobs that take the WebUI's queue lock.
"""
from __future__ import annotations

import asyncio
import json
import secrets

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from modules import shared

from ..core import families
from ..core.errors import PerfusionError
from . import library_actions, state
from .backend import refuse_unusable
from .cards import concept_json, current_family
from .export import export_from_body
from .train_request import WEBUI_FAMILY, ApiError, check_images, parse_train_request

PREFIX = "/perfusion/v1"


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """`user:password,user2:password2` as the WebUI's --api-auth takes it (a password may contain ':')."""
    out = {}
    for item in (api_auth or "").split(","):
        user, sep, password = item.strip().partition(":")
        if sep and user:
            out[user] = password
    return out


def check_credentials(credentials: dict[str, str], user: str | None, password: str | None) -> bool:
    expected = credentials.get(user or "")
    return expected is not None and secrets.compare_digest((password or "").encode(), expected.encode())


def _auth_dependency():
    credentials = parse_credentials(getattr(shared.cmd_opts, "api_auth", None))
    if not credentials:
        return []
    basic = HTTPBasic(auto_error=False)

    def auth(creds: HTTPBasicCredentials | None = Depends(basic)):
        if creds is None or not check_credentials(credentials, creds.username, creds.password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return [Depends(auth)]


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message, "detail": exc.message})


async def _json_body(request: Request, empty: bytes):
    """The request's JSON body (`empty` parsed when there is none); 400 when it is not JSON."""
    try:
        return json.loads(await request.body() or empty)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def register(_demo, app: FastAPI) -> None:
    deps = _auth_dependency()

    async def list_concepts():
        return [concept_json(e) for e in state.store().entries()]

    async def start_training(request: Request):
        try:
            body = await _json_body(request, b"null")
            family = current_family()
            family = family if family and families.get(family).webui_trainable else WEBUI_FAMILY
            steps = getattr(shared.opts, "perfusion_default_steps", None)  # the setting, else the family's
            req = parse_train_request(body, state.images_dirs(), {"steps": int(steps)} if steps else None, family)
            await asyncio.to_thread(check_images, req)  # 422 now, naming each file, rather than a job that fails later
            if shared.sd_model is None:
                raise ApiError(409, "no Stable Diffusion checkpoint is loaded")
            try:
                refuse_unusable(shared.sd_model)  # Forge: refused now, with the command to use, not as a failed job
            except PerfusionError as exc:
                raise ApiError(409, str(exc)) from exc
            job = state.jobs().submit(req)
        except ApiError as exc:
            return _error(exc)
        return {"job_id": job.id, "state": job.state, "name": req.name}

    async def list_jobs():
        return [j.to_json(preview=False) for j in state.jobs().list()]

    async def get_job(job_id: str, preview: bool = True):
        try:
            return state.jobs().get(job_id).to_json(preview=preview)
        except ApiError as exc:
            return _error(exc)

    async def interrupt_job(job_id: str):
        try:
            job = state.jobs().interrupt(job_id)
        except ApiError as exc:
            return _error(exc)
        return {"id": job.id, "state": job.state, "interrupt_requested": True}

    async def export(request: Request):
        try:
            body = await _json_body(request, b"null")
            # minutes of work under the queue lock: in a worker thread, or every route of the server waits for it
            return await asyncio.to_thread(export_from_body, body, state.store())
        except ApiError as exc:
            return _error(exc)

    async def concept_action(name: str, action: str, request: Request):
        try:
            body = await _json_body(request, b"{}")
            return library_actions.handle(state.library(), action, name, body)
        except ApiError as exc:
            return _error(exc)

    async def concept_query(name: str, action: str):
        if action not in ("steps", "continue"):
            return _error(ApiError(404, f"unknown action {action!r} (GET: steps, continue)"))
        try:
            return library_actions.handle(state.library(), action, name, {})
        except ApiError as exc:
            return _error(exc)

    async def list_trash():
        return state.library().trash()

    async def restore(entry: str):
        try:
            return state.library().restore(entry)
        except ApiError as exc:
            return _error(exc)

    app.add_api_route(f"{PREFIX}/concepts", list_concepts, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/concepts/{{name}}/{{action}}", concept_action, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/concepts/{{name}}/{{action}}", concept_query, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/trash", list_trash, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/trash/{{entry}}/restore", restore, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/train", start_training, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/jobs", list_jobs, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", get_job, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/interrupt", interrupt_job, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/export", export, methods=["POST"], dependencies=deps)
