"""SSIM and squared error through PyTorch: the same numbers as ``metrics.fused``, on a GPU.

With ``[runtime] device = "cuda"`` (``metrics.fused.set_device``), ``metrics.ssim`` and
``metrics.psnr`` send frames here instead of to the numba kernels. What is computed is the
same: scikit-image's SSIM (Gaussian sigma 1.5, 11 taps, K1 0.01, K2 0.03, data range 255,
population covariance) in float64, kept where the 11x11 window lies inside the frame, the
mean per channel; squared error summed exactly in int64.

- the four moments (``x``, ``y``, ``x^2 + y^2``, ``x y``) of every channel go through one
  depthwise ``conv2d`` per direction (the Gaussian is separable), without padding: the valid
  region is exactly the region scikit-image keeps after filtering with reflection and cropping;
- frames go in batches (``FRAMES_PER_BATCH``), so GPU memory stays bounded whatever the length.

Float64 throughout, as on the CPU: the moments' cancellation (E[x^2] - E[x]^2) keeps ~1e-11 of
SSIM, far inside the 1e-6 to scikit-image the tests ask of both paths. On the CPU (where the tests
run it: this machine has no GPU) it agrees with the numba kernels to ~1e-15; on a GPU it is
the same arithmetic in another order, so agreement to 1e-6 is expected, not yet measured.

Example::

    means = ssim_channel_means(reference, candidate, torch.device("cuda"))   # float64 (F, C)
    errors = squared_errors(reference, candidate, torch.device("cuda"))     # int64 (F,)
"""

from __future__ import annotations

import numpy as np

from metrics.fused import C1, C2, gaussian_taps

FRAMES_PER_BATCH = 8  # 8 frames of 720p RGB: ~0.5 GB of float64 moments on the device


def _as_nchw(frames: np.ndarray, device, dtype):
    """(F, H, W[, C]) -> (F, C, H, W) tensor on ``device``."""
    import torch

    t = torch.from_numpy(np.require(frames, requirements=["C", "W"])).to(device)
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    return t.permute(0, 3, 1, 2).to(dtype)


def ssim_channel_means(reference: np.ndarray, candidate: np.ndarray, device) -> np.ndarray:
    """Per-frame, per-channel mean SSIM of (F, H, W[, C]) frame pairs, float64 (F, C)."""
    import torch

    channels = reference.shape[3] if reference.ndim == 4 else 1
    taps = torch.from_numpy(gaussian_taps()).to(device)
    groups = 4 * channels
    horizontal = taps.view(1, 1, 1, -1).repeat(groups, 1, 1, 1)
    vertical = taps.view(1, 1, -1, 1).repeat(groups, 1, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(reference), FRAMES_PER_BATCH):
            x = _as_nchw(reference[start:start + FRAMES_PER_BATCH], device, torch.float64)
            y = _as_nchw(candidate[start:start + FRAMES_PER_BATCH], device, torch.float64)
            moments = torch.cat([x, y, x * x + y * y, x * y], dim=1)  # (N, 4C, H, W)
            moments = torch.nn.functional.conv2d(moments, horizontal, groups=groups)
            moments = torch.nn.functional.conv2d(moments, vertical, groups=groups)
            ux, uy, mq, mp = moments.split(channels, dim=1)
            uxy = ux * uy
            uu = ux * ux + uy * uy
            ssim = ((2.0 * uxy + C1) * (2.0 * (mp - uxy) + C2)) / ((uu + C1) * (mq - uu + C2))
            out.append(ssim.mean(dim=(2, 3)).cpu().numpy())
    if not out:
        return np.zeros((0, channels))
    return np.concatenate(out).astype(np.float64)


def squared_errors(reference: np.ndarray, candidate: np.ndarray, device) -> np.ndarray:
    """Per-frame sum of squared differences of uint8 frames, exact (int64 on the device), (F,)."""
    import torch

    out = []
    for start in range(0, len(reference), FRAMES_PER_BATCH):
        x = _as_nchw(reference[start:start + FRAMES_PER_BATCH], device, torch.int64)
        y = _as_nchw(candidate[start:start + FRAMES_PER_BATCH], device, torch.int64)
        out.append((x - y).square().flatten(1).sum(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)
