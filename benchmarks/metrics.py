"""Benchmark: per-frame PSNR + SSIM of one 81-frame 1280x720 pair: ours, scikit-image and ffmpeg.

Each implementation runs in its own child process on the same deterministic pair (smooth moving
content, a noisy and slightly shifted candidate), so peak memory is measured separately. ffmpeg's
``ssim`` and ``psnr`` filters read the frames raw (rgb24 files in a temporary folder, so no decoding
is counted) with their default threading. Prints seconds per frame for each, the speed ratios,
the peak resident memory above what the two uint8 videos take, and the largest disagreement with
scikit-image on the frames both scored. The CPU (``lscpu`` model name) is printed and recorded.
The three run in turn ``--rounds`` times (default 3) and the ratios are taken per round, so a
slow spell of a shared machine hits all three alike; medians and ranges are printed.
No thresholds: compare the ratio across commits. Results are also written to
``benchmarks/results/metrics-<time>.json``.

Usage::

    .venv/bin/python benchmarks/metrics.py                 # 81 frames of 1280x720
    .venv/bin/python benchmarks/metrics.py --frames 9      # quicker look
    .venv/bin/python benchmarks/metrics.py --rounds 5      # five alternated rounds on a noisy machine
    .venv/bin/python benchmarks/metrics.py --device cuda   # ours through PyTorch on the GPU (metrics.torch_kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_pair(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic uint8 (F, H, W, 3) reference and candidate, built one frame at a time."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    reference = np.empty((frames, height, width, 3), np.uint8)
    candidate = np.empty_like(reference)
    for t in range(frames):
        phase = 0.15 * t
        for c in range(3):
            wave = 127 + 60 * np.sin(xx / (23 + 7 * c) + phase) * np.cos(yy / (31 - 5 * c) - phase)
            reference[t, :, :, c] = np.clip(wave + 40 * np.sin((xx + yy) / 97 + c), 0, 255).astype(np.uint8)
        noisy = reference[t].astype(np.int16) + rng.integers(-6, 7, reference[t].shape, dtype=np.int16)
        candidate[t] = np.clip(np.roll(noisy, 1, axis=1), 0, 255).astype(np.uint8)
    return reference, candidate


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(impl: str, frames: int, height: int, width: int, limit: int, device: str = "cpu") -> dict:
    """Score the pair with ``impl`` in this process; returns timings and memory."""
    reference, candidate = make_pair(frames, height, width)
    count = min(limit, frames)
    loaded_mb = _rss_mb()
    if impl == "ffmpeg":
        return _run_ffmpeg(reference[:count], candidate[:count], loaded_mb)
    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from metrics import fused
        from metrics.psnr import psnr_frames
        from metrics.ssim import ssim_frames

        fused.set_device(device)
        psnr_frames(reference[:1], candidate[:1])  # warm-up: compiling (a stale numba cache), thread pools,
        ssim_frames(reference[:1], candidate[:1])  # first allocations, CUDA context
        start = time.perf_counter()
        psnr = psnr_frames(reference[:count], candidate[:count])
        ssim = ssim_frames(reference[:count], candidate[:count])
    else:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        start = time.perf_counter()
        psnr, ssim = [], []
        for r, c in zip(reference[:count], candidate[:count]):
            psnr.append(peak_signal_noise_ratio(r, c, data_range=255))
            ssim.append(structural_similarity(r, c, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=255, channel_axis=-1))
    seconds = time.perf_counter() - start
    return {"impl": impl, "frames": count, "seconds": seconds, "seconds_per_frame": seconds / count,
            "peak_rss_mb": _rss_mb(), "videos_rss_mb": loaded_mb, "extra_peak_mb": _rss_mb() - loaded_mb,
            "psnr": [float(v) for v in psnr], "ssim": [float(v) for v in ssim]}


def _run_ffmpeg(reference: np.ndarray, candidate: np.ndarray, loaded_mb: float) -> dict:
    import re
    import tempfile

    count, height, width = reference.shape[:3]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        ref_path, cand_path = Path(tmp) / "ref.rgb", Path(tmp) / "cand.rgb"
        reference.tofile(ref_path)
        candidate.tofile(cand_path)
        raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "24"]
        graph = "[0:v]split[a0][a1];[1:v]split[b0][b1];[a0][b0]ssim=stats_file=-;[a1][b1]psnr=stats_file=-"
        cmd = ["ffmpeg", "-hide_banner", "-nostats", *raw, "-i", str(ref_path), *raw, "-i", str(cand_path),
               "-lavfi", graph, "-f", "null", "-"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    ssim = [float(m) for m in re.findall(r"All:([0-9.]+)", done.stdout)]
    psnr = [float(m) for m in re.findall(r"psnr_avg:([0-9.]+|inf)", done.stdout)]
    return {"impl": "ffmpeg", "frames": count, "seconds": seconds, "seconds_per_frame": seconds / count,
            "peak_rss_mb": float("nan"), "videos_rss_mb": loaded_mb, "extra_peak_mb": float("nan"),
            "psnr": psnr, "ssim": ssim, "note": "8x8-block SSIM (ffmpeg's approximation), not Wang's Gaussian window"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--skimage-frames", type=int, default=None, help="score only this many frames with scikit-image")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where ours runs: numba on the CPU, or PyTorch on the GPU")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run the three in turn this many times; medians and per-round ratios are printed")
    parser.add_argument("--child", choices=["ours", "skimage", "ffmpeg"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.child:
        limit = args.frames if args.child != "skimage" or args.skimage_frames is None else args.skimage_frames
        print(json.dumps(run_child(args.child, args.frames, args.height, args.width, limit, args.device)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"--device cuda: no CUDA device is visible to torch {torch.__version__}", file=sys.stderr)
            return 2
    rounds: list[dict] = []
    for _ in range(args.rounds):  # alternated, so a slow spell of a shared machine hits every impl alike
        results = {}
        for impl in ("ours", "skimage", "ffmpeg"):
            cmd = [sys.executable, __file__, "--child", impl, "--frames", str(args.frames), "--height", str(args.height),
                   "--width", str(args.width), "--device", args.device] + (["--skimage-frames", str(args.skimage_frames)] if args.skimage_frames else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
        rounds.append(results)
    results = rounds[0]
    ours, ref, ff = results["ours"], results["skimage"], results["ffmpeg"]
    both = min(ours["frames"], ref["frames"])
    ssim_err = max(abs(a - b) for a, b in zip(ours["ssim"][:both], ref["ssim"][:both]))
    psnr_err = max(abs(a - b) for a, b in zip(ours["psnr"][:both], ref["psnr"][:both]))
    float64_video_mb = args.frames * args.height * args.width * 3 * 8 / 2**20

    def per_frame(impl: str) -> list[float]:
        return [r[impl]["seconds_per_frame"] for r in rounds]

    def ratios(impl: str) -> list[float]:
        return [r[impl]["seconds_per_frame"] / r["ours"]["seconds_per_frame"] for r in rounds]

    def spread(values: list[float], fmt: str) -> str:
        return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores")
    print(f"pair: {args.frames} frames of {args.width}x{args.height}; PSNR + SSIM (RGB) per frame; ours on {args.device}; "
          f"{args.rounds} rounds, medians (min-max)")
    print(f"{'impl':10s} {'frames':>6s} {'s/frame':>26s} {'peak RSS MB':>12s} {'above videos MB':>16s}")
    for r in (ours, ref, ff):
        print(f"{r['impl']:10s} {r['frames']:6d} {spread(per_frame(r['impl']), '.4f'):>26s} {r['peak_rss_mb']:12.0f} "
              f"{r['extra_peak_mb']:16.0f}")
    print(f"speed ratio (skimage / ours), per round: {spread(ratios('skimage'), '.1f')}x")
    print(f"speed ratio (ffmpeg ssim+psnr filters / ours), per round: {spread(ratios('ffmpeg'), '.2f')}x"
          " (ffmpeg's SSIM is an 8x8-block approximation; its time includes process start and reading raw files)")
    print(f"max |diff| on {both} frames: SSIM {ssim_err:.2e}, PSNR {psnr_err:.2e} dB")
    print(f"for scale: one float64 copy of a video is {float64_video_mb:.0f} MB")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = [{k: {kk: vv for kk, vv in v.items() if kk not in ("psnr", "ssim")} for k, v in r.items()} for r in rounds]
    path = out_dir / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "cpu": cpu_model(), "rounds": summary,
                                "ratio_skimage_median": median(ratios("skimage")),
                                "ratio_ffmpeg_median": median(ratios("ffmpeg")),
                                "ssim_max_diff": ssim_err, "psnr_max_diff": psnr_err}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
