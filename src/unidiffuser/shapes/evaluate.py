"""`unidiffuser eval shapes`: every mode of a shapes-world model scored exactly by the world's parsers.

Each row is one task, one split and one guidance scale, scored on ``samples`` draws:

    t2i      every attribute the prompt states is in the generated image      (world.matches)
    i2t      the generated caption states the rendered scene exactly          (world.exact)
    joint    the generated caption states the generated image exactly         (world.exact)
    image    the generated image parses as a scene; and how many distinct scenes among them
    text     the generated caption parses
    image variation   the new image states the source scene exactly           (world.exact)
    text variation    the new caption means what the prompt said              (world.exact)

The one-object t2i and i2t rows also say what went wrong: the share of samples that parse as one
object, and of samples whose shape, colour, size and cell each agree with the asked-for scene (a
sample that does not parse counts as wrong on each). The other rows of generated images say why
the images that show no scene show none (``parse.REJECTIONS``: one colour twice, a diagonal pair,
three or more objects, ...).

``best_of`` > 1 scores the pipeline's best-of sampling: each conditional and joint sample is the
one of ``best_of`` candidates that the model's CLIP scorer ranks first (``UniDiffuser.text_to_image``
and the others); the unconditional image and text rows have nothing to rank against and stay as
drawn.

``tasks`` picks rows by task (``TASKS``: t2i, i2t, image-variation, text-variation, joint, image,
text); each kept row is scored exactly as in the whole table, on the same scenes and noise.

Conditional tasks are scored on ``seen`` scenes (shape-colour pairs of the training split) and
``held-out`` scenes (at least one pair never shown in training), one and two objects apart. The
scenes, prompts and sampler noise are functions of the seed, so a rerun gives the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..solvers import DEFAULT_SOLVER, SOLVERS
from .captions import caption, parse_caption
from .parse import REJECTIONS, NotAScene, read_image
from .world import Scene, canonical, exact, matches, render, sample_scene

SPLITS = {"seen": "train", "held-out": "heldout"}
DEFAULT_GUIDANCE = (0.0, 3.0)
# What ``evaluate(tasks=...)`` can be asked to score; each names the rows it adds.
TASKS: tuple[str, ...] = ("t2i", "i2t", "image-variation", "text-variation", "joint", "image", "text")


@dataclass(frozen=True)
class Row:
    """One line of the table: a task's score on ``n`` samples of one split at one guidance scale."""

    task: str
    split: str
    guidance: float | None
    n: int
    score: float
    extra: str = ""


def _scenes(seed: int, split: str, num_objects: int | None, n: int):
    rng = np.random.default_rng([seed, num_objects or 0, 0 if split == "train" else 1])
    scenes = [sample_scene(rng, split, num_objects=num_objects) for _ in range(n)]
    return scenes, [caption(s, rng) for s in scenes]


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


ATTRIBUTES = ("shape", "colour", "size", "cell")


def attribute_shares(pairs: Sequence[tuple[Scene, Scene | None]]) -> dict[str, float]:
    """For (asked, got) one-object scenes: the share of ``got`` that parsed as one object ("one
    object"), and the share agreeing with ``asked`` on each of ``ATTRIBUTES`` (the cell only where
    ``asked`` places its object; a ``got`` of None or of two objects agrees on nothing)."""
    if any(len(asked.objects) != 1 for asked, _ in pairs):
        raise ValueError("attribute_shares compares one-object scenes; the asked-for scenes hold two")
    single = [(asked.objects[0], got.objects[0] if got is not None and len(got.objects) == 1 else None)
              for asked, got in pairs]  # fmt: skip
    shares = {"one object": _share([g is not None for _, g in single])}
    for name in ATTRIBUTES:
        fields = ("x", "y") if name == "cell" else (name,)
        judged = [(a, g) for a, g in single if name != "cell" or a.placed]
        shares[name] = _share([g is not None and all(getattr(a, f) == getattr(g, f) for f in fields)
                               for a, g in judged])  # fmt: skip
    return shares


def _what_went_wrong(asked: Sequence[Scene], got: Sequence[Scene | None]) -> str:
    """The attribute shares of one-object rows as a line of the table; nothing for two objects."""
    if len(asked[0].objects) != 1:
        return ""
    shares = attribute_shares(list(zip(asked, got, strict=True)))
    return ", ".join(f"{name} {value:.2f}" for name, value in shares.items())


def read_images(images: Sequence) -> tuple[list[Scene | None], str]:
    """Each image's scene (None where it shows none), and why the others show none as a line of the
    table: "not a scene 0.53: one colour twice 0.27, three or more objects 0.16, ..." (shares of all
    the images, largest first; empty when every image parses)."""
    scenes: list[Scene | None] = []
    reasons: list[str] = []
    for image in images:
        try:
            scenes.append(read_image(image))
        except NotAScene as e:
            scenes.append(None)
            reasons.append(e.reason)
    if not reasons:
        return scenes, ""
    counts = sorted(((reasons.count(r), r) for r in REJECTIONS if r in reasons), key=lambda c: -c[0])
    parts = ", ".join(f"{r} {n / len(scenes):.2f}" for n, r in counts)
    return scenes, f"not a scene {len(reasons) / len(scenes):.2f}: {parts}"


def evaluate(
    pipe,
    *,
    samples: int = 32,
    steps: int = 50,
    guidance_scales: Sequence[float] = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = 64,
    log: Callable[[str], None] | None = None,
    tasks: Sequence[str] = TASKS,
    solver: str = DEFAULT_SOLVER,
    best_of: int = 1,
) -> list[Row]:
    """Score the modes of ``pipe`` (a shapes-world ``UniDiffuser``) that ``tasks`` names (every one
    by default; see ``TASKS``), in the table's fixed order, with ``solver`` (one of
    ``solvers.SOLVERS``; the pipeline's default) and ``best_of`` candidates per ranked sample; see
    the module docstring. ``batch_size`` counts candidates: a call samples ``batch_size // best_of``
    outputs (at least one)."""
    if samples < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"samples={samples}, steps={steps}, batch_size={batch_size}: each must be >= 1")
    pipe.check_best_of(best_of)  # before any sampling
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {', '.join(SOLVERS)}")
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks={list(tasks)}: name one or more of {', '.join(TASKS)}")
    size = pipe.default_size[0]
    rows: list[Row] = []

    def batched(method: str, inputs: list | None = None, ranked: bool = True, **options) -> tuple[list, list]:
        """``pipe.<method>`` over the inputs (or ``samples`` draws when None), ``batch_size``
        candidates at a time; ``ranked``: each output the best of ``best_of``."""
        images, texts = [], []
        if ranked and best_of > 1:
            options["best_of"] = best_of
        per_call = max(1, batch_size // options.get("best_of", 1))
        for i in range(0, samples if inputs is None else len(inputs), per_call):
            first = min(per_call, samples - i) if inputs is None else inputs[i : i + per_call]
            out = getattr(pipe, method)(first, steps=steps, seed=seed + i, solver=solver, **options)
            images += out.images or []
            texts += out.texts or []
        return images, texts

    def add(row: Row) -> None:
        rows.append(row)
        if log is not None:
            log(format_rows([row], header=False))

    for scale in guidance_scales:
        for split_name, split in SPLITS.items():
            for k in (1, 2):
                scenes, prompts = _scenes(seed, split, k, samples)
                if "t2i" in tasks:
                    images, _ = batched("text_to_image", prompts, guidance_scale=scale)
                    asked = [parse_caption(p) for p in prompts]
                    got, rejected = read_images(images)
                    ok = [matches(a, g) for a, g in zip(asked, got, strict=True)]
                    why = _what_went_wrong(asked, got) if k == 1 else rejected
                    add(Row(f"t2i, {k} object{'s' * (k > 1)}", split_name, scale, samples, _share(ok), why))
                if "i2t" not in tasks:
                    continue
                renders = [render(s, size) for s in scenes]
                _, texts = batched("image_to_text", renders, guidance_scale=scale)
                got = [parse_caption(t) for t in texts]
                ok = [exact(g, s) for g, s in zip(got, scenes, strict=True)]
                why = _what_went_wrong(scenes, got)
                add(Row(f"i2t, {k} object{'s' * (k > 1)}", split_name, scale, samples, _share(ok), why))

            scenes, prompts = _scenes(seed, split, None, samples)  # one or two objects
            if "image-variation" in tasks:
                renders = [render(s, size) for s in scenes]
                images, _ = batched("image_variation", renders, guidance_scale=scale)
                got, rejected = read_images(images)
                ok = [exact(g, s) for g, s in zip(got, scenes, strict=True)]
                add(Row("image variation", split_name, scale, samples, _share(ok), rejected))
            if "text-variation" in tasks:
                _, texts = batched("text_variation", prompts, guidance_scale=scale)
                ok = [exact(parse_caption(t), parse_caption(p)) for t, p in zip(texts, prompts, strict=True)]
                add(Row("text variation", split_name, scale, samples, _share(ok)))

        if "joint" in tasks:
            images, texts = batched("joint", guidance_scale=scale)
            got, rejected = read_images(images)
            ok = [exact(parse_caption(t), g) for t, g in zip(texts, got, strict=True)]
            add(Row("joint", "-", scale, samples, _share(ok), rejected))

    if "image" in tasks:
        images, _ = batched("image", ranked=False)
        parsed, rejected = read_images(images)
        distinct = len({canonical(s) for s in parsed if s is not None})
        add(Row("image (valid scene)", "-", None, samples, _share([s is not None for s in parsed]),
                "; ".join(filter(None, [f"{distinct} distinct scenes", rejected]))))  # fmt: skip
    if "text" in tasks:
        _, texts = batched("text", ranked=False)
        parsed_texts = [parse_caption(t) for t in texts]
        distinct = len({canonical(s) for s in parsed_texts if s is not None})
        add(Row("text (valid caption)", "-", None, samples, _share([s is not None for s in parsed_texts]),
                f"{distinct} distinct scenes"))  # fmt: skip
    return rows


def format_rows(rows: Sequence[Row], header: bool = True) -> str:
    """A Markdown table of rows."""
    lines = []
    if header:
        lines += ["| task | split | guidance | samples | score | |", "|---|---|---|---|---|---|"]
    for r in rows:
        g = "-" if r.guidance is None else f"{r.guidance:g}"
        lines.append(f"| {r.task} | {r.split} | {g} | {r.n} | {r.score:.3f} | {r.extra} |")
    return "\n".join(lines)


__all__ = [
    "ATTRIBUTES",
    "DEFAULT_GUIDANCE",
    "TASKS",
    "Row",
    "attribute_shares",
    "evaluate",
    "format_rows",
    "read_images",
]
