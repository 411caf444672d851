"""Plain-text tables for the terminal: parity per module, PSNR per frame.

Example::

    print(parity_table(json.load(open("runs/r1/parity.json"))))
"""

from __future__ import annotations

import math


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def parity_table(parity: dict) -> str:
    """The modules of a ``parity.json`` document: error, export time, batch axis, verdict."""
    rows = []
    for module, m in parity["modules"].items():
        export = m.get("export", {})
        rows.append([
            module, _num(m["max_abs"], ".2e"), _num(m["rel_l2"], ".2e"), str(m["samples"]),
            _num(export.get("seconds"), ".1f"), "dynamic" if export.get("dynamic_batch") else "static",
            _num(export.get("size_bytes", 0) / 1e6, ".2f"), "pass" if m["passed"] else "FAIL",
        ])
    head = f"parity of ONNX vs PyTorch, {parity['model']['name']} ({parity['model']['fingerprint']}), threshold rel-L2 <= {parity['threshold']:g}"
    return head + "\n" + _table(["module", "max_abs", "rel_l2", "calls", "export_s", "batch", "MB", "parity"], rows)


def psnr_table(title: str, videos: dict[str, list[float]], cap_db: float) -> str:
    """One row per video: the PSNR of every frame (``inf`` shown as ``>cap``), min and mean."""
    rows = []
    for name, values in videos.items():
        shown = [f">{cap_db:g}" if math.isinf(v) else f"{v:.1f}" for v in values]
        finite = [min(v, cap_db) for v in values]
        rows.append([name, f"{min(finite):.1f}", f"{sum(finite) / len(finite):.1f}", " ".join(shown)])
    return title + "\n" + _table(["video", "min_db", "mean_db", "per-frame PSNR (dB)"], rows)


def score_table(videos) -> str:
    """Per-video summary of a scores table (pandas DataFrame from ``metrics.scores.summarize``)."""
    has_latents = "latent_sqnr_min_db" in videos.columns
    headers = ["variant", "video", "psnr_db", "psnr_min", "ssim_mean", "ssim_min", "motion_psnr", "flicker"]
    if has_latents:
        headers += ["latent_sqnr_min", "at step (expert)"]
    judged = "adherence" in videos.columns
    if judged:
        headers += ["adherence (seen)"]
    rows = []
    for r in videos.itertuples(index=False):
        row = [r.variant, r.video, f"{r.psnr_video_db:.2f}", f"{r.psnr_min:.2f}", f"{r.ssim_mean:.5f}", f"{r.ssim_min:.5f}",
               _num(r.motion_psnr_mean, ".2f"), str(int(r.flicker_frames))]
        if has_latents:
            row += [_num(r.latent_sqnr_min_db, ".1f"),
                    "" if r.latent_sqnr_min_db != r.latent_sqnr_min_db else f"{int(r.latent_worst_step)} ({r.latent_worst_expert})"]
        if judged:
            row += ["" if r.adherence != r.adherence else
                    f"{'ok' if r.adherence == 1 else 'WRONG'} ({r.seen_colour} {r.seen_shape} {r.seen_motion})"]
        rows.append(row)
    return _table(headers, rows)


def quantization_table(report: dict) -> str:
    """Per module: compute ops by precision, FP32-kept nodes, size, latency and SQNR against FP32."""
    from quant.recipes.census import precision_counts

    rows = []
    for module, m in report["modules"].items():
        counts = precision_counts(m["census"])
        rows.append([
            module, str(counts["int8"]), str(counts["fp16"]), str(counts["fp32"]), str(len(m["kept_fp32"])),
            f"{m['size_bytes'] / 1e6:.2f}/{m['fp32_size_bytes'] / 1e6:.2f}",
            f"{m['latency_ms']:.1f}/{m['fp32_latency_ms']:.1f}",
            "identical" if m["identical_to_fp32"] else ("NaN/Inf" if m["nonfinite_output"] else _num(m["sqnr_min_db"], ".1f")),
            "identical" if m.get("kernel_identical") else _num(m.get("kernel_sqnr_db"), ".1f"),
        ])
    head = f"quantization '{report['recipe']}' of {report['model']['name']} (compute ops = MatMul/Conv/Gemm)"
    if report.get("target"):
        head += f", target {report['target']['id']}"
    table = _table(["module", "int8", "fp16", "fp32", "kept_fp32", "MB (q/fp32)", "ms (q/fp32)", "SQNR_min_dB",
                    "kernel_SQNR_dB"], rows)
    return "\n".join([head, table, *kernel_warnings(report)])


def kernel_warnings(report: dict) -> list[str]:
    """One line per module whose kernel SQNR says something (``quant_report.kernel_finding``)."""
    lines = []
    for module, m in report["modules"].items():
        finding = m.get("kernel") or {}
        if finding.get("status") == "lossy-kernels":
            lines.append(f"WARNING {report['recipe']} {module}: {finding['message']}")
        elif finding.get("status") == "float-math":
            lines.append(f"note: {report['recipe']} {module} {finding['message']}")
    return lines


def verdict_lines(results: dict) -> str:
    """The variants of a run with their headline metrics and gate results."""
    rows = []
    judged = any(v["metrics"].get("adherence") is not None for v in results["variants"])
    for v in results["variants"]:
        m = v["metrics"]
        failed = [g for g in v["gates"] if not g["passed"]]
        rows.append([v["name"], _num(m.get("psnr_mean"), ".2f"), _num(m.get("psnr_min"), ".2f"),
                     _num(m.get("ssim_mean"), ".4f"), _num(m.get("ssim_min"), ".4f"),
                     *([_num(m.get("adherence"), ".3f")] if judged else []),
                     "pass" if v["passed"] else f"FAIL ({', '.join(g['metric'] for g in failed)})"])
    head = f"run {results['run_id']}: {results['model']['name']} ({results['model']['fingerprint'][:12]})"
    target = results.get("target")
    if target:
        head += f"\ntarget {target['id']}: {target['cpu']}, int8 path {target['int8_path']}, {target['threads']} threads"
    notes = sorted({f"note: {g['variant']}: {g['metric']} {g['op']} {g['threshold']:g}: {g['note']}"
                    for v in results["variants"] for g in v["gates"] if g.get("note")})
    findings = [f"{'WARNING' if f['status'] == 'lossy-kernels' else 'note'}: {f['recipe']} {f['module']}: {f['message']}"
                for f in results.get("kernel_findings", []) if f["status"] in ("lossy-kernels", "float-math")]
    table = _table(["variant", "psnr_mean", "psnr_min", "ssim_mean", "ssim_min", *(["adherence"] if judged else []),
                    "gates"], rows)
    reference = (results.get("reference_adherence") or {}).get("summary")
    if reference:
        head += (f"\nreference adherence: colour {reference['adherence_colour']:.0%}, shape {reference['adherence_shape']:.0%}, "
                 f"motion {reference['adherence_motion']:.0%}, all three {reference['adherence']:.0%}")
    return "\n".join([head, table, *findings, *notes])


def module_lines(results: dict) -> str:
    """A module audit's recipes with quality, speed and gate results, then kernel findings."""
    rows = []
    for v in results["variants"]:
        m = v["metrics"]
        failed = [g for g in v["gates"] if not g["passed"]]
        rows.append([v["name"], _num(m.get("sqnr_min_db"), ".2f"), _num(m.get("kernel_sqnr_db"), ".1f"),
                     _num(m.get("psnr_mean"), ".2f"), _num(m.get("ssim_min"), ".4f"), _num(m.get("latency_ms"), ".3f"),
                     _num(m.get("speedup_vs_onnx"), ".2f"), _num(m.get("size_ratio"), ".2f"),
                     "pass" if v["passed"] else f"FAIL ({', '.join(g['metric'] for g in failed)})"])
    target = results["target"]
    head = (f"module audit {results['run_id']}: {results['model']['name']} ({results['model']['fingerprint'][7:19]})\n"
            f"target {target['id']}: {target['cpu']}, int8 path {target['int8_path']}, {target['threads']} threads\n"
            f"samples: {len(results['samples']['calibration'])} calibrate, {len(results['samples']['held_back'])} held back")
    table = _table(["recipe", "sqnr_min_db", "kernel_sqnr", "psnr_mean", "ssim_min", "latency_ms", "speedup", "size",
                    "gates"], rows)
    notes = [f"note: output {name}: {o['note']}" for name, o in results["outputs"].items() if o["note"]]
    findings = [f"{'WARNING' if e['kernel']['status'] == 'lossy-kernels' else 'note'}: {v['name']} {name}: "
                f"{e['kernel']['message']}" for v in results["variants"] for name, e in v["outputs"].items()
                if e["kernel"]["status"] in ("lossy-kernels", "float-math")]
    return "\n".join([head, table, *notes, *findings])


def history_tables(runs, rows, metric: str) -> str:
    """The run list, then ``metric`` per variant (rows) across runs (columns, oldest first)."""
    import json

    text = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)  # noqa: E731 - SQL NULL
    listing = _table(["run", "time", "tag", "model", "fingerprint", "verdict", "variants", "failed", "baseline"],
                     [[r.run_id, r.time, text(r.tag), r.model, r.fingerprint.split(":")[-1][:12], r.verdict,
                       str(r.variants), str(r.failed), text(r.baseline)] for r in runs.itertuples()])
    order = list(dict.fromkeys(rows["run_id"]))
    labels = [next((t for t in rows.loc[rows["run_id"] == r, "tag"] if t), r[-11:]) for r in order]
    values: dict[str, dict[str, str]] = {}
    for r in rows.itertuples():
        value = json.loads(r.metrics).get(metric)
        mark = "" if r.verdict == "pass" else ("!R" if r.regression_failed else "!")
        values.setdefault(r.variant, {})[r.run_id] = _num(value, ".3f") + mark
    trend = _table(["variant", *labels], [[v, *(cells.get(r, "") for r in order)] for v, cells in values.items()])
    return (f"{len(runs)} run(s)\n{listing}\n\n{metric} across runs (! failed a gate, !R regression)\n{trend}")


def sensitivity_table(table, top: int = 20) -> str:
    """The ``top`` most sensitive nodes of a ``quant.stages.sensitivity`` ranking."""
    rows = [[str(r.rank), r.node, r.op_type, str(r.nodes), _num(r.activation_sqnr_db, ".1f"),
             _num(r.keep_fp32_sqnr_db, ".2f"), _num(r.gain_db, "+.3f")] for r in table.head(top).itertuples()]
    head = (f"{len(table)} quantized layers ({int(table['nodes'].sum())} nodes), ranked by the module-output SQNR "
            "gained by keeping each one in FP32")
    return head + "\n" + _table(["rank", "node", "op", "nodes", "activation_sqnr_db", "keep_fp32_sqnr_db", "gain_db"], rows)


def search_table(result) -> str:
    """Every verified candidate of a mixed-precision search, with the references."""
    metric = result.gates[0].metric if result.gates else "psnr_mean"
    rows = []
    for c in [*result.references.values(), *result.candidates]:
        mark = "<- chosen" if c is result.chosen else ""
        index = str(c.index) if c.index >= 0 else c.label
        rows.append([index, f"{c.coverage:.1%}", _num(c.latency_ms, ".1f"), _num(c.metrics.get(metric), ".3f"),
                     "pass" if c.passed else "fail", mark])
    gates = ", ".join(f"{g.metric} {g.op} {g.threshold:g}" for g in result.gates)
    return (f"search against {gates} ({len(result.moves)} moves, {len(result.candidates)} candidates verified)\n"
            + _table(["candidate", "int8_coverage", "ms_per_video", metric, "gate", ""], rows))


def inc_table(comparison: dict) -> str:
    """Our search's recipe for one module against INC autotune's trials, on the same video metric."""
    ours, inc = comparison["ours"], comparison["inc"]
    rows = [["quant-audit search", f"{ours['recipe']} + {len(ours['keep_fp32'])} node(s) FP32", _num(ours["value"], ".2f"), ""]]
    for t in inc["trials"][1:]:
        rows.append([f"INC trial {t['trial']}", f"act_sym={t['config']['act_sym']} act_algo={t['config']['act_algo']}",
                     _num(t["value"], ".2f"), "pass" if t["passed"] else "fail"])
    return (f"{comparison['module']} alone quantized, {inc['gate']} (INC FP32 baseline {inc['fp32_baseline']:.2f})\n"
            + _table(["who", "setting", "value", "gate"], rows))
