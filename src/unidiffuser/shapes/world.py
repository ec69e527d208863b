"""The shapes world: scenes of one or two flat-coloured objects on a few backgrounds, and their renderer.

A scene is a few discrete attributes: each object's shape, colour, size and cell of a 3x3 grid
(``x`` is the column, ``y`` the row, 0 = left/top), the background, and for two objects the spatial
relation of the first to the second. Two objects always differ in colour and share a row ("left
of", "right of") or a column ("above", "below"), so the relation holds geometrically and is the
only one that does.

Rendering is exact and deterministic: every object is a pixel mask centred on a pixel of its cell,
no anti-aliasing, so a clean render contains exactly the palette and background colours and every
mask of a given shape and size is a translate of the same stamp. Pure numpy and Pillow.

A fixed set of shape-colour pairs, ``HELD_OUT``, never occurs in ``split="train"`` scenes; it tests
composition. Everything here is a pure function of its arguments; the caches only hold constants.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
# The corners of the RGB cube except black: pairwise at least 255 apart, and at least 165 from
# every background colour (which all stay dark or mid-gray).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "gradient")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout", "any")
GRID = 3  # cells per side
MIN_IMAGE_SIZE = 32  # pixels; below this, two large objects in adjacent cells would touch

# The names of the cells, (x, y) -> name, for display; captions have their own phrasings.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "center",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}

# One pair per shape, each with a different colour, so every shape and every colour is still seen
# in training, only never together.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("circle", "blue"), ("square", "yellow"), ("triangle", "red"), ("cross", "cyan"), ("diamond", "magenta")}
)

_GRAY = (96, 96, 96)
_GRADIENT_TOP = (20, 20, 90)  # dark blue at the top, fading to dark red at the bottom
_GRADIENT_BOTTOM = (90, 30, 30)


@dataclass(frozen=True)
class Object:
    """One object. ``x``/``y`` are its grid column/row (0-2), or both None where unstated (a caption).

    Raises:
        ValueError: an attribute outside the vocabulary, or only one of x and y given.
    """

    shape: str
    colour: str
    size: str
    x: int | None = None
    y: int | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r}: expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour={self.colour!r}: expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r}: expected one of {SIZES}")
        if (self.x is None) != (self.y is None):
            raise ValueError(f"x={self.x}, y={self.y}: give both or neither")
        for v in (self.x, self.y):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < GRID):
                raise ValueError(f"x={self.x}, y={self.y}: expected grid indices in 0..{GRID - 1}")

    @property
    def placed(self) -> bool:
        return self.x is not None


@dataclass(frozen=True)
class Scene:
    """One or two objects, a background (None where unstated) and, for two, ``objects[0] relation objects[1]``.

    Raises:
        ValueError: no or too many objects, a relation with one object or none with two, two objects
            of one colour, or positions that contradict the relation.
    """

    objects: tuple[Object, ...]
    background: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.objects, tuple) or not all(isinstance(o, Object) for o in self.objects):
            raise ValueError(f"objects={self.objects!r}: expected a tuple of Object")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"{len(self.objects)} objects: a scene has one or two")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r}: expected one of {BACKGROUNDS} or None")
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError(f"relation={self.relation!r} with one object")
            return
        if self.relation not in RELATIONS:
            raise ValueError(f"relation={self.relation!r}: two objects need one of {RELATIONS}")
        a, b = self.objects
        if a.colour == b.colour:
            raise ValueError(f"two {a.colour} objects: the objects of a scene differ in colour")
        if a.placed != b.placed:
            raise ValueError("place both objects or neither")
        if a.placed and not _holds(a, self.relation, b):
            raise ValueError(f"({a.x}, {a.y}) {self.relation} ({b.x}, {b.y}) does not hold on the grid")

    @property
    def complete(self) -> bool:
        """Every attribute known (a renderable scene)."""
        return self.background is not None and all(o.placed for o in self.objects)


def _holds(a: Object, relation: str, b: Object) -> bool:
    if relation in ("left of", "right of"):
        return a.y == b.y and (a.x < b.x if relation == "left of" else a.x > b.x)
    return a.x == b.x and (a.y < b.y if relation == "above" else a.y > b.y)


_FLIP = {"right of": "left of", "below": "above"}


def canonical(scene: Scene) -> Scene:
    """The same scene stated with "left of" or "above": "A right of B" becomes "B left of A"."""
    if scene.relation not in _FLIP:
        return scene
    a, b = scene.objects
    return Scene((b, a), scene.background, _FLIP[scene.relation])


def is_held_out(scene: Scene) -> bool:
    """Whether any object is a held-out shape-colour pair."""
    return any((o.shape, o.colour) in HELD_OUT for o in scene.objects)


def matches(prompt: Scene | None, image: Scene | None) -> bool:
    """Every attribute the prompt states is in the image (t2i scoring).

    The image must hold as many objects as the prompt, in the prompt's relation; attributes the
    prompt leaves as None (background, positions in two-object captions) are not checked.
    """
    if prompt is None or image is None or len(prompt.objects) != len(image.objects):
        return False
    prompt, image = canonical(prompt), canonical(image)
    if prompt.relation != image.relation:
        return False
    if prompt.background is not None and prompt.background != image.background:
        return False
    for p, q in zip(prompt.objects, image.objects, strict=True):
        if (p.shape, p.colour, p.size) != (q.shape, q.colour, q.size):
            return False
        if p.placed and (p.x, p.y) != (q.x, q.y):
            return False
    return True


def describe(scene: Scene, background: bool = False) -> Scene:
    """What every caption states: objects' shape, colour, size, a lone object's cell and the relation.

    Drops the cells of two objects (the relation stands for them) and, unless asked to keep it,
    the background, which captions state only sometimes. Keeps the scene's orientation.
    """
    objects = scene.objects
    if len(objects) == 2:
        objects = tuple(Object(o.shape, o.colour, o.size) for o in objects)
    return Scene(objects, scene.background if background else None, scene.relation)


def exact(a: Scene | None, b: Scene | None) -> bool:
    """The two agree on everything a caption states (i2t scoring), and on the background if both state it."""
    if a is None or b is None:
        return False
    if a.background is not None and b.background is not None and a.background != b.background:
        return False
    return describe(canonical(a)) == describe(canonical(b))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng={rng!r}: expected a numpy Generator or an int seed")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_any(rng: np.random.Generator, num_objects: int) -> Scene:
    background = _pick(rng, BACKGROUNDS)
    colour_names = tuple(COLOURS)
    if num_objects == 1:
        obj = Object(
            _pick(rng, SHAPES),
            _pick(rng, colour_names),
            _pick(rng, SIZES),
            int(rng.integers(GRID)),
            int(rng.integers(GRID)),
        )
        return Scene((obj,), background)
    relation = _pick(rng, RELATIONS)
    line = int(rng.integers(GRID))  # the shared row or column
    lo, hi = sorted(int(i) for i in rng.choice(GRID, size=2, replace=False))
    first, second = (lo, hi) if relation in ("left of", "above") else (hi, lo)
    ci, cj = (int(i) for i in rng.choice(len(colour_names), size=2, replace=False))
    cells = (
        [(first, line), (second, line)]
        if relation in ("left of", "right of")
        else [(line, first), (line, second)]
    )
    objects = tuple(
        Object(_pick(rng, SHAPES), colour_names[c], _pick(rng, SIZES), x, y)
        for c, (x, y) in zip((ci, cj), cells, strict=True)
    )
    return Scene(objects, background, relation)


def sample_scene(
    rng: np.random.Generator | int, split: str = "train", *, num_objects: int | None = None
) -> Scene:
    """A random complete scene.

    Args:
        rng: the generator every draw comes from (or an int seed).
        split: "train" (no held-out pair), "heldout" (at least one object a held-out pair) or "any";
            the law of "any" conditioned on the split.
        num_objects: 1 or 2, or None for either with equal chance.

    Returns:
        A complete scene.

    Raises:
        ValueError: an unknown split or number of objects.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if num_objects not in (None, 1, 2):
        raise ValueError(f"num_objects={num_objects!r}: expected 1, 2 or None")
    rng = _as_rng(rng)
    while True:
        n = num_objects if num_objects is not None else int(rng.integers(1, 3))
        scene = _sample_any(rng, n)
        if split == "any" or (split == "heldout") == is_held_out(scene):
            return scene


# ---- geometry and rendering


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"size={image_size!r}: expected an int")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"size={image_size}: images are at least {MIN_IMAGE_SIZE} pixels")


def cell_centre(index: int, image_size: int) -> int:
    """The pixel at the centre of grid column or row ``index``; symmetric about the image centre."""
    return (image_size * (2 * index + 1)) // (2 * GRID)


def object_radius(size: str, image_size: int) -> int:
    """Half the stamp's side in pixels, excluding the centre pixel: 2 and 4 at 32 px, 4 and 8 at 64."""
    return image_size // 16 if size == "small" else image_size // 8


@functools.cache
def shape_mask(shape: str, size: str, image_size: int) -> np.ndarray:
    """The object's boolean stamp, (2r+1, 2r+1), centred on its middle pixel; read-only.

    Raises:
        ValueError: an unknown shape or size, or an image smaller than ``MIN_IMAGE_SIZE``.
    """
    if shape not in SHAPES or size not in SIZES:
        raise ValueError(f"shape={shape!r}, size={size!r}: expected one of {SHAPES} and {SIZES}")
    _check_image_size(image_size)
    r = object_radius(size, image_size)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    if shape == "circle":
        mask = dx**2 + dy**2 <= (r + 0.5) ** 2
    elif shape == "square":
        mask = np.ones_like(dx, dtype=bool)
    elif shape == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= r
    elif shape == "cross":
        arm = r // 4  # half-thickness: 1, 3 and 5 pixel arms at radius 2, 4 and 8
        mask = (np.abs(dx) <= arm) | (np.abs(dy) <= arm)
    else:  # triangle, apex up: rows 1, 3, 3, 5, 5, ... wide, left-right symmetric on the pixel grid
        mask = np.abs(dx) <= (dy + r + 1) // 2
    mask.flags.writeable = False
    return mask


@functools.cache
def background_array(background: str, image_size: int) -> np.ndarray:
    """The empty background, (S, S, 3) uint8; read-only.

    Raises:
        ValueError: an unknown background or an image smaller than ``MIN_IMAGE_SIZE``.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}: expected one of {BACKGROUNDS}")
    _check_image_size(image_size)
    if background == "gradient":
        t = np.linspace(0.0, 1.0, image_size)[:, None]  # (S, 1), top to bottom
        rows = (1 - t) * np.array(_GRADIENT_TOP) + t * np.array(_GRADIENT_BOTTOM)  # (S, 3)
        out = np.broadcast_to(np.rint(rows)[:, None, :], (image_size, image_size, 3)).astype(np.uint8)
    else:
        rgb = (0, 0, 0) if background == "black" else _GRAY
        out = np.empty((image_size, image_size, 3), np.uint8)
        out[:] = rgb
    out.flags.writeable = False
    return out


def render_array(
    scene: Scene, size: int = 32, *, rgb: Sequence[tuple[int, int, int]] | None = None
) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array; see ``render``.

    ``rgb`` paints the objects in these colours (one per object, in order) instead of their
    palette colours: a picture outside the world, for training encoders (``clip_training``).
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene={scene!r}: expected a Scene")
    if not scene.complete:
        raise ValueError(f"{scene}: rendering needs the background and every object's cell")
    paints = [COLOURS[o.colour] for o in scene.objects] if rgb is None else list(rgb)
    if len(paints) != len(scene.objects):
        raise ValueError(f"rgb: {len(paints)} colours for {len(scene.objects)} objects; give one per object")
    out = background_array(scene.background, size).copy()
    for o, paint in zip(scene.objects, paints, strict=True):
        r = object_radius(o.size, size)
        cy, cx = cell_centre(o.y, size), cell_centre(o.x, size)
        out[cy - r : cy + r + 1, cx - r : cx + r + 1][shape_mask(o.shape, o.size, size)] = paint
    return out


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as an RGB image, exact colours, no anti-aliasing.

    Args:
        scene: a complete scene (background and every object's cell known).
        size: side in pixels, at least ``MIN_IMAGE_SIZE``; small objects are 5 px across at 32 px.

    Raises:
        ValueError: an incomplete scene or a too small size.
    """
    return Image.fromarray(render_array(scene, size))
