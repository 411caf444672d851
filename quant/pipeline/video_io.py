"""Video files: ``.npz`` holding ``frames`` uint8 (F, H, W, 3), and a viewable animated WebP.

``.npz`` files are written without pickle and read with ``allow_pickle=False``, so a video from
anyone can be opened safely.

Example::

    save_npz(Path("videos/torch/p00_s0.npz"), frames, prompt="a red kite", seed=0)
    frames = load_frames(Path("videos/torch/p00_s0.npz"))   # uint8 (F, H, W, 3)
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from quant.errors import UserError, first_line
from quant.support.files import atomic_path

LATENTS_DIR = "latents"


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
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy renamed .npz loads as a bare array
            raise UserError(f"{path}: not an .npz archive (a single array, e.g. a renamed .npy)")
        with data:
            if "frames" not in data.files:
                raise UserError(f"{path}: no 'frames' array (has: {', '.join(data.files) or 'nothing'})")
            frames = data["frames"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:  # zlib: a damaged member
        raise UserError(f"{path}: not a readable .npz video ({first_line(exc)})") from None
    if frames.dtype != np.uint8:
        raise UserError(f"{path}: 'frames' must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"{path}: 'frames' must be (F, H, W, 3), got shape {frames.shape}")
    return frames


CONTAINER_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
VIDEO_SUFFIXES = (".npz",) + CONTAINER_SUFFIXES


def read_video(path: Path) -> np.ndarray:
    """Frames of a ``.npz`` video or of a container file (decoded with PyAV to RGB24).

    Returns:
        uint8 (F, H, W, 3).

    Raises:
        UserError: unreadable, undecodable or empty video.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return load_frames(path)
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, IndexError, ValueError) as exc:
        raise UserError(f"{path}: cannot decode video ({first_line(exc)})") from None
    if not frames:
        raise UserError(f"{path}: video has no frames")
    return np.stack(frames)


def save_webp(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """An animated, lossless WebP of ``frames`` for people to look at."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                       loop=0, lossless=True)


def save_trajectory(path: Path, trajectory) -> None:
    """Write a ``quant.pipeline.sampling.Trajectory``: ``latents`` float32 (S, C, T, H, W), ``timesteps``, ``experts``.

    Stored, not deflated: float latents shrink by 7% under zlib, which took 32-42 ms a video (a
    sixth of the shapes model's generation time; measured on an Intel Xeon, 8x16x5x16x16 latents)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, latents=trajectory.latents.astype(np.float32), timesteps=trajectory.timesteps,
                     experts=trajectory.experts.astype(str))


def load_trajectory(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a trajectory file, or None when there is none.

    Raises:
        UserError: the file exists but is unreadable or lacks ``latents``/``timesteps``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable latent trajectory ({first_line(exc)})") from None
    if "latents" not in out or "timesteps" not in out:
        raise UserError(f"{path}: a latent trajectory needs 'latents' and 'timesteps' arrays")
    return out
