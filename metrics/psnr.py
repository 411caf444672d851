"""PSNR of uint8 frames against reference frames, per frame and per video.

PSNR = 10 log10(255^2 / MSE). Identical frames have MSE 0 and an infinite PSNR; it is returned
as ``inf`` (never NaN) and callers that tabulate it apply ``cap_db`` and flag it. Matches
``skimage.metrics.peak_signal_noise_ratio(ref, cand, data_range=255)`` (checked in tests).

Example::

    per_frame = psnr_frames(reference, candidate)     # float64 (F,)
    psnr_video(reference, candidate)                  # from the mean MSE over frames
"""

from __future__ import annotations

import numpy as np

DATA_RANGE = 255.0
CAP_DB = 100.0  # the value shown for identical frames where a finite number is needed


def _check_pair(reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise ValueError(f"video shapes differ: reference {reference.shape} vs candidate {candidate.shape}")
    if reference.ndim != 4:
        raise ValueError(f"expected (F, H, W, C) frames, got shape {reference.shape}")


def mse_frames(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Mean squared error of each frame, float64 (F,)."""
    _check_pair(reference, candidate)
    diff = reference.astype(np.float64) - candidate.astype(np.float64)
    return np.mean(diff * diff, axis=(1, 2, 3))


def _psnr_from_mse(mse: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(DATA_RANGE**2 / np.where(mse == 0, 1.0, mse)))


def psnr_frames(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """PSNR in dB of each frame, float64 (F,); ``inf`` where the frames are identical."""
    return _psnr_from_mse(mse_frames(reference, candidate))


def psnr_video(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of the whole video, from the mean MSE over its frames."""
    return float(_psnr_from_mse(np.array([mse_frames(reference, candidate).mean()]))[0])
