"""`unidiffuser serve`: the JSON API for every task, its limits and queue, the page in a real browser.

One server over a tiny random pipeline runs on loopback for the module; the browser test drives
it in headless Chromium (the system's /usr/bin/chromium through Playwright) and saves a
screenshot under pytest's temporary folder. A second test starts the command itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip(
    "httpx", reason="the serve tests need the `serve` extra: pip install -e '.[serve]'"
)
pytest.importorskip("gradio", reason="the serve tests need the `serve` extra: pip install -e '.[serve]'")

from unidiffuser import shipped  # noqa: E402
from unidiffuser.pipeline import UniDiffuser  # noqa: E402
from unidiffuser.serve import load_model  # noqa: E402
from unidiffuser.serve.app import bind, build_app, make_server  # noqa: E402
from unidiffuser.serve.jobs import TASKS, Busy, Limits, Worker, make_job  # noqa: E402
from unidiffuser.serve.page import EXAMPLE_PROMPTS, write_example_images  # noqa: E402
from unidiffuser.shapes import parse_caption, parse_image, render, sample_scene  # noqa: E402
from unidiffuser.tiny import tiny_pipeline  # noqa: E402

# gradio's queue calls pandas in ways pandas 3 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

CHROMIUM = Path("/usr/bin/chromium")
LIMITS = Limits(samples=3, frames=4, steps=20, prompt_chars=80, image_side=256, queue=1)
STEPS = 3  # solver steps of the API tests: the tiny model draws noise at any number
WAIT_MS = 60_000  # the browser's patience for one step: generous, for a busy 2-core machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-model"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The app over the tiny model, served on a free loopback port in a thread."""
    pipe = UniDiffuser.from_pretrained(model_dir)
    out = tmp_path_factory.mktemp("serve-out")
    app = build_app(pipe, out=out, limits=LIMITS, model="tiny")
    uvicorn = make_server(app)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn.started:
        assert time.monotonic() < deadline, "the server did not start within 30 s"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield type("Served", (), {"url": url, "client": client, "pipe": pipe, "out": out, "app": app})
    uvicorn.should_exit = True
    thread.join(timeout=10)
    sock.close()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_png(seed: int) -> bytes:
    """A PNG file of a scene of the shapes world, 32 pixels like the shipped model's."""
    return png_bytes(render(sample_scene(np.random.default_rng(seed)), 32))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(text: str) -> Image.Image:
    data = base64.b64decode(text)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


# -- the API, task by task ----------------------------------------------------------------------


def _requests(image_a: bytes, image_b: bytes) -> dict:
    """Per task: the API request, the same call on the pipeline, and the numbers of images and texts."""
    a, b = Image.open(io.BytesIO(image_a)), Image.open(io.BytesIO(image_b))
    prompt = EXAMPLE_PROMPTS[1]
    common = {"steps": STEPS, "seed": 3}
    return {
        "text_to_image": (
            {"prompt": prompt, "samples": 2, "guidance": 2.0},
            lambda p: p.text_to_image(prompt, num_samples=2, guidance_scale=2.0, **common), (2, 0),
        ),
        "image_to_text": (
            {"image": b64(image_a), "samples": 2, "guidance": 2.0},
            lambda p: p.image_to_text(a, num_samples=2, guidance_scale=2.0, **common), (0, 2),
        ),
        "joint": ({"samples": 2}, lambda p: p.joint(2, **common), (2, 2)),
        "image": ({"samples": 2}, lambda p: p.image(2, **common), (2, 0)),
        "text": ({"samples": 2}, lambda p: p.text(2, **common), (0, 2)),
        "image_variation": (
            {"image": b64(image_a), "samples": 2}, lambda p: p.image_variation(a, num_samples=2, **common), (2, 2),
        ),
        "text_variation": (
            {"prompt": prompt, "samples": 2}, lambda p: p.text_variation(prompt, num_samples=2, **common), (2, 2),
        ),
        "interpolate": (
            {"image_a": b64(image_a), "image_b": b64(image_b), "frames": 3},
            lambda p: p.interpolate(a, b, frames=3, **common), (3, 0),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("task", list(TASKS))
def test_api_runs_every_task_as_the_pipeline_does(server, task):
    fields, direct, (num_images, num_texts) = _requests(shapes_png(0), shapes_png(1))[task]
    response = server.client.post(f"/api/{task}", json=fields | {"steps": STEPS, "seed": 3})
    assert response.status_code == 200, response.text
    answer = response.json()
    images = [decode_png(text) for text in answer["images"]]
    assert (len(images), len(answer["texts"])) == (num_images, num_texts)
    expected = direct(server.pipe)
    assert [png_bytes(im) for im in images] == [png_bytes(im) for im in expected.images]
    assert answer["texts"] == expected.texts
    settings = answer["settings"]
    assert settings["task"] == task and settings["steps"] == STEPS and settings["seed"] == 3
    assert settings["grid"] == server.pipe.grid
    for name in TASKS[task].images:
        sent = base64.b64decode(fields[name])
        assert settings[name] == {"width": 32, "height": 32, "sha256": hashlib.sha256(sent).hexdigest()}


def test_api_describes_its_tasks_limits_and_queue(server):
    info = server.client.get("/api").json()
    assert list(info["tasks"]) == list(TASKS)
    assert info["tasks"]["interpolate"]["required"] == ["image_a", "image_b"]
    assert "guidance" not in info["tasks"]["image"]["fields"]
    assert info["limits"]["samples"] == LIMITS.samples
    assert info["tasks"]["text_to_image"]["fields"]["guidance"] == LIMITS.default_guidance
    assert info["queue"] == {"running": 0, "waiting": 0, "max_waiting": LIMITS.queue}


def _tall_png() -> bytes:
    return png_bytes(Image.new("RGB", (8, LIMITS.image_side + 1)))


BAD_REQUESTS = [
    ("text_to_image", {"prompt": ""}, 400, "prompt: empty"),
    ("text_to_image", {"prompt": "   "}, 400, "prompt: empty"),
    ("text_to_image", {}, 400, "prompt: empty"),
    ("text_to_image", {"prompt": "a" * 81}, 400, "at most 80"),
    ("text_to_image", {"prompt": 7}, 400, "expected a string"),
    (
        "text_to_image",
        {"prompt": "a red circle", "steps": 10**12},
        400,
        "steps=1000000000000: this server allows 1 to 20",
    ),
    (
        "text_to_image",
        {"prompt": "a red circle", "samples": 10**6},
        400,
        "samples=1000000: this server allows 1 to 3",
    ),
    ("text_to_image", {"prompt": "a red circle", "guidance": 1e300}, 400, "guidance=1e+300"),
    ("text_to_image", {"prompt": "a red circle", "seed": -1}, 400, "seed=-1"),
    (
        "text_to_image",
        {"prompt": "a red circle", "seed": 2**70},
        400,
        "seed=1.18e+21: this server allows 0 to",
    ),
    (
        "text_to_image",
        {"prompt": "a red circle", "steps": 1e300},
        400,
        "steps=1e+300: this server allows 1 to 20",
    ),
    ("text_to_image", {"prompt": "a red circle", "steps": "ten"}, 400, "steps: expected a whole number"),
    ("text_to_image", {"prompt": "a red circle", "steps": 2.5}, 400, "steps: expected a whole number"),
    ("text_to_image", {"prompt": "a red circle", "stpes": 5}, 400, "no field 'stpes'"),
    (
        "interpolate",
        {"image_a": b64(shapes_png(0)), "image_b": b64(shapes_png(1)), "frames": 1},
        400,
        "frames=1",
    ),
    ("joint", {"samples": 0}, 400, "samples=0: this server allows 1 to 3"),
    ("joint", {"best_of": 9}, 400, "best_of=9: this server allows 1 to 4"),
    ("image", {"best_of": 2}, 400, "image has no field 'best_of'"),
    ("image_to_text", {}, 400, "image: no image given"),
    ("image_to_text", {"image": b64(b"just some text, not a picture\n")}, 400, "not an image"),
    ("image_to_text", {"image": "%%% not base64 %%%"}, 400, "not valid base64"),
    ("image_to_text", {"image": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)}, 400, "image"),
    ("image_to_text", {"image": b64(_tall_png())}, 400, "up to 256 pixels a side"),
    ("painting", {}, 404, "no task 'painting'"),
]


@pytest.mark.parametrize(("task", "fields", "status", "message"), BAD_REQUESTS)
def test_api_refuses_bad_requests_with_a_clear_message(server, task, fields, status, message):
    response = server.client.post(f"/api/{task}", json=fields)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_api_answers_unknown_paths_and_methods_in_its_own_format(server):
    response = server.client.get("/api/text_to_image")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "send POST with a JSON object" in response.json()["error"]
    for method, path in (("GET", "/api/nothing/here"), ("POST", "/api/joint/more"), ("DELETE", "/api/x")):
        response = server.client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"].startswith(f"no API path {path}; GET /api lists the tasks")


def test_command_says_whether_the_port_or_the_host_is_wrong(model_dir):
    from unidiffuser.cli import main

    for port in ("99999", "-1"):
        with pytest.raises(SystemExit) as exit:  # argparse's own: usage and the problem on stderr
            main(["serve", "--model", str(model_dir), "--port", port])
        assert exit.value.code == 2
    taken = bind("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        with pytest.raises(
            SystemExit, match=rf"cannot listen on 127.0.0.1:{port} .*; choose another with --port"
        ):
            main(["serve", "--model", str(model_dir), "--port", port])
    finally:
        taken.close()
    with pytest.raises(
        SystemExit, match=r"cannot listen on 999.1.1.1:0 .*; give --host an address of this machine"
    ):
        main(["serve", "--model", str(model_dir), "--host", "999.1.1.1", "--port", "0"])


def test_api_refuses_bodies_that_are_not_json_objects(server):
    for body, message in ((b"not json", "not JSON"), (b"[1, 2]", "got list")):
        response = server.client.post("/api/joint", content=body)
        assert response.status_code == 400 and message in response.json()["error"]
    huge = b" " * (2 * (LIMITS.image_bytes * 4 // 3 + 4) + 64 * 1024 + 1)
    response = server.client.post("/api/joint", content=huge)
    assert response.status_code == 413 and "accepts up to" in response.json()["error"]
    # and after all of these the server still answers
    assert server.client.post("/api/text", json={"steps": 1}).status_code == 200


def test_a_full_queue_answers_busy_and_the_waiting_requests_finish(server, monkeypatch):
    started, release = threading.Event(), threading.Event()
    sample = server.pipe.text_to_image

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(30), "the test never released the pipeline"
        return sample(*args, **kwargs)

    monkeypatch.setattr(server.pipe, "text_to_image", slow)
    answers: list = []

    def post() -> None:
        answers.append(server.client.post("/api/text_to_image", json={"prompt": "a red circle", "steps": 1}))

    running = threading.Thread(target=post)
    running.start()
    assert started.wait(30)
    waiting = threading.Thread(target=post)
    waiting.start()
    deadline = time.monotonic() + 30
    while server.client.get("/api").json()["queue"]["waiting"] < 1:
        assert time.monotonic() < deadline, "the second request never joined the queue"
        time.sleep(0.02)
    try:
        refused = server.client.post("/api/text_to_image", json={"prompt": "a red circle", "steps": 1})
        assert refused.status_code == 503
        assert "busy" in refused.json()["error"] and refused.headers["retry-after"].isdigit()
    finally:
        release.set()
        running.join(30)
        waiting.join(30)
    assert [answer.status_code for answer in answers] == [200, 200]
    assert server.client.get("/api").json()["queue"] == {"running": 0, "waiting": 0, "max_waiting": 1}


def test_worker_tells_a_waiting_job_how_many_are_ahead():
    started, release = threading.Event(), threading.Event()

    class SlowPipe:
        def text(self, num_samples: int, **kwargs) -> str:
            started.set()
            assert release.wait(30)
            return f"{num_samples} captions"

    worker = Worker(SlowPipe(), queue=1)
    job = make_job(TASKS["text"], {"samples": 2}, Limits())
    results, ahead = [], []
    first = threading.Thread(target=lambda: results.append(worker.run(job)))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: results.append(worker.run(job, waiting=ahead.append)))
    second.start()
    deadline = time.monotonic() + 30
    while worker.status()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(Busy, match="one request is running and 1 waiting"):
        worker.run(job)
    release.set()
    first.join(30)
    second.join(30)
    assert ahead == [1] and results == ["2 captions", "2 captions"]


# -- the page in a real browser -----------------------------------------------------------------


def test_page_in_headless_chromium(server, tmp_path_factory):
    if not CHROMIUM.exists():
        reason = f"no browser at {CHROMIUM}: apt-get install -y chromium chromium-driver"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="the page test needs playwright (the dev extra)"
    )
    artifacts = tmp_path_factory.mktemp("artifacts")
    image_path = artifacts / "shapes.png"
    image_path.write_bytes(shapes_png(2))
    text_path = artifacts / "notes.txt"
    text_path.write_text("not a picture\n")
    fake_path = artifacts / "notes.png"  # a text file named as an image passes the browser's check
    fake_path.write_text("not a picture either\n")
    prompt = EXAMPLE_PROMPTS[0]
    requested: list[str] = []

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server.url)

            # text to image: type a prompt, press Generate, wait for a real image in the gallery
            page.locator("#text_to_image-prompt textarea").fill(prompt)
            page.locator("#text_to_image-run").click()
            shown = page.locator("#text_to_image-gallery img").first
            shown.wait_for(timeout=WAIT_MS)
            page.wait_for_function(
                "el => el.complete && el.naturalWidth > 0", arg=shown.element_handle(), timeout=WAIT_MS
            )
            picture = Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body()))
            steps = LIMITS.default("steps")
            expected = server.pipe.text_to_image(prompt, steps=steps, seed=0).images[0]
            assert png_bytes(picture.convert("RGB")) == png_bytes(expected)
            settings = page.locator("#text_to_image-settings")
            settings.get_by_text(f'"steps": {steps}').wait_for(timeout=WAIT_MS)
            assert prompt in settings.inner_text()
            with page.expect_download() as download:
                page.locator("#text_to_image-download").click()
            saved = json.loads(Path(download.value.path()).read_text())
            assert saved["prompt"] == prompt and saved["steps"] == steps and saved["task"] == "text_to_image"
            page.screenshot(path=artifacts / "text_to_image.png", full_page=True)

            # image to text: upload a picture, press Generate, read the caption
            page.get_by_role("tab", name="Image to text").click()
            page.locator("#image_to_text-image input[type=file]").set_input_files(image_path)
            page.locator("#image_to_text-image img").first.wait_for(timeout=WAIT_MS)
            page.locator("#image_to_text-run").click()
            captions = page.locator("#image_to_text-captions textarea")
            page.wait_for_function(
                "el => el.value.length > 0", arg=captions.element_handle(), timeout=WAIT_MS
            )
            expected_caption = server.pipe.image_to_text(Image.open(image_path), steps=steps, seed=0).texts[0]
            assert captions.input_value() == expected_caption
            page.screenshot(path=artifacts / "image_to_text.png", full_page=True)

            # text files given as the image: polite messages, not a crash
            page.get_by_role("tab", name="Image variation").click()
            upload = page.locator("#image_variation-image input[type=file]")
            upload.set_input_files(text_path)
            page.get_by_text("Invalid file type: notes.txt").first.wait_for(timeout=WAIT_MS)
            upload.set_input_files(fake_path)
            page.locator("#image_variation-run").click()
            page.get_by_text("not an image this server can read").first.wait_for(timeout=WAIT_MS)
            page.screenshot(path=artifacts / "not_an_image.png", full_page=True)

            # interpolation: the first example pair, then as many frames as the slider says
            page.get_by_role("tab", name="Interpolation").click()
            page.locator("#tab-interpolate [data-testid=dataset-cell-0-0]").click()
            page.locator("#interpolate-image_b img").first.wait_for(timeout=WAIT_MS)
            page.locator("#interpolate-run").click()
            frames = LIMITS.default("frames")
            page.wait_for_function(
                "n => document.querySelectorAll('#interpolate-gallery img').length >= n",
                arg=frames,
                timeout=WAIT_MS,
            )
            assert page.locator("#interpolate-gallery img").count() == frames
            page.screenshot(path=artifacts / "interpolate.png", full_page=True)
        finally:
            browser.close()

    print(f"screenshots in {artifacts}")
    outside = [url for url in requested if not url.startswith((server.url, "data:", "blob:"))]
    assert not outside, f"the page asked for files from elsewhere: {outside[:5]}"


# -- the command ---------------------------------------------------------------------------------


class Lines:
    """Every line a process writes to a stream, read in a thread so that the pipe never fills."""

    def __init__(self, stream):
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(stream), daemon=True).start()

    def wait_for(self, pattern: str, seconds: float) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {seconds} s:\n{''.join(self.lines)}")


def test_command_serves_on_loopback_and_writes_only_to_its_output_folder(model_dir, tmp_path):
    home, tmp, cwd = (tmp_path / name for name in ("home", "tmp", "cwd"))
    for folder in (home, tmp, cwd):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "XDG_", "HF_"))}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "unidiffuser.cli", "serve", "--model", str(model_dir), "--port", "0"]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    stderr = Lines(process.stderr)
    try:
        url = stderr.wait_for(r"at (http://127\.0\.0\.1:\d+)/", 180)[1]  # loopback by default
        out = Path(stderr.wait_for(r"files go to (.+) \(removed on exit\)", 10)[1])
        assert httpx.get(url, timeout=30).status_code == 200
        answer = httpx.post(
            f"{url}/api/text_to_image", json={"prompt": "a red circle", "steps": 2}, timeout=60
        )
        assert answer.status_code == 200 and len(answer.json()["images"]) == 1
        # without --out, everything it writes is in one temporary folder
        assert out.parent == tmp and list(tmp.iterdir()) == [out] and (out / "examples").is_dir()
        written = [p for folder in (home, cwd) for p in folder.rglob("*")]
        assert not written, f"files written outside the output folder: {written[:5]}"
    finally:
        process.terminate()  # SIGTERM: a graceful stop
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, "".join(stderr.lines)
    assert not list(tmp.iterdir()), "the temporary output folder outlived the server"
    package = Path(load_model.__code__.co_filename).parent
    assert sorted(p.name for p in package.iterdir() if p.suffix != ".py") in ([], ["__pycache__"])


def test_default_model_is_the_shipped_one(tmp_path):
    if not (shipped.SHIPPED_DIR / "unidiffuser.json").is_file():
        pytest.skip(f"the shipped model is not trained yet ({shipped.SHIPPED_DIR} has no unidiffuser.json)")
    pipe, name = load_model(None)
    assert name == "shipped shapes model"
    app = build_app(pipe, out=tmp_path, limits=LIMITS, model=name)
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        answer = client.post("/api/text_to_image", json={"prompt": EXAMPLE_PROMPTS[0], "steps": 5}).json()
    assert decode_png(answer["images"][0]).size == pipe.default_size[::-1]


def test_default_model_missing_says_how_to_fix_it(monkeypatch, tmp_path):
    from unidiffuser.cli import main

    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "missing")
    with pytest.raises(SystemExit, match=r"the shipped model.*--model DIR"):
        main(["serve", "--port", "0"])


def test_examples_speak_the_shapes_worlds_language(tmp_path):
    assert all(parse_caption(prompt) is not None for prompt in EXAMPLE_PROMPTS)
    for path in write_example_images(tmp_path, 32):
        image = Image.open(path)
        assert image.size == (32, 32) and parse_image(image) is not None


def test_a_request_without_guidance_gets_the_models_own():
    job = make_job(TASKS["text_to_image"], {"prompt": "a red circle"}, Limits(default_guidance=2.5))
    assert job.guidance == 2.5
    assert make_job(TASKS["text_to_image"], {"prompt": "a red circle"}, Limits()).guidance == 7.0
    capped = Limits(guidance=4.0, default_guidance=6.0)  # a default above the limit is capped to it
    assert make_job(TASKS["text_to_image"], {"prompt": "a red circle"}, capped).guidance == 4.0


def test_api_best_of_ranks_candidates_as_the_pipeline_does(server):
    prompt = "a red circle"
    fields = {"prompt": prompt, "samples": 2, "best_of": 3, "steps": STEPS, "seed": 3}
    answer = server.client.post("/api/text_to_image", json=fields).json()
    expected = server.pipe.text_to_image(
        prompt, num_samples=2, best_of=3, steps=STEPS, seed=3, solver="dpm++3s"
    )
    assert [png_bytes(decode_png(text)) for text in answer["images"]] == [
        png_bytes(im) for im in expected.images
    ]
    assert answer["settings"]["best_of"] == 3
    drawn = server.pipe.text_to_image(prompt, num_samples=2, steps=STEPS, seed=3, solver="dpm++3s")
    assert "best_of" not in make_job(TASKS["image"], {}, LIMITS).settings("m", "time")  # not a ranked task
    assert [png_bytes(im) for im in expected.images] != [png_bytes(im) for im in drawn.images]


def test_a_model_without_a_scorer_refuses_best_of_with_the_reason():
    unranked = Limits(best_of=1)  # what `unidiffuser serve` sets for a model without a scorer
    assert make_job(TASKS["joint"], {}, unranked).best_of == 1
    with pytest.raises(ValueError, match="best_of=2: this model has no CLIP scorer"):
        make_job(TASKS["joint"], {"best_of": 2}, unranked)


def test_limits_refuse_impossible_values():
    with pytest.raises(ValueError, match="samples=0"):
        Limits(samples=0)
    with pytest.raises(ValueError, match="frames=1"):
        Limits(frames=1)


def test_command_serves_the_fast_path_with_static_fp8_scales(model_dir, tmp_path, monkeypatch):
    import torch
    from starlette.testclient import TestClient

    from unidiffuser.cli import main
    from unidiffuser.fast import FastNetwork, fp8_layers

    enable, pipes, apps = UniDiffuser.enable_fast_sampling, [], []

    def eager_enable(self, **kw):  # the real path, with a backend that needs no C++ compiler
        pipes.append(self)
        return enable(self, **kw, backend="aot_eager")

    class Server:
        def run(self, sockets):
            sockets[0].close()

    monkeypatch.setattr(UniDiffuser, "enable_fast_sampling", eager_enable)
    monkeypatch.setattr("unidiffuser.serve.app.make_server", lambda app: apps.append(app) or Server())
    args = ["serve", "--model", str(model_dir), "--port", "0", "--out", str(tmp_path), "--max-steps", "4"]
    assert main([*args, "--fp8", "static"]) == 0
    (pipe,) = pipes
    assert isinstance(pipe.sampler, FastNetwork) and pipe.sampler.fp8 == "static"
    assert set(pipe.sampler.fp8_amax) == set(fp8_layers(pipe.network))  # calibrated on every layer
    with TestClient(apps[0]) as client:
        answer = client.post("/api/text_to_image", json={"prompt": "a red circle", "steps": 4})
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1
    assert main([*args, "--dtype", "bf16"]) == 0 and len(pipes) == 1  # no --fast: the plain path
    assert {p.dtype for p in apps[1].state.worker.pipe.network.parameters()} == {torch.bfloat16}
