"""Fused SSIM and squared error on CPU: one pass over row strips, float64 throughout, every core.

What scikit-image computes (``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)``) in float64, without its full-frame temporaries:

- each worker takes a strip of output rows; per input row it converts the row to float64 once,
  forms ``x``, ``y``, ``x^2 + y^2`` and ``x y`` and filters them horizontally (11 taps, the
  Gaussian's symmetry folded) into a ring of 11 rows; each output row is the ring filtered
  vertically, turned into the SSIM map and summed per channel. Nothing larger than a row is
  written; memory is flat in the frame count (one frame pair at a time).
- the image is handled interleaved (``H x W*C``): a horizontal tap is ``C`` values away, so every
  loop runs over contiguous memory and LLVM vectorises it.
- the same map as scikit-image's, kept where the window lies inside the frame (a 5-pixel border
  cropped), per-channel means then the mean over channels. Per-row sums are added in row order,
  so the result does not depend on the number of threads.
- squared error is summed in int64 (exact) per channel over the whole frame.

No fast-math flags: no reassociation and no FMA contraction, so every x86-64 CPU computes the same
bits (vector width changes no elementwise result).

Example::

    ssim, sq_err = frame_stats(reference_frame, candidate_frame)   # per-channel SSIM and squared-error sums
"""

from __future__ import annotations

import numba
import numpy as np

SIGMA, TRUNCATE = 1.5, 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # 5, scipy.ndimage's rule
K1, K2, DATA_RANGE = 0.01, 0.03, 255.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2


def gaussian_taps() -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel for sigma 1.5, truncate 3.5 (11 taps, float64)."""
    x = np.arange(-RADIUS, RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / SIGMA**2)
    return w / w.sum()


_TAPS = gaussian_taps()


@numba.njit(cache=True, nogil=True)
def _horizontal(src, dst, taps, step, lo, hi):
    """dst[j] = sum_k taps[k] * src[j + (k - 5) * step] for j in [lo, hi) (symmetric taps folded)."""
    t0, t1, t2, t3, t4, t5 = taps[0], taps[1], taps[2], taps[3], taps[4], taps[5]
    s1, s2, s3, s4, s5 = step, 2 * step, 3 * step, 4 * step, 5 * step
    for j in range(lo, hi):
        dst[j] = (t5 * src[j] + t4 * (src[j - s1] + src[j + s1]) + t3 * (src[j - s2] + src[j + s2])
                  + t2 * (src[j - s3] + src[j + s3]) + t1 * (src[j - s4] + src[j + s4])
                  + t0 * (src[j - s5] + src[j + s5]))


@numba.njit(cache=True, nogil=True)
def _vertical(ring, slots, dst, taps, lo, hi):
    """dst[j] = sum_k taps[k] * ring[slots[k], j] for j in [lo, hi)."""
    t0, t1, t2, t3, t4, t5 = taps[0], taps[1], taps[2], taps[3], taps[4], taps[5]
    r0, r1, r2, r3, r4 = ring[slots[0]], ring[slots[1]], ring[slots[2]], ring[slots[3]], ring[slots[4]]
    r5 = ring[slots[5]]
    r6, r7, r8, r9, r10 = ring[slots[6]], ring[slots[7]], ring[slots[8]], ring[slots[9]], ring[slots[10]]
    for j in range(lo, hi):
        dst[j] = (t5 * r5[j] + t4 * (r4[j] + r6[j]) + t3 * (r3[j] + r7[j]) + t2 * (r2[j] + r8[j])
                  + t1 * (r1[j] + r9[j]) + t0 * (r0[j] + r10[j]))


@numba.njit(cache=True, nogil=True)
def _strip(x, y, channels, taps, first, last, row_sums):
    """SSIM row sums (per channel) of output rows [first, last) into row_sums[row - RADIUS, c]."""
    n = x.shape[1]
    lo, hi = RADIUS * channels, n - RADIUS * channels
    window = 2 * RADIUS + 1
    xs, ys = np.empty(n), np.empty(n)
    qs, ps = np.empty(n), np.empty(n)
    ring_x, ring_y = np.empty((window, n)), np.empty((window, n))
    ring_q, ring_p = np.empty((window, n)), np.empty((window, n))
    mx, my, mq, mp = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    slots = np.empty(window, np.int64)
    for r in range(first - RADIUS, last + RADIUS):
        for j in range(n):
            a = np.float64(x[r, j])
            b = np.float64(y[r, j])
            xs[j] = a
            ys[j] = b
            qs[j] = a * a + b * b
            ps[j] = a * b
        slot = r % window
        _horizontal(xs, ring_x[slot], taps, channels, lo, hi)
        _horizontal(ys, ring_y[slot], taps, channels, lo, hi)
        _horizontal(qs, ring_q[slot], taps, channels, lo, hi)
        _horizontal(ps, ring_p[slot], taps, channels, lo, hi)
        out = r - RADIUS  # the output row whose window this input row completes
        if out < first:
            continue
        for k in range(window):
            slots[k] = (out - RADIUS + k) % window
        _vertical(ring_x, slots, mx, taps, lo, hi)
        _vertical(ring_y, slots, my, taps, lo, hi)
        _vertical(ring_q, slots, mq, taps, lo, hi)
        _vertical(ring_p, slots, mp, taps, lo, hi)
        for j in range(lo, hi):
            ux, uy = mx[j], my[j]
            uxy = ux * uy
            uu = ux * ux + uy * uy
            # scikit-image: S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2))
            mx[j] = ((2.0 * uxy + C1) * (2.0 * (mp[j] - uxy) + C2)) / ((uu + C1) * (mq[j] - uu + C2))
        for c in range(channels):
            total = 0.0
            for j in range(lo + c, hi, channels):
                total += mx[j]
            row_sums[out - RADIUS, c] = total


@numba.njit(cache=True, parallel=True, nogil=True)
def _ssim_sums(x, y, channels, taps, blocks):
    """Per-channel sums of the SSIM map over the valid region, and the number of values summed."""
    height = x.shape[0]
    rows = height - 2 * RADIUS
    row_sums = np.zeros((rows, channels))
    per_block = (rows + blocks - 1) // blocks
    for b in numba.prange(blocks):
        first = RADIUS + b * per_block
        last = min(first + per_block, height - RADIUS)
        if first < last:
            _strip(x, y, channels, taps, first, last, row_sums)
    sums = np.zeros(channels)
    for i in range(rows):  # in row order: the same sum for any number of threads
        for c in range(channels):
            sums[c] += row_sums[i, c]
    return sums


@numba.njit(cache=True, parallel=True, nogil=True)
def _squared_error(x, y, channels):
    """Per-channel sums of (x - y)^2 over the whole frame, exact (int64)."""
    height, n = x.shape
    rows = np.zeros((height, channels), np.int64)
    for r in numba.prange(height):
        for j in range(n):
            d = np.int64(x[r, j]) - np.int64(y[r, j])
            rows[r, j % channels] += d * d
    out = np.zeros(channels, np.int64)
    for r in range(height):
        for c in range(channels):
            out[c] += rows[r, c]
    return out


def _interleaved(frame: np.ndarray) -> tuple[np.ndarray, int]:
    frame = np.ascontiguousarray(frame)
    channels = frame.shape[2] if frame.ndim == 3 else 1
    return frame.reshape(frame.shape[0], frame.shape[1] * channels), channels


def ssim_frame(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-channel mean SSIM of one (H, W[, C]) frame pair (uint8 or float), float64 (C,)."""
    x, channels = _interleaved(reference)
    y, _ = _interleaved(candidate)
    height, width = reference.shape[0], reference.shape[1]
    blocks = min(max(1, numba.get_num_threads()) * 4, height - 2 * RADIUS)
    sums = _ssim_sums(x, y, channels, _TAPS, blocks)
    return sums / ((height - 2 * RADIUS) * (width - 2 * RADIUS))


def squared_error(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-channel sum of squared differences of one uint8 frame pair, int64 (C,), exact."""
    x, channels = _interleaved(reference)
    y, _ = _interleaved(candidate)
    return _squared_error(x, y, channels)
