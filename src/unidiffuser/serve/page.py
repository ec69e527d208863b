"""The web page: one Gradio tab per task, over the same checks and queue as the JSON API.

Each tab has the task's inputs, controls for steps, guidance, seed and the number of samples (or
frames), where the model has a CLIP scorer a best-of control, a Generate button, and the results: a gallery of images with their captions, the
captions as text, the exact settings as JSON and a button to download them. Examples come from
the shapes world the shipped model was trained on.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from ..shapes import render, sample_scene
from ..shapes.world import MIN_IMAGE_SIZE
from .jobs import MAX_SEED, SERVED_TASKS, Busy, Limits, RequestError, ServedTask, Worker, make_job

# Prompts in the shapes world's vocabulary (shapes.captions parses every one of them).
EXAMPLE_PROMPTS: tuple[str, ...] = (
    "a small red circle at the top left on a gray background",
    "a big blue square to the left of a small green triangle",
    "a large yellow diamond in the center on a black background",
    "a small white cross above a big magenta circle",
)
EXAMPLE_IMAGES = 4

# The shapes world's pictures are small: show them enlarged with sharp pixels, not blurred.
CSS = """
.pixelated img { image-rendering: pixelated; }
.enlarged img { width: 100%; height: 100%; object-fit: contain; }
"""
REQUEST_ERROR = "Please change the request"  # the title of a message about the request's values


def write_example_images(folder: Path, size: int, count: int = EXAMPLE_IMAGES, seed: int = 0) -> list[Path]:
    """Render scenes of the shapes world to PNG files of size x size pixels (the same for the same seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"shapes_{i}.png"
        render(sample_scene(rng), size).save(path)
        paths.append(path)
    return paths


def image_upload(**kwargs: Any) -> gr.Image:
    """Gradio's image input, but the uploaded file reaches the handler unopened.

    Gradio's own preprocessing opens the file with Pillow and fails on anything that is not an
    image; passing the path on lets ``jobs.read_image`` refuse it with a clear message, the same
    check the JSON API applies. (The method is replaced on the instance: a subclass of a Gradio
    component makes Gradio write a type stub beside this file.)
    """
    component = gr.Image(type="filepath", **kwargs)

    def unopened(payload: Any) -> str | None:
        if payload is None:
            return None
        if payload.path is None:
            raise gr.Error("The image did not arrive; upload it again.", print_exception=False)
        return payload.path

    component.preprocess = unopened
    return component


class Page:
    """Builds the Blocks: one tab per task, each wired to the worker."""

    def __init__(self, worker: Worker, limits: Limits, model: str, out: Path):
        self.worker, self.limits, self.model = worker, limits, model
        self.settings_dir = out / "settings"
        # drawn at the model's own size, as the shapes model saw its training pictures
        size = max(MIN_IMAGE_SIZE, min(worker.pipe.default_size))
        self.example_images = write_example_images(out / "examples", size)
        self._serial = 0
        self._serial_lock = threading.Lock()

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="UniDiffuser", analytics_enabled=False) as blocks:
            gr.Markdown(
                f"# UniDiffuser\nModel: `{self.model}`. Every tab is also a route of the JSON API: "
                "`POST /api/<task>`; `GET /api` lists the tasks, their fields and this server's limits."
            )
            with gr.Tabs():
                for task in SERVED_TASKS:
                    with gr.Tab(task.title, id=task.name, elem_id=f"tab-{task.name}"):
                        self._tab(task)
        return blocks

    def _tab(self, task: ServedTask) -> None:
        gr.Markdown(task.summary)
        limits, inputs = self.limits, {}
        with gr.Row():
            with gr.Column():
                if task.prompt:
                    inputs["prompt"] = gr.Textbox(
                        label="Prompt", lines=2, max_length=limits.prompt_chars, elem_id=f"{task.name}-prompt",
                        placeholder=EXAMPLE_PROMPTS[0],
                    )  # fmt: skip
                with gr.Row():
                    for name in task.images:
                        inputs[name] = image_upload(
                            label={"image_a": "First image", "image_b": "Second image"}.get(name, "Image"),
                            sources=["upload", "clipboard"], elem_id=f"{task.name}-{name}", height=240,
                            elem_classes=["pixelated", "enlarged"],
                        )  # fmt: skip
                inputs["steps"] = gr.Slider(
                    1, limits.steps, value=limits.default("steps"), step=1, label="Steps"
                )
                if task.guidance:
                    inputs["guidance"] = gr.Slider(
                        0, limits.guidance, value=limits.default("guidance"), step=0.5, label="Guidance scale"
                    )
                if task.count == "frames":
                    inputs["frames"] = gr.Slider(
                        2, limits.frames, value=limits.default("frames"), step=1, label="Frames"
                    )
                else:
                    inputs["samples"] = gr.Slider(
                        1, limits.samples, value=limits.default("samples"), step=1, label="Samples"
                    )
                if task.ranked:
                    inputs["best_of"] = gr.Slider(
                        1, max(limits.best_of, 2), value=limits.default("best_of"), step=1,
                        label="Best of (candidates per sample, ranked by CLIP)", visible=limits.best_of > 1,
                    )  # fmt: skip
                inputs["seed"] = gr.Number(
                    limits.default("seed"), label="Seed", precision=0, minimum=0, maximum=MAX_SEED
                )
                button = gr.Button("Generate", variant="primary", elem_id=f"{task.name}-run")
            with gr.Column():
                gallery = gr.Gallery(
                    label="Images", format="png", columns=4, object_fit="contain", elem_id=f"{task.name}-gallery",
                    elem_classes="pixelated", visible="images" in task.outputs,
                )  # fmt: skip
                captions = gr.Textbox(
                    label="Captions", lines=3, interactive=False, elem_id=f"{task.name}-captions",
                    visible="texts" in task.outputs,
                )  # fmt: skip
                settings = gr.Code(
                    label="Settings", language="json", interactive=False, elem_id=f"{task.name}-settings"
                )
                download = gr.DownloadButton(
                    "Download settings (JSON)", visible=False, elem_id=f"{task.name}-download"
                )
        self._examples(task, inputs)
        outputs = {"gallery": gallery, "captions": captions, "settings": settings, "download": download}

        def run(values: dict, progress: gr.Progress = gr.Progress()) -> dict:  # noqa: B008 (Gradio's idiom)
            fields = {name: values[component] for name, component in inputs.items()}
            return self._run(task, fields, outputs, progress)

        button.click(
            run, inputs=set(inputs.values()), outputs=set(outputs.values()), api_visibility="private",
            concurrency_limit=None,  # the worker queues and refuses, for the page and the API alike
        )  # fmt: skip

    def _examples(self, task: ServedTask, inputs: dict) -> None:
        images = [str(path) for path in self.example_images]
        if task.prompt:
            gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[inputs["prompt"]], label="Example prompts")
        elif task.images == ("image",):
            gr.Examples([[p] for p in images], inputs=[inputs["image"]], label="Example images")
        elif task.images:
            pairs = [[images[i], images[(i + 1) % len(images)]] for i in range(len(images))]
            gr.Examples(pairs, inputs=[inputs[name] for name in task.images], label="Example pairs")

    def _run(self, task: ServedTask, fields: dict, outputs: dict, progress: gr.Progress) -> dict:
        for name in task.images:  # Gradio has refused files over Limits.image_bytes at upload
            path = fields.get(name)
            fields[name] = Path(path).read_bytes() if path else None
        try:
            job = make_job(task, fields, self.limits)
        except RequestError as err:
            raise gr.Error(str(err), title=REQUEST_ERROR, print_exception=False) from None

        def waiting(ahead: int) -> None:
            progress(0, desc=f"waiting for {ahead} earlier request{'s' if ahead > 1 else ''}")

        def sampling(done: int, total: int) -> None:
            progress((done, total), desc="sampling", unit="steps")

        progress(0, desc="sampling")
        start = time.perf_counter()
        try:
            out = self.worker.run(job, progress=sampling, waiting=waiting)
        except Busy as err:
            raise gr.Error(str(err), title="Busy", print_exception=False) from None
        except ValueError as err:  # the pipeline's own checks
            raise gr.Error(f"{task.name}: {err}", title=REQUEST_ERROR, print_exception=False) from None
        settings = job.settings(self.model, self.worker.pipe.grid) | {
            "seconds": round(time.perf_counter() - start, 3)
        }
        text = json.dumps(settings, indent=2)
        captions = out.texts if len(out.texts) == len(out.images) else [None] * len(out.images)
        return {
            outputs["gallery"]: list(zip(out.images, captions, strict=True)),
            outputs["captions"]: "\n".join(out.texts),
            outputs["settings"]: text,
            outputs["download"]: gr.DownloadButton(value=self._save_settings(task, text), visible=True),
        }

    def _save_settings(self, task: ServedTask, text: str) -> Path:
        with self._serial_lock:
            self._serial += 1
            serial = self._serial
        self.settings_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings_dir / f"{time.strftime('%Y%m%d-%H%M%S')}_{serial:04d}_{task.name}.json"
        path.write_text(text + "\n", encoding="utf-8")
        return path
