"""Score tables: per frame -> per video -> per variant (pandas).

``score_video`` gives one row per frame; ``latent_rows`` one row per denoising step;
``summarize`` aggregates frames to videos and to variants (mean, min, 5th percentile).

Infinite PSNR (identical frames or identical motion) never reaches a table: the value is capped
at ``CAP_DB`` and flagged (``psnr_identical``), so means and minima stay numbers. A latent SQNR
of +inf (identical latents) is capped at ``CAP_SQNR_DB``; -inf (NaN/Inf in the candidate) is kept,
so it fails any gate.

Example::

    frames = score_video(reference, candidate).assign(variant="int8", video="p00_s0")
    videos, variants = summarize(frames)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from metrics import psnr, ssim, temporal
from metrics.tensor import sqnr_db

CAP_DB = psnr.CAP_DB
CAP_SQNR_DB = 200.0
SCHEMA_VERSION = 1

FRAME_COLUMNS = ["frame", "mse", "psnr_db", "psnr_identical", "ssim", "ssim_luma", "motion_psnr_db", "motion_ssim",
                 "flicker_excess", "flicker_flag"]


def metric_parameters() -> dict:
    """What produced each number: implementation, colour space and parameters (recorded with results)."""
    return {"schema_version": SCHEMA_VERSION, "psnr": psnr.PARAMETERS,
            "ssim": {**ssim.PARAMETERS, "colour_space": "RGB, mean of per-channel SSIM"},
            "ssim_luma": {**ssim.PARAMETERS, "colour_space": "BT.601 Y = 0.299R + 0.587G + 0.114B, full range"},
            "temporal": temporal.PARAMETERS,
            "latent_sqnr": {"definition": "10 log10(sum ref^2 / sum (cand-ref)^2) of the latents after each step",
                            "cap_db": CAP_SQNR_DB, "nonfinite": "-inf"},
            "aggregation": {"p5": "5th percentile over frames (numpy linear)", "psnr_cap_db": CAP_DB}}


def score_video(reference: np.ndarray, candidate: np.ndarray, luma: bool = True) -> pd.DataFrame:
    """One row per frame of ``candidate`` against ``reference`` (uint8 (F, H, W, 3), same shape)."""
    mse = psnr.mse_frames(reference, candidate)
    values = psnr.psnr_frames(reference, candidate)
    moves = temporal.temporal_frames(reference, candidate)
    motion = moves["motion_psnr_db"]
    return pd.DataFrame({
        "frame": np.arange(reference.shape[0]),
        "mse": mse,
        "psnr_db": np.minimum(values, CAP_DB),
        "psnr_identical": np.isinf(values),
        "ssim": ssim.ssim_frames(reference, candidate),
        "ssim_luma": ssim.ssim_frames(reference, candidate, colour="luma") if luma else np.nan,
        "motion_psnr_db": np.where(np.isnan(motion), np.nan, np.minimum(motion, CAP_DB)),
        "motion_ssim": moves["motion_ssim"],
        "flicker_excess": moves["flicker_excess"],
        "flicker_flag": moves["flicker_flag"],
    })


def latent_rows(reference: dict, candidate: dict) -> pd.DataFrame:
    """One row per step: SQNR of the candidate's latents against the reference's after that step.

    Args:
        reference, candidate: trajectory arrays (``latents`` (S, ...), ``timesteps``, ``experts``).
    """
    ref, cand = reference["latents"], candidate["latents"]
    if ref.shape != cand.shape:
        raise ValueError(f"latent trajectories differ in shape: reference {ref.shape} vs candidate {cand.shape}")
    experts = reference.get("experts", np.array(["transformer"] * len(ref)))
    values = [min(sqnr_db(c, r), CAP_SQNR_DB) for c, r in zip(cand, ref)]
    return pd.DataFrame({"step": np.arange(len(ref)), "timestep": reference["timesteps"],
                         "expert": [str(e) for e in experts], "latent_sqnr_db": values})


def _p5(series: pd.Series) -> float:
    clean = series.dropna()
    return float(np.percentile(clean, 5)) if len(clean) else math.nan


def _aggregate(frames: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    grouped = frames.groupby(keys, sort=False)
    out = grouped.agg(
        frames=("frame", "size"),
        psnr_mean=("psnr_db", "mean"), psnr_min=("psnr_db", "min"), psnr_p5=("psnr_db", _p5),
        ssim_mean=("ssim", "mean"), ssim_min=("ssim", "min"), ssim_p5=("ssim", _p5),
        ssim_luma_mean=("ssim_luma", "mean"), ssim_luma_min=("ssim_luma", "min"),
        motion_psnr_mean=("motion_psnr_db", "mean"), motion_psnr_min=("motion_psnr_db", "min"),
        motion_ssim_mean=("motion_ssim", "mean"), motion_ssim_min=("motion_ssim", "min"),
        flicker_max=("flicker_excess", "max"), flicker_frames=("flicker_flag", "sum"),
        identical_frames=("psnr_identical", "sum"),
        mse_mean=("mse", "mean"),
    ).reset_index()
    with np.errstate(divide="ignore"):
        video_psnr = 10 * np.log10(psnr.DATA_RANGE**2 / out["mse_mean"].to_numpy())
    out.insert(len(keys) + 1, "psnr_video_db", np.minimum(video_psnr, CAP_DB))
    return out.drop(columns="mse_mean")


def _latent_summary(latents: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    def one(group: pd.DataFrame) -> pd.Series:
        worst = group.loc[group["latent_sqnr_db"].idxmin()]
        return pd.Series({"latent_sqnr_min_db": worst["latent_sqnr_db"],
                          "latent_sqnr_final_db": group.sort_values("step")["latent_sqnr_db"].iloc[-1],
                          "latent_worst_step": int(worst["step"]), "latent_worst_expert": worst["expert"]})
    return latents.groupby(keys, sort=False)[["step", "expert", "latent_sqnr_db"]].apply(one).reset_index()


def summarize(frames: pd.DataFrame, latents: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Aggregate per-frame rows (with ``variant`` and ``video`` columns) to videos and to variants.

    Returns:
        (per-video table, per-variant table). With ``latents`` (rows with ``variant``, ``video``,
        ``step``...), both gain the worst and final latent SQNR and the step/expert where it is worst.
    """
    videos = _aggregate(frames, ["variant", "video"])
    variants = _aggregate(frames, ["variant"])
    variants.insert(1, "videos", frames.groupby("variant", sort=False)["video"].nunique().to_numpy())
    if latents is not None and len(latents):
        videos = videos.merge(_latent_summary(latents, ["variant", "video"]), on=["variant", "video"], how="left")
        variants = variants.merge(_latent_summary(latents, ["variant"]), on="variant", how="left")
    return videos, variants
