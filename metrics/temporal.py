"""Temporal metrics: is the motion right, and does the candidate flicker?

- Motion fidelity compares frame differences. For each t >= 1, d_t = frame_t - frame_{t-1}
  (signed, in 8-bit levels) for reference and candidate. ``motion_psnr_db`` is
  10 log10(255^2 / mean((d_cand - d_ref)^2)) (inf when the motion is identical), and
  ``motion_ssim`` is the SSIM (same parameters as frame SSIM, ``data_range`` 255) of the
  differences mapped to [0, 255] by (d + 255) / 2.
- Flicker is a change between consecutive frames that the reference does not have:
  ``flicker_excess`` = max(0, mean|d_cand| - mean|d_ref|) in 8-bit levels; a frame is flagged
  when it exceeds ``FLICKER_LEVELS``.

Frame 0 has no predecessor: its temporal values are NaN (not applicable), never 0.

Example::

    t = temporal_frames(reference, candidate)
    t["motion_psnr_db"][1:], t["flicker_flag"].sum()
"""

from __future__ import annotations

import numpy as np

from metrics.psnr import DATA_RANGE
from metrics.ssim import ssim_frames

FLICKER_LEVELS = 2.0

PARAMETERS = {
    "motion_psnr": "PSNR of candidate vs reference frame differences, peak 255",
    "motion_ssim": "SSIM of frame differences mapped by (d + 255) / 2, data_range 255",
    "flicker_excess": "max(0, mean|d_cand| - mean|d_ref|) in 8-bit levels",
    "flicker_threshold_levels": FLICKER_LEVELS,
}


def _differences(frames: np.ndarray) -> np.ndarray:
    return frames[1:].astype(np.int16) - frames[:-1].astype(np.int16)


def temporal_frames(reference: np.ndarray, candidate: np.ndarray, flicker_levels: float = FLICKER_LEVELS) -> dict[str, np.ndarray]:
    """Per-frame temporal metrics (arrays of length F; frame 0 is NaN/False).

    Returns:
        ``motion_psnr_db``, ``motion_ssim``, ``flicker_excess`` (float64) and ``flicker_flag`` (bool).
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"video shapes differ: reference {reference.shape} vs candidate {candidate.shape}")
    count = reference.shape[0]
    out = {k: np.full(count, np.nan) for k in ("motion_psnr_db", "motion_ssim", "flicker_excess")}
    out["flicker_flag"] = np.zeros(count, dtype=bool)
    if count < 2:
        return out
    d_ref, d_cand = _differences(reference), _differences(candidate)
    err = (d_cand.astype(np.float64) - d_ref).reshape(count - 1, -1)
    mse = np.mean(err * err, axis=1)
    with np.errstate(divide="ignore"):
        out["motion_psnr_db"][1:] = np.where(mse == 0, np.inf, 10 * np.log10(DATA_RANGE**2 / np.where(mse == 0, 1, mse)))
    out["motion_ssim"][1:] = ssim_frames((d_ref + 255) / 2.0, (d_cand + 255) / 2.0)
    mad = lambda d: np.abs(d).reshape(count - 1, -1).mean(axis=1)  # noqa: E731
    out["flicker_excess"][1:] = np.maximum(0.0, mad(d_cand) - mad(d_ref))
    out["flicker_flag"][1:] = out["flicker_excess"][1:] > flicker_levels
    return out
