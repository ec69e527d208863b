"""Where a shapes-world model loses held-out shape-colour pairs: three measurements.

``eval shapes`` says *that* held-out one-object scenes fail, and on which attribute (the shape).
These measurements say *where*:

``shape_probe``: how well a linear probe reads the shape from one representation (the U-ViT's text
latent of the caption, the CLIP image embedding, the autoencoder latent) of one-object scenes. It
is fitted on the two colours shown with every shape (where the colour cannot rule a shape out) and
tested on the other colours' seen pairs and on the held-out pairs. A representation that writes a
held-out pair as some seen pair passes the first test and fails the second.

``reader_probe``: how well a nonlinear reader trained on the seen pairs of every colour names a
held-out pair's shape from one representation: whether a representation that holds the shape
also gets it read by a learner that, like the U-ViT, sees the seen pairs only.

``clip_swap``: image-to-text on held-out one-object renders, with the CLIP image embedding the
U-ViT is given replaced by that of an edited scene (the same shape in a seen colour, or the same
colour with a seen shape). The captions' shapes and colours then say which of the two inputs, the
autoencoder latent or the CLIP embedding, the network reads them from.

``clip_blind``: image-to-text on seen and held-out one-object renders with the CLIP embedding
replaced by the mean embedding of seen scenes, which tells no scene from another: how much of a
caption the network can read from the autoencoder latent alone.

    python -m unidiffuser.shapes.composition [--model DIR]     (the shipped model by default)
    python -m unidiffuser.shapes.composition --image-encoder DIR   (the probes of one CLIP image tower)

The second form probes a CLIP image tower on its own (``recipe shapes --stage clip`` writes one to
``OUT/clip/image_encoder``), before any U-ViT is trained on it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .captions import caption, parse_caption
from .world import COLOURS, HELD_OUT, SHAPES, Object, Scene, exact, render, sample_scene

Embed = Callable[[Sequence[Scene]], Tensor]


def _one_object(split: str, n: int, seed: int, colours: Sequence[str] | None = None) -> list[Scene]:
    """``n`` one-object scenes of ``split``, of ``colours`` only when given."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample_scene(rng, split, num_objects=1)
        if colours is None or scene.objects[0].colour in colours:
            scenes.append(scene)
    return scenes


# Colours shown in training with every shape: none of their pairs is held out.
COMPLETE_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if all((s, c) not in HELD_OUT for s in SHAPES))
OTHER_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c not in COMPLETE_COLOURS)


def shape_probe(embed: Embed, *, train: int = 2000, test: int = 600, seed: int = 0, iters: int = 300) -> dict:
    """The shape read from ``embed(scenes)`` by a linear probe fitted on the complete colours only.

    On ``COMPLETE_COLOURS`` (shown with every shape) the colour says nothing about the shape, so the
    probe cannot learn to rule a shape out by colour, a rule that would fail every held-out scene
    whatever the representation holds (on the other colours, the colour alone excludes the held-out
    shape). The probe is then tested on the other colours: on their seen pairs (does a shape read
    the same in a colour the probe never saw?) and on their held-out pairs (and in a pair never
    shown in training?). A representation that writes shape and colour apart scores high on both;
    one that writes each pair its own way scores low on both; one that writes a held-out pair as a
    seen one scores high on the first and low on the second.

    Args:
        embed: one-object scenes -> (N, ...) features.
        train: scenes of the complete colours the probe is fitted on (and as many seen scenes of
            every colour for the feature scales).
        test: scenes of each test set.
        seed: the scenes.
        iters: full-batch Adam steps of the probe.

    Returns:
        {"other colours, seen pairs": accuracy, "held-out pairs": accuracy}.
    """
    fit = _one_object("train", train, seed, COMPLETE_COLOURS)
    # the feature scales from seen scenes of every colour (no labels): a feature the two colours
    # leave still is not blown up where the others move it
    x = embed(_one_object("train", train, seed + 3)).float().flatten(1)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x = embed(fit).float().flatten(1)
    probe = torch.nn.Linear(x.shape[1], len(SHAPES))
    torch.nn.init.zeros_(probe.weight)  # a feature the fit never moves keeps no weight
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    inputs, shapes = (x - mean) / scale, _shapes(fit)
    with torch.enable_grad():
        for _ in range(iters):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(inputs), shapes).backward()
            optimizer.step()
    scores = {}
    for name, split, offset in (("other colours, seen pairs", "train", 1), ("held-out pairs", "heldout", 2)):
        scenes = _one_object(split, test, seed + offset, OTHER_COLOURS)
        with torch.no_grad():
            guess = probe((embed(scenes).float().flatten(1) - mean) / scale).argmax(1)
        scores[name] = float((guess == _shapes(scenes)).float().mean())
    return scores


def reader_probe(
    embed: Embed, *, train: int = 6000, test: int = 1000, seed: int = 0, steps: int = 1500, readers: int = 3
) -> dict:
    """The held-out shape as a nonlinear reader trained on seen pairs names it.

    ``shape_probe`` asks whether a representation holds a held-out pair's shape; this asks whether
    a reader that learns from the seen pairs alone, as the U-ViT does, reads it out. Small MLPs
    (two hidden layers of 256, GELU; AdamW, batches of 256) learn shape and colour from the
    embeddings of ``train`` one-object scenes of every seen pair and name those of ``test``
    held-out scenes. A reader may learn that a colour rules a shape out, which every seen pair
    bears out and every held-out one defeats.

    Returns:
        {"held-out shape": mean over the readers, "held-out colour": mean, "readers": [each
        reader's held-out shape accuracy]}.
    """
    fit, held = _one_object("train", train, seed + 11), _one_object("heldout", test, seed + 12)
    x, y = embed(fit).float().flatten(1), embed(held).float().flatten(1)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x, y = (x - mean) / scale, (y - mean) / scale
    colours = list(COLOURS)
    shape_x, colour_x = _shapes(fit), torch.tensor([colours.index(s.objects[0].colour) for s in fit])
    shape_y, colour_y = _shapes(held), torch.tensor([colours.index(s.objects[0].colour) for s in held])
    shapes, colour_scores = [], []
    for k in range(readers):
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            reader = torch.nn.Sequential(
                torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                torch.nn.Linear(256, len(SHAPES) + len(colours)),
            )  # fmt: skip
        optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3, weight_decay=1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                i = torch.randint(len(x), (256,), generator=generator)
                out = reader(x[i])
                loss = torch.nn.functional.cross_entropy(out[:, : len(SHAPES)], shape_x[i])
                loss = loss + torch.nn.functional.cross_entropy(out[:, len(SHAPES) :], colour_x[i])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            out = reader(y)
        shapes.append(float((out[:, : len(SHAPES)].argmax(1) == shape_y).float().mean()))
        colour_scores.append(float((out[:, len(SHAPES) :].argmax(1) == colour_y).float().mean()))
    return {
        "held-out shape": float(np.mean(shapes)),
        "held-out colour": float(np.mean(colour_scores)),
        "readers": shapes,
    }


def _shapes(scenes: Sequence[Scene]) -> Tensor:
    return torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])


def representations(pipe, batch_size: int = 256) -> dict[str, Embed]:
    """The U-ViT's inputs for a one-object scene, as ``shape_probe`` embeddings: the text latent of
    a caption of it, the CLIP image embedding and the autoencoder latent of its render."""
    size = pipe.default_size[0]
    generator = torch.Generator().manual_seed(0)

    def batched(fn: Callable[[Sequence[Scene]], Tensor]) -> Embed:
        def embed(scenes: Sequence[Scene]) -> Tensor:
            return torch.cat(
                [fn(scenes[i : i + batch_size]).cpu() for i in range(0, len(scenes), batch_size)]
            )

        return embed

    def text(scenes: Sequence[Scene]) -> Tensor:
        rng = np.random.default_rng(len(scenes))
        return pipe.encode_prompts([caption(s, rng) for s in scenes])

    def image(key: str) -> Callable[[Sequence[Scene]], Tensor]:
        return lambda scenes: pipe.encode_images([render(s, size) for s in scenes], generator)[key]

    return {
        "text latent of a caption": batched(text),
        "CLIP image embedding": batched(image("clip_img")),
        "autoencoder latent": batched(image("img")),
    }


def image_embedding(encoder, batch_size: int = 256) -> Embed:
    """A ``ClipImageEmbedder``'s embedding of each scene's render, as a ``shape_probe`` embedding."""
    size = encoder.image_size

    def embed(scenes: Sequence[Scene]) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [encoder([render(s, size) for s in scenes[i : i + batch_size]]).float().cpu()
                 for i in range(0, len(scenes), batch_size)]
            )  # fmt: skip

    return embed


def _edit(scene: Scene, **attributes: str) -> Scene:
    return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], **attributes),))


def clip_swap(pipe, *, samples: int = 96, steps: int = 20, guidance: float = 3.0, seed: int = 5) -> dict:
    """Image-to-text on held-out one-object renders, the CLIP embedding given being that of the
    render itself, of the same shape in a seen colour, or of the same colour with a seen shape.

    Returns:
        {donor: {"shape as rendered", "shape as the CLIP donor", "colour as rendered",
        "colour as the CLIP donor"}}: the share of captions (that parse as one object) stating
        each; with the render itself as donor the pairs of figures agree.
    """
    rng = np.random.default_rng(seed)
    scenes = _one_object("heldout", samples, seed)

    def seen_colour(scene: Scene) -> Scene:
        o = scene.objects[0]
        return _edit(scene, colour=next(c for c in rng.permutation(list(COLOURS))
                                        if c != o.colour and (o.shape, c) not in HELD_OUT))  # fmt: skip

    def seen_shape(scene: Scene) -> Scene:
        o = scene.objects[0]
        return _edit(scene, shape=next(s for s in rng.permutation(SHAPES)
                                       if s != o.shape and (s, o.colour) not in HELD_OUT))  # fmt: skip

    donors = {
        "the render itself": scenes,
        "same shape, a seen colour": [seen_colour(s) for s in scenes],
        "same colour, a seen shape": [seen_shape(s) for s in scenes],
    }
    size = pipe.default_size[0]
    renders = [render(s, size) for s in scenes]
    results = {}
    for name, donor in donors.items():
        pictures = renders if donor is scenes else [render(d, size) for d in donor]
        embeds = pipe.encode_images(pictures, torch.Generator().manual_seed(0))["clip_img"]
        got = _captions_read(pipe, renders, embeds, steps=steps, guidance=guidance, seed=seed)
        said = [g.objects[0] if g is not None and len(g.objects) == 1 else None for g in got]
        results[name] = {
            "shape as rendered": _share_stating(said, scenes, "shape"),
            "shape as the CLIP donor": _share_stating(said, donor, "shape"),
            "colour as rendered": _share_stating(said, scenes, "colour"),
            "colour as the CLIP donor": _share_stating(said, donor, "colour"),
        }
    return results


def clip_blind(pipe, *, samples: int = 96, steps: int = 20, guidance: float = 3.0, seed: int = 5) -> dict:
    """Image-to-text on seen and held-out one-object renders, the CLIP embedding given being the
    render's own or the mean embedding of 512 seen scenes (which tells no scene from another).

    Returns:
        {embedding: {split: share of captions stating the rendered object exactly}}. Where the
        mean costs little, the network reads the scene from the autoencoder latent.
    """
    size = pipe.default_size[0]
    seen = [render(s, size) for s in _one_object("train", 512, seed + 1)]
    mean = pipe.encode_images(seen, torch.Generator().manual_seed(0))["clip_img"].mean(0)
    results: dict[str, dict[str, float]] = {"the render's own": {}, "the mean of seen scenes": {}}
    for split, label in (("train", "seen pairs"), ("heldout", "held-out pairs")):
        scenes = _one_object(split, samples, seed)
        renders = [render(s, size) for s in scenes]
        own = pipe.encode_images(renders, torch.Generator().manual_seed(0))["clip_img"]
        for name, embeds in (("the render's own", own), ("the mean of seen scenes", mean.expand_as(own))):
            got = _captions_read(pipe, renders, embeds, steps=steps, guidance=guidance, seed=seed)
            results[name][label] = float(np.mean([exact(g, s) for g, s in zip(got, scenes, strict=True)]))
    return results


def _captions_read(pipe, renders, embeds: Tensor, *, steps: int, guidance: float, seed: int) -> list:
    """Image-to-text on ``renders`` with ``embeds`` as the CLIP image embeddings the network is
    given: each caption parsed (None where it does not parse)."""
    encode = pipe.encode_images

    def swapped(images, generator, size=None):
        return {**encode(images, generator, size), "clip_img": embeds}

    pipe.encode_images = swapped
    try:
        texts = pipe.image_to_text(renders, steps=steps, guidance_scale=guidance, seed=seed).texts
    finally:
        pipe.encode_images = encode
    return [parse_caption(t) for t in texts]


def _share_stating(said: Sequence[Object | None], source: Sequence[Scene], attribute: str) -> float:
    """The share of ``said`` objects (None: the caption did not state one object) whose
    ``attribute`` is that of the ``source`` scene's object."""
    return float(np.mean([o is not None and getattr(o, attribute) == getattr(s.objects[0], attribute)
                          for o, s in zip(said, source, strict=True)]))  # fmt: skip


_PROBE_HEADER = (
    "| {what} | shape probe ({colours} scenes) on the other colours' seen pairs | on the held-out pairs | "
    "readers trained on seen pairs: held-out shape (each reader) | held-out colour |\n|---|---|---|---|---|"
)


def _probe_row(name: str, embed: Embed) -> str:
    """One row under ``_PROBE_HEADER``: ``shape_probe`` and ``reader_probe`` of ``embed``."""
    scores, read = shape_probe(embed), reader_probe(embed)
    each = ", ".join(f"{v:.3f}" for v in read["readers"])
    cells = [f"{v:.3f}" for v in scores.values()] + [f"{read['held-out shape']:.3f} ({each})"]
    return f"| {name} | " + " | ".join(cells) + f" | {read['held-out colour']:.3f} |"


def report(pipe, *, samples: int = 96, steps: int = 20, log: Callable[[str], None] = print) -> None:
    """The three measurements as three Markdown tables."""
    log(_PROBE_HEADER.format(what="representation", colours=", ".join(COMPLETE_COLOURS)))
    for name, embed in representations(pipe).items():
        log(_probe_row(name, embed))
    log(f"\n| CLIP embedding given (held-out renders, {samples} captions) | shape as rendered | shape as "
        "the CLIP donor | colour as rendered | colour as the CLIP donor |\n|---|---|---|---|---|")  # fmt: skip
    for name, shares in clip_swap(pipe, samples=samples, steps=steps).items():
        log(f"| {name} | " + " | ".join(f"{v:.2f}" for v in shares.values()) + " |")
    log(f"\n| CLIP embedding given (one-object renders, {samples} captions) | exact captions, seen pairs | "
        "held-out pairs |\n|---|---|---|")  # fmt: skip
    for name, shares in clip_blind(pipe, samples=samples, steps=steps).items():
        log(f"| {name} | " + " | ".join(f"{v:.2f}" for v in shares.values()) + " |")


def main(argv: list[str] | None = None) -> int:
    from ..cli import positive_int
    from ..pipeline import UniDiffuser
    from ..shipped import shipped_model_dir

    parser = argparse.ArgumentParser(prog="python -m unidiffuser.shapes.composition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default=None, help="model directory; the shipped shapes model if left out")
    parser.add_argument(
        "--samples", type=positive_int, default=96, help="held-out renders captioned per CLIP donor"
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="solver steps per caption")
    parser.add_argument(
        "--image-encoder", default=None, metavar="DIR",
        help="only the shape probe and the readers of this CLIP image tower (a folder such as OUT/clip/image_encoder)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.image_encoder is not None:
        from ..components.clip import ClipImageEmbedder

        if args.model is not None:
            parser.error("--image-encoder probes one tower on its own; leave out --model")
        try:
            encoder = ClipImageEmbedder.from_pretrained_dir(args.image_encoder)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"{parser.prog}: --image-encoder {args.image_encoder}: {err}") from None
        print(_PROBE_HEADER.format(what="CLIP image tower", colours=", ".join(COMPLETE_COLOURS)), flush=True)
        print(_probe_row(args.image_encoder, image_embedding(encoder.float())))
        return 0
    try:
        pipe = UniDiffuser.from_pretrained(args.model or shipped_model_dir())
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{parser.prog}: --model {args.model}: {err}") from None
    report(pipe, samples=args.samples, steps=args.steps, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
