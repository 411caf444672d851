"""Prompt adherence for the shapes world: does a video show the colour, shape and motion it was asked for?

A rule-based judge that reads the frames alone (no reference video, no model):

- **background**: the median colour of each frame (the object covers a few percent of it);
- **object**: each pixel's coverage is its projection onto (object colour - background), the
  object colour being the mean of the pixels that differ most from the background; pixels
  covered more than half make the object's mask;
- **colour**: the palette colour nearest (RGB) to the median colour of the well-covered pixels;
- **shape**: per frame, the soft intersection-over-union of the coverage with a circle, a square
  and a triangle drawn by the renderer's own geometry with the object's area and centroid (both
  survive blur); the best fit of the most frames wins;
- **motion**: the least-squares slope of the coverage-weighted centroid over the frames; the
  dominant axis and its sign give the direction, which must cover at least
  ``MIN_TRAVEL_FRACTION`` of the frame (the world's objects travel half of it).

Example::

    verdict = judge_video(frames, parse_prompt("a red circle moving left"))
    verdict.ok, verdict.colour, verdict.shape, verdict.direction
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metrics.shapes_world import COLOURS, SHAPES, ShapeSpec, parse_prompt, shape_mask

MIN_OBJECT_PIXELS = 12          # fewer covered pixels: no object in that frame
MIN_CONTRAST = 40.0             # a pixel differing less than this (max over RGB) from the background is background
MIN_TRAVEL_FRACTION = 0.15      # the least movement (fraction of the frame) that counts as "moving"
PARAMETERS = {
    "colour": "nearest palette colour (RGB) to the median of pixels covered > 75%",
    "shape": "per-frame best soft IoU with circle/square/triangle of the object's area and centroid; "
             "majority of frames",
    "motion": "least-squares centroid slope; dominant axis and sign; travel >= "
              f"{MIN_TRAVEL_FRACTION:g} of the frame",
    "min_object_pixels": MIN_OBJECT_PIXELS, "min_contrast": MIN_CONTRAST,
}


@dataclass(frozen=True)
class Judgement:
    """What the judge saw in one video and whether it matches the prompt.

    Attributes:
        colour, shape, direction: what the video shows (``"none"`` when no object was found;
            direction ``"static"`` when it does not move far enough).
        colour_ok, shape_ok, motion_ok: each against the prompt; ``ok``: all three.
        travel: the centroid's movement over the clip along its dominant axis, in frames' widths.
        shape_iou: the mean IoU of the winning shape over the frames where it won.
    """

    colour: str
    shape: str
    direction: str
    colour_ok: bool
    shape_ok: bool
    motion_ok: bool
    ok: bool
    travel: float
    shape_iou: float


def _coverage(frame: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """Coverage in [0, 1] per pixel of the object in one frame, or None without an object."""
    pixels = frame.reshape(-1, 3).astype(np.float64)
    diff = np.abs(pixels - background).max(axis=1)
    strong = diff >= max(MIN_CONTRAST, 0.5 * diff.max())
    if strong.sum() < MIN_OBJECT_PIXELS // 2:
        return None
    colour = pixels[strong].mean(axis=0)
    axis = colour - background
    norm = float(axis @ axis)
    if norm < MIN_CONTRAST**2:
        return None
    coverage = np.clip((pixels - background) @ axis / norm, 0.0, 1.0)
    coverage[diff < MIN_CONTRAST / 2] = 0.0
    return coverage.reshape(frame.shape[:2])


# Centroid offset from the bounding-box centre, and bounding-box width from the area, per shape
# (the renderer's geometry: the triangle's centroid is a sixth of its height below the box centre).
_WIDTH_FROM_AREA = {"circle": lambda a: np.sqrt(4 * a / np.pi), "square": np.sqrt, "triangle": lambda a: np.sqrt(2 * a)}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}


def _best_shape(coverage: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    """The shape whose template, of the same area and centroid as ``coverage``, overlaps it most
    (soft IoU: sum of minima over sum of maxima). Area and centroid survive blur and noise."""
    ys, xs = np.nonzero(coverage)
    pad = 4  # templates are drawn on a crop around the object: the same sums, a fraction of the work
    y0, x0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
    coverage = coverage[y0:int(ys.max()) + pad + 1, x0:int(xs.max()) + pad + 1]
    cx, cy = cx - x0, cy - y0
    area = float(coverage.sum())
    scores = {}
    for shape in SHAPES:
        width = float(_WIDTH_FROM_AREA[shape](area))
        template = shape_mask(shape, coverage.shape, cx, cy - _CENTROID_DROP[shape] * width, width, supersample=2)
        scores[shape] = float(np.minimum(template, coverage).sum() / max(np.maximum(template, coverage).sum(), 1e-9))
    best = max(scores, key=scores.get)
    return best, scores[best]


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def observe(frames: np.ndarray) -> dict:
    """What a video shows: ``colour``, ``shape``, ``direction``, ``travel``, ``shape_iou``.

    Args:
        frames: uint8 (F, H, W, 3) RGB.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (F, H, W, 3), got {frames.shape}")
    size = max(frames.shape[1:3])
    centroids, colours, shapes = [], [], []
    backgrounds = np.median(frames.reshape(len(frames), -1, 3), axis=1)  # the object covers a few percent
    ys, xs = np.mgrid[:frames.shape[1], :frames.shape[2]] + 0.5  # pixel centres, as the renderer draws
    for index, frame in enumerate(frames):
        coverage = _coverage(frame, backgrounds[index])
        if coverage is None:
            continue
        mask = coverage > 0.5
        if mask.sum() < MIN_OBJECT_PIXELS:
            continue
        weight = coverage.sum()
        cx, cy = (coverage * xs).sum() / weight, (coverage * ys).sum() / weight
        centroids.append((index, cx, cy))
        core = coverage > 0.75
        colours.append(np.median(frame[core if core.sum() >= 4 else mask].reshape(-1, 3).astype(np.float64), axis=0))
        shapes.append(_best_shape(coverage, cx, cy))
    if len(centroids) < max(2, len(frames) // 2):
        return {"colour": "none", "shape": "none", "direction": "none", "travel": 0.0, "shape_iou": 0.0}
    colour = _nearest_colour(np.median(np.stack(colours), axis=0))
    votes = Counter(s for s, _ in shapes)
    shape = max(votes, key=lambda s: (votes[s], np.mean([iou for n, iou in shapes if n == s])))
    shape_iou = float(np.mean([iou for n, iou in shapes if n == shape]))
    t, cx, cy = (np.asarray(c, dtype=np.float64) for c in zip(*centroids))
    span = len(frames) - 1
    dx, dy = (np.polyfit(t, c, 1)[0] * span for c in (cx, cy))
    if abs(dx) >= abs(dy):
        direction, travel = ("right" if dx > 0 else "left"), abs(dx) / size
    else:
        direction, travel = ("down" if dy > 0 else "up"), abs(dy) / size
    if travel < MIN_TRAVEL_FRACTION:
        direction = "static"
    return {"colour": colour, "shape": shape, "direction": direction, "travel": float(travel), "shape_iou": shape_iou}


def judge_video(frames: np.ndarray, spec: ShapeSpec) -> Judgement:
    """Judge one video against the combination its prompt asked for."""
    seen = observe(frames)
    colour_ok, shape_ok, motion_ok = (seen["colour"] == spec.colour, seen["shape"] == spec.shape,
                                      seen["direction"] == spec.direction)
    return Judgement(seen["colour"], seen["shape"], seen["direction"], colour_ok, shape_ok, motion_ok,
                     colour_ok and shape_ok and motion_ok, round(seen["travel"], 4), round(seen["shape_iou"], 4))


def prompt_tags(prompt: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """A prompt's tags: its colour, shape and motion (when it is a shapes prompt) and ``extra``."""
    spec = parse_prompt(prompt)
    tags = spec.tags() if spec else []
    return tags + [t for t in extra if t not in tags]


def adherence_row(frames: np.ndarray, prompt: str) -> dict | None:
    """The per-video adherence columns for ``frames`` generated from ``prompt``; None when the
    prompt is not one of the shapes world (nothing to judge)."""
    spec = parse_prompt(prompt)
    if spec is None:
        return None
    v = judge_video(frames, spec)
    return {"adherence": float(v.ok), "adherence_colour": float(v.colour_ok), "adherence_shape": float(v.shape_ok),
            "adherence_motion": float(v.motion_ok), "seen_colour": v.colour, "seen_shape": v.shape,
            "seen_motion": v.direction, "travel": v.travel, "shape_iou": v.shape_iou}


ADHERENCE_METRICS = ("adherence", "adherence_colour", "adherence_shape", "adherence_motion")


def summarize_adherence(videos: pd.DataFrame, prompts: dict[str, str], tags: dict[str, list[str]]) -> pd.DataFrame:
    """Per variant: adherence rates, the worst prompt and the tag it fails most.

    Args:
        videos: per-video rows with ``variant``, ``prompt_id`` and the adherence columns.
        prompts: prompt id -> text; tags: prompt id -> tags.

    Returns:
        one row per variant: the four rates, ``adherence_failed`` (how many videos),
        ``adherence_worst_prompt`` (the prompt with the lowest rate, '' when none failed),
        ``adherence_worst_tag`` (the tag on most failed videos, alphabetically first on a tie; ''
        when none failed) and
        ``adherence_failed_prompts`` ('; '-joined prompt texts with a failed video).
    """
    rows = []
    for variant, group in videos.groupby("variant", sort=False):
        judged = group.dropna(subset=["adherence"])
        if not len(judged):
            continue
        failed = judged[judged["adherence"] < 1]
        row = {"variant": variant, **{m: float(judged[m].mean()) for m in ADHERENCE_METRICS},
               "adherence_failed": int(len(failed))}
        if len(failed):
            by_prompt = judged.groupby("prompt_id", sort=True)["adherence"].mean()
            worst = by_prompt.idxmin()
            counts = Counter(tag for pid in failed["prompt_id"] for tag in tags.get(pid, []))
            row["adherence_worst_prompt"] = prompts.get(worst, worst)
            row["adherence_worst_tag"] = min(counts, key=lambda t: (-counts[t], t)) if counts else ""  # ties: A-Z
            row["adherence_failed_prompts"] = "; ".join(prompts.get(p, p) for p in dict.fromkeys(failed["prompt_id"]))
        else:
            row.update(adherence_worst_prompt="", adherence_worst_tag="", adherence_failed_prompts="")
        rows.append(row)
    return pd.DataFrame(rows)
