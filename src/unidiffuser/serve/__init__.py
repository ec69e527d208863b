"""`unidiffuser serve`: a web page and a JSON API for every task of one model, on this machine.

The pieces: ``jobs`` (the tasks, limits, checked requests and the bounded queue), ``api`` (the JSON
routes), ``page`` (the Gradio page) and ``app`` (both over one worker, and the server). This module
only registers the command; Gradio, FastAPI and torch are imported when it runs.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import signal
import sys
import tempfile
from pathlib import Path

DEFAULT_PORT = 7860


def load_model(model: str | None, device: str = "cpu", dtype=None):
    """The pipeline to serve and its name: ``model`` a model directory, or None for the shipped model;
    ``dtype`` (a torch dtype, None for fp32) is the weights'.

    Raises:
        FileNotFoundError, ValueError: the directory is missing or not a model (the message says which).
    """
    import torch

    from .. import shipped
    from ..pipeline import UniDiffuser

    path, name = model, str(model)
    if model is None:
        path, name = shipped.shipped_model_dir(), "shipped shapes model"
    return UniDiffuser.from_pretrained(path, device=device, dtype=dtype or torch.float32), name


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model on a web page and a JSON API (the shipped shapes model unless --model)."""
    from ..devices import device_option
    from ..sample_cli import apply_speed_arguments, torch_dtype
    from .app import bind, build_app, make_server
    from .jobs import DEFAULTS, Limits

    device = str(device_option(args.device, "unidiffuser serve"))
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        # a port taken or not ours to open is the port's fault; anything else the address's
        port = err.errno in (errno.EADDRINUSE, errno.EACCES)
        fix = (
            "choose another with --port"
            if port
            else "give --host an address of this machine (127.0.0.1, 0.0.0.0)"
        )
        raise SystemExit(f"unidiffuser serve: {err}; {fix}") from None
    try:
        pipe, name = load_model(args.model, device, torch_dtype(args.dtype))
    except (FileNotFoundError, ValueError) as err:
        sock.close()
        where = f"--model {args.model}: " if args.model else ""  # the shipped model's error names itself
        raise SystemExit(f"unidiffuser serve: {where}{err}") from None
    apply_speed_arguments(pipe, args, min(DEFAULTS["steps"], args.max_steps))  # calibrate as requests run
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="unidiffuser-serve-"))
    limits = Limits(
        samples=args.max_samples,
        steps=args.max_steps,
        queue=args.max_queue,
        default_guidance=pipe.guidance_scale,
        best_of=args.max_best_of if pipe.scorer is not None else 1,
    )
    app = build_app(pipe, out=out, limits=limits, model=name)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]
    print(f"serving {name} at http://{host}:{port}/ (API: http://{host}:{port}/api)", file=sys.stderr)
    print(f"files go to {out}{'' if args.out else ' (removed on exit)'}; Ctrl-C stops", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again under the
    # handler that was there before: make SIGTERM end like Ctrl-C, so the clean-up below runs
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        make_server(app).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print("stopped", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter, nonnegative_int, port_number, positive_int
    from ..sample_cli import add_speed_arguments
    from .jobs import DEFAULTS, Limits  # light: no Gradio, no server

    p = sub.add_parser(
        "serve", help="serve a model on a local web page and JSON API",
        description=cmd_serve.__doc__, formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", default=None, help="model directory, or none for the shipped shapes model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help="port to listen on (0: any free port)"
    )
    p.add_argument(
        "--out", default=None,
        help="folder for everything the server writes, or none for a temporary one removed on exit",
    )  # fmt: skip
    p.add_argument(
        "--max-samples",
        type=positive_int,
        default=Limits.samples,
        help="most samples one request may ask for",
    )
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=Limits.steps,
        help="most solver steps one request may ask for",
    )
    p.add_argument(
        "--max-best-of", type=positive_int, default=Limits.best_of,
        help="most candidates per sample one request may rank (best_of; needs the model's CLIP scorer, "
        "which the shipped model has)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=nonnegative_int, default=Limits.queue,
        help="requests that may wait behind the running one; more are answered 'busy'",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_speed_arguments(p, f"the requests' default steps ({DEFAULTS['steps']}, or --max-steps if fewer)")
    p.set_defaults(func=cmd_serve)
