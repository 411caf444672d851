"""``<out>/dashboard.html``: every variant's metrics across the runs in the history store.

One section per model (fingerprint): a chart per tracked metric with a line per variant (runs in
time order, labelled with their release tags; black crosses mark failed gates, red rings
regressions against the baseline), then the run list. Self-contained like the report.

Example::

    render_dashboard(Path("runs"))     # reads runs/history.sqlite, writes runs/dashboard.html
"""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from quant.support.files import atomic_write_text
from reports import history, plots
from reports.html import environment

CHART_METRICS = ("psnr_mean", "psnr_min", "ssim_mean", "ssim_min")


def dashboard_context(out: Path, store=None) -> dict:
    store = store if store is not None else history.location(out)
    rows = history.trend(store)
    all_runs = history.runs(store)
    models = []
    if not rows.empty:
        for fingerprint, part in rows.groupby("fingerprint", sort=False):
            main = [v for v in dict.fromkeys(part["variant"]) if not part.loc[part["variant"] == v, "kind"].eq("attribution").all()]
            models.append({"name": part["model_name"].iloc[-1], "fingerprint": fingerprint,
                           "charts": [{"metric": m, "svg": Markup(plots.history_chart(part, m, main))}
                                      for m in CHART_METRICS],
                           "runs": all_runs[all_runs["fingerprint"] == fingerprint].to_dict("records")})
    return {"models": models, "title": "quant-audit dashboard", "out": str(out)}


def render_dashboard(out: Path, store=None) -> Path:
    """Write ``<out>/dashboard.html`` from the history store (default ``history.location(out)``)."""
    page = environment().get_template("dashboard.html.j2").render(**dashboard_context(out, store))
    path = Path(out) / "dashboard.html"
    atomic_write_text(path, page)
    return path
