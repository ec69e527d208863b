"""Every mode of a model, once, as a gallery: a PNG grid per task and an HTML page showing them together.

``write_gallery`` runs text to image, image to text, joint, image, text, both variations and an
interpolation. The inputs are the shapes world's (prompts from its captions, rendered scenes), so
the gallery suits the shipped shapes model; a model of another world still runs every mode.
Tasks that produce only text (text, text variation) draw each caption's scene with the world's
renderer, so the grid shows what the caption says; the page says so under the grid.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MIN_TILE = 128  # pixels a side of a tile in the grids; smaller pictures are enlarged
PROMPTS = (
    "a big red circle in the center",
    "a small blue square at the top left",
    "a big green triangle to the left of a small yellow circle",
    "a small white cross above a big magenta diamond",
)


@dataclass
class Section:
    """One task of the gallery: its grid file, what went in, what came out."""

    name: str
    title: str
    note: str
    inputs: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _scene_picture(text: str, size: int) -> Image.Image:
    """The world's rendering of what a caption states (grey where it does not parse)."""
    from .shapes import parse_caption, render
    from .shapes.world import Object, Scene

    scene = parse_caption(text)
    if scene is None:
        return Image.new("RGB", (size, size), (200, 200, 200))
    objects = scene.objects
    if not all(o.placed for o in objects):  # two objects: place them as the relation says
        cells = {"left of": ((0, 1), (2, 1)), "right of": ((2, 1), (0, 1)), "above": ((1, 0), (1, 2)),
                 "below": ((1, 2), (1, 0))}[scene.relation]  # fmt: skip
        objects = tuple(Object(o.shape, o.colour, o.size, *c) for o, c in zip(objects, cells, strict=True))
    return render(Scene(objects, scene.background or "gray", scene.relation), size)


def write_gallery(
    pipe,
    out: str | Path,
    *,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every mode of ``pipe`` and write ``out/<task>.png`` grids and ``out/index.html``; returns the page."""
    from .components.images import make_grid
    from .shapes import caption, render, sample_scene

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = pipe.default_size[0]
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, "heldout", num_objects=1), sample_scene(rng, "train", num_objects=1),
              sample_scene(rng, "heldout", num_objects=2), sample_scene(rng, "train", num_objects=2)]  # fmt: skip
    renders = [render(s, size) for s in scenes]
    sections: list[Section] = []
    common = {"steps": steps, "seed": seed}
    if guidance_scale is None:
        guidance_scale = pipe.guidance_scale  # the model's own
    guided = {**common, "guidance_scale": guidance_scale}

    # small pictures are enlarged (nearest pixel) so that a tile holds a caption's longest word
    scale = max(1, -(-MIN_TILE // size))

    def save(section: Section, images: list[Image.Image], captions: list[str], columns: int) -> None:
        tiles = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
        make_grid(tiles, captions, columns=columns).save(out / f"{section.name}.png.tmp", format="PNG")
        (out / f"{section.name}.png.tmp").replace(out / f"{section.name}.png")
        section.captions = captions
        sections.append(section)
        log(f"{section.title}: {len(images)} pictures in {section.seconds:.1f} s")

    def timed(fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        return result, time.perf_counter() - start

    r, t = timed(pipe.text_to_image, list(PROMPTS), num_samples=2, **guided)
    s = Section("t2i", "Text to image", "two samples per prompt", list(PROMPTS), seconds=t)
    save(s, r.images, [p for p in PROMPTS for _ in range(2)], 4)

    r, t = timed(pipe.image_to_text, renders, **guided)
    s = Section("i2t", "Image to text", "rendered scenes: held-out and seen pairs, one and two objects",
                [caption(sc) for sc in scenes], seconds=t)  # fmt: skip
    save(s, renders, r.texts, 4)

    r, t = timed(pipe.joint, 8, **guided)
    save(Section("joint", "Joint", "image-caption pairs drawn together", seconds=t), r.images, r.texts, 4)

    r, t = timed(pipe.image, 8, **common)
    save(Section("image", "Image", "the image marginal", seconds=t), r.images, [""] * 8, 4)

    r, t = timed(pipe.text, 8, **common)
    note = "the text marginal; each picture is the world's rendering of its caption, not a model output"
    save(Section("text", "Text", note, seconds=t), [_scene_picture(c, size) for c in r.texts], r.texts, 4)

    r, t = timed(pipe.image_variation, renders, **guided)
    note = "top row: the sources, each with the caption read from it; bottom row: the pictures drawn from those captions"
    s = Section("image_variation", "Image variation", note, seconds=t)
    save(s, [*renders, *r.images], (r.texts or [""] * 4) + [""] * 4, 4)

    r, t = timed(pipe.text_variation, list(PROMPTS), **guided)
    note = "each prompt's new caption; pictures are the world's rendering of the new caption"
    s = Section("text_variation", "Text variation", note, list(PROMPTS), seconds=t)
    save(s, [_scene_picture(c, size) for c in r.texts], r.texts, 4)

    r, t = timed(pipe.interpolate, renders[0], renders[1], frames=5, **common)
    s = Section("interpolation", "Interpolation", "from the first picture to the second, through DDIM inversion",
                seconds=t)  # fmt: skip
    save(s, [renders[0], *r.images, renders[1]], ["start", *[""] * len(r.images), "end"], 7)

    page = out / "index.html"
    tmp = page.with_name("index.html.tmp")
    tmp.write_text(_page(sections, steps, pipe.grid, guidance_scale, seed))
    tmp.replace(page)
    return page


def _page(sections: list[Section], steps: int, grid: str, guidance_scale: float, seed: int) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>unidiffuser gallery</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}img{image-rendering:pixelated;"
        "max-width:100%}section{margin-bottom:2em}li{font-family:monospace}</style></head><body>",
        f"<h1>unidiffuser gallery</h1><p>{steps} steps ({e(grid)} grid), guidance scale {guidance_scale:g}, "
        f"seed {seed}.</p>",
    ]
    for s in sections:
        parts.append(f"<section id='{s.name}'><h2>{e(s.title)}</h2><p>{e(s.note)} ({s.seconds:.1f} s)</p>")
        if s.inputs:
            parts.append("<p>Inputs:</p><ul>" + "".join(f"<li>{e(x)}</li>" for x in s.inputs) + "</ul>")
        parts.append(f"<img src='{s.name}.png' alt='{e(s.title)}'>")
        texts = [c for c in s.captions if c]
        if texts:
            parts.append("<p>Captions:</p><ol>" + "".join(f"<li>{e(c)}</li>" for c in texts) + "</ol>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = ["PROMPTS", "write_gallery"]
