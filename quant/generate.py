"""The generate stage: fixed-seed videos for one variant.

Writes ``<out>/videos/<variant>/<prompt_id>_s<seed>.npz`` (``frames`` uint8 (F, H, W, 3), plus
the prompt, seed and variant), an animated ``.webp`` beside each, the latent trajectory in
``latents/<prompt_id>_s<seed>.npz``, and ``manifest.json`` with the
model fingerprint, settings, module recipes and a SHA-256 of each video's frames (same
frames, same hash: two runs can be compared at a glance). The manifest is rewritten
after every video, so an interrupted run keeps what it finished; called again with the same
``key``, the videos it lists (and whose frames still hash the same) are reused, not regenerated.
A different ``key`` clears the folder first, so stale videos are never scored.

Example::

    records = generate_variant(model, parse_variant("onnx", mods), prompts, [0, 1], settings, Path("runs/r1"))
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quant.progress import progress

from quant.environment import versions
from quant.io_utils import atomic_write_json
from quant.models import LoadedModel
from quant.pipeline import assemble, generate_video, nonfinite_counts
from quant.prompts import prompt_id
from quant.settings import GenerationSettings
from quant.variants import Variant
from quant.video_io import LATENTS_DIR, load_frames, save_npz, save_trajectory, save_webp

SCHEMA_VERSION = 2  # 2: key, and the modules whose outputs held NaN/Inf per video


@dataclass
class VideoRecord:
    """One generated video file and how it was made."""

    file: str
    prompt_id: str
    prompt: str
    seed: int
    frames: int
    nonfinite: bool
    frames_sha256: str
    nonfinite_modules: dict[str, int] = field(default_factory=dict)  # ONNX module -> calls with NaN/Inf output


def video_dir(root: Path, variant: str) -> Path:
    return Path(root) / "videos" / variant


def _manifest(model: LoadedModel, variant: Variant, settings: GenerationSettings, records: list[VideoRecord],
              key: str | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "variant": variant.name,
        "modules": variant.modules,
        "noise_ulps": variant.noise_ulps,
        "model": model.identity(),
        "settings": settings.to_dict(),
        "versions": versions(),
        "videos": [asdict(r) for r in records],
    }


def _finished(folder: Path, key: str | None) -> dict[tuple[str, int], VideoRecord]:
    """Videos a previous call with the same ``key`` finished; a different key clears ``folder``."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = None
    if key is None or manifest is None or manifest.get("key") != key or manifest.get("schema_version") != SCHEMA_VERSION:
        if folder.is_dir():
            shutil.rmtree(folder)
        return {}
    done = {}
    for entry in manifest.get("videos", []):
        record = VideoRecord(**entry)
        try:
            frames = load_frames(folder / record.file)
        except Exception:  # noqa: BLE001 - a damaged file is regenerated, not trusted
            continue
        if hashlib.sha256(frames.tobytes()).hexdigest() == record.frames_sha256:
            done[(record.prompt, record.seed)] = record
    return done


def generate_variant(model: LoadedModel, variant: Variant, prompts: list[str], seeds: list[int],
                     settings: GenerationSettings, root: Path, fps: int = 8,
                     show_progress: bool = True, save_latents: bool = True, key: str | None = None) -> list[VideoRecord]:
    """Generate every (prompt, seed) with ``variant`` and write the files described above.

    With ``save_latents`` the latents after every step go to ``latents/<name>.npz`` beside the
    video, so ``quant-audit score`` can say at which step (and expert) a variant's error enters.
    With ``key`` (what produced the videos, e.g. a hash of model files and settings), videos
    finished by an interrupted call with the same key are kept.
    """
    settings.check_for(model.pipe)
    pipe = assemble(model, variant, root, settings)
    folder = video_dir(root, variant.name)
    done = _finished(folder, key)
    records: list[VideoRecord] = []
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    for index, prompt, seed in progress(jobs, f"generate {variant.name}", "video", show_progress):
        if (prompt, seed) in done:
            records.append(done[(prompt, seed)])
            continue
        before = nonfinite_counts(pipe)
        video = generate_video(pipe, prompt, seed, settings, trajectory=save_latents, noise_ulps=variant.noise_ulps)
        after = nonfinite_counts(pipe)
        name = f"{prompt_id(index)}_s{seed}"
        path = folder / f"{name}.npz"
        if video.trajectory is not None:
            save_trajectory(folder / LATENTS_DIR / f"{name}.npz", video.trajectory)
        save_npz(path, video.frames, prompt=prompt, seed=seed, variant=variant.name, nonfinite=video.nonfinite)
        save_webp(folder / f"{name}.webp", video.frames, fps=fps)
        records.append(VideoRecord(path.name, prompt_id(index), prompt, seed, int(video.frames.shape[0]),
                                   video.nonfinite, hashlib.sha256(video.frames.tobytes()).hexdigest(),
                                   {m: after[m] - before[m] for m in after if after[m] - before[m]}))
        atomic_write_json(folder / "manifest.json", _manifest(model, variant, settings, records, key))
    return records
