"""Fused SSIM and squared error on CPU: one pass over row strips, float64 throughout, every core.

What scikit-image computes (``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)``) in float64, without its full-frame temporaries:

- each worker takes a strip of output rows, and goes through it in column tiles sized to a third
  of the L2 cache; per input row of a tile it converts the row to float64 once, forms ``x``,
  ``y``, ``x^2 + y^2`` and ``x y`` and filters them horizontally (11 taps, the Gaussian's symmetry
  folded) into a ring of rows; output rows are the ring filtered vertically, four at a time (each
  ring row loaded once for the four), turned into the SSIM map and summed per channel in chunks
  of ``CHUNK`` pixels. Nothing larger than a tile's row is written; memory is flat in the frame
  count (one frame pair at a time).
- the image is handled interleaved (``H x W*C``): a horizontal tap is ``C`` values away, so every
  loop runs over contiguous memory and LLVM vectorises it.
- the same map as scikit-image's, kept where the window lies inside the frame (a 5-pixel border
  cropped), per-channel means then the mean over channels. Chunk sums are added in row order,
  then chunk order, so the result depends neither on the number of threads nor on the tiles
  (the cache size).
- squared error is summed in int64 (exact) over the whole frame.

No fast-math flags: no reassociation and no FMA contraction, so every x86-64 CPU computes the same
bits (vector width changes no elementwise result).

Example::

    ssim_frame(reference_frame, candidate_frame)      # per-channel mean SSIM, float64 (C,)
    squared_error(reference_frame, candidate_frame)   # sum of squared differences, exact int
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np

SIGMA, TRUNCATE = 1.5, 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # 5: scipy.ndimage's rule, as scikit-image uses
K1, K2, DATA_RANGE = 0.01, 0.03, 255.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2


def gaussian_taps() -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel for sigma 1.5, truncate 3.5 (11 taps, float64)."""
    x = np.arange(-RADIUS, RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / SIGMA**2)
    return w / w.sum()


_TAPS = gaussian_taps()
CHUNK = 32  # pixels: the SSIM map is summed in row chunks of this many, then the chunks in order
_DEVICE = "cpu"  # where metrics.ssim and metrics.psnr compute: "cpu" (these kernels) or "cuda" (metrics.torch_kernels)


def set_device(device: str) -> None:
    """Compute SSIM and squared error on ``device``: ``"cpu"`` (numba, here) or a torch device
    such as ``"cuda"`` (``metrics.torch_kernels``, the same numbers). Set by ``[runtime] device``."""
    global _DEVICE
    _DEVICE = device


def device() -> str:
    return _DEVICE


# The loops below index 0-based views of the shifted inputs (``src[lo + d : hi + d]``), never
# ``src[j - d]``: numba wraps negative indices, and that check alone keeps LLVM from vectorising
# (4.7x slower on a 720p frame, measured). ``error_model="numpy"``: numba's default ("python")
# guards every float division with a ZeroDivisionError branch, which keeps the SSIM map's loop
# scalar (3.2 ns a value against 0.95 vectorised, measured). No denominator here can be zero:
# (uu + C1) >= C1, and the variance sum vq - uu is >= 0 up to rounding, far above -C2.

@numba.njit(cache=True, nogil=True, error_model="numpy")
def _horizontal(src, dst, taps, step, lo, hi):
    """dst[j] = sum_k taps[k] * src[j + (k - 5) * step] for j in [lo, hi) (symmetric taps folded)."""
    t0, t1, t2, t3, t4, t5 = taps[0], taps[1], taps[2], taps[3], taps[4], taps[5]
    m = hi - lo
    c = src[lo:hi]
    a1, b1 = src[lo - step:hi - step], src[lo + step:hi + step]
    a2, b2 = src[lo - 2 * step:hi - 2 * step], src[lo + 2 * step:hi + 2 * step]
    a3, b3 = src[lo - 3 * step:hi - 3 * step], src[lo + 3 * step:hi + 3 * step]
    a4, b4 = src[lo - 4 * step:hi - 4 * step], src[lo + 4 * step:hi + 4 * step]
    a5, b5 = src[lo - 5 * step:hi - 5 * step], src[lo + 5 * step:hi + 5 * step]
    out = dst[lo:hi]
    for k in range(m):
        out[k] = (t5 * c[k] + t4 * (a1[k] + b1[k]) + t3 * (a2[k] + b2[k]) + t2 * (a3[k] + b3[k])
                  + t1 * (a4[k] + b4[k]) + t0 * (a5[k] + b5[k]))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _vertical(ring, slots, dst, taps, lo, hi):
    """dst[j] = sum_k taps[k] * ring[slots[k], j] for j in [lo, hi)."""
    t0, t1, t2, t3, t4, t5 = taps[0], taps[1], taps[2], taps[3], taps[4], taps[5]
    r0, r1, r2 = ring[slots[0], lo:hi], ring[slots[1], lo:hi], ring[slots[2], lo:hi]
    r3, r4, r5 = ring[slots[3], lo:hi], ring[slots[4], lo:hi], ring[slots[5], lo:hi]
    r6, r7, r8 = ring[slots[6], lo:hi], ring[slots[7], lo:hi], ring[slots[8], lo:hi]
    r9, r10 = ring[slots[9], lo:hi], ring[slots[10], lo:hi]
    out = dst[lo:hi]
    for k in range(hi - lo):
        out[k] = (t5 * r5[k] + t4 * (r4[k] + r6[k]) + t3 * (r3[k] + r7[k]) + t2 * (r2[k] + r8[k])
                  + t1 * (r1[k] + r9[k]) + t0 * (r0[k] + r10[k]))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _vertical4(ring, slots, d0, d1, d2, d3, taps, lo, hi):
    """Four consecutive output rows from 14 ring rows (``slots[0:14]``), each summed exactly as
    ``_vertical`` sums it: every input row is loaded once for four outputs instead of four times."""
    t0, t1, t2, t3, t4, t5 = taps[0], taps[1], taps[2], taps[3], taps[4], taps[5]
    r0, r1, r2 = ring[slots[0], lo:hi], ring[slots[1], lo:hi], ring[slots[2], lo:hi]
    r3, r4, r5 = ring[slots[3], lo:hi], ring[slots[4], lo:hi], ring[slots[5], lo:hi]
    r6, r7, r8 = ring[slots[6], lo:hi], ring[slots[7], lo:hi], ring[slots[8], lo:hi]
    r9, r10, r11 = ring[slots[9], lo:hi], ring[slots[10], lo:hi], ring[slots[11], lo:hi]
    r12, r13 = ring[slots[12], lo:hi], ring[slots[13], lo:hi]
    o0, o1, o2, o3 = d0[lo:hi], d1[lo:hi], d2[lo:hi], d3[lo:hi]
    for k in range(hi - lo):
        a0, a1, a2, a3, a4, a5, a6 = r0[k], r1[k], r2[k], r3[k], r4[k], r5[k], r6[k]
        a7, a8, a9, a10, a11, a12, a13 = r7[k], r8[k], r9[k], r10[k], r11[k], r12[k], r13[k]
        o0[k] = t5 * a5 + t4 * (a4 + a6) + t3 * (a3 + a7) + t2 * (a2 + a8) + t1 * (a1 + a9) + t0 * (a0 + a10)
        o1[k] = t5 * a6 + t4 * (a5 + a7) + t3 * (a4 + a8) + t2 * (a3 + a9) + t1 * (a2 + a10) + t0 * (a1 + a11)
        o2[k] = t5 * a7 + t4 * (a6 + a8) + t3 * (a5 + a9) + t2 * (a4 + a10) + t1 * (a3 + a11) + t0 * (a2 + a12)
        o3[k] = t5 * a8 + t4 * (a7 + a9) + t3 * (a6 + a10) + t2 * (a5 + a11) + t1 * (a4 + a12) + t0 * (a3 + a13)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _map_row_sums(mx, my, mq, mp, lo, hi, channels, chunk_sums, row, chunk):
    """The SSIM map of one output row's tile from its four moments (into ``mx``), summed per
    channel in chunks of ``CHUNK`` pixels into ``chunk_sums[row, chunk + i, c]``."""
    vx, vy, vq, vp = mx[lo:hi], my[lo:hi], mq[lo:hi], mp[lo:hi]
    for k in range(hi - lo):
        ux, uy = vx[k], vy[k]
        uxy = ux * uy
        uu = ux * ux + uy * uy
        # scikit-image: S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2))
        vx[k] = ((2.0 * uxy + C1) * (2.0 * (vp[k] - uxy) + C2)) / ((uu + C1) * (vq[k] - uu + C2))
    span = CHUNK * channels
    for start in range(lo, hi, span):
        end = min(start + span, hi)
        for c in range(channels):
            total = 0.0
            for j in range(start + c, end, channels):
                total += mx[j]
            chunk_sums[row, chunk, c] = total
        chunk += 1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _strip(x, y, channels, taps, first, last, tile, row_sums):
    """SSIM row sums (per channel) of output rows [first, last), added into row_sums[row - RADIUS, c].

    The rows are made in column tiles of ``tile`` values (a multiple of ``channels``), each tile
    top to bottom, so that the ring of filtered rows stays in the core's L2 cache (a full 720p
    row's ring does not: 1.3x slower, measured). Output rows are made four at a time
    (``_vertical4``: 14 ring rows read once, not 44 reads); the last ``(last - first) % 4`` one at
    a time. Either way each value is the same sum; per row, tiles are added left to right."""
    n = x.shape[1]
    window = 2 * RADIUS + 1
    ring_rows = window + 3  # the 11-row window of four consecutive output rows
    halo = RADIUS * channels
    width = tile + 2 * halo + 8  # a tile and its halo; 8 more keep the ring's rows off one cache set
    xs, ys = np.empty(width), np.empty(width)
    qs, ps = np.empty(width), np.empty(width)
    ring_x, ring_y = np.empty((ring_rows, width)), np.empty((ring_rows, width))
    ring_q, ring_p = np.empty((ring_rows, width)), np.empty((ring_rows, width))
    m = np.empty((16, width))  # four moments x four output rows
    slots = np.empty(ring_rows, np.int64)
    for start in range(halo, n - halo, tile):
        lo, hi = halo, halo + min(tile, n - halo - start)  # the tile's columns in the local buffers
        chunk = (start - halo) // (CHUNK * channels)  # its first chunk of the row's sums
        for r in range(first - RADIUS, last + RADIUS):
            xr, yr = x[r, start - halo:], y[r, start - halo:]
            for j in range(hi + halo):
                a = np.float64(xr[j])
                b = np.float64(yr[j])
                xs[j] = a
                ys[j] = b
                qs[j] = a * a + b * b
                ps[j] = a * b
            slot = r % ring_rows
            _horizontal(xs, ring_x[slot], taps, channels, lo, hi)
            _horizontal(ys, ring_y[slot], taps, channels, lo, hi)
            _horizontal(qs, ring_q[slot], taps, channels, lo, hi)
            _horizontal(ps, ring_p[slot], taps, channels, lo, hi)
            out = r - RADIUS  # the output row whose window this input row completes
            if out < first:
                continue
            if (out - first) % 4 == 3:  # output rows out-3 .. out
                for k in range(ring_rows):
                    slots[k] = (out - 3 - RADIUS + k) % ring_rows
                _vertical4(ring_x, slots, m[0], m[1], m[2], m[3], taps, lo, hi)
                _vertical4(ring_y, slots, m[4], m[5], m[6], m[7], taps, lo, hi)
                _vertical4(ring_q, slots, m[8], m[9], m[10], m[11], taps, lo, hi)
                _vertical4(ring_p, slots, m[12], m[13], m[14], m[15], taps, lo, hi)
                for i in range(4):
                    _map_row_sums(m[i], m[4 + i], m[8 + i], m[12 + i], lo, hi, channels, row_sums,
                                  out - 3 + i - RADIUS, chunk)
            elif out == last - 1:  # the rows left over after the last group of four
                for o in range(out - (out - first) % 4, out + 1):
                    for k in range(window):
                        slots[k] = (o - RADIUS + k) % ring_rows
                    _vertical(ring_x, slots, m[0], taps, lo, hi)
                    _vertical(ring_y, slots, m[4], taps, lo, hi)
                    _vertical(ring_q, slots, m[8], taps, lo, hi)
                    _vertical(ring_p, slots, m[12], taps, lo, hi)
                    _map_row_sums(m[0], m[4], m[8], m[12], lo, hi, channels, row_sums, o - RADIUS, chunk)


@numba.njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _ssim_sums(x, y, channels, taps, blocks, tile):
    """Per-channel sums of the SSIM map over the valid region (windows inside the frame)."""
    height = x.shape[0]
    rows = height - 2 * RADIUS
    chunks = (x.shape[1] // channels - 2 * RADIUS + CHUNK - 1) // CHUNK
    row_sums = np.zeros((rows, chunks, channels))
    per_block = (rows + blocks - 1) // blocks
    for b in numba.prange(blocks):
        first = RADIUS + b * per_block
        last = min(first + per_block, height - RADIUS)
        if first < last:
            _strip(x, y, channels, taps, first, last, tile, row_sums)
    sums = np.zeros(channels)
    for i in range(rows):  # in row order: the same sum for any number of threads
        for k in range(row_sums.shape[1]):
            for c in range(channels):
                sums[c] += row_sums[i, k, c]
    return sums


@numba.njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _squared_error(x, y):
    """Sum of (x - y)^2 over the whole frame, exact (int64; each row's sum vectorises)."""
    height, n = x.shape
    rows = np.zeros(height, np.int64)
    for r in numba.prange(height):
        xr, yr = x[r], y[r]
        total = np.int64(0)
        for j in range(n):
            d = np.int64(xr[j]) - np.int64(yr[j])
            total += d * d
        rows[r] = total
    return rows.sum()


def _l2_bytes() -> int:
    """The L2 cache of CPU 0 (Linux sysfs), 1 MiB where it cannot be read."""
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                return int(size[:-1]) * 1024 if size.endswith("K") else int(size[:-1]) << 20 if size.endswith("M") else int(size)
    except (OSError, ValueError):
        pass
    return 1 << 20


_L2_BYTES = _l2_bytes()
# Bytes of working buffers per value of a tile's width: 4 moments x 14 ring rows, 16 moment rows
# and 4 input rows, float64.
_BYTES_PER_VALUE = (4 * 14 + 16 + 4) * 8


def tile_pixels(width: int, channels: int, l2_bytes: int | None = None) -> int:
    """Width in pixels of the column tiles: a multiple of ``CHUNK`` whose buffers take about a
    third of the L2 cache (a third measured fastest on a 2 MiB L2), tiles of even width across
    the frame. The result's bits do not depend on it (the map is summed in fixed chunks)."""
    budget = (l2_bytes or _L2_BYTES) // 3 // (_BYTES_PER_VALUE * channels)
    widest = max(CHUNK, budget // CHUNK * CHUNK)
    valid = max(1, width - 2 * RADIUS)
    tiles = -(-valid // widest)
    return -(-valid // tiles // CHUNK) * CHUNK


def _interleaved(frame: np.ndarray) -> tuple[np.ndarray, int]:
    frame = np.ascontiguousarray(frame)
    channels = frame.shape[2] if frame.ndim == 3 else 1
    return frame.reshape(frame.shape[0], frame.shape[1] * channels), channels


def ssim_frame(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-channel mean SSIM of one (H, W[, C]) frame pair (uint8 or float), float64 (C,)."""
    x, channels = _interleaved(reference)
    y, _ = _interleaved(candidate)
    height, width = reference.shape[0], reference.shape[1]
    blocks = min(max(1, numba.get_num_threads()) * 2, height - 2 * RADIUS)  # uneven cores even out
    sums = _ssim_sums(x, y, channels, _TAPS, blocks, tile_pixels(width, channels) * channels)
    return sums / ((height - 2 * RADIUS) * (width - 2 * RADIUS))


# What the audit scores: RGB uint8 frames, BT.601 luma (float32), frame differences (float64).
KERNEL_DTYPES = (np.uint8, np.float32, np.float64)


def compile_kernels() -> None:
    """Compile the kernels for every frame type the audit scores into numba's cache (or load them
    from it), by running them on small frames. ``make``'s install step runs this, as pip compiles
    bytecode at install: otherwise each worker process of a clone's first audit compiles them at
    its first score (12 s a process on 2 cores, measured). Not to be run in the fork server: a
    process that ran a parallel kernel has started numba's thread pool, and processes forked from
    it break at their first parallel call."""
    for dtype in KERNEL_DTYPES:
        frame = np.zeros((2 * RADIUS + 1, 2 * RADIUS + 1, 3), dtype)
        ssim_frame(frame, frame)
    frame = np.zeros((1, 1, 3), np.uint8)
    squared_error(frame, frame)


def squared_error(reference: np.ndarray, candidate: np.ndarray) -> int:
    """Sum of squared differences over all values of one uint8 frame pair, exact."""
    x, _ = _interleaved(reference)
    y, _ = _interleaved(candidate)
    return int(_squared_error(x, y))
