"""``report.html``: one self-contained page per run, from ``templates/report.html.j2`` plus data.

``report_context`` reads a finished run folder (``results.json``, ``scores/*.csv``,
``quantization/*.json``, ``videos/``) into plain data; the template lays it out. Charts are
inline SVG (``reports.plots``); playback is one animated WebP per (prompt, variant) holding
reference | variant | difference x``DIFF_GAIN`` side by side, so the three always play in step.
Everything is embedded (data URIs), so the page opens from disk with no network. Jinja2
autoescaping escapes every user string (prompts, tags, paths); only our own SVG is marked safe.

Example::

    render_report(Path("runs/20261121-101500-ab12"))    # writes report.html in that folder
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from PIL import Image

from quant.errors import UserError
from quant.support.files import atomic_write_text
from quant.recipes.census import precision_counts
from quant.recipes.names import FLOOR, split_target
from reports import plots

TEMPLATES = Path(__file__).resolve().parent / "templates"
DIFF_GAIN = 8
SUMMARY_COLUMNS = ["psnr_mean", "psnr_min", "psnr_p5", "ssim_mean", "ssim_min", "motion_psnr_mean",
                   "flicker_max", "latent_sqnr_min_db"]


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["j2", "html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["g"] = lambda v: "n/a" if v is None else f"{v:.6g}"
    env.filters["mb"] = lambda b: "" if b is None else f"{b / 1e6:.2f}"
    return env


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def _heat(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """|candidate - reference| (mean over RGB) x DIFF_GAIN through the inferno colour map, uint8 RGB."""
    import matplotlib

    diff = np.abs(candidate.astype(np.int16) - reference.astype(np.int16)).mean(axis=-1) * DIFF_GAIN
    colours = matplotlib.colormaps["inferno"](np.clip(diff, 0, 255) / 255.0)[..., :3]
    return (colours * 255).round().astype(np.uint8)


def compare_frames(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """uint8 (F, H, 3W + 4, 3): reference | candidate | |difference| x DIFF_GAIN, 2-pixel white gaps."""
    gap = np.full((reference.shape[1], 2, 3), 255, np.uint8)
    return np.stack([np.concatenate([r, gap, c, gap, h], axis=1)
                     for r, c, h in zip(reference, candidate, _heat(reference, candidate))])


def side_by_side(reference: np.ndarray, candidate: np.ndarray, fps: int) -> str:
    """A data URI of an animated WebP of ``compare_frames``."""
    images = [Image.fromarray(f) for f in compare_frames(reference, candidate)]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                   loop=0, quality=85, method=4)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _playback(run_dir: Path, results: dict, variants: list[str]) -> list[dict]:
    from quant.pipeline.video_io import load_frames

    fps = results["config"]["variants"]["fps"]
    seed = results["seeds"][0]
    out = []
    for prompt in results["prompts"]:
        name = f"{prompt['id']}_s{seed}.npz"
        ref_path = run_dir / "videos" / "torch" / name
        if not ref_path.is_file():
            continue
        reference = load_frames(ref_path)
        clips = []
        for variant in variants:
            path = run_dir / "videos" / variant / name
            if path.is_file():
                clips.append({"variant": variant, "src": side_by_side(reference, load_frames(path), fps)})
        out.append({"id": prompt["id"], "text": prompt["text"], "seed": seed, "clips": clips,
                    "width": reference.shape[2] * 3 + 4, "height": reference.shape[1]})
    return out


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def _quantization(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((run_dir / "quantization").glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        for module, m in report.get("modules", {}).items():
            if "census" not in m:  # an emulated recipe (quant.stages.emulate): SQNR and kernel SQNR only
                rows.append({"recipe": report["recipe"], "module": module, "sqnr_min": m.get("sqnr_min_db"),
                             **dict.fromkeys(("int8", "fp16", "fp32", "size", "fp32_size", "latency", "fp32_latency")),
                             "kernel_sqnr": m.get("kernel_sqnr_db"), "kernel_identical": m.get("kernel_identical"),
                             "kernel": {"status": "emulated", "message": f"{len(m.get('nodes', []))} node(s) emulated, "
                                        f"{m.get('saturable_pairs', 0)} weight pairs can saturate"
                                        + (f"; not emulated: {len(m['not_emulated'])} node(s)" if m.get("not_emulated") else "")},
                             "kept": [], "notes": [f"{n}: {why}" for n, why in list(m.get("not_emulated", {}).items())[:6]]})
                continue
            counts = precision_counts(m["census"])
            rows.append({"recipe": report["recipe"], "module": module, **counts, "size": m.get("size_bytes"),
                         "fp32_size": m.get("fp32_size_bytes"), "latency": m.get("latency_ms"),
                         "fp32_latency": m.get("fp32_latency_ms"), "sqnr_min": m.get("sqnr_min_db"),
                         "kernel_sqnr": m.get("kernel_sqnr_db"), "kernel_identical": m.get("kernel_identical"),
                         "kernel": m.get("kernel") or {"status": "n/a", "message": ""},
                         "kept": sorted(m.get("kept_fp32", {})), "reasons": m.get("fp32_compute_reasons", {}),
                         "notes": m.get("notes", [])})
    return rows


def describe_modules(modules: dict[str, str]) -> str:
    """``all fp16``; ``transformer_2=int8 (rest torch)``; or every module's recipe for a mix."""
    modules = {m: (r.split("+")[0] + " (nodes kept FP32)" if "+keep-" in r else r) for m, r in modules.items()}
    recipes = set(modules.values())
    if len(recipes) == 1:
        return f"all {recipes.pop()}"
    swapped = {m: r for m, r in modules.items() if r != "torch"}
    if len(swapped) == 1:
        (module, recipe), = swapped.items()
        return f"{module}={recipe} (rest torch)"
    return ", ".join(f"{m}={r}" for m, r in modules.items())


def _sensitivity(results: dict) -> list[dict]:
    section = results.get("sensitivity") or {}
    out = []
    for module, rows in (section.get("modules") or {}).items():
        table = pd.DataFrame(rows)
        out.append({"module": module, "recipe": section.get("recipe"), "rows": rows[:15], "nodes": len(rows),
                    "svg": _svg(plots.sensitivity_bars(table, f"{module} ({section.get('recipe')})"))})
    return out


def _adherence(results: dict) -> dict | None:
    """The adherence table: per variant its rates, worst prompt and tag, beside PSNR/SSIM (shapes world only)."""
    rows = []
    for v in results["variants"]:
        m = v["metrics"]
        if m.get("adherence") is None:
            continue
        rows.append({"name": v["name"], **{k: m.get(k) for k in ("adherence", "adherence_colour", "adherence_shape",
                                                                  "adherence_motion", "psnr_mean", "ssim_mean")},
                     "worst_prompt": m.get("adherence_worst_prompt") or "", "worst_tag": m.get("adherence_worst_tag") or "",
                     "failed_prompts": m.get("adherence_failed_prompts") or ""})
    reference = (results.get("reference_adherence") or {}).get("summary")
    if not rows and not reference:
        return None
    videos = len((results.get("reference_adherence") or {}).get("videos") or [])
    return {"rows": rows, "reference": reference, "videos": videos}


def _cost(summary: pd.DataFrame, variants: list[str]) -> dict | None:
    """The cost table and the quality-vs-cost chart (Pareto front) of the main variants."""
    if "video_seconds" not in summary:
        return None
    rows = summary[summary["variant"].isin(variants)].dropna(subset=["video_seconds"])
    if rows.empty:
        return None
    modules = [c[:-len("_seconds")] for c in rows.columns if c.endswith("_seconds") and not c.startswith("video_")]
    # the chart and the front are about deployments: not the floor (FP32 PyTorch with moved noise) and
    # not emulations of other targets' kernels (float math here, so their time says nothing)
    deployable = [v for v in variants if v != FLOOR and split_target(v)[1] is None]
    points = [(r.variant, float(r.video_seconds), float(r.psnr_mean)) for r in rows.itertuples()
              if r.variant in deployable and not pd.isna(getattr(r, "psnr_mean", float("nan")))]
    return {"rows": rows.to_dict("records"), "modules": modules, "front": plots.pareto_front(points),
            "svg": _svg(plots.cost_quality_chart(summary, deployable)),
            "warmup": bool(rows.get("warmup_excluded", pd.Series([0])).fillna(0).astype(bool).all())}


def _svg(text: str) -> Markup:
    return Markup(text)  # our own matplotlib output; matplotlib escapes the labels it draws


def report_context(run_dir: Path) -> dict:
    """Everything the report template shows, read from the files of ``run_dir``."""
    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{results_path}: not found; is {run_dir} a finished `quant-audit run` folder?") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{results_path}: not valid JSON ({exc})") from None
    frames = _read_csv(run_dir / "scores" / "frames.csv")
    summary = _read_csv(run_dir / "scores" / "summary.csv")
    latents = _read_csv(run_dir / "scores" / "latents.csv")
    variants = results["variants"]
    main = [v["name"] for v in variants if v["kind"] != "attribution"]
    recipes = list(dict.fromkeys(v["name"].split("@")[0] for v in variants if v["kind"] == "attribution"))
    gates = (list(results.get("parity_gates", [])) + [g for v in variants for g in v["gates"]]
             + list(results.get("search_gates", [])))
    gates.sort(key=lambda g: g["passed"])  # failures first
    return {
        "r": results, "gates": gates, "main_variants": main,
        "floor": next(({"m": v["metrics"]} for v in variants if v["kind"] == "floor"), None),
        "summary_columns": SUMMARY_COLUMNS,
        "variants": [{**v, "m": v["metrics"], "recipes": describe_modules(v["modules"])} for v in variants],
        "attribution_svg": _svg(plots.attribution_bars(summary, results["modules"], recipes)) if len(summary) else "",
        "attribution": [{"module": m, "cells": [next((v for v in variants if v["name"] == f"{r}@{m}"), None)
                                                for r in recipes]} for m in results["modules"]],
        "recipes": recipes,
        "frames_svg": _svg(plots.frame_curves(frames, main)) if len(frames) else "",
        "latents_svg": _svg(plots.latent_curves(latents, main)) if len(latents) else "",
        "playback": _playback(run_dir, results, main), "diff_gain": DIFF_GAIN,
        "quantization": _quantization(run_dir),
        "sensitivity": _sensitivity(results),
        "adherence": _adherence(results),
        "cost": _cost(summary, main),
        "search": results.get("search") or None,
        "search_svg": _svg(plots.search_curve(results["search"])) if results.get("search") else "",
        "config_toml": (run_dir / "config.toml").read_text(encoding="utf-8") if (run_dir / "config.toml").is_file() else "",
        "title": f"quant-audit {results['run_id']}",
    }


def render_report(run_dir: Path) -> Path:
    """Render ``run_dir/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    page = environment().get_template("report.html.j2").render(**report_context(run_dir))
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path

