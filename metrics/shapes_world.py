"""The procedural world the ``wan2.2-t2v-shapes`` model is trained on, and its prompt grammar.

One object on a plain dark background: a ``circle``, ``square`` or ``triangle`` about a quarter
of the frame across, in one of eight colours, moving left, right, up or down across about half
the frame over the clip. The renderer is the training data (nothing is downloaded) and the
ground truth the adherence judge (:mod:`metrics.adherence`) is tested on; both use the shape
geometry defined here.

Example::

    spec = parse_prompt("a red circle moving left")     # ShapeSpec("red", "circle", "left")
    video = render_video(spec, frames=17, size=64, seed=0)   # uint8 [17, 64, 64, 3]
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

BACKGROUND = (30, 30, 30)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 50),
    "cyan": (40, 210, 220),
    "magenta": (210, 60, 200),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Unit step per frame (dx, dy) in image coordinates (y grows downwards).
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

OBJECT_FRACTION = 0.25   # the object's width (bounding box) as a fraction of the frame
TRAVEL_FRACTION = 0.5    # how far it moves over the clip, as a fraction of the frame
_SUPERSAMPLE = 4         # antialiasing: render at 4x and average

_PROMPT = re.compile(
    r"^\s*an?\s+(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)\s+moving\s+(?P<direction>[a-z]+)\s*[.!]?\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class ShapeSpec:
    """What a prompt asks for."""

    colour: str
    shape: str
    direction: str

    def prompt(self) -> str:
        """The canonical prompt: ``a <colour> <shape> moving <direction>``."""
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def tags(self) -> list[str]:
        """The colour, shape and motion tags of this combination."""
        return [self.colour, self.shape, self.direction]


def parse_prompt(prompt: str) -> ShapeSpec | None:
    """The combination a prompt asks for, or ``None`` when it is not a prompt of this world."""
    match = _PROMPT.match(prompt)
    if not match:
        return None
    colour, shape, direction = (match.group(k).lower() for k in ("colour", "shape", "direction"))
    if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
        return None
    return ShapeSpec(colour, shape, direction)


def all_specs() -> list[ShapeSpec]:
    """Every combination (8 colours x 3 shapes x 4 directions = 96), in a fixed order."""
    return [ShapeSpec(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def shape_mask(shape: str, size: int | tuple[int, int], cx: float, cy: float, width: float,
               supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` centred at (cx, cy) with bounding-box ``width``, on a
    ``size`` x ``size`` (or ``(height, width)``) grid (pixel centres at integer + 0.5),
    antialiased by supersampling.

    The triangle is isosceles, apex up, as wide as it is tall; the circle's diameter and the
    square's side are ``width``.
    """
    rows, cols = (size, size) if isinstance(size, int) else size
    x = (np.arange(cols * supersample, dtype=np.float64)[None, :] + 0.5) / supersample - cx
    y = (np.arange(rows * supersample, dtype=np.float64)[:, None] + 0.5) / supersample - cy
    half = width / 2.0
    if shape == "circle":
        inside = x * x + y * y <= half * half
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        # apex (0, -half), base from (-half, half) to (half, half): |x| <= (y + half) / 2
        inside = (y >= -half) & (y <= half) & (np.abs(x) <= (y + half) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3))


def trajectory(direction: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Object centres ``[frames, 2]`` (x, y): crossing ``TRAVEL_FRACTION`` of the frame along the
    direction, centred with a small random offset, at a random position across it."""
    travel = TRAVEL_FRACTION * size
    width = OBJECT_FRACTION * size
    dx, dy = STEPS[direction]
    margin = width / 2 + 2
    along_centre = size / 2 + rng.uniform(-0.06, 0.06) * size
    across = rng.uniform(margin + 4, size - margin - 4)
    t = np.linspace(-0.5, 0.5, frames) * travel
    along = along_centre + t
    if dx:
        xs = along if dx > 0 else size - along
        ys = np.full(frames, across)
    else:
        ys = along if dy > 0 else size - along
        xs = np.full(frames, across)
    return np.stack([xs, ys], axis=1)


def render_video(spec: ShapeSpec, frames: int = 17, size: int = 64, seed: int = 0,
                 width_jitter: float = 0.1) -> np.ndarray:
    """A ground-truth clip for ``spec``: uint8 ``[frames, size, size, 3]``.

    ``seed`` draws the start position, the position across the motion and the object's size
    (``OBJECT_FRACTION`` of the frame, +- ``width_jitter``).
    """
    rng = np.random.default_rng(seed)
    width = OBJECT_FRACTION * size * (1 + rng.uniform(-width_jitter, width_jitter))
    centres = trajectory(spec.direction, frames, size, rng)
    background = np.asarray(BACKGROUND, dtype=np.float64)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i, (cx, cy) in enumerate(centres):
        cover = shape_mask(spec.shape, size, cx, cy, width)[..., None]
        video[i] = np.rint(background + cover * (colour - background)).astype(np.uint8)
    return video
