"""``report.html`` of ``quant-audit module``: one self-contained page for a single ONNX model.

The same look as the video report (``templates/base.css``): verdict, gates, per-recipe quality
and cost, per-output SQNR and kernel SQNR, the previews of image outputs (reference | quantized |
difference, ``previews/*.png`` embedded as data URIs), the optional int8 sensitivity ranking,
the samples and the environment. Jinja2 autoescaping escapes every user string (file, input and
output names, tags).

Example::

    atomic_write_text(run_dir / "report.html", render_module_report(results, run_dir))
"""

from __future__ import annotations

import base64
from pathlib import Path

from reports.html import environment

SUMMARY_COLUMNS = ["sqnr_min_db", "sqnr_mean_db", "kernel_sqnr_db", "psnr_mean", "psnr_min", "ssim_mean", "ssim_min",
                   "latency_ms", "speedup_vs_onnx", "size_bytes"]


def _previews(run_dir: Path, results: dict) -> list[dict]:
    out = []
    for variant in results["variants"]:
        for path in sorted((run_dir / "previews").glob(f"{variant['name']}.*.png")):
            uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            out.append({"recipe": variant["name"], "output": path.name[len(variant["name"]) + 1:-4], "uri": uri})
    return out


def render_module_report(results: dict, run_dir: Path) -> str:
    """The page for ``results`` (``results.json`` of a module audit) in ``run_dir``."""
    gates = sorted([g for v in results["variants"] for g in v["gates"]], key=lambda g: g["passed"])
    return environment().get_template("module_report.html.j2").render(
        r=results, gates=gates, columns=SUMMARY_COLUMNS, previews=_previews(Path(run_dir), results),
        title=f"quant-audit module {results['run_id']}")
