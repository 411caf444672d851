"""Benchmark: the audit's own overhead, the pure work inside its stages against their wall times.

Reads a finished run folder (``quant-audit run --out DIR`` writes ``DIR/<run-id>``; ``make demo``
writes ``runs/<run-id>``) and sets, per stage group:

- ``generate``: each ``generate:<variant>`` stage's wall seconds (``results.json`` "stages")
  against the seconds inside the pipeline calls (each video's ``seconds`` in
  ``videos/<variant>/manifest.json``, measured while the video was made) and, inside those, the
  module calls alone (``module_seconds``: ONNX Runtime sessions or PyTorch modules). The rest is
  building sessions and models, writing videos, latents and manifests;
- ``score``: each ``score:<variant>`` stage's wall seconds against the metric kernels alone (PSNR,
  SSIM in RGB and luma, temporal metrics: ``metrics.scores.score_video``, what the stage calls),
  timed again here on the run's own videos. The rest is reading videos, latent SQNR, adherence
  and tables;
- ``export``, ``calibrate``, ``quantize``, ``emulate``, ``report``: wall seconds only (tracing,
  quantization and session building have no "call" to separate from their bookkeeping);
- the whole run: the sum of its stages, and ``finished - started`` from ``results.json`` (to
  one second; the report stage runs after ``finished`` is written).

A stage's seconds are the sum of its tasks' seconds: with ``executor = "processes"`` or ``"ray"``
the tasks of a batch overlap, so the stages' total exceeds the run's wall time (both are printed).
Stages a run reused from its cache are counted as reused, with their (small) time. Stages whose
videos the run did not keep (the search's candidates, which ``[search]`` evaluates and deletes)
are counted as such, and the share of work is taken over the stages whose work was measured. No
thresholds: compare the shares across commits. The CPU is printed: the run's target's model name
(``/proc/cpuinfo``, what ``lscpu`` shows), and this machine's where the kernels were re-timed.

Usage::

    .venv/bin/python benchmarks/overhead.py runs/<run-id>
    .venv/bin/python benchmarks/overhead.py runs/<run-id> --no-rescore   # skip re-timing the metric kernels
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cpu(results: dict) -> str:
    """The CPU the run came from (its target), and this machine's where the kernels are re-timed."""
    from quant.support.target import current_target

    ran = (results.get("target") or {}).get("cpu", "unknown")
    here = current_target().cpu
    return ran if ran == here else f"{ran} (metric kernels re-timed on {here})"


def _video_work(run: Path, variant: str) -> tuple[float, dict[str, float], int]:
    """Seconds inside pipeline calls and, per module, inside module calls for ``variant``'s
    videos, and their count."""
    path = run / "videos" / variant / "manifest.json"
    if not path.is_file():
        return float("nan"), {}, 0
    videos = json.loads(path.read_text(encoding="utf-8")).get("videos", [])
    pipeline = sum(float(v.get("seconds") or 0.0) for v in videos)
    modules: dict[str, float] = defaultdict(float)
    for video in videos:
        for module, seconds in (video.get("module_seconds") or {}).items():
            modules[module] += float(seconds)
    return pipeline, dict(modules), len(videos)


def _metric_work(run: Path, variant: str) -> float:
    """Seconds of ``score_video`` over ``variant``'s videos against the reference, timed here;
    NaN when the run did not keep them."""
    from metrics.scores import score_video
    from quant.stages.score import pair_videos
    from quant.pipeline.video_io import read_video

    if not (run / "videos" / variant).is_dir():
        return float("nan")
    pairs = pair_videos(run / "videos" / "torch", run / "videos" / variant)
    total = 0.0
    for ref_path, cand_path in pairs:
        reference, candidate = read_video(ref_path), read_video(cand_path)
        start = time.perf_counter()
        score_video(reference, candidate, luma=True)
        total += time.perf_counter() - start
    return total


def measure(run: Path, rescore: bool = True) -> dict:
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    groups: dict[str, dict] = defaultdict(lambda: {"wall": 0.0, "work": 0.0, "modules": 0.0, "stages": 0,
                                                   "reused": 0, "videos": 0, "measured_wall": 0.0, "not_kept": 0})
    per_module: dict[str, float] = defaultdict(float)
    if rescore:  # the kernels' first call loads numba's cache; not the stage's work
        from metrics.scores import score_video
        import numpy as np

        frame = np.zeros((2, 16, 16, 3), np.uint8)
        score_video(frame, frame)
    for stage in results.get("stages", []):
        name, seconds = stage["name"], float(stage["seconds"])
        group_name, _, variant = name.partition(":")
        group = groups[group_name]
        group["wall"] += seconds
        group["stages"] += 1
        group["reused"] += int(bool(stage.get("reused")))
        if stage.get("reused"):
            continue
        if group_name == "generate":
            pipeline, modules, count = _video_work(run, variant)
            if math.isnan(pipeline):  # no manifest: the run did not keep these videos
                group["not_kept"] += 1
                continue
            group["work"] += pipeline
            group["measured_wall"] += seconds
            group["modules"] += sum(modules.values())
            group["videos"] += count
            for module, module_seconds in modules.items():
                per_module[module] += module_seconds
        elif group_name == "score" and rescore:
            work = _metric_work(run, variant)
            if math.isnan(work):
                group["not_kept"] += 1
                continue
            group["work"] += work
            group["measured_wall"] += seconds
    started = datetime.fromisoformat(results["started"])
    finished = datetime.fromisoformat(results["finished"])
    total = (finished - started).total_seconds()
    return {"run": str(run), "cpu": _cpu(results), "target": (results.get("target") or {}).get("id"),
            "total_seconds": total, "stage_seconds": sum(g["wall"] for g in groups.values()),
            "groups": {k: dict(v) for k, v in groups.items()}, "module_call_seconds": dict(per_module),
            "largest_stages": sorted(((float(st["seconds"]), st["name"]) for st in results.get("stages", [])),
                                     reverse=True)[:8]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (with results.json)")
    parser.add_argument("--no-rescore", dest="rescore", action="store_false",
                        help="do not time the metric kernels again (score has no 'work' column then)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for the JSON record (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not (args.run / "results.json").is_file():
        print(f"{args.run}: not a finished run folder (no results.json)", file=sys.stderr)
        return 2
    report = measure(args.run, args.rescore)
    print(f"CPU: {report['cpu']}; target {report['target']}; run {report['run']}")
    print(f"{'stage':<12} {'stages':>6} {'reused':>6} {'stage s':>8} {'work s':>8} {'share':>6}  work is")
    what = {"generate": "pipeline calls (module calls alone: {modules:.1f} s over {videos} videos)",
            "score": "metric kernels (PSNR, SSIM RGB + luma, temporal), timed again"}
    for name, g in sorted(report["groups"].items(), key=lambda kv: -kv[1]["wall"]):
        has_work = name in what and (name != "score" or args.rescore)
        work = f"{g['work']:8.1f}" if has_work else f"{'-':>8}"
        share = f"{g['work'] / g['measured_wall']:6.0%}" if has_work and g["measured_wall"] > 0 else f"{'-':>6}"
        note = what[name].format(**g) if has_work else "wall time only"
        if has_work and g["not_kept"]:
            note += f"; {g['not_kept']} stage(s) whose videos the run did not keep (search candidates): not in work or share"
        print(f"{name:<12} {g['stages']:>6} {g['reused']:>6} {g['wall']:8.1f} {work} {share}  {note}")
    calls = ", ".join(f"{m} {v:.1f} s" for m, v in sorted(report["module_call_seconds"].items(), key=lambda kv: -kv[1]))
    print(f"generate's module calls by module: {calls}")
    print("largest stages: " + ", ".join(f"{name} {seconds:.1f} s" for seconds, name in report["largest_stages"]))
    print(f"stages {report['stage_seconds']:.1f} s in all; the run's wall from start to results.json "
          f"{report['total_seconds']:.0f} s (the report stage comes after results.json)")
    out = args.results / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
