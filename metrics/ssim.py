"""SSIM per frame, as Wang et al. 2004 and as scikit-image computes it, only faster.

Parameters (scikit-image's "match the paper" configuration): Gaussian window sigma 1.5
(11 taps, truncate 3.5), K1 0.01, K2 0.03, ``data_range`` 255, population covariance. The SSIM
map is averaged over the region scikit-image keeps (a 5-pixel border cropped), then over RGB
channels (``colour="rgb"``) or computed on BT.601 luma (``colour="luma"``,
Y = 0.299 R + 0.587 G + 0.114 B, full range, unrounded).

How it stays equal to ``skimage.metrics.structural_similarity`` while being faster:
- The cropped border equals the filter radius, so every kept value's window lies inside the
  frame: the border mode cannot matter, and only that region is averaged.
- Four Gaussian filters instead of five: the formula needs sigma_x^2 + sigma_y^2 only as a sum,
  so x^2 + y^2 is filtered once. Filters are OpenCV's SIMD ``sepFilter2D`` in float32.
- Each channel is centred on its own mean (a float32 value; subtracting it from 8-bit values is
  exact) before the float32 filters, which keeps the cancellation in E[x^2] - E[x]^2 small; the
  means are added back to mu exactly.
- The map is formed in one numexpr pass; the average is accumulated in float64.
Tests check agreement with scikit-image to 1e-6 on noise, blur, shifts, brightness, constant,
identical and odd-sized frames.

Frames smaller than the 11x11 window have no SSIM, as in scikit-image: ``ValueError``.

Example::

    values = ssim_frames(reference, candidate)            # float64 (F,), mean over RGB
    luma = ssim_frames(reference, candidate, colour="luma")
"""

from __future__ import annotations

import cv2
import numexpr
import numpy as np

SIGMA = 1.5
TRUNCATE = 3.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # scipy.ndimage's rule, as scikit-image uses: 5
WINDOW = 2 * RADIUS + 1  # 11
LUMA_BT601 = (0.299, 0.587, 0.114)
COLOURS = ("rgb", "luma")

PARAMETERS = {
    "implementation": "quant-audit metrics.ssim (OpenCV float32 separable Gaussian, numexpr map, float64 mean)",
    "reference_implementation": "skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, "
                                "use_sample_covariance=False, data_range=255)",
    "gaussian_sigma": SIGMA, "window": WINDOW, "K1": K1, "K2": K2, "data_range": DATA_RANGE,
    "covariance": "population", "border_cropped": RADIUS,
}


def _kernel() -> np.ndarray:
    x = np.arange(-RADIUS, RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / SIGMA**2)
    return (w / w.sum()).astype(np.float32)


_KERNEL = _kernel()
_C1 = (K1 * DATA_RANGE) ** 2
_C2 = (K2 * DATA_RANGE) ** 2
_MAP = "((2 * ux * uy + c1) * (2 * (sxy - mx * my) + c2)) / ((ux * ux + uy * uy + c1) * (sq - mx * mx - my * my + c2))"


def _blur(image: np.ndarray) -> np.ndarray:
    """Gaussian filter of an (H, W[, C]) float32 image (same size; only the valid region is used)."""
    return cv2.sepFilter2D(image, cv2.CV_32F, _KERNEL, _KERNEL, borderType=cv2.BORDER_REFLECT)


def _add_channels(image: np.ndarray, per_channel: np.ndarray) -> np.ndarray:
    """``image + per_channel`` (one value per channel), with OpenCV's scalar add: numpy and numexpr
    broadcasting over the channel axis is several times slower on these arrays."""
    return cv2.add(image, tuple(float(v) for v in per_channel) + (0.0,) * (4 - len(per_channel)))


def _frame_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of one (H, W, C) or (H, W) float32 frame pair, averaged over channels."""
    channels = x.shape[2] if x.ndim == 3 else 1
    cx = np.asarray(cv2.mean(x)[:channels], dtype=np.float32)
    cy = np.asarray(cv2.mean(y)[:channels], dtype=np.float32)
    xc, yc = _add_channels(x, -cx), _add_channels(y, -cy)  # exact in float32 for 8-bit values
    mx, my = _blur(xc), _blur(yc)
    sq = _blur(numexpr.evaluate("xc * xc + yc * yc"))
    sxy = _blur(numexpr.evaluate("xc * yc"))
    ux, uy = _add_channels(mx, cx), _add_channels(my, cy)  # mu, exactly: the centres come back
    ssim_map = numexpr.evaluate(_MAP, local_dict={"ux": ux, "uy": uy, "mx": mx, "my": my, "sq": sq, "sxy": sxy,
                                                   "c1": np.float32(_C1), "c2": np.float32(_C2)})
    valid = ssim_map[RADIUS:-RADIUS, RADIUS:-RADIUS]  # windows inside the frame, as scikit-image crops
    # SSIM <= 1 by definition; float32 rounding of an identical pair can land 1e-8 above it.
    return min(1.0, max(-1.0, float(np.mean(cv2.mean(valid)[:channels]))))


def _luma(frame: np.ndarray) -> np.ndarray:
    r, g, b = LUMA_BT601
    f = frame.astype(np.float64)
    return (f[..., 0] * r + f[..., 1] * g + f[..., 2] * b).astype(np.float32)


def check_frame_size(shape: tuple[int, ...]) -> None:
    """Raise ValueError when (F, H, W, 3) frames are smaller than the SSIM window."""
    height, width = shape[1], shape[2]
    if height < WINDOW or width < WINDOW:
        raise ValueError(f"frames of {height}x{width} are smaller than the {WINDOW}x{WINDOW} SSIM window")


def ssim_frames(reference: np.ndarray, candidate: np.ndarray, colour: str = "rgb") -> np.ndarray:
    """SSIM of each frame of ``candidate`` against ``reference``, one frame at a time.

    Args:
        reference, candidate: uint8 (F, H, W, 3), same shape.
        colour: ``"rgb"`` (mean of the three channels' SSIM) or ``"luma"`` (BT.601 Y).

    Returns:
        float64 (F,).

    Raises:
        ValueError: different shapes, not (F, H, W, 3), frames smaller than 11x11, unknown colour.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"video shapes differ: reference {reference.shape} vs candidate {candidate.shape}")
    if reference.ndim != 4 or reference.shape[-1] != 3:
        raise ValueError(f"expected (F, H, W, 3) frames, got shape {reference.shape}")
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {COLOURS}, got {colour!r}")
    check_frame_size(reference.shape)
    prepare = _luma if colour == "luma" else (lambda f: f.astype(np.float32))
    return np.array([_frame_ssim(prepare(r), prepare(c)) for r, c in zip(reference, candidate)], dtype=np.float64)


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 full-range luma of uint8 RGB frames as ``colour="luma"`` computes it, float32 (F, H, W)."""
    return np.stack([_luma(f) for f in frames]) if len(frames) else np.zeros((0,) + frames.shape[1:3], np.float32)
