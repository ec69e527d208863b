"""What the server runs: its tasks, the limits on one request, checked requests, and the queue.

Both faces of the server, the web page (``page.py``) and the JSON API (``api.py``), turn what
arrives into a ``Job`` through ``make_job``, which checks every field against ``Limits`` and
raises ``RequestError`` with a message meant for the person who sent it. A ``Worker`` owns the one
pipeline of the process and runs jobs one at a time; past ``Limits.queue`` waiting jobs it answers
``Busy`` at once instead of queueing without end. Nothing here imports Gradio or FastAPI.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from ..components.images import load_image
from ..solvers import DEFAULT_SOLVER  # interpolation inverts with DDIM instead

if TYPE_CHECKING:  # the pipeline module is only needed to run a job, not to parse the command line
    from ..pipeline import Output, UniDiffuser

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ServedTask:
    """One task of the server: a tab of the page and a route ``POST /api/<name>``.

    Args:
        name: the route, the tab's id, and the ``UniDiffuser`` method that runs it.
        title: the tab's label.
        summary: one line for the page and the API description.
        prompt: whether it takes a prompt.
        images: the names of its image inputs, in the method's argument order.
        guidance: whether it takes a guidance scale.
        count: "samples" (``num_samples``) or "frames" (interpolation's ``frames``).
        progress: whether the method reports its solver steps.
        outputs: what it returns: "images", "texts" or both.
        ranked: whether it takes ``best_of`` (each output the best of that many candidates by the
            model's CLIP scorer): the tasks whose outputs have a prompt, an image or each other to
            agree with.
    """

    name: str
    title: str
    summary: str
    prompt: bool = False
    images: tuple[str, ...] = ()
    guidance: bool = True
    count: str = "samples"
    progress: bool = True
    outputs: tuple[str, ...] = ("images",)
    ranked: bool = True

    def fields(self) -> tuple[str, ...]:
        """The request fields this task accepts."""
        names = (("prompt",) if self.prompt else ()) + self.images + ("steps", "seed", self.count)
        return names + (("guidance",) if self.guidance else ()) + (("best_of",) if self.ranked else ())


BOTH = ("images", "texts")
SERVED_TASKS: tuple[ServedTask, ...] = (
    ServedTask("text_to_image", "Text to image", "Images of a prompt.", prompt=True),
    ServedTask(
        "image_to_text", "Image to text", "Captions of an image.", images=("image",),
        outputs=("texts",),
    ),
    ServedTask("joint", "Joint", "Image-caption pairs drawn together.", outputs=BOTH),
    ServedTask("image", "Image", "Images from the image marginal.", guidance=False, ranked=False),
    ServedTask(
        "text", "Text", "Captions from the text marginal.", guidance=False, outputs=("texts",), ranked=False
    ),
    ServedTask(
        "image_variation", "Image variation",
        "Image to caption to image: new images of what an image shows (with the caption between).",
        images=("image",), progress=False, outputs=BOTH,
    ),
    ServedTask(
        "text_variation", "Text variation",
        "Text to image to text: new captions of what a prompt says (with the image between).",
        prompt=True, progress=False, outputs=BOTH,
    ),
    ServedTask(
        "interpolate", "Interpolation",
        "Images between two images (both inverted to noise, joined, and sampled back).",
        images=("image_a", "image_b"), guidance=False, count="frames", progress=False, ranked=False,
    ),
)  # fmt: skip
TASKS: dict[str, ServedTask] = {task.name: task for task in SERVED_TASKS}

# What a request that leaves a field out gets; the page starts from the same values. The guidance
# scale is the model's own (``Limits.default_guidance``).
DEFAULTS: dict[str, Any] = {"steps": 25, "seed": 0, "samples": 1, "frames": 5, "best_of": 1}
CAPPED = ("steps", "guidance", "samples", "frames", "best_of")  # defaults held to their limits


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for, and how many requests may wait.

    Args:
        samples: samples per request.
        frames: frames of one interpolation (both ends included).
        steps: solver steps.
        guidance: the largest guidance scale.
        prompt_chars: characters of a prompt.
        image_bytes: bytes of an uploaded image file.
        image_side: pixels of the longer side of an uploaded image.
        queue: requests that may wait behind the running one; more are answered "busy".
        default_guidance: the guidance scale of a request that leaves it out (the model's own).
        best_of: candidates per output of a ranked task (1 where the model has no CLIP scorer).
    """

    samples: int = 4
    frames: int = 8
    steps: int = 100
    guidance: float = 20.0
    prompt_chars: int = 300
    image_bytes: int = 8 * 2**20
    image_side: int = 4096
    queue: int = 8
    default_guidance: float = 7.0  # the released model's (pipeline.DEFAULT_GUIDANCE_SCALE)
    best_of: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            low = 0 if name in ("queue", "guidance", "default_guidance") else 1
            if not value >= low:
                raise ValueError(f"Limits.{name}={value!r}: expected a number >= {low}")
        if self.frames < 2:
            raise ValueError(f"Limits.frames={self.frames}: an interpolation needs at least 2 frames")

    def default(self, name: str) -> Any:
        """The value of a field a request leaves out: ``DEFAULTS`` or the model's guidance, capped
        at the limit; None for a field that has no default (a prompt, an image)."""
        value = self.default_guidance if name == "guidance" else DEFAULTS.get(name)
        if value is None:
            return None
        return min(value, getattr(self, name)) if name in CAPPED else value


class RequestError(ValueError):
    """A request asked for something the server does not do; the message says what to change."""


class Busy(RuntimeError):
    """The queue is full; the request was not run and may be sent again later."""


@dataclass(frozen=True)
class UploadedImage:
    """A checked upload: the decoded picture and what identifies the file."""

    image: Image.Image
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class Job:
    """A checked request: every value within its limits, images decoded."""

    task: ServedTask
    prompt: str | None
    images: dict[str, UploadedImage]
    steps: int
    seed: int
    count: int
    guidance: float | None
    best_of: int | None = None

    def settings(self, model: str, grid: str) -> dict[str, Any]:
        """Everything that fixes the result, as JSON values (images by size and SHA-256); ``grid``
        is the solver's time grid, the pipeline's (``UniDiffuser.grid``)."""
        settings: dict[str, Any] = {"task": self.task.name, "model": model}
        if self.prompt is not None:
            settings["prompt"] = self.prompt
        for name, upload in self.images.items():
            settings[name] = {"width": upload.width, "height": upload.height, "sha256": upload.sha256}
        settings |= {"steps": self.steps, "seed": self.seed, self.task.count: self.count}
        if self.guidance is not None:
            settings["guidance"] = self.guidance
        if self.best_of is not None:
            settings["best_of"] = self.best_of
        settings["solver"] = "ddim" if self.task.name == "interpolate" else DEFAULT_SOLVER
        settings["grid"] = grid
        return settings


def make_job(task: ServedTask, fields: Mapping[str, Any], limits: Limits) -> Job:
    """Check one request's fields and build its job.

    Args:
        task: the task asked for.
        fields: the request's values by field name, images as the bytes of their files; a number
            left out (or None) takes ``limits.default(name)``.
        limits: the limits to hold the request to.

    Raises:
        RequestError: a field is unknown, missing, of the wrong type or out of its range.
    """
    unknown = sorted(set(fields) - set(task.fields()))
    if unknown:
        raise RequestError(
            f"{task.name} has no field {', '.join(map(repr, unknown))}; its fields are {', '.join(task.fields())}"
        )

    def value(name: str) -> Any:
        given = fields.get(name)
        return limits.default(name) if given is None else given

    low_count = 2 if task.count == "frames" else 1
    high_count = limits.frames if task.count == "frames" else limits.samples
    return Job(
        task=task,
        prompt=_prompt(fields.get("prompt"), limits) if task.prompt else None,
        images={name: read_image(fields.get(name), name, limits) for name in task.images},
        steps=_integer("steps", value("steps"), 1, limits.steps),
        seed=_integer("seed", value("seed"), 0, MAX_SEED),
        count=_integer(task.count, value(task.count), low_count, high_count),
        guidance=_number("guidance", value("guidance"), 0.0, limits.guidance) if task.guidance else None,
        best_of=_best_of(value("best_of"), limits) if task.ranked else None,
    )


def _best_of(value: Any, limits: Limits) -> int:
    if limits.best_of == 1 and value != 1:
        raise RequestError(
            f"best_of={value!r}: this model has no CLIP scorer to rank candidates with, so every sample is "
            "kept as drawn (best_of 1)"
        )
    return _integer("best_of", value, 1, limits.best_of)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # sliders and JSON numbers may send 20.0 for 20
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name}: expected a whole number from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        shown = value if abs(value) < 10**15 else f"{value:.3g}"
        raise RequestError(f"{name}={shown}: this server allows {low} to {high}")
    return value


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name}: expected a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name}={value:g}: this server allows {low:g} to {high:g}")
    return float(value)


def _prompt(value: Any, limits: Limits) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(
            "prompt: empty; write what to generate, e.g. 'a small red circle at the top left on a gray background'"
        )
    if not isinstance(value, str):
        raise RequestError(f"prompt: expected a string, got {type(value).__name__}")
    prompt = value.strip()
    if len(prompt) > limits.prompt_chars:
        raise RequestError(
            f"prompt: {len(prompt)} characters; this server allows at most {limits.prompt_chars}"
        )
    return prompt


def decode_base64(value: Any, name: str) -> bytes:
    """The bytes of a base64 string, with or without a ``data:image/...;base64,`` prefix."""
    if not isinstance(value, str):
        raise RequestError(f"{name}: expected the image file as a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            f"{name}: not valid base64; send the image file's bytes base64-encoded (e.g. `base64 -w0 FILE`)"
        ) from None


def read_image(data: bytes | None, name: str, limits: Limits) -> UploadedImage:
    """Decode an uploaded image file, politely refusing what is not a readable image.

    Raises:
        RequestError: no data, too many bytes or pixels, or not an image Pillow can read.
    """
    if not data:
        raise RequestError(f"{name}: no image given; upload a PNG, JPEG or WebP file")
    if len(data) > limits.image_bytes:
        raise RequestError(
            f"{name}: the file has {len(data):,} bytes; this server accepts images up to {limits.image_bytes:,}"
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns about images between one and two times its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            width, height = picture.size
            if max(width, height) <= limits.image_side:
                picture.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise RequestError(
            f"{name}: the file is not an image this server can read ({len(data):,} bytes starting "
            f"{data[:12]!r}); upload a PNG, JPEG or WebP file"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(
            f"{name}: the image file is damaged or incomplete ({err}); upload it again"
        ) from None
    if max(width, height) > limits.image_side:
        raise RequestError(
            f"{name}: {width}x{height} pixels; this server accepts images up to {limits.image_side} pixels a side"
        )
    return UploadedImage(load_image(picture), width, height, hashlib.sha256(data).hexdigest())


Progress = Callable[[int, int], None]  # (steps done, steps in all), as the pipeline reports them


def run_job(pipe: UniDiffuser, job: Job, progress: Progress | None = None) -> Output:
    """Run one job on the pipeline."""
    task = job.task
    args: list[Any] = ([job.prompt] if task.prompt else []) + [job.images[n].image for n in task.images]
    kwargs: dict[str, Any] = {"steps": job.steps, "seed": job.seed}
    kwargs["frames" if task.count == "frames" else "num_samples"] = job.count
    if task.guidance:
        kwargs["guidance_scale"] = job.guidance
    if task.ranked:
        kwargs["best_of"] = job.best_of
    if task.name != "interpolate":
        kwargs["solver"] = DEFAULT_SOLVER
    if task.progress and progress is not None:
        kwargs["progress"] = progress
    return getattr(pipe, task.name)(*args, **kwargs)


class Worker:
    """The process's one pipeline, running one job at a time with a bounded line of waiting jobs.

    Args:
        pipe: the pipeline, loaded once for the process.
        queue: how many jobs may wait behind the running one; the next is refused with ``Busy``.
    """

    def __init__(self, pipe: UniDiffuser, queue: int):
        self.pipe = pipe
        self.queue = queue
        self._running = threading.Lock()  # held while the pipeline runs a job
        self._count = threading.Lock()  # guards _admitted
        self._admitted = 0  # the running job and those waiting

    def status(self) -> dict[str, int]:
        with self._count:
            running = int(self._running.locked())
            return {"running": running, "waiting": self._admitted - running, "max_waiting": self.queue}

    def run(
        self, job: Job, progress: Progress | None = None, waiting: Callable[[int], None] | None = None
    ) -> Output:
        """Run a job once the pipeline is free.

        Args:
            progress: called with (steps done, steps in all) while sampling.
            waiting: called once with the number of jobs ahead when this one has to wait.

        Raises:
            Busy: ``queue`` jobs are already waiting.
        """
        with self._count:
            if self._admitted > self.queue:
                raise Busy(
                    f"the server is busy: one request is running and {self._admitted - 1} waiting, "
                    f"as many as it queues; try again in a moment"
                )
            ahead = self._admitted
            self._admitted += 1
        try:
            if ahead and waiting is not None:
                waiting(ahead)
            with self._running:
                return run_job(self.pipe, job, progress)
        finally:
            with self._count:
                self._admitted -= 1
