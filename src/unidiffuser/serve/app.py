"""The server's application: the JSON API and the web page over one worker, and running it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from ..pipeline import UniDiffuser
from .api import api_router
from .jobs import Limits, Worker


def build_app(
    pipe: UniDiffuser, *, out: str | Path, limits: Limits | None = None, model: str = "model"
) -> FastAPI:
    """The API at ``/api`` and the page at ``/``, both over one worker that owns ``pipe``.

    Args:
        pipe: the pipeline every request runs on.
        out: the folder for everything the server writes: the settings files offered for download,
            the example images, and Gradio's temporary files (uploads and results) under
            ``out/gradio`` (Gradio takes that folder from ``GRADIO_TEMP_DIR``, which this sets for
            the whole process).
        limits: what one request may ask for and how many may wait (``Limits()`` by default).
        model: the model's name as the page and the settings show it.
    """
    limits = limits or Limits()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Gradio reads both from the environment only: its files go under `out`, and it sends nothing
    # out of the machine (no telemetry, no version check).
    os.environ["GRADIO_TEMP_DIR"] = str(out / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    from .page import CSS, Page

    worker = Worker(pipe, limits.queue)
    # no /docs: FastAPI's documentation pages load their scripts from the internet
    app = FastAPI(title="UniDiffuser", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.include_router(api_router(worker, limits, model))
    blocks = Page(worker, limits, model, out).build()
    blocks.queue(default_concurrency_limit=None)  # the worker bounds the line, not Gradio
    return gr.mount_gradio_app(
        app, blocks, path="/", css=CSS, footer_links=[], run_history=False, ssr_mode=False,
        mcp_server=False, max_file_size=limits.image_bytes, allowed_paths=[str(out / "examples")],
    )  # fmt: skip


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port).

    Raises:
        OSError: the address is taken or cannot be bound; the message names it, ``errno`` says why.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        error = OSError(f"cannot listen on {host}:{port} ({err.strerror or err})")
        error.errno = err.errno  # what went wrong, for a caller to say what to change
        raise error from None
    sock.listen(128)
    return sock


def make_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for the app; run it with ``server.run(sockets=[bind(host, port)])``."""
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
