"""PSNR agrees with scikit-image, and identical frames give inf, never NaN or a crash."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from metrics.psnr import psnr_frames, psnr_video

rng = np.random.default_rng(0)


def _pairs():
    base = rng.integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
    noisy = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    brighter = np.clip(base.astype(int) + 9, 0, 255).astype(np.uint8)
    shifted = np.roll(base, 1, axis=2)
    return {"noise": (base, noisy), "brightness": (base, brighter), "shift": (base, shifted)}


@pytest.mark.parametrize("kind", ["noise", "brightness", "shift"])
def test_psnr_matches_skimage(kind):
    reference, candidate = _pairs()[kind]
    ours = psnr_frames(reference, candidate)
    theirs = [peak_signal_noise_ratio(r, c, data_range=255) for r, c in zip(reference, candidate)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    whole = peak_signal_noise_ratio(reference, candidate, data_range=255)
    assert abs(psnr_video(reference, candidate) - whole) < 1e-6


def test_identical_frames_are_infinite_not_nan():
    frames = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    other = frames.copy()
    other[1, 0, 0, 0] ^= 1
    values = psnr_frames(frames, other)
    assert np.isinf(values[0]) and np.isfinite(values[1]) and not np.isnan(values).any()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_frames(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 9, 3), np.uint8))
