"""Tensor metrics: signal-to-quantization-noise ratio (SQNR) of a tensor against a reference.

SQNR = 10 log10(sum(ref^2) / sum((cand - ref)^2)) dB, as torchao's ``compute_error``. Identical
tensors give ``inf``; a candidate with NaN/Inf gives ``-inf`` (the worst possible value, so it
fails every gate instead of vanishing from a mean).

Example::

    sqnr_db(int8_latents, fp32_latents)   # 31.2
"""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(candidate: np.ndarray, reference: np.ndarray) -> float:
    """SQNR in dB of ``candidate`` against ``reference`` (same shape)."""
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes differ: candidate {candidate.shape} vs reference {reference.shape}")
    if not np.isfinite(candidate).all():
        return -math.inf
    noise = float(np.sum((candidate - reference) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
