"""The shapes world: a procedural image-caption world with exact parsers for both sides.

Scenes of one or two flat-coloured objects (``world``), captions from templates and synonyms and
their exact inverse (``captions``), and an image parser that reads scenes back from clean renders
exactly and from noisy or generated images robustly (``parse``). ``matches`` and ``exact`` score a
prompt against an image and a caption against an image.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scene = sample_scene(rng)
    >>> matches(parse_caption(caption(scene, rng)), parse_image(render(scene)))
    True
"""

from .captions import caption, normalize, parse_caption, templates
from .parse import REJECTIONS, NotAScene, parse_image, read_image
from .world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Object,
    Scene,
    canonical,
    describe,
    exact,
    is_held_out,
    matches,
    render,
    render_array,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT",
    "POSITIONS",
    "REJECTIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "NotAScene",
    "Object",
    "Scene",
    "canonical",
    "caption",
    "describe",
    "exact",
    "is_held_out",
    "matches",
    "normalize",
    "parse_caption",
    "parse_image",
    "read_image",
    "render",
    "render_array",
    "sample_scene",
    "templates",
]
