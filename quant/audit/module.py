"""``quant-audit module``: audit one ONNX model a user already has, without its PyTorch source.

Inputs are ``.npz`` files keyed by the model's input names (``allow_pickle=False``), checked
against the graph before any work: a missing, extra, mis-typed or mis-shaped input is exit 2
naming the file and the input. Sorted by name, every fourth sample (the 4th, 8th, ...; the last
one when there are fewer than four) is held back for measuring; the rest calibrate.

For every recipe that needs no PyTorch source (``quant.recipes.records.ONNX_ONLY``: ``fp16``
with its overflow guard, ``int8`` with its method and options, ``int8-dynamic``), on the
held-back samples, against the FP32 model on this target:

- the quantized model (``work/<fingerprint>/onnx/<recipe>/model.onnx``, a stage reused while
  the model, the samples, the options and our code are unchanged), its op census and size;
- latency: median of timed calls after warm-up, with min and max, and ``speedup_vs_onnx``;
- per output: SQNR and kernel SQNR (the deployed graph against its own float math);
- for outputs that are images or videos (N,3,H,W / N,H,W,3 / N,3,F,H,W), PSNR/SSIM per sample
  with the video audit's metric code, after mapping the declared (``--output-range``) or
  detected value range ([-1, 1], [0, 1] or [0, 255]) to 8-bit frames. As in the video
  audit's tables, identical frames count as ``CAP_DB`` (100 dB) and identical outputs as
  ``CAP_SQNR_DB`` (200 dB), so means stay numbers; NaN/Inf output is -inf and fails.

Then gates (``[gates.default]`` and ``[gates.<recipe>]`` of the config, a finite gate per
recipe, regression against ``--baseline``), and the run files as for ``run``:
``results.json``, ``scores/samples.csv``, ``scores/summary.csv``, ``junit.xml``,
``report.html``, ``quantization/<recipe>.json`` and a history row per recipe. ``--sensitivity``
ranks the model's nodes for int8 (``quant.stages.sensitivity.rank_nodes``).

Example::

    result = audit_module(Path("upscaler.onnx"), Path("samples/"), Path("runs"), AuditConfig())
    result.verdict, result.results["variants"][1]["metrics"]["psnr_mean"]
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from metrics.psnr import CAP_DB, psnr_frames
from metrics.scores import CAP_SQNR_DB
from metrics.ssim import WINDOW, ssim_frames
from metrics.tensor import sqnr_db
from quant.config import AuditConfig
from quant.errors import UserError
from quant.gates import Baseline, GateResult, Gate, check_gates, check_regression
from quant.pipeline.ort_modules import open_session, run_session
from quant.pipeline.video_io import to_uint8
from quant.recipes.census import kernel_finding, precision_census, precision_counts, timed_calls
from quant.recipes.emulate import float_math_model
from quant.recipes.external import TensorSpec, fingerprint, model_files, signature
from quant.recipes.export import onnx_size_bytes
from quant.recipes.names import onnx_dir
from quant.recipes.quantize import check_onnx_file, quantize
from quant.recipes.records import ONNX_ONLY, record
from quant.stages.calibrate import NpzCalibrationReader
from quant.stages.ledger import Ledger
from quant.stages.runner import Stage, StageRunner
from quant.stages.workspace import RUN_FILE, Workspace
from quant.support.environment import utc_now, versions
from quant.support.files import atomic_path, atomic_write_json, atomic_write_text, json_number
from quant.support.progress import progress
from quant.support.target import current_target, set_device, set_threads

SCHEMA_VERSION = 1
MODEL = "model"  # the module name the single model goes by (file names, history rows)
HOLDOUT_EVERY = 4
_RANGES = ((-1.0, 1.0), (0.0, 1.0), (0.0, 255.0))
_RANGE_SLACK = 0.05  # of the range's width: outputs may overshoot their nominal range a little
# --- the model and its samples -----------------------------------------------------------------

def check_sample(path: Path, arrays: dict[str, np.ndarray], inputs: list[TensorSpec]) -> None:
    """Raise UserError naming ``path`` and the input when a sample does not fit the graph."""
    expected = {s.name: s for s in inputs}
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise UserError(f"{path}: missing input '{missing[0]}' (the model takes: "
                        f"{', '.join(s.describe() for s in inputs)})")
    extra = [n for n in arrays if n not in expected]
    if extra:
        raise UserError(f"{path}: '{extra[0]}' is not an input of the model (its inputs: {', '.join(expected)})")
    for name, spec in expected.items():
        value = arrays[name]
        if str(value.dtype) != spec.dtype:
            raise UserError(f"{path}: input '{name}' is {value.dtype}, the model takes {spec.dtype}")
        if spec.shape is not None and (len(spec.shape) != value.ndim or
                                       any(d is not None and d != v for d, v in zip(spec.shape, value.shape))):
            raise UserError(f"{path}: input '{name}' has shape {tuple(value.shape)}, the model takes {spec.type_text()}")


def load_samples(folder: Path, inputs: list[TensorSpec]) -> list[Path]:
    """The ``.npz`` files of ``folder``, sorted, each checked against ``inputs``.

    Raises:
        UserError: no folder, fewer than two samples, an unreadable file or a sample that does not fit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: inputs folder not found")
    files = sorted(folder.glob("*.npz"))
    if len(files) < 2:
        raise UserError(f"{folder}: {len(files)} .npz sample(s); need at least 2 (one calibrates, one is held back)")
    for path in files:
        try:
            arrays = _read(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable .npz of arrays ({str(exc).splitlines()[0][:120]})") from None
        check_sample(path, arrays, inputs)
    return files


def split_samples(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibration, held back): every ``HOLDOUT_EVERY``-th file is held back (the last if none is)."""
    held = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or [files[-1]]
    return [f for f in files if f not in held], held


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# --- image outputs -----------------------------------------------------------------------------

def image_layout(shape: tuple[int, ...]) -> str | None:
    """``N3HW``, ``NHW3`` or ``N3FHW`` when an output of this shape holds RGB images at least
    the SSIM window across; else None."""
    if len(shape) == 4 and shape[1] == 3 and min(shape[2:]) >= WINDOW:
        return "N3HW"
    if len(shape) == 4 and shape[3] == 3 and min(shape[1:3]) >= WINDOW:
        return "NHW3"
    if len(shape) == 5 and shape[1] == 3 and min(shape[3:]) >= WINDOW:
        return "N3FHW"
    return None


def detect_range(lo: float, hi: float) -> tuple[float, float] | None:
    """The smallest of [-1, 1], [0, 1], [0, 255] holding [lo, hi] (with 5% slack) whose width the
    values span at least a quarter of (so a feature map in [0, 3] is not taken for 8-bit pixels),
    or None: then the output is declared with ``--output-range`` or measured by SQNR only."""
    for a, b in sorted(_RANGES, key=lambda r: r[1] - r[0]):
        slack = _RANGE_SLACK * (b - a)
        if lo >= a - slack and hi <= b + slack and (a < 0 or lo >= -slack) and hi - lo >= 0.25 * (b - a):
            return a, b
    return None


def to_frames(x: np.ndarray, layout: str, value_range: tuple[float, float]) -> np.ndarray:
    """An image output as uint8 frames (K, H, W, 3): every image of the batch (and every frame)."""
    lo, hi = value_range
    x = np.asarray(x, dtype=np.float32)
    if layout == "N3HW":
        x = x.transpose(0, 2, 3, 1)
    elif layout == "N3FHW":
        x = x.transpose(0, 2, 3, 4, 1).reshape(-1, x.shape[3], x.shape[4], 3)
    return to_uint8((x - lo) / (hi - lo))


@dataclass
class OutputPlan:
    """How an output is measured: its layout and value range when it is an image, else why not."""

    name: str
    shape: tuple[int, ...]
    layout: str | None = None
    value_range: tuple[float, float] | None = None
    range_source: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "image": self.value_range is not None, "layout": self.layout,
                "range": list(self.value_range) if self.value_range else None, "range_source": self.range_source,
                "note": self.note}


def plan_outputs(names: list[str], fp32_outputs: list[list[np.ndarray]], declared: dict[str, tuple[float, float]]
                 ) -> list[OutputPlan]:
    """Per output: an image (layout and range) or not, from the FP32 outputs on the held-back samples."""
    plans = []
    for i, name in enumerate(names):
        values = [o[i] for o in fp32_outputs]
        plan = OutputPlan(name, tuple(values[0].shape))
        plan.layout = image_layout(plan.shape)
        if plan.layout is None:
            plan.note = "not an image (N,3,H,W / N,H,W,3 / N,3,F,H,W at least 11x11): SQNR only"
        elif name in declared:
            plan.value_range, plan.range_source = declared[name], "declared"
        else:
            lo = min(float(np.nanmin(v)) for v in values)
            hi = max(float(np.nanmax(v)) for v in values)
            plan.value_range = detect_range(lo, hi)
            plan.range_source = "detected" if plan.value_range else ""
            if plan.value_range is None:
                plan.note = (f"values in [{lo:.4g}, {hi:.4g}] fit no image range ([-1,1], [0,1], [0,255]); "
                             f"declare one with --output-range {name}=LO:HI for PSNR/SSIM")
        plans.append(plan)
    return plans


def parse_ranges(texts: list[str] | None, outputs: list[TensorSpec]) -> dict[str, tuple[float, float]]:
    """``NAME=LO:HI`` entries of ``--output-range``.

    Raises:
        UserError: a malformed entry, an unknown output or an empty range.
    """
    names = [o.name for o in outputs]
    out = {}
    for text in texts or ():
        name, _, span = text.partition("=")
        lo_text, _, hi_text = span.partition(":")
        try:
            lo, hi = float(lo_text), float(hi_text)
        except ValueError:
            raise UserError(f"--output-range {text!r}: expected NAME=LO:HI, e.g. image=0:1") from None
        if name not in names:
            raise UserError(f"--output-range {text!r}: the model has no output '{name}' (outputs: {', '.join(names)})")
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise UserError(f"--output-range {text!r}: needs finite LO < HI")
        out[name] = (lo, hi)
    return out


# --- measuring one recipe ----------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """(min, mean) of SQNR values, +inf (identical) capped at ``CAP_SQNR_DB`` as the video audit's
    tables do; -inf (NaN/Inf output) makes both -inf, so it fails every gate."""
    values = [min(v, CAP_SQNR_DB) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    if any(v == -math.inf for v in values):
        return -math.inf, (float(np.mean(finite)) if finite else -math.inf)
    if not finite:
        return None, None
    return min(finite), float(np.mean(finite))


def measure_recipe(recipe: str, fp32_bytes: int, path: Path, held: dict[str, dict[str, np.ndarray]], names: list[str],
                   reference: list[list[np.ndarray]], plans: list[OutputPlan], fp32_ms: list[float],
                   kept_fp32: dict, notes: list[str], options: dict) -> tuple[dict, list[dict], list[np.ndarray]]:
    """The quantization record of ``recipe``, one score row per (held-back sample, output), and the
    outputs on the first held-back sample (``held``: sample name -> inputs)."""
    candidate = open_session(path)
    with tempfile.TemporaryDirectory() as tmp:
        float_math = open_session(float_math_model(path, Path(tmp) / "float_math.onnx"), optimize=False)
    rows, nonfinite, first = [], 0, None
    for (sample_name, sample), ref in zip(held.items(), reference):
        out, math_out = run_session(candidate, sample), run_session(float_math, sample)
        first = out if first is None else first
        nonfinite += int(any(not np.isfinite(o).all() for o in out))
        for i, plan in enumerate(plans):
            row = {"variant": recipe, "sample": sample_name, "output": names[i],
                   "sqnr_db": sqnr_db(out[i], ref[i]), "kernel_sqnr_db": sqnr_db(out[i], math_out[i]),
                   "float_math_sqnr_db": sqnr_db(math_out[i], ref[i]), "psnr_db": math.nan, "ssim": math.nan,
                   "images": 0, "identical_images": 0}
            if plan.value_range is not None:
                a, b = to_frames(ref[i], plan.layout, plan.value_range), to_frames(out[i], plan.layout, plan.value_range)
                psnr = psnr_frames(a, b)
                row.update(psnr_db=float(np.mean(np.minimum(psnr, CAP_DB))), ssim=float(np.mean(ssim_frames(a, b))),
                           images=len(a), identical_images=int(np.isinf(psnr).sum()))
            rows.append(row)
    ms = timed_calls(candidate, next(iter(held.values())), runs=9)
    census = precision_census(path)
    per_output = {}
    for name in names:
        mine = [r for r in rows if r["output"] == name]
        sq_min, sq_mean = _stats([r["sqnr_db"] for r in mine])
        k_min, _ = _stats([r["kernel_sqnr_db"] for r in mine])
        f_min, _ = _stats([r["float_math_sqnr_db"] for r in mine])
        identical = all(r["kernel_sqnr_db"] == math.inf for r in mine)  # the kernels compute the float math exactly
        per_output[name] = {"sqnr_min_db": json_number(sq_min), "sqnr_mean_db": json_number(sq_mean),
                            "kernel_sqnr_db": json_number(k_min), "kernel_identical": identical,
                            "float_math_sqnr_min_db": json_number(f_min),
                            "kernel": kernel_finding(recipe, None if identical else k_min, f_min,
                                                     current_target().int8_path)}
    entry = {"file": path.name, "size_bytes": onnx_size_bytes(path), "fp32_size_bytes": fp32_bytes,
             "census": census, "precision": precision_counts(census), "kept_fp32": kept_fp32, "notes": notes,
             "latency_ms": statistics.median(ms), "latency_min_ms": min(ms), "latency_max_ms": max(ms),
             "fp32_latency_ms": statistics.median(fp32_ms), "fp32_latency_min_ms": min(fp32_ms),
             "fp32_latency_max_ms": max(fp32_ms), "latency_runs": len(ms), "samples": len(held),
             "nonfinite_samples": nonfinite, "outputs": per_output, "options": options}
    return entry, rows, first


def summary_row(recipe: str, entry: dict, rows: list[dict]) -> dict:
    """The gateable metrics of one recipe (``scores/summary.csv``)."""
    sq_min, sq_mean = _stats([r["sqnr_db"] for r in rows])
    k_min, _ = _stats([r["kernel_sqnr_db"] for r in rows])
    images = [r for r in rows if r["images"]]
    psnr = [r["psnr_db"] for r in images]
    ssim = [r["ssim"] for r in images]
    return {"variant": recipe, "sqnr_min_db": sq_min, "sqnr_mean_db": sq_mean,
            "kernel_sqnr_db": k_min,
            "psnr_mean": float(np.mean(psnr)) if psnr else None, "psnr_min": float(np.min(psnr)) if psnr else None,
            "ssim_mean": float(np.mean(ssim)) if ssim else None, "ssim_min": float(np.min(ssim)) if ssim else None,
            "latency_ms": entry["latency_ms"], "fp32_latency_ms": entry["fp32_latency_ms"],
            "speedup_vs_onnx": entry["fp32_latency_ms"] / entry["latency_ms"] if entry["latency_ms"] > 0 else None,
            "size_bytes": entry["size_bytes"], "size_ratio": entry["size_bytes"] / max(entry["fp32_size_bytes"], 1),
            **{f"{p}_compute_nodes": n for p, n in entry["precision"].items()}}


# --- the audit ---------------------------------------------------------------------------------

@dataclass
class ModuleAuditResult:
    run_id: str
    run_dir: Path
    verdict: str
    results: dict
    failed: list[GateResult] = field(default_factory=list)


def module_gates(config: AuditConfig, recipe: str) -> tuple[Gate, ...]:
    """``[gates.default]`` then ``[gates.<recipe>]`` (the recipe's own table wins per metric)."""
    merged = {g.metric: g for g in config.gates.get("default", ())}
    merged.update({g.metric: g for g in config.gates.get(recipe, ())})
    return tuple(merged.values())


def check_recipes(recipes: list[str], config: AuditConfig) -> list[str]:
    """The recipes to run, each one ``quant-audit module`` can run; gate tables must name one of them.

    Raises:
        UserError: a recipe that needs PyTorch or is unknown, or a gate table naming no audited recipe.
    """
    for name in recipes:
        if not record(name).quantizes or name not in ONNX_ONLY:
            why = "needs the model's PyTorch source" if record(name).needs_torch else "is not a quantization recipe"
            raise UserError(f"recipe '{name}' {why}; a single ONNX model takes: {', '.join(ONNX_ONLY)}")
    for table in config.gates:
        if table != "default" and table not in recipes:
            raise UserError(f"{config.source}: gates.{table}: '{table}' is not an audited recipe "
                            f"(recipes: {', '.join(recipes)})")
    return list(dict.fromkeys(recipes))


def audit_module(model_path: Path, inputs: Path, out: Path, config: AuditConfig, recipes: list[str] | None = None,
                 ranges: list[str] | None = None, baseline: str | None = None, sensitivity: bool = False,
                 show_progress: bool = True, argv: list[str] | None = None) -> ModuleAuditResult:
    """Audit ``model_path`` on the samples in ``inputs`` (see the module doc).

    Raises:
        UserError: a bad model, sample, recipe, range, config or baseline (before any heavy work).
    """
    from quant.audit.run import _new_run_id, quantize_options
    from reports import history

    model_path, out = Path(model_path), Path(out)
    check_onnx_file(model_path)
    files = model_files(model_path)
    inputs_spec, outputs_spec = signature(model_path)
    samples = load_samples(inputs, inputs_spec)
    declared = parse_ranges(ranges, outputs_spec)
    recipes = check_recipes(recipes or [r for r in config.recipes if r in ONNX_ONLY] or list(ONNX_ONLY), config)
    set_threads(config.threads)
    set_device(config.device, where=f"{config.source}: runtime.device")
    target = current_target()
    model_id = {"name": model_path.name, "path": str(model_path.resolve()), "fingerprint": fingerprint(files),
                "files": [f.name for f in files], "inputs": [s.describe() for s in inputs_spec],
                "outputs": [s.describe() for s in outputs_spec]}
    workspace = Workspace(out, config.history_url)
    base = None
    if baseline:
        run_id, why = history.resolve_baseline(workspace.history, baseline, model_id["fingerprint"], target.id)
        if why:
            print(why, file=sys.stderr)
        if run_id:
            base = Baseline(run_id, history.run_metrics(workspace.history, run_id), history.run_target(workspace.history, run_id))
    calibration, held_files = split_samples(samples)
    held = {p.stem: _read(p) for p in held_files}  # read once: every recipe is measured on them
    fp32 = open_session(model_path)
    names = [o.name for o in fp32.get_outputs()]
    reference = [run_session(fp32, sample) for sample in held.values()]
    bad = [n for i, n in enumerate(names) if any(not np.isfinite(r[i]).all() for r in reference)]
    if bad:
        raise UserError(f"{model_path}: the FP32 model itself gives NaN/Inf in output '{bad[0]}' on the held-back "
                        "samples; nothing to compare quantization against")
    plans = plan_outputs(names, reference, declared)
    work = workspace.work(model_id["fingerprint"])
    run_id, started = _new_run_id(), utc_now()
    run_dir = workspace.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_FILE, {"schema_version": SCHEMA_VERSION, "run_id": run_id, "kind": "module",
                                           "status": "running", "started": started})
    print(f"starting module audit {run_id} in {run_dir}\ntarget: {target.describe()}", file=sys.stderr)
    times: list[dict] = []
    runner = StageRunner(Ledger(work), done=lambda s: times.append({"name": s.name, "seconds": round(s.seconds, 3),
                                                                     "reused": s.reused}))

    fp32_ms = timed_calls(fp32, next(iter(held.values())), runs=9)
    fp32_bytes = sum(f.stat().st_size for f in files)
    entries, score_rows, summary = {}, [], []
    for recipe in progress(recipes, "module audit", "recipe", show_progress):
        options = quantize_options(config, recipe)
        dst = onnx_dir(work, recipe) / f"{MODEL}.onnx"

        def work_fn(recipe=recipe, options=options, dst=dst) -> None:
            result = quantize(model_path, dst, recipe, lambda: NpzCalibrationReader(calibration), options)
            atomic_write_json(dst.with_suffix(".json"), {"kept_fp32": result.kept_fp32, "notes": result.notes})

        runner.run(Stage(f"quantize:{recipe}:{MODEL}", {"recipe": recipe, "options": options.record(),
                                                        "target": target.id},
                         work_fn, outputs=(dst, dst.with_suffix(".json")), files=(*files, *calibration),
                         sources=("quant.recipes.quantize", record(recipe).source, "quant.audit.module")))
        made = json.loads(dst.with_suffix(".json").read_text(encoding="utf-8"))
        start = time.perf_counter()
        entry, rows, first = measure_recipe(recipe, fp32_bytes, dst, held, names, reference, plans, fp32_ms,
                                            made["kept_fp32"], made["notes"], options.record())
        times.append({"name": f"measure:{recipe}", "seconds": round(time.perf_counter() - start, 3), "reused": False})
        entries[recipe] = entry
        score_rows += rows
        summary.append(summary_row(recipe, entry, rows))
        _preview(run_dir, recipe, reference[0], first, plans)
        atomic_write_json(run_dir / "quantization" / f"{recipe}.json",
                          {"schema_version": SCHEMA_VERSION, "recipe": recipe, "model": model_id,
                           "target": target.to_dict(), "versions": versions(), "modules": {MODEL: entry}})
    ranking = None
    if sensitivity:
        ranking = _sensitivity(model_path, calibration, held, work, config, show_progress, times)
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    command = ["quant-audit", "module", "--onnx", str(model_path), "--inputs", str(inputs), "--out", str(out),
               "--recipes", ",".join(recipes), "--config", str(run_dir / "config.toml"),
               *[a for name, (lo, hi) in declared.items() for a in ("--output-range", f"{name}={lo!r}:{hi!r}")],
               *(["--sensitivity"] if sensitivity else [])]
    results = _results(run_id, started, config, model_id, target, samples, calibration, held_files, plans, entries,
                       summary, base, ranking, times, argv or sys.argv, command)
    _write(run_dir, results, summary, score_rows, workspace)
    atomic_write_json(run_dir / RUN_FILE, {"schema_version": SCHEMA_VERSION, "run_id": run_id, "kind": "module",
                                           "status": "complete", "started": started, "finished": results["finished"],
                                           "verdict": results["verdict"]})
    failed = [GateResult(**g) for g in results["failed_gates"]]
    return ModuleAuditResult(run_id, run_dir, results["verdict"], results, failed)


def _preview(run_dir: Path, recipe: str, reference: list[np.ndarray], out: list[np.ndarray],
             plans: list[OutputPlan]) -> None:
    """``previews/<recipe>.<output>.png``: the first image of the first held-back sample, reference |
    quantized | difference (the video report's layout), for each image output."""
    from PIL import Image

    from reports.html import compare_frames

    images = [p for p in plans if p.value_range is not None]
    if not images:
        return
    names = [p.name for p in plans]
    for plan in images:
        i = names.index(plan.name)
        a = to_frames(reference[i][:1], plan.layout, plan.value_range)[:1]
        b = to_frames(out[i][:1], plan.layout, plan.value_range)[:1]
        strip = compare_frames(a, b)[0]
        scale = max(1, 128 // strip.shape[0])  # small images enlarged (nearest neighbour) to be seen
        strip = strip.repeat(scale, axis=0).repeat(scale, axis=1)
        with atomic_path(run_dir / "previews" / f"{recipe}.{_safe(plan.name)}.png") as tmp:
            Image.fromarray(strip).save(tmp, format="PNG")


def _safe(name: str) -> str:
    """An output name as a file-name part (graph names may hold '/' or ':')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "output"


def _sensitivity(model_path, calibration, held, work, config, show_progress, times) -> dict:
    from quant.audit.run import quantize_options
    from quant.stages.sensitivity import rank_nodes, write_sensitivity

    start = time.perf_counter()
    table, extra = rank_nodes(model_path, lambda: NpzCalibrationReader(calibration), list(held.values()), "int8",
                              quantize_options(config, "int8"), MODEL, show_progress)
    write_sensitivity(work, MODEL, "int8", table, extra)
    times.append({"name": "sensitivity:int8", "seconds": round(time.perf_counter() - start, 3), "reused": False})
    return {"recipe": "int8", "full_sqnr_db": json_number(extra["full_sqnr_db"]),
            "ranking": [{k: json_number(v) for k, v in r.items()} for r in table.to_dict("records")]}


def _results(run_id, started, config, model_id, target, samples, calibration, held, plans, entries, summary, base,
             ranking, times, argv, command) -> dict:
    variants, checked = [], []
    for row in summary:
        recipe = row["variant"]
        entry = entries[recipe]
        gates = check_gates(recipe, row, module_gates(config, recipe), {MODEL: entry["nonfinite_samples"]})
        if base is not None and recipe in base.metrics and config.regression:
            gates += check_regression(recipe, row, base.metrics[recipe], config.regression, base.run_id,
                                      base.note(target.id))
        checked += gates
        variants.append({"name": recipe, "kind": "module", "modules": {MODEL: recipe},
                         "metrics": {k: json_number(v) for k, v in row.items() if k != "variant"},
                         "outputs": entry["outputs"],
                         "quantization": {k: entry[k] for k in ("options", "kept_fp32", "notes", "file")},
                         "passed": all(g.passed for g in gates),
                         "gates": [g.to_dict() for g in gates]})
    return {
        "schema_version": SCHEMA_VERSION, "kind": "module", "run_id": run_id, "tag": config.tag,
        "started": started, "finished": utc_now(),
        "verdict": "pass" if all(g.passed for g in checked) else "fail",
        "model": model_id, "modules": [MODEL], "target": target.to_dict(), "versions": versions(),
        "config": config.to_dict(), "command": list(argv), "reproduce": shlex.join(command),
        "samples": {"total": len(samples), "calibration": [p.name for p in calibration], "held_back": [p.name for p in held],
                    "rule": f"every {HOLDOUT_EVERY}th sample in name order is held back for measuring"},
        "outputs": {p.name: p.to_dict() for p in plans},
        "baseline": None if base is None else {"run_id": base.run_id, "target": base.target},
        "sensitivity": ranking,
        "stages": times,
        "failed_gates": [g.to_dict() for g in checked if not g.passed],
        "variants": variants,
    }


def _write(run_dir: Path, results: dict, summary: list[dict], rows: list[dict], workspace: Workspace) -> None:
    from reports import history
    from reports.dashboard import render_dashboard
    from reports.junit import write_junit
    from reports.module_html import render_module_report

    for name, table in (("summary.csv", pd.DataFrame(summary)), ("samples.csv", pd.DataFrame(rows))):
        with atomic_path(run_dir / "scores" / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.10g")
    atomic_write_json(run_dir / "results.json", results)
    write_junit(run_dir / "junit.xml", results)
    atomic_write_text(run_dir / "report.html", render_module_report(results, run_dir))
    history.record_run(workspace.history, results)
    render_dashboard(workspace.out, workspace.history)
