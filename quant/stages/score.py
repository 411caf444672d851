"""The score stage: PSNR/SSIM (and temporal, latent) metrics of candidate videos against references.

Every video in the candidate folder (``.npz`` with ``frames`` uint8 (F, H, W, 3), or a container
such as ``.mp4`` read through PyAV) is scored against the file of the same name in the
reference folder. Works on any two folders, not only the suite's own. Where both folders hold
``latents/<name>.npz`` trajectories, the latent SQNR of every step is scored too.

Example::

    tables = score_folders(Path("runs/r1/videos/torch"), Path("runs/r1/videos/int8"), variant="int8")
    write_tables(tables, Path("runs/r1/scores/frames.csv"))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from quant.support.progress import progress

from metrics.adherence import adherence_row, prompt_tags, summarize_adherence
from metrics.scores import latent_rows, metric_parameters, score_video, summarize
from quant.errors import UserError
from quant.stages.executor import TaskContext
from quant.stages.workspace import Workspace
from quant.support.files import atomic_path, atomic_write_json
from quant.pipeline.prompts import prompt_id, read_prompt_entries
from quant.pipeline.video_io import LATENTS_DIR, VIDEO_SUFFIXES, load_trajectory, read_video

_NAME = re.compile(r"^(?P<prompt>p\d+)_s(?P<seed>\d+)$")


@dataclass
class ScoreTables:
    """frames: one row per (variant, video, frame); videos/variants: aggregates; latents: per step."""

    frames: pd.DataFrame
    videos: pd.DataFrame
    variants: pd.DataFrame
    latents: pd.DataFrame


@dataclass(frozen=True)
class PromptSet:
    """The eval prompts by id (``p00``...) and their tags: what adherence is judged against."""

    texts: dict[str, str]
    tags: dict[str, list[str]]

    def record(self) -> dict:
        return {"texts": self.texts, "tags": self.tags}

    @classmethod
    def from_file(cls, path: Path) -> "PromptSet":
        """A prompt file's prompts by id, each tagged with its colour/shape/motion (shapes prompts) and
        the file's own ``| tags``."""
        entries = read_prompt_entries(path)
        return cls({prompt_id(i): text for i, (text, _) in enumerate(entries)},
                   {prompt_id(i): prompt_tags(text, extra) for i, (text, extra) in enumerate(entries)})

    @property
    def prompts(self) -> list[str]:
        """The prompt texts in file order (``p00`` first)."""
        return list(self.texts.values())


def list_videos(folder: Path) -> list[Path]:
    """Video files directly in ``folder`` (previews and manifests are not videos)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def pair_videos(reference: Path, candidate: Path) -> list[tuple[Path, Path]]:
    """(reference file, candidate file) for every candidate video.

    Raises:
        UserError: a folder is missing, the candidate folder has no video, or a partner is missing.
    """
    for role, folder in (("reference", reference), ("candidate", candidate)):
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: {role} folder not found")
    candidates = list_videos(candidate)
    if not candidates:
        raise UserError(f"{candidate}: no videos to score (expected {', '.join(VIDEO_SUFFIXES)} files)")
    pairs = []
    for cand in candidates:
        ref = Path(reference) / cand.name
        if not ref.is_file():
            raise UserError(f"{cand}: no reference video of the same name ({ref} not found)")
        pairs.append((ref, cand))
    return pairs


def _ids(name: str, variant: str) -> dict:
    match = _NAME.match(name)
    return {"variant": variant, "video": name, "prompt_id": match["prompt"] if match else "",
            "seed": int(match["seed"]) if match else -1}


def _adherence(frames, ids: dict, prompts: PromptSet | None) -> dict | None:
    text = prompts.texts.get(ids["prompt_id"]) if prompts else None
    row = adherence_row(frames, text) if text else None
    return {**ids, **row} if row else None


def _score_pair(ref_path: Path, cand_path: Path, variant: str, luma: bool,
                prompts: PromptSet | None) -> tuple[pd.DataFrame, pd.DataFrame | None, dict | None]:
    reference, candidate = read_video(ref_path), read_video(cand_path)
    if reference.shape != candidate.shape:
        raise UserError(f"{cand_path}: shape {candidate.shape} differs from reference {ref_path} {reference.shape}")
    try:
        frames = score_video(reference, candidate, luma=luma)
    except ValueError as exc:  # e.g. frames smaller than the SSIM window
        raise UserError(f"{cand_path}: {exc}") from None
    name = cand_path.stem
    ids = _ids(name, variant)
    judged = _adherence(candidate, ids, prompts)
    frames = frames.assign(**ids)[list(ids) + list(frames.columns)]
    ref_traj = load_trajectory(ref_path.parent / LATENTS_DIR / f"{name}.npz")
    cand_traj = load_trajectory(cand_path.parent / LATENTS_DIR / f"{name}.npz")
    if ref_traj is None or cand_traj is None:
        return frames, None, judged
    try:
        steps = latent_rows(ref_traj, cand_traj)
    except ValueError as exc:
        raise UserError(f"{cand_path.parent / LATENTS_DIR / (name + '.npz')}: {exc}") from None
    return frames, steps.assign(variant=variant, video=name)[["variant", "video"] + list(steps.columns)], judged


def _with_adherence(videos: pd.DataFrame, variants: pd.DataFrame, rows: list[dict],
                    prompts: PromptSet) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not rows:
        return videos, variants
    judged = pd.DataFrame(rows)
    videos = videos.merge(judged.drop(columns=["prompt_id", "seed"]), on=["variant", "video"], how="left")
    summary = summarize_adherence(judged, prompts.texts, prompts.tags)
    return videos, variants.merge(summary, on="variant", how="left")


def score_folders(reference: Path, candidate: Path, variant: str | None = None, luma: bool = True,
                  show_progress: bool = True, prompts: PromptSet | None = None) -> ScoreTables:
    """Score every candidate video against its reference; ``variant`` defaults to the folder name.

    With ``prompts``, videos whose prompt belongs to the shapes world are also judged for
    adherence (``metrics.adherence``): per-video columns and per-variant rates.
    """
    variant = variant or Path(candidate).resolve().name
    frame_parts, latent_parts, judged = [], [], []
    for ref_path, cand_path in progress(pair_videos(reference, candidate), f"score {variant}", "video", show_progress):
        frames, steps, verdict = _score_pair(ref_path, cand_path, variant, luma, prompts)
        frame_parts.append(frames)
        if steps is not None:
            latent_parts.append(steps)
        if verdict is not None:
            judged.append(verdict)
    frames = pd.concat(frame_parts, ignore_index=True)
    latents = pd.concat(latent_parts, ignore_index=True) if latent_parts else pd.DataFrame()
    videos, variants = summarize(frames, latents if len(latents) else None)
    videos, variants = _with_adherence(videos, variants, judged, prompts)
    return ScoreTables(frames, videos, variants, latents)


def judge_folder(folder: Path, prompts: PromptSet, variant: str = "torch") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Adherence of every video in ``folder`` on its own (no reference): per-video rows and the
    one-row summary (empty tables when no prompt belongs to the shapes world)."""
    rows = []
    for path in list_videos(folder):
        verdict = _adherence(read_video(path), _ids(path.stem, variant), prompts)
        if verdict is not None:
            rows.append(verdict)
    if not rows:
        return pd.DataFrame(), pd.DataFrame()
    judged = pd.DataFrame(rows)
    return judged, summarize_adherence(judged, prompts.texts, prompts.tags)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.10g")


def table_paths(out: Path) -> dict[str, Path]:
    """Where ``write_tables`` puts each table for ``--out FILE.csv``."""
    out = Path(out)
    stem = out.name[:-4] if out.name.lower().endswith(".csv") else out.name
    return {"frames": out, "videos": out.with_name(f"{stem}.videos.csv"), "summary": out.with_name(f"{stem}.summary.csv"),
            "latents": out.with_name(f"{stem}.latents.csv"), "metrics": out.with_name(f"{stem}.metrics.json")}


def write_tables(tables: ScoreTables, out: Path) -> dict[str, Path]:
    """Write the frames table to ``out`` and the others beside it (see ``table_paths``)."""
    paths = table_paths(out)
    _write_csv(tables.frames, paths["frames"])
    _write_csv(tables.videos, paths["videos"])
    _write_csv(tables.variants, paths["summary"])
    if len(tables.latents):
        _write_csv(tables.latents, paths["latents"])
    atomic_write_json(paths["metrics"], json.loads(json.dumps(metric_parameters())))
    return {k: p for k, p in paths.items() if k != "latents" or len(tables.latents)}


def score_task(context: TaskContext, variant: str, prompts: PromptSet | None = None) -> dict:
    """One variant's tables (a task, ``quant.stages.executor``): ``videos/<variant>`` against
    ``videos/torch`` under ``context.root``, written to ``scores/<variant>/``."""
    root = context.root
    tables = score_folders(Workspace.videos(root, "torch"), Workspace.videos(root, variant), variant=variant,
                           show_progress=False, prompts=prompts)
    write_tables(tables, Workspace.scores(root, variant))
    return {}


def score_inputs(variant: str) -> tuple[str, ...]:
    """What ``score_task`` reads, relative to the root."""
    return tuple(str(Workspace.videos(Path(), v)) for v in ("torch", variant))


def score_outputs(variant: str) -> tuple[str, ...]:
    return (str(Workspace.scores(Path(), variant).parent),)
