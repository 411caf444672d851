"""Video files: ``.npz`` holding ``frames`` uint8 (F, H, W, 3), and a viewable animated WebP.

``.npz`` files are written without pickle and read with ``allow_pickle=False``, so a video from
anyone can be opened safely.

Example::

    save_npz(Path("videos/torch/p00_s0.npz"), frames, prompt="a red kite", seed=0)
    frames = load_frames(Path("videos/torch/p00_s0.npz"))   # uint8 (F, H, W, 3)
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from quant.errors import UserError
from quant.io_utils import atomic_path


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 (x*255 rounded, as diffusers' ``numpy_to_pil``); NaN -> 0."""
    scaled = np.nan_to_num(np.asarray(frames, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def save_npz(path: Path, frames: np.ndarray, **meta) -> None:
    """Write ``frames`` (uint8 (F, H, W, 3)) and scalar/text metadata to ``path`` atomically."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    arrays = {"frames": frames, **{k: np.asarray(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_frames(path: Path) -> np.ndarray:
    """Read ``frames`` from an ``.npz`` video.

    Raises:
        UserError: unreadable file, no ``frames`` array, wrong dtype or layout.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "frames" not in data.files:
                raise UserError(f"{path}: no 'frames' array (has: {', '.join(data.files) or 'nothing'})")
            frames = data["frames"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz video ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if frames.dtype != np.uint8:
        raise UserError(f"{path}: 'frames' must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"{path}: 'frames' must be (F, H, W, 3), got shape {frames.shape}")
    return frames


def save_webp(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """An animated, lossless WebP of ``frames`` for people to look at."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                       loop=0, lossless=True)
