"""Read a shapes-world scene back from an image: segmentation by colour, classification by geometry.

The steps, each tolerant of what a generator or a corruption does to a clean render:

1. Background: the one whose empty render, moved by a global colour shift (the image's median
   offset from it), fits the image best in median pixel distance; objects cover far less than half
   the image, so medians see only background. Too far from every background means no scene.
2. Pixel labels: every pixel is read as a mix ``b + alpha (c - b)`` of its expected background ``b``
   and each palette colour ``c``. It belongs to the colour that explains it with the smallest
   residual and ``alpha >= 0.5``. Mixing is what blur does at edges, so a blurred edge never
   passes for a third colour. A blob of pixels no mix explains (an object of another colour)
   means no scene.
3. Objects: 8-connected components per colour; specks smaller than a fraction of the smallest
   object are dropped as noise. One or two objects, else no scene. An object whose mean colour is
   off the palette, or that is nowhere near its full colour, means no scene.
4. Shape and size together, by least squares: the object's alpha map is compared with every
   (shape, size) stamp, placed at its centroid, shifted by up to a pixel and blurred at a few
   levels. On a clean render the unblurred right stamp fits exactly. A best stamp that, cut at
   alpha 0.5, overlaps the object's pixels by less than half (intersection over union) means no
   scene. The fitted stamp's centre gives the cell; two cells give the relation.

The result is a complete ``Scene`` in canonical orientation ("left of" or "above"). Where there
is none, ``read_image`` raises ``NotAScene`` with the check that failed (``REJECTIONS``), which is
what tells a generator's failures apart; ``parse_image`` returns None.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from .world import (
    BACKGROUNDS,
    COLOURS,
    GRID,
    MIN_IMAGE_SIZE,
    SHAPES,
    SIZES,
    Object,
    Scene,
    background_array,
    shape_mask,
)

# Thresholds in 0-255 RGB units. Palette colours lie at least 165 from every background and the
# nearest wrong colour's mixing line lies about 180 from a pure palette pixel, so these split
# the margins roughly in half.
MAX_BACKGROUND_DISTANCE = 80.0  # median distance of the image to its (shifted) background
MAX_SHIFT = 80.0  # the largest global colour shift of the background tolerated
MAX_RESIDUAL = 90.0  # distance of a pixel to the nearest mix of background and a colour
MAX_MEAN_RESIDUAL = 45.0  # the same, averaged over an object: orange is neither red nor yellow
MIN_ALPHA = 0.5  # a pixel at least half object colour belongs to the object
# Somewhere an object is mostly its colour (a 1 px arm blurred by sigma 1 peaks at 0.63); half-
# strength ghosts are not objects.
MIN_PEAK_ALPHA = 0.6
MIN_SPECK = 0.4  # components below this fraction of the smallest stamp's area are noise
MIN_IOU = 0.5  # the best stamp, cut at MIN_ALPHA, must overlap the component at least this well
_SHIFT = 1  # pixels of placement search either way
# Blurs (Gaussian sigma in pixels of a 32 px image, scaled with the size) the stamps are matched at.
BLUR_LEVELS = (0.0, 0.5, 1.0, 1.5)

_PALETTE = np.array(list(COLOURS.values()), np.float32)  # (C, 3)
_COLOUR_NAMES = tuple(COLOURS)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


@functools.cache
def _backgrounds(size: int) -> np.ndarray:
    """Every empty background, (B, S, S, 3) float32."""
    return np.stack([background_array(b, size) for b in BACKGROUNDS]).astype(np.float32)


def _gaussian_matrix(side: int, sigma: float) -> np.ndarray:
    """(side, side): left-multiplying blurs the columns of an image; the identity for sigma 0."""
    if sigma == 0:
        return np.eye(side, dtype=np.float32)
    d = np.arange(side)[:, None] - np.arange(side)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


@functools.cache
def _stamp_bank(
    size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, str]], np.ndarray, int]:
    """Every stamp, at every blur and placement shift, on a window centred on a component's centroid.

    Returns:
        soft stamps (N, W*W) float32, the same cut at 0.5 (N, W*W) bool, half their squared norms
        (N,), the (shape, size) of each, the window position of each stamp's centre pixel (N, 2),
        and the window's half side W // 2.
    """
    stamps = {(shape, s): shape_mask(shape, s, size) for shape in SHAPES for s in SIZES}
    # Where each stamp's centroid lies relative to its centre pixel (the triangle's lies lower).
    offsets = {
        k: [round(float(a.mean())) - m.shape[0] // 2 for a in np.nonzero(m)] for k, m in stamps.items()
    }
    sigmas = [b * size / 32 for b in BLUR_LEVELS]
    reach = max(m.shape[0] // 2 + max(map(abs, offsets[k])) for k, m in stamps.items())
    half = reach + _SHIFT + math.ceil(2 * max(sigmas))
    side = 2 * half + 1
    blurs = [_gaussian_matrix(side, sigma) for sigma in sigmas]
    soft, labels, centres = [], [], []
    for (shape, size_name), stamp in stamps.items():
        r = stamp.shape[0] // 2
        # The stamp's centre pixel, placed so that the stamp's centroid falls on the window's centre.
        base = (half - offsets[shape, size_name][0], half - offsets[shape, size_name][1])
        for dy in range(-_SHIFT, _SHIFT + 1):
            for dx in range(-_SHIFT, _SHIFT + 1):
                cy, cx = base[0] + dy, base[1] + dx
                canvas = np.zeros((side, side), np.float32)
                canvas[cy - r : cy + r + 1, cx - r : cx + r + 1] = stamp
                for g in blurs:
                    soft.append(g @ canvas @ g.T)
                    labels.append((shape, size_name))
                    centres.append((cy, cx))
    soft = np.stack(soft).reshape(len(soft), -1)
    return soft, soft >= MIN_ALPHA, 0.5 * (soft * soft).sum(1), labels, np.array(centres), half


@functools.cache
def _mixing_lines(size: int, which: int) -> tuple[np.ndarray, np.ndarray]:
    """From background ``which`` to each colour: directions (S, S, C, 3) and squared lengths (S, S, C)."""
    direction = _PALETTE[None, None] - _backgrounds(size)[which][:, :, None]
    return direction, (direction * direction).sum(-1)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image as (S, S, 3) float32 in 0-255."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image of shape {image.shape}: expected (H, W, 3)")
        array = image.astype(np.float32)
        if not np.issubdtype(image.dtype, np.integer):
            array = array * 255.0  # floats are read as 0-1
    else:
        raise TypeError(f"image of type {type(image).__name__}: expected a PIL image or a numpy array")
    h, w = array.shape[:2]
    if h != w or h < MIN_IMAGE_SIZE:
        raise ValueError(f"image of {w}x{h} pixels: expected a square of at least {MIN_IMAGE_SIZE}")
    return array


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 8-connected components of a boolean mask, as (ys, xs) index arrays."""
    todo = set(zip(*(a.tolist() for a in np.nonzero(mask)), strict=True))
    out = []
    while todo:
        stack = [todo.pop()]
        pixels = []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy, dx in _NEIGHBOURS:
                p = (y + dy, x + dx)
                if p in todo:
                    todo.remove(p)
                    stack.append(p)
        ys, xs = np.array(pixels).T
        out.append((ys, xs))
    return out


class _Pixels(NamedTuple):
    background: str
    labels: np.ndarray  # (S, S) colour index, -1 for none
    alpha: np.ndarray  # (S, S, C) mixing fraction of each colour
    off_line: np.ndarray  # (S, S, C, 3) the pixel minus its nearest mix of background and each colour
    unknown: np.ndarray  # (S, S) pixels that no mix explains


def _label_pixels(array: np.ndarray) -> _Pixels | None:
    """Each pixel read against the background that fits the image best, or None if none fits."""
    size = array.shape[0]
    backgrounds = _backgrounds(size)  # (B, S, S, 3)
    # Each background up to a global colour shift (objects cover far less than half the pixels, so
    # medians see only the background); the shift is charged for, or black would pass for gray.
    offsets = array[None] - backgrounds  # (B, S, S, 3)
    shifts = np.median(offsets.reshape(len(BACKGROUNDS), -1, 3), axis=1)  # (B, 3)
    distance = np.linalg.norm(offsets - shifts[:, None, None], axis=-1)  # (B, S, S)
    spread = np.median(distance.reshape(len(BACKGROUNDS), -1), axis=1)  # (B,)
    shift_norm = np.linalg.norm(shifts, axis=1)
    which = int(np.argmin(spread + 0.5 * shift_norm))
    if spread[which] > MAX_BACKGROUND_DISTANCE or shift_norm[which] > MAX_SHIFT:
        return None
    direction, length2 = _mixing_lines(size, which)  # a global shift moves both ends alike
    offset = offsets[which] - shifts[which]  # (S, S, 3)
    along = np.einsum("hwk,hwck->hwc", offset, direction)  # (S, S, C)
    alpha = along / length2
    # Squared distance to each mixing line, by Pythagoras.
    residual2 = np.maximum((offset * offset).sum(-1, keepdims=True) - along * alpha, 0.0)  # (S, S, C)
    fits = residual2 <= MAX_RESIDUAL**2  # (S, S, C)
    score = np.where(fits & (alpha >= MIN_ALPHA), residual2, np.inf)
    labels = np.where(np.isfinite(score.min(-1)), score.argmin(-1), -1)  # (S, S)
    # Unknown: neither a colour, nor near the background, nor any mix of the two.
    near_background = distance[which] <= MAX_RESIDUAL
    mixed = (fits & (alpha > -0.25) & (alpha < 1.5)).any(-1)
    unknown = (labels < 0) & ~near_background & ~mixed
    off_line = offset[:, :, None] - alpha[..., None] * direction
    return _Pixels(BACKGROUNDS[which], labels, np.clip(alpha, -1.0, 2.0), off_line, unknown)


def _classify(
    alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int
) -> tuple[str, str, float, float] | None:
    """Shape, size and the centre (y, x) of the stamp that best explains a component, or None.

    Args:
        alpha: (S, S) the component colour's mixing fraction, zero on other objects' pixels.
        ys, xs: the component's pixels.
        size: the image side.
    """
    soft, hard, energy, labels, centres, half = _stamp_bank(size)
    side = 2 * half + 1
    oy, ox = round(float(ys.mean())) - half, round(float(xs.mean())) - half  # window origin
    window = np.zeros((side, side), np.float32)
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + side, alpha.shape[0]), min(ox + side, alpha.shape[1])
    window[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = alpha[y0:y1, x0:x1]
    window = window.reshape(-1)
    # Least squares: the noise adds the same to every stamp's error, so it leaves the choice alone.
    # einsum, not a BLAS matvec: threaded BLAS is far slower on a vector this short when cores are busy.
    best = int(np.argmin(energy - np.einsum("nk,k->n", soft, window)))
    # The sanity check is on shapes, not intensities: the component against the stamp, both cut at 0.5.
    wy, wx = ys - oy, xs - ox
    inside = (wy >= 0) & (wy < side) & (wx >= 0) & (wx < side)
    mask = np.zeros((side, side), bool)
    mask[wy[inside], wx[inside]] = True
    # Component pixels outside the window (a far too large object) only add to the union.
    intersection = int((hard[best] & mask.reshape(-1)).sum())
    if intersection < MIN_IOU * (int(hard[best].sum()) + len(ys) - intersection):
        return None
    shape, size_name = labels[best]
    return shape, size_name, oy + centres[best][0] + 0.5, ox + centres[best][1] + 0.5


# Why an image is not a scene, one reason per check of ``read_image``, in the order it checks them.
REJECTIONS: tuple[str, ...] = (
    "no background",  # no background of the world fits the image
    "stray pixels",  # a blob of pixels that no colour and no mix with the background explains
    "no object",
    "three or more objects",
    "off-palette object",  # an object whose colour is, on average, off every palette colour
    "faint object",  # nowhere near full strength: a ghost
    "unknown shape",  # no stamp of any shape and size fits the object
    "one colour twice",
    "diagonal pair",  # two objects that share neither a row nor a column of the grid
)


class NotAScene(Exception):
    """An image that shows no scene of the world; ``reason`` is one of ``REJECTIONS``."""

    def __init__(self, reason: str):
        if reason not in REJECTIONS:
            raise ValueError(f"reason={reason!r}: expected one of {REJECTIONS}")
        super().__init__(reason)
        self.reason = reason


def parse_image(image: Image.Image | np.ndarray) -> Scene | None:
    """The scene an image shows, or None if it shows no scene of this world (``read_image`` says why).

    Args:
        image: a square RGB image of at least ``MIN_IMAGE_SIZE`` pixels: a PIL image (any mode is
            converted to RGB) or an (S, S, 3) array, integers in 0-255 or floats in 0-1.

    Raises:
        TypeError: not an image or an array.
        ValueError: not square, too small, or not three channels.
    """
    try:
        return read_image(image)
    except NotAScene:
        return None


def read_image(image: Image.Image | np.ndarray) -> Scene:
    """The scene an image shows: complete, in canonical orientation ("left of" or "above").

    Raises:
        NotAScene: it shows none; its ``reason`` says which check failed (``REJECTIONS``).
        TypeError: not an image or an array.
        ValueError: not square, too small, or not three channels.
    """
    array = _as_array(image)
    size = array.shape[0]
    pixels = _label_pixels(array)
    if pixels is None:
        raise NotAScene("no background")
    labels, alpha = pixels.labels, pixels.alpha
    smallest = min(int(shape_mask(s, "small", size).sum()) for s in SHAPES)
    # Strong noise leaves unexplained pixels scattered; an object of no palette colour leaves a blob.
    if any(len(ys) >= smallest for ys, _ in _components(pixels.unknown)):
        raise NotAScene("stray pixels")
    min_area = math.ceil(MIN_SPECK * smallest)
    found = []
    for c in np.unique(labels[labels >= 0]).tolist():
        for ys, xs in _components(labels == c):
            if len(ys) >= min_area:
                found.append((c, ys, xs))
    if not found:
        raise NotAScene("no object")
    if len(found) > 2:
        raise NotAScene("three or more objects")
    objects = []
    cell = size / GRID
    for c, ys, xs in found:
        # Averaged over the object, noise cancels: what is left is how far its colour is off the palette.
        if np.linalg.norm(pixels.off_line[ys, xs, c].mean(0)) > MAX_MEAN_RESIDUAL:
            raise NotAScene("off-palette object")
        if alpha[ys, xs, c].max() < MIN_PEAK_ALPHA:  # a faint ghost, not an object
            raise NotAScene("faint object")
        own = np.where((labels >= 0) & (labels != c), 0.0, alpha[:, :, c])  # other objects do not count
        classified = _classify(own, ys, xs, size)
        if classified is None:
            raise NotAScene("unknown shape")
        shape, size_name, cy, cx = classified
        x, y = min(int(cx // cell), GRID - 1), min(int(cy // cell), GRID - 1)
        objects.append(Object(shape, _COLOUR_NAMES[c], size_name, max(x, 0), max(y, 0)))
    relation = None
    if len(objects) == 2:
        a, b = objects
        if a.colour == b.colour:
            raise NotAScene("one colour twice")
        if a.y == b.y and a.x != b.x:
            relation = "left of"
            objects.sort(key=lambda o: o.x)
        elif a.x == b.x and a.y != b.y:
            relation = "above"
            objects.sort(key=lambda o: o.y)
        else:
            raise NotAScene("diagonal pair")
    return Scene(tuple(objects), pixels.background, relation)
