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

from metrics import fused

DATA_RANGE = 255.0
CAP_DB = 100.0  # the value shown for identical frames where a finite number is needed

PARAMETERS = {
    "implementation": "quant-audit metrics.psnr (metrics.fused: exact int64 sum of squares)",
    "reference_implementation": "skimage.metrics.peak_signal_noise_ratio(data_range=255); ffmpeg psnr filter",
    "data_range": DATA_RANGE, "colour_space": "RGB, all channels", "identical_frames": f"inf, capped at {CAP_DB:g} dB in means and flagged",
    "video_psnr": "from the mean MSE over frames",
}


def _check_pair(reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise ValueError(f"video shapes differ: reference {reference.shape} vs candidate {candidate.shape}")
    if reference.ndim != 4:
        raise ValueError(f"expected (F, H, W, C) frames, got shape {reference.shape}")


def mse_frames(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Mean squared error of each frame, float64 (F,).

    uint8 frames are summed exactly in int64 (``metrics.fused``, every core); other dtypes are
    computed in float64.
    """
    _check_pair(reference, candidate)
    size = float(np.prod(reference.shape[1:]))
    if reference.dtype == np.uint8 and candidate.dtype == np.uint8 and fused.device() != "cpu":
        from metrics.torch_kernels import squared_errors

        return squared_errors(reference, candidate, fused.device()) / size
    if reference.dtype == np.uint8 and candidate.dtype == np.uint8:
        return np.array([fused.squared_error(r, c) / size for r, c in zip(reference, candidate)], dtype=np.float64)
    out = np.empty(reference.shape[0], dtype=np.float64)
    for i, (r, c) in enumerate(zip(reference, candidate)):
        diff = r.astype(np.float64) - c.astype(np.float64)
        out[i] = np.mean(diff * diff)
    return out


def _psnr_from_mse(mse: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(DATA_RANGE**2 / np.where(mse == 0, 1.0, mse)))


def psnr_frames(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """PSNR in dB of each frame, float64 (F,); ``inf`` where the frames are identical."""
    return _psnr_from_mse(mse_frames(reference, candidate))


def psnr_video(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of the whole video, from the mean MSE over its frames."""
    return float(_psnr_from_mse(np.array([mse_frames(reference, candidate).mean()]))[0])
