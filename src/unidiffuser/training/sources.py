"""Raw image-caption data: a folder of pictures with captions, or webdataset tar shards.

Two layouts are read, both in a fixed, deterministic order:

* An image folder: every ``*.jpg|jpeg|png|webp|bmp`` below the root (recursively, any case of
  the suffix) with its caption in the same-named ``.txt`` beside it (``cats/01.jpg`` and
  ``cats/01.txt``). Files are taken in sorted order of their relative paths; hidden files and
  folders (names starting with ".") are left out.
* Webdataset tar shards in img2dataset's layout: members ``NNN.jpg|png|webp`` with ``NNN.txt``,
  or ``NNN.json`` holding a "caption" string; the members of one example are consecutive (the
  key is the member name up to the first dot of its base name, as webdataset does). Shards are
  given as paths, globs or brace lists such as ``"data/{00000..00009}.tar"`` (``expand_braces``),
  or as a directory holding ``*.tar`` files; they are streamed, never extracted to disk.

Work is cut into parts: one tar shard, or ``part_size`` consecutive entries of a folder. Several
processes share the work by whole parts, round-robin: process r of W reads parts r, r + W, ...;
so a part, and everything written from it, belongs to exactly one process.

Bad data is skipped and counted by reason, never fatal and never silent:

    unreadable_image   the bytes are not a picture Pillow can decode (or it is truncated)
    no_caption         a picture without a .txt, or whose .json has no "caption" string
    empty_caption      the caption is empty or only white space
    bad_caption        the caption is not UTF-8 text, or the .json does not parse
    no_image           a caption (or other member) without a picture
    missing_shard      a listed tar shard that does not exist
    corrupt_shard      a tar shard that cannot be opened or ends early; the examples read before
                       the damage are kept, the example being read when it broke is dropped

Reading happens in two steps, so that skipping work already done costs no image decoding:
``Part.read()`` yields ``Record``s (bytes and caption, with a ``problem`` when one is already
known), and ``decode`` turns a record into an ``Example`` or raises ``SkipItem``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from ..components.images import load_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DEFAULT_PART_SIZE = 1000
SKIP_REASONS = (
    "unreadable_image",
    "no_caption",
    "empty_caption",
    "bad_caption",
    "no_image",
    "missing_shard",
    "corrupt_shard",
)
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_GLOB_CHARS = re.compile(r"[*?\[]")

log = logging.getLogger(__name__)


class SkipItem(Exception):
    """An item that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Example(NamedTuple):
    """One usable pair: a stable key, the picture (RGB, fully loaded) and its caption."""

    key: str
    image: Image.Image
    caption: str


@dataclass(frozen=True)
class Record:
    """One item before decoding: a picture (a file or encoded bytes) and its caption.

    ``problem`` names the skip reason when it is known without decoding (a missing caption, a
    broken shard), in which case the other fields may be None.
    """

    key: str
    image: Path | bytes | None
    caption: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Part:
    """A unit of work: a name stable across runs, what it reads, and its records in order."""

    index: int
    source: str  # a tar path, or "folder[first .. last]"
    fingerprint: str  # changes when the data behind the part changes
    size: int | None  # number of records, when known without reading
    read: Callable[[], Iterator[Record]]


def decode(record: Record) -> Example:
    """A record -> an ``Example`` with the picture in RGB; raises ``SkipItem`` for a bad item."""
    if record.problem is not None:
        raise SkipItem(record.problem, record.key)
    if record.image is None:
        raise SkipItem("no_image", record.key)
    if record.caption is None:
        raise SkipItem("no_caption", record.key)
    caption = record.caption.strip()
    if not caption:
        raise SkipItem("empty_caption", record.key)
    try:
        if isinstance(record.image, bytes):
            with Image.open(io.BytesIO(record.image)) as im:
                im.load()  # decode now: a truncated picture fails here
                image = load_image(im)
        else:
            image = load_image(record.image)
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, DecompressionBomb...)
        raise SkipItem("unreadable_image", f"{record.key}: {e}") from e
    return Example(record.key, image, caption)


# ---------------------------------------------------------------------------------------------
# Naming the data: brace lists, globs, folders


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``"a{1..3}b"`` -> a1b a2b a3b, ``"{x,y}.tar"`` -> x.tar y.tar.

    Ranges keep zero padding (``{008..010}`` -> 008 009 010), may count down and take a step
    (``{0..10..5}``); alternatives and ranges nest and combine. A group with neither a comma nor
    a range, such as ``{abc}``, stays as it is (as in bash).

    Raises:
        ValueError: unbalanced braces, or a range step of 0.
    """
    depth, start = 0, None
    for i, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{pattern!r}: '}}' at position {i} closes no '{{'")
            if depth == 0:
                prefix, body, rest = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                choices = _brace_choices(body, pattern)
                tails = expand_braces(rest)
                return [prefix + choice + tail for choice in choices for tail in tails]
    if depth:
        raise ValueError(f"{pattern!r}: '{{' at position {start} is never closed")
    return [pattern]


def _brace_choices(body: str, pattern: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    if len(parts) > 1:
        return [x for part in parts for x in expand_braces(part)]
    match = _RANGE.match(body)
    if match is None:
        return ["{" + x + "}" for x in expand_braces(body)]
    a, b, step = match.group(1), match.group(2), match.group(3)
    lo, hi, step = int(a), int(b), abs(int(step)) if step else 1
    if step == 0:
        raise ValueError(f"{pattern!r}: range {{{body}}} has a step of 0")
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
    width = max(len(a), len(b)) if padded else 0
    numbers = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    return [f"{n:0{width}d}" for n in numbers]


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix[1:].lower() in IMAGE_EXTENSIONS


def open_data(spec: str | Sequence[str]) -> ImageCaptionFolder | WebDatasetShards:
    """The raw data named by ``spec``: an image folder, or tar shards.

    Args:
        spec: a directory (an image folder; or, when it directly holds ``*.tar`` files, those
            shards), or tar shards as paths, globs and brace lists; several may be given as a
            list. A listed shard that does not exist is skipped and counted ("missing_shard"),
            as long as at least one shard exists.

    Raises:
        ValueError: nothing exists under that name, a glob matches nothing, or folders and
            shards are mixed.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("data: no path given")
    names: list[str] = []
    for s in specs:
        for name in expand_braces(os.fspath(s)):
            if _GLOB_CHARS.search(name):
                matches = sorted(glob.glob(name, recursive=True))
                if not matches:
                    raise ValueError(f"data = {name!r}: the pattern matches no file")
                names.extend(matches)
            else:
                names.append(name)
    names = list(dict.fromkeys(names))  # drop repeats, keep the order
    paths = [Path(n) for n in names]
    dirs = [p for p in paths if p.is_dir()]
    if dirs:
        if len(paths) > 1:
            raise ValueError(
                f"data = {spec!r}: give one image folder, or tar shards, not a mix of {len(paths)} paths"
            )
        tars = sorted(p for p in dirs[0].iterdir() if p.is_file() and _is_tar(p))
        return WebDatasetShards(tars) if tars else ImageCaptionFolder(dirs[0])
    existing = [p for p in paths if p.is_file()]
    if not existing:
        raise ValueError(f"data = {spec!r}: no such file or directory ({', '.join(names[:3])} ...)")
    not_tar = [str(p) for p in existing if not _is_tar(p)]
    if not_tar:
        raise ValueError(
            f"data = {spec!r}: {not_tar[0]} is not a .tar shard; give tar shards or one image folder"
        )
    return WebDatasetShards(paths)


# ---------------------------------------------------------------------------------------------
# The two layouts


class ImageCaptionFolder:
    """Pictures below ``root`` with same-named ``.txt`` captions, in sorted order.

    The entries are the pictures, and the captions that have no picture (counted "no_image");
    each picture's key is its path relative to the root.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data = {str(root)!r}: not a directory")
        files = [p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file()]
        files = [p for p in files if not any(part.startswith(".") for part in p.parts)]  # hidden
        images = [p for p in files if _is_image(p)]
        stems = {p.with_suffix("") for p in images}
        orphans = [p for p in files if p.suffix == ".txt" and p.with_suffix("") not in stems]
        self.entries: list[Path] = sorted(images + orphans, key=lambda p: p.as_posix())
        self.missing: list[str] = []
        if not self.entries:
            raise ValueError(
                f"data = {str(root)!r}: no pictures ({', '.join(IMAGE_EXTENSIONS)}) and no tar shards"
            )

    def __repr__(self) -> str:
        return f"ImageCaptionFolder({str(self.root)!r}, {len(self.entries)} entries)"

    def parts(self, part_size: int = DEFAULT_PART_SIZE) -> list[Part]:
        """``part_size`` consecutive entries per part."""
        if part_size < 1:
            raise ValueError(f"part_size={part_size}: expected an integer >= 1")
        out = []
        for index, start in enumerate(range(0, len(self.entries), part_size)):
            chunk = self.entries[start : start + part_size]
            keys = "\n".join(p.as_posix() for p in chunk)
            out.append(
                Part(
                    index=index,
                    source=f"{self.root}[{chunk[0].as_posix()} .. {chunk[-1].as_posix()}]",
                    fingerprint=f"{len(chunk)}:{zlib.crc32(keys.encode()):08x}",
                    size=len(chunk),
                    read=lambda chunk=chunk: self._read(chunk),
                )
            )
        return out

    def _read(self, chunk: list[Path]) -> Iterator[Record]:
        for rel in chunk:
            key = rel.as_posix()
            path = self.root / rel
            if not _is_image(rel):
                yield Record(key, None, None, problem="no_image")
                continue
            caption_path = path.with_suffix(".txt")
            if not caption_path.is_file():
                yield Record(key, path, None, problem="no_caption")
                continue
            try:
                caption = caption_path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                yield Record(key, path, None, problem="bad_caption")
                continue
            yield Record(key, path, caption)


class WebDatasetShards:
    """Tar shards in img2dataset's layout, one part per shard, each read as a stream.

    Args:
        paths: the shards in order; those that do not exist are kept in ``missing`` and their
            parts yield one "missing_shard" record.
    """

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("data: no tar shards given")
        self.missing = [str(p) for p in self.paths if not p.is_file()]

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.paths)} shards, {len(self.missing)} missing)"

    def parts(self, part_size: int = DEFAULT_PART_SIZE) -> list[Part]:
        """One part per shard (``part_size`` does not apply: a shard is read as one stream)."""
        out = []
        for index, path in enumerate(self.paths):
            size = path.stat().st_size if path.is_file() else -1
            out.append(Part(index, str(path), f"{path.name}:{size}", None, lambda path=path: read_tar(path)))
        return out


def read_tar(path: str | Path) -> Iterator[Record]:
    """The examples of one webdataset shard, in member order, streamed."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        yield Record(name, None, None, problem="missing_shard")
        return
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                if base.startswith("."):
                    continue
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key:  # the previous example is complete
                    if key is not None:
                        yield _tar_record(f"{name}/{key}", members)
                    key, members = member_key, {}
                members[ext.lower()] = tar.extractfile(member).read()  # now: the stream moves on
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        log.debug("%s: %s", path, e)
        yield Record(name, None, None, problem="corrupt_shard")
        return
    if key is not None:
        yield _tar_record(f"{name}/{key}", members)


def _tar_record(key: str, members: dict[str, bytes]) -> Record:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        return Record(key, None, None, problem="no_image")
    if "txt" in members:
        try:
            return Record(key, image, members["txt"].decode("utf-8"))
        except UnicodeDecodeError:
            return Record(key, image, None, problem="bad_caption")
    if "json" in members:
        try:
            caption = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
            return Record(key, image, None, problem="bad_caption")
        if isinstance(caption, str):
            return Record(key, image, caption)
    return Record(key, image, None, problem="no_caption")


# ---------------------------------------------------------------------------------------------
# Reading examples


def my_parts(parts: Sequence[Part], rank: int = 0, world_size: int = 1) -> list[Part]:
    """The parts process ``rank`` of ``world_size`` reads: whole parts, round-robin."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    return [p for p in parts if p.index % world_size == rank]


class Examples:
    """The usable examples of one process's share of the data, in order; bad ones counted.

    Args:
        data: an ``open_data`` spec, or an opened source.
        rank: this process's index; it reads whole parts round-robin (``my_parts``).
        world_size: number of processes.
        part_size: entries per part of an image folder.

    ``skipped`` counts the items left out by reason (see the module docstring); it is logged when
    an iteration ends.
    """

    def __init__(
        self,
        data: str | Sequence[str] | ImageCaptionFolder | WebDatasetShards,
        *,
        rank: int = 0,
        world_size: int = 1,
        part_size: int = DEFAULT_PART_SIZE,
    ):
        self.source = data if isinstance(data, (ImageCaptionFolder, WebDatasetShards)) else open_data(data)
        self.parts = my_parts(self.source.parts(part_size), rank, world_size)
        self.skipped: Counter[str] = Counter()
        self.count = 0

    def __iter__(self) -> Iterator[Example]:
        self.skipped.clear()
        self.count = 0
        for part in self.parts:
            for record in part.read():
                try:
                    example = decode(record)
                except SkipItem as e:
                    self.skipped[e.reason] += 1
                    continue
                self.count += 1
                yield example
        level = logging.WARNING if self.skipped else logging.INFO
        log.log(level, "read %d examples from %r; %s", self.count, self.source, describe_skips(self.skipped))


def describe_skips(skipped: Counter[str]) -> str:
    """A line such as "skipped 3 (2 no_caption, 1 unreadable_image)", or "skipped none"."""
    total = sum(skipped.values())
    if not total:
        return "skipped none"
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"skipped {total} ({detail})"
