"""A still frame strip of one prompt from a finished run: reference | variant | difference, a row per frame.

For READMEs and reviews where an animated report does not fit. The difference uses the report's
colour map and gain (``reports.html``).

Usage::

    python -m reports.strip runs/<run_id> --variant int8 --prompt p00 --frames 0,8,16 --scale 3 --out strip.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from reports.html import DIFF_GAIN, compare_frames


def frame_strip(reference: np.ndarray, candidate: np.ndarray, frames: list[int], scale: int = 3) -> np.ndarray:
    """uint8 RGB image: for each frame index a row of the report's playback (``compare_frames``),
    rows 2 pixels apart, every pixel repeated ``scale`` times."""
    panels = compare_frames(reference[frames], candidate[frames])
    gap = np.full((2, panels.shape[2], 3), 255, np.uint8)
    rows = [part for panel in panels for part in (panel, gap)][:-1]
    return np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)


def main(argv: list[str] | None = None) -> int:
    from quant.pipeline.video_io import load_frames

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--prompt", default="p00", help="prompt id (p00 = the first eval prompt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", default="0,8,16", help="comma-separated frame indices")
    parser.add_argument("--scale", type=int, default=3, help="pixel repetition (nearest neighbour)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    name = f"{args.prompt}_s{args.seed}.npz"
    reference = load_frames(args.run_dir / "videos" / "torch" / name)
    candidate = load_frames(args.run_dir / "videos" / args.variant / name)
    frames = [int(f) for f in args.frames.split(",")]
    Image.fromarray(frame_strip(reference, candidate, frames, args.scale)).save(args.out, optimize=True)
    print(f"wrote {args.out}: reference | {args.variant} | difference x{DIFF_GAIN}, frames {frames}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
