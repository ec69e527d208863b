"""The JSON API: ``GET /api`` describes the server, ``POST /api/<task>`` runs a task.

A request is a JSON object of the task's fields (images as base64 strings of their files); the
answer is ``{"task", "settings", "images", "texts", "seconds"}`` with every image a base64 PNG.
Errors answer ``{"error": message}``: 400 for a request to change, 404 for an unknown task or path,
405 for a task's path asked with another method than POST, 413 for a body too large, 503 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from .jobs import TASKS, Busy, Limits, RequestError, Worker, decode_base64, make_job

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def describe(worker: Worker, limits: Limits, model: str) -> dict[str, Any]:
    """What ``GET /api`` answers: the model, each task's fields with defaults, limits, the queue."""
    tasks = {
        task.name: {
            "summary": task.summary,
            "fields": {name: limits.default(name) for name in task.fields()},
            "required": (["prompt"] if task.prompt else []) + list(task.images),
        }
        for task in TASKS.values()
    }
    return {"model": model, "tasks": tasks, "limits": asdict(limits), "queue": worker.status()}


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def api_router(worker: Worker, limits: Limits, model: str) -> APIRouter:
    """The API's routes over one worker."""
    router = APIRouter(prefix="/api")
    # a body holds at most two base64 images (4 characters per 3 bytes) and a few small fields
    max_body = 2 * (limits.image_bytes * 4 // 3 + 4) + 64 * 1024

    @router.get("")
    def info() -> dict[str, Any]:
        return describe(worker, limits, model)

    @router.post("/{name}")
    async def run(name: str, request: Request) -> JSONResponse:
        task = TASKS.get(name)
        if task is None:
            return _error(404, f"no task {name!r}; the tasks are {', '.join(TASKS)}")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return _error(
                413, f"the request has {int(length):,} bytes; this server accepts up to {max_body:,}"
            )
        body = await request.body()
        if len(body) > max_body:
            return _error(413, f"the request has {len(body):,} bytes; this server accepts up to {max_body:,}")
        try:
            fields = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"the body is not JSON ({err}); send a JSON object of the task's fields")
        if not isinstance(fields, dict):
            return _error(400, f"expected a JSON object of the task's fields, got {type(fields).__name__}")
        # decoding images and sampling both take a while: off the event loop
        return await run_in_threadpool(_run, task.name, fields)

    def _run(name: str, fields: dict[str, Any]) -> JSONResponse:
        task = TASKS[name]
        start = time.perf_counter()
        try:
            for image in task.images:
                if fields.get(image) is not None:
                    fields[image] = decode_base64(fields[image], image)
            job = make_job(task, fields, limits)
            out = worker.run(job)
        except RequestError as err:
            return _error(400, str(err))
        except Busy as err:
            return _error(503, str(err), **{"Retry-After": str(RETRY_AFTER_S)})
        except ValueError as err:  # the pipeline's own checks
            return _error(400, f"{name}: {err}")
        except Exception as err:  # a failure of ours: answer it and keep serving
            log.exception("%s failed", name)
            return _error(500, f"{name} failed inside the server ({type(err).__name__}: {err}); see its log")
        answer = {
            "task": name,
            "settings": job.settings(model, worker.pipe.grid),
            "images": [png_base64(image) for image in out.images],
            "texts": out.texts,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return JSONResponse(answer)

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def elsewhere(path: str, request: Request) -> JSONResponse:
        if path in TASKS:  # a task's path with another method than POST
            return _error(
                405, f"{request.method} /api/{path}: send POST with a JSON object of the task's fields "
                "(GET /api lists them)", Allow="POST",
            )  # fmt: skip
        return _error(404, f"no API path /api/{path}; GET /api lists the tasks, POST /api/TASK runs one")

    return router
