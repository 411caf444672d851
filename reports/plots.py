"""Charts for the report and the dashboard: matplotlib figures rendered to inline SVG text.

Every function takes plain tables (pandas) and returns an ``<svg>`` string, or ``""`` when
there is nothing to draw; the templates embed it as is, so pages need no network and no script.

Example::

    svg = frame_curves(frames_table, ["onnx", "fp16", "int8"])
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "quant-audit",
                     "text.parse_math": False})  # tags and variant names are text, never mathtext


def to_svg(fig) -> str:
    """The figure as SVG text without the XML prolog (it is embedded in HTML)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def frame_curves(frames: pd.DataFrame, variants: list[str]) -> str:
    """Mean PSNR and SSIM per frame index (over every prompt and seed), one line per variant."""
    rows = frames[frames["variant"].isin(variants)]
    if rows.empty:
        return ""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for variant in variants:
        part = rows[rows["variant"] == variant].groupby("frame")
        if not len(part):
            continue
        axes[0].plot(part["psnr_db"].mean(), marker=".", label=variant)
        axes[1].plot(part["ssim"].mean(), marker=".", label=variant)
    axes[0].set(xlabel="frame", ylabel="PSNR (dB, mean over videos)", title="PSNR per frame")
    axes[1].set(xlabel="frame", ylabel="SSIM (mean over videos)", title="SSIM per frame")
    axes[1].legend(fontsize=8, loc="lower left")
    return to_svg(fig)


def latent_curves(latents: pd.DataFrame, variants: list[str]) -> str:
    """Latent SQNR after each denoising step, one line per variant; shading marks the expert."""
    rows = latents[latents["variant"].isin(variants)] if len(latents) else latents
    if rows.empty:
        return ""
    fig, ax = plt.subplots(figsize=(10, 3.2))
    experts = rows.groupby("step")["expert"].first()
    for step, expert in experts.items():
        if expert == "transformer_2":
            ax.axvspan(step - 0.5, step + 0.5, color="0.9", lw=0)
    for variant in variants:
        part = rows[rows["variant"] == variant].groupby("step")["latent_sqnr_db"].mean()
        if len(part):
            ax.plot(part.index, part.to_numpy(), marker="o", ms=3, label=variant)
    ax.set(xlabel="denoising step (grey: low-noise expert transformer_2)", ylabel="latent SQNR (dB)",
           title="Latent divergence from the FP32 reference per step")
    ax.legend(fontsize=8, ncol=3)
    return to_svg(fig)


def attribution_bars(summary: pd.DataFrame, modules: list[str], recipes: list[str], metric: str = "psnr_mean") -> str:
    """``<recipe>@<module>`` variants: the video metric when only that module is quantized."""
    values = {(r, m): summary.loc[summary["variant"] == f"{r}@{m}", metric] for r in recipes for m in modules}
    if not any(len(v) for v in values.values()):
        return ""
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.55 * len(modules) * max(1, len(recipes)) / 2))
    height = 0.8 / max(1, len(recipes))
    y = np.arange(len(modules))
    for i, recipe in enumerate(recipes):
        vals = [float(values[(recipe, m)].iloc[0]) if len(values[(recipe, m)]) else np.nan for m in modules]
        bars = ax.barh(y + i * height, vals, height, label=recipe)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_yticks(y + height * (len(recipes) - 1) / 2, modules)
    ax.invert_yaxis()
    ax.set(xlabel=f"{metric} of the video with only this module quantized (dB; lower = this module costs more)",
           title="Per-module attribution")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return to_svg(fig)


def history_chart(rows: pd.DataFrame, metric: str, variants: list[str]) -> str:
    """``metric`` across runs (x: run, labelled with its tag), one line per variant; red rings mark
    regression failures, crosses failed gates."""
    if rows.empty:
        return ""
    order = rows.drop_duplicates("run_id")[["run_id", "tag", "time"]].reset_index(drop=True)
    position = {r: i for i, r in enumerate(order["run_id"])}
    fig, ax = plt.subplots(figsize=(6.5, 3))
    for variant in variants:
        part = rows[rows["variant"] == variant]
        if part.empty:
            continue
        x = part["run_id"].map(position).to_numpy()
        ax.plot(x, part[metric].to_numpy(dtype=float), marker="o", ms=4, label=variant)
        failed = part["verdict"].to_numpy() == "fail"
        ax.scatter(x[failed], part[metric].to_numpy(dtype=float)[failed], marker="x", color="black", zorder=3)
        regressed = part["regression_failed"].to_numpy() == 1
        ax.scatter(x[regressed], part[metric].to_numpy(dtype=float)[regressed], s=140, facecolors="none",
                   edgecolors="red", linewidths=1.5, zorder=4)
    labels = [(t or r[-11:]) for r, t in zip(order["run_id"], order["tag"])]
    ax.set_xticks(range(len(order)), labels, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel=metric, title=f"{metric} across runs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return to_svg(fig)


def sensitivity_bars(table: pd.DataFrame, title: str, top: int = 15) -> str:
    """The ``top`` nodes by keep-one-in-FP32 gain (dB at the module output), most sensitive on top."""
    if table is None or table.empty:
        return ""
    part = table.head(top)
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.28 * len(part)))
    colours = ["#cf222e" if g > 0 else "#8c959f" for g in part["gain_db"]]
    bars = ax.barh(np.arange(len(part)), part["gain_db"], color=colours)
    ax.bar_label(bars, fmt="%+.2f", fontsize=7, padding=2)
    counts = part["nodes"] if "nodes" in part else [1] * len(part)
    labels = [f"{n} ({o}{f' x{c}' if c > 1 else ''})" for n, o, c in zip(part["node"], part["op_type"], counts)]
    ax.set_yticks(np.arange(len(part)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="module-output SQNR gained by keeping this node in FP32 (dB)", title=f"Sensitivity: {title}")
    return to_svg(fig)


def search_curve(search: dict) -> str:
    """Video quality against INT8 coverage and against latency for every verified candidate;
    the chosen mix is a star, the all-INT8 and all-FP16 references are labelled."""
    candidates = search.get("candidates") or []
    if not candidates:
        return ""
    metric = search["settings"]["gates"][0].split()[0]
    threshold = float(search["settings"]["gates"][0].split()[-1])
    chosen = (search.get("chosen") or {}).get("index")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, x, label in ((axes[0], "coverage", "INT8 coverage (share of compute nodes)"),
                         (axes[1], "latency_ms", "ORT CPU time per video (ms, estimated)")):
        for c in candidates:
            colour = "#1a7f37" if c["passed"] else "#cf222e"
            ax.scatter(c[x], c["metrics"].get(metric), color=colour, s=24, zorder=3)
            ax.annotate(str(c["index"]), (c[x], c["metrics"].get(metric)), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
            if c["index"] == chosen:
                ax.scatter(c[x], c["metrics"].get(metric), marker="*", s=260, facecolors="none",
                           edgecolors="black", zorder=4, label="chosen")
        for name, ref in (search.get("references") or {}).items():
            ax.scatter(ref[x], ref["metrics"].get(metric), marker="s", s=40, color="0.4", zorder=3)
            ax.annotate(f"all {name}", (ref[x], ref["metrics"].get(metric)), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
        ax.axhline(threshold, color="0.5", ls="--", lw=1)
        ax.set(xlabel=label)
    axes[0].set(ylabel=metric, title="Quality against INT8 coverage (green: passes the gate)")
    axes[1].set(title="Quality against latency")
    axes[0].legend(fontsize=7, loc="lower left")
    return to_svg(fig)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes: (name, seconds, quality), fewer
    seconds and more quality being better; ties keep both."""
    front = []
    for name, t, q in points:
        dominated = any((t2 <= t and q2 >= q) and (t2 < t or q2 > q) for n2, t2, q2 in points if n2 != name)
        if not dominated:
            front.append(name)
    return front


def cost_quality_chart(summary: pd.DataFrame, variants: list[str], quality: str = "psnr_mean") -> str:
    """Quality (``psnr_mean``) against median seconds per video, one point per variant (with its
    min-max spread); the Pareto front is joined and its points ringed."""
    if "video_seconds" not in summary or quality not in summary:
        return ""
    rows = summary[summary["variant"].isin(variants)].dropna(subset=["video_seconds", quality])
    if rows.empty:
        return ""
    points = [(r.variant, float(r.video_seconds), float(getattr(r, quality))) for r in rows.itertuples()]
    front = set(pareto_front(points))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for r in rows.itertuples():
        t, q = float(r.video_seconds), float(getattr(r, quality))
        lo, hi = getattr(r, "video_seconds_min", t), getattr(r, "video_seconds_max", t)
        ax.errorbar([t], [q], xerr=[[max(t - lo, 0)], [max(hi - t, 0)]], fmt="o", ms=5, capsize=2,
                    color="#0969da" if r.variant in front else "#8c959f")
        ax.annotate(r.variant, (t, q), textcoords="offset points", xytext=(5, 3), fontsize=8)
    edge = sorted((t, q) for n, t, q in points if n in front)
    ax.plot([t for t, _ in edge], [q for _, q in edge], color="#0969da", lw=1, alpha=0.6, label="Pareto front")
    ax.scatter([t for t, _ in edge], [q for _, q in edge], s=90, facecolors="none", edgecolors="#0969da")
    ax.set(xlabel="seconds per video (median; bars: min-max)", ylabel=f"{quality} (dB)" if "psnr" in quality else quality,
           title="Quality against cost: up and to the left is better")
    ax.legend(fontsize=8, loc="lower right")
    return to_svg(fig)
