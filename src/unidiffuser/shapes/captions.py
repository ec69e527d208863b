"""Captions of shapes-world scenes from templates and synonyms, and their exact inverse.

Every caption states each object's size, colour and shape, a lone object's cell and, for two
objects, the relation of the first to the second (their cells are left unstated); the background
is stated by an optional closing clause. All words are lower case, with no punctuation.

``parse_caption`` inverts every template and synonym exactly: it matches the whole text against
regular expressions built from the same tables that ``caption`` draws from, so the two cannot drift
apart.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .world import COLOURS, GRID, Object, Scene, _as_rng

# Each canonical value's surface forms; the first is the canonical wording.
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big", "huge"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus", "plus sign"),
    "diamond": ("diamond", "rhombus"),
}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",),
    "gray": ("gray", "grey"),
    "gradient": ("gradient", "shaded"),
}
BACKGROUND_CLAUSES: tuple[str, ...] = ("on a {g} background", "against a {g} background")
PICTURE_WORDS: tuple[str, ...] = ("a picture of", "an image of", "a photo of")


def _position_words() -> dict[tuple[int, int], tuple[str, ...]]:
    rows = {0: ("top", "upper"), 2: ("bottom", "lower")}
    cols = {0: "left", 2: "right"}
    centres = ("center", "centre", "middle")
    words: dict[tuple[int, int], tuple[str, ...]] = {}
    for y in range(GRID):
        for x in range(GRID):
            if y in rows and x in cols:  # corners
                words[x, y] = tuple(
                    f"{prep} the {r} {cols[x]}{corner}"
                    for r in rows[y]
                    for prep, corner in (("in", ""), ("at", ""), ("in", " corner"))
                )
            elif y in rows:  # top or bottom edge
                words[x, y] = (f"at the {rows[y][0]}", *(f"in the {r} {c}" for r in rows[y] for c in centres))
            elif x in cols:  # left or right edge
                words[x, y] = (f"on the {cols[x]}", f"at the {cols[x]}", f"on the {cols[x]} side")
            else:
                words[x, y] = tuple(f"in the {c}" for c in centres)
    return words


POSITION_WORDS: dict[tuple[int, int], tuple[str, ...]] = _position_words()

# Slots: {o} a lone object with {p} its cell; {a} {r} {b} two objects and their relation; {i} a
# "picture of" phrase. Any template may end with a background clause.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "{o} {p}",
    "there is {o} {p}",
    "{p} there is {o}",
    "{o} is {p}",
    "{i} {o} {p}",
)
PAIR_TEMPLATES: tuple[str, ...] = ("{a} {r} {b}", "there is {a} {r} {b}", "{a} is {r} {b}", "{i} {a} {r} {b}")
BACKGROUND_CHANCE = 1 / 3  # how often a random caption states the background


def templates(num_objects: int) -> tuple[str, ...]:
    """The templates for scenes of ``num_objects`` objects."""
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects={num_objects!r}: expected 1 or 2")
    return SINGLE_TEMPLATES if num_objects == 1 else PAIR_TEMPLATES


def _choose(rng: np.random.Generator | None, options: tuple[str, ...]) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _noun_phrase(o: Object, rng: np.random.Generator | None, colour: bool = True) -> str:
    size = _choose(rng, SIZE_WORDS[o.size])
    if not colour:
        return f"a {size} {_choose(rng, SHAPE_WORDS[o.shape])}"
    return f"a {size} {_choose(rng, COLOUR_WORDS[o.colour])} {_choose(rng, SHAPE_WORDS[o.shape])}"


def caption(
    scene: Scene,
    rng: np.random.Generator | int | None = None,
    *,
    template: int | None = None,
    background: bool | None = None,
    colour: bool = True,
) -> str:
    """A caption of the scene.

    Args:
        scene: the scene; a lone object must be placed, and a stated background known.
        rng: draws the template and every synonym (or an int seed); None gives the canonical caption:
            the first template and the first synonyms, no background clause unless asked for.
        template: index into ``templates(len(scene.objects))``; None draws one.
        background: state the background (True), not (False), or draw (None: with probability
            ``BACKGROUND_CHANCE`` when rng is given, never without).
        colour: False leaves every object's colour out ("a small circle"), for pictures whose
            objects are not drawn in their colours (``clip_training``); such a caption is not one
            ``parse_caption`` reads.

    Raises:
        ValueError: a template index out of range, a lone object without a cell, or background=True
            for a scene without one.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene={scene!r}: expected a Scene")
    gen = None if rng is None else _as_rng(rng)
    options = templates(len(scene.objects))
    if template is None:
        template = 0 if gen is None else int(gen.integers(len(options)))
    if not 0 <= template < len(options):
        raise ValueError(f"template={template}: expected 0..{len(options) - 1}")
    if background is None:
        background = gen is not None and scene.background is not None and gen.random() < BACKGROUND_CHANCE
    if background and scene.background is None:
        raise ValueError("background=True for a scene whose background is unknown")
    slots: dict[str, str] = {"i": _choose(gen, PICTURE_WORDS)}
    if len(scene.objects) == 1:
        (o,) = scene.objects
        if not o.placed:
            raise ValueError(f"{o}: a lone object's caption states its cell")
        slots |= {"o": _noun_phrase(o, gen, colour), "p": _choose(gen, POSITION_WORDS[o.x, o.y])}
    else:
        a, b = scene.objects
        slots |= {
            "a": _noun_phrase(a, gen, colour),
            "r": _choose(gen, RELATION_WORDS[scene.relation]),
            "b": _noun_phrase(b, gen, colour),
        }
    text = options[template].format(**slots)
    if background:
        clause = _choose(gen, BACKGROUND_CLAUSES)
        text += " " + clause.format(g=_choose(gen, BACKGROUND_WORDS[scene.background]))
    return text


# ---- the inverse


def _alternation(name: str, table: dict) -> tuple[str, dict[str, object]]:
    """A named regex group matching any surface form in the table, and the map back to values."""
    back: dict[str, object] = {}
    for value, forms in table.items():
        for form in forms:
            if back.setdefault(form, value) != value:
                raise ValueError(f"{name}: {form!r} would mean both {back[form]!r} and {value!r}")
    # Longest first, so "plus sign" is tried before "plus".
    pattern = "|".join(re.escape(f) for f in sorted(back, key=lambda f: (-len(f), f)))
    return f"(?P<{name}>{pattern})", back


@functools.cache
def _grammar() -> tuple[list[tuple[int, re.Pattern]], dict[str, dict[str, object]]]:
    """The compiled templates (with the optional background clause) and the maps of every slot."""
    maps: dict[str, dict[str, object]] = {}

    def group(name: str, table: dict) -> str:
        pattern, back = _alternation(name, table)
        maps[name] = back
        return pattern

    def noun(prefix: str) -> str:
        return (
            f"a {group(prefix + '_size', SIZE_WORDS)} {group(prefix + '_colour', COLOUR_WORDS)}"
            f" {group(prefix + '_shape', SHAPE_WORDS)}"
        )

    clauses = {
        bg: tuple(c.format(g=w) for c in BACKGROUND_CLAUSES for w in words)
        for bg, words in BACKGROUND_WORDS.items()
    }
    slots = {
        "o": noun("o"),
        "a": noun("a"),
        "b": noun("b"),
        "p": group("p", POSITION_WORDS),
        "r": group("r", RELATION_WORDS),
        "i": "(?:" + "|".join(re.escape(w) for w in PICTURE_WORDS) + ")",
    }
    tail = f"(?: {group('g', clauses)})?"
    compiled = []
    for n in (1, 2):
        for template in templates(n):
            pieces = re.split(r"\{(\w)\}", template)  # literal, slot, literal, slot, ..., literal
            body = "".join(slots[p] if k % 2 else re.escape(p) for k, p in enumerate(pieces))
            compiled.append((n, re.compile(body + tail)))
    return compiled, maps


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding space or closing full stop."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_caption(text: str) -> Scene | None:
    """The scene a caption states, or None if the text is not a caption of this world.

    Accepts exactly what ``caption`` writes, up to case, spacing and a closing full stop.
    Unstated attributes are None: the background without its clause, the cells of two objects.
    Deterministic; text that several templates would read differently is rejected.

    Raises:
        TypeError: text is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text={text!r}: expected a str")
    text = normalize(text)
    compiled, maps = _grammar()
    found: set[Scene] = set()
    for n, pattern in compiled:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        background = maps["g"][g["g"]] if g["g"] is not None else None

        def obj(prefix: str, cell: tuple[int, int] | tuple[None, None] = (None, None), g=g) -> Object:
            return Object(
                maps[prefix + "_shape"][g[prefix + "_shape"]],
                maps[prefix + "_colour"][g[prefix + "_colour"]],
                maps[prefix + "_size"][g[prefix + "_size"]],
                *cell,
            )

        try:
            if n == 1:
                found.add(Scene((obj("o", maps["p"][g["p"]]),), background))
            else:
                found.add(Scene((obj("a"), obj("b")), background, maps["r"][g["r"]]))
        except ValueError:  # well formed but not a scene of this world, e.g. two red objects
            continue
    return found.pop() if len(found) == 1 else None
