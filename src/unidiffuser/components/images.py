"""Image I/O for the pipeline: files -> RGB pictures -> pixel tensors in [-1, 1] -> pictures, grids.

Everything here is Pillow and NumPy; no torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see ``load_image`` for the rules)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own convert() clips 16-bit values to 0..255 instead of rescaling them.
        values = np.asarray(image, dtype=np.float64)
        eight = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path_or_pil: str | Path | Image.Image) -> Image.Image:
    """Read a picture and return it as 8-bit RGB.

    Conversions: greyscale ("L", "1") is repeated over the three channels; images with
    transparency (RGBA, LA, PA, and palette images with a transparent colour) are composited on
    white; palette, CMYK, YCbCr and the other Pillow modes go through Pillow's own RGB conversion;
    16-bit greyscale ("I;16*" and "I", as Pillow opens 16-bit PNGs) is rescaled by 1/257 and
    rounded to 8 bits. The EXIF orientation is not applied (as in the released pipeline).

    Args:
        path_or_pil: a file path, or an already opened PIL image (only converted).

    Returns:
        The image in mode "RGB", fully loaded (the file is closed).

    Raises:
        ValueError: the path does not exist or is not a readable, complete image file.
    """
    if isinstance(path_or_pil, Image.Image):
        if 0 in path_or_pil.size:
            raise ValueError(f"image of {path_or_pil.width}x{path_or_pil.height} pixels: it holds no pixel")
        return _to_rgb(path_or_pil)
    if not isinstance(path_or_pil, (str, Path)):
        raise ValueError(f"path_or_pil: expected a path or a PIL image, got {type(path_or_pil).__name__}")
    path = Path(path_or_pil)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give an image file")
    if not path.is_file():
        raise ValueError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a resize
            return _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot read image {str(path)!r}: {err}. The file is not an image Pillow can decode, "
            "or it is truncated or corrupt; re-export or re-download it."
        ) from err


def resize_and_crop(image: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """Resize so the image just covers ``size``, then center crop to it.

    For a square size this is CLIP's preprocessing: the shortest side becomes the side, the
    other one floor(side * long / short) (the rule of torchvision's and transformers' Resize);
    the crop starts at floor((new - size) / 2) (transformers' center crop).

    Args:
        image: an RGB picture.
        size: (height, width) of the result.
        resample: "bicubic" (default), "lanczos" or "bilinear".

    Returns:
        The RGB picture of exactly ``size``.
    """
    height, width = size
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}, expected one of {sorted(RESAMPLE)}")
    w, h = image.size
    # integer arithmetic: the side that needs the larger scale is matched exactly
    if width * h >= height * w:
        new_w, new_h = width, h * width // w
    else:
        new_w, new_h = w * height // h, height
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), RESAMPLE[resample])
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(images: Sequence[Image.Image], size: tuple[int, int], *, resample: str = "bicubic") -> Tensor:
    """Pictures -> a float32 batch in [-1, 1], the autoencoder's input.

    Each picture is converted to RGB (``load_image`` rules), resized with ``resample`` so that it
    covers ``size`` (for a square size: its shortest side becomes the side) and center cropped.

    Args:
        images: PIL images of any size and mode.
        size: (height, width) in pixels.
        resample: "bicubic" (default), "lanczos" or "bilinear".

    Returns:
        (B, 3, height, width) float32 tensor in [-1, 1].
    """
    if isinstance(images, Image.Image) or not len(images):
        raise ValueError("images: expected a non-empty sequence of PIL images")
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size={size!r}: expected (height, width), two positive integers")
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        rgb = resize_and_crop(_to_rgb(image), size, resample)
        arrays.append(np.asarray(rgb, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) in 0..255
    return (batch / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def to_pil(pixels: Tensor) -> list[Image.Image]:
    """A batch in [-1, 1] -> 8-bit RGB pictures (values outside are clipped, then rounded).

    Args:
        pixels: (B, 3, H, W) or (3, H, W) tensor, any float dtype and device.

    Returns:
        B PIL images of mode "RGB".
    """
    if not isinstance(pixels, Tensor) or pixels.ndim not in (3, 4) or pixels.shape[-3] != 3:
        got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"pixels: expected a (B, 3, H, W) or (3, H, W) tensor, got {got}")
    if pixels.ndim == 3:
        pixels = pixels[None]
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()  # (B, 3, H, W)
    x = x.to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(a, mode="RGB") for a in x]


def _wrap(text: str, font, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """Greedy word wrap by measured width; words wider than a line are split by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and draw.textlength(line + char, font=font) > width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def make_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    *,
    padding: int = 4,
) -> Image.Image:
    """Tile pictures on a white sheet, row by row, each caption wrapped under its tile.

    Args:
        images: the pictures; tiles take the largest width and height among them (smaller
            pictures are centered in their tile).
        captions: one string per picture, drawn in black with Pillow's default font, or None.
        columns: tiles per row; by default ceil(sqrt(len(images))).
        padding: pixels between tiles and around the text.

    Returns:
        An RGB picture.
    """
    if isinstance(images, Image.Image) or not len(images):
        raise ValueError("images: expected a non-empty sequence of PIL images")
    n = len(images)
    if captions is not None and (isinstance(captions, str) or len(captions) != n):
        raise ValueError(f"captions: expected {n} strings (one per image) or None")
    columns = columns or math.ceil(math.sqrt(n))
    if columns < 1:
        raise ValueError(f"columns={columns}: expected a positive integer")
    rows = math.ceil(n / columns)
    tile_w = max(im.width for im in images)
    tile_h = max(im.height for im in images)

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(str(c), font, measure, tile_w - 2 * padding) for c in captions] if captions else None
    _, top, _, bottom = font.getbbox("Ag")
    line_h = bottom - top + 2
    text_h = max(len(lines) for lines in wrapped) * line_h + 2 * padding if wrapped else 0

    cell_w, cell_h = tile_w + padding, tile_h + text_h + padding
    sheet = Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x0 = padding + (i % columns) * cell_w
        y0 = padding + (i // columns) * cell_h
        offset = ((tile_w - image.width) // 2, (tile_h - image.height) // 2)
        sheet.paste(_to_rgb(image), (x0 + offset[0], y0 + offset[1]))
        if wrapped:
            for j, line in enumerate(wrapped[i]):
                draw.text(
                    (x0 + padding, y0 + tile_h + padding + j * line_h - top), line, fill="black", font=font
                )
    return sheet


__all__ = ["load_image", "make_grid", "resize_and_crop", "to_pil", "to_tensor"]
