"""The history store: ``<out>/history.sqlite``, one row per (run, variant), for trends and regressions.

Schema (version in table ``meta``): ``results`` with the run id, variant, time, tag, model name
and fingerprint, the variant's kind and module recipes, the gated metrics as columns (all of
them as JSON in ``metrics``), the variant's verdict, whether a regression gate failed, and the
run's verdict and baseline. Writers use WAL and ``BEGIN IMMEDIATE`` with a busy timeout, so two
runs finishing at once both land. A store written by a newer schema is refused, not guessed at.

Example::

    record_run(Path("runs/history.sqlite"), results)          # results.json's content
    resolve_baseline(Path("runs/history.sqlite"), "latest", fingerprint)   # -> run id or None
    trend(Path("runs/history.sqlite"))                        # pandas table, one row per (run, variant)
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pandas as pd

from quant.errors import UserError

DB_NAME = "history.sqlite"
SCHEMA_VERSION = 1
METRIC_COLUMNS = ("psnr_mean", "psnr_min", "psnr_p5", "ssim_mean", "ssim_min", "ssim_p5",
                  "motion_psnr_mean", "flicker_max", "latent_sqnr_min_db")
_DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL, variant TEXT NOT NULL, time TEXT NOT NULL, tag TEXT NOT NULL,
    model_name TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, modules TEXT NOT NULL,
    {", ".join(f"{c} REAL" for c in METRIC_COLUMNS)},
    metrics TEXT NOT NULL, verdict TEXT NOT NULL, regression_failed INTEGER NOT NULL,
    failed_gates TEXT NOT NULL, run_verdict TEXT NOT NULL, baseline_run TEXT,
    PRIMARY KEY (run_id, variant));
CREATE INDEX IF NOT EXISTS results_by_model ON results (fingerprint, time);
"""


def _connect(path: Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=60000")
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a quant-audit history store ({exc})") from None
    return conn


def _check_schema(conn: sqlite3.Connection, path: Path, create: bool) -> bool:
    """True when the store has our tables; creates them when ``create``. Refuses newer schemas."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        row = None
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a quant-audit history store ({exc})") from None
    if row is None:
        if create:
            for statement in filter(str.strip, _DDL.split(";")):  # executescript would commit mid-transaction
                conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return create
    if int(row[0]) > SCHEMA_VERSION:
        raise UserError(f"{path}: history schema version {row[0]} is newer than this quant-audit reads "
                        f"({SCHEMA_VERSION}); upgrade quant-audit")
    return True


def _rows(results: dict) -> list[tuple]:
    out = []
    for v in results["variants"]:
        metrics = v["metrics"]
        failed = [g for g in v["gates"] if not g["passed"]]
        out.append((results["run_id"], v["name"], results["finished"], results.get("tag", ""),
                    results["model"]["name"], results["model"]["fingerprint"], v["kind"], json.dumps(v["modules"]),
                    *[metrics.get(c) for c in METRIC_COLUMNS], json.dumps(metrics),
                    "pass" if v["passed"] else "fail", int(any(g["kind"] == "regression" for g in failed)),
                    json.dumps(failed), results["verdict"], (results.get("baseline") or {}).get("run_id")))
    return out


def record_run(path: Path, results: dict) -> None:
    """Add (or replace) the rows of one run, in one transaction."""
    rows = _rows(results)
    marks = ", ".join("?" * len(rows[0])) if rows else ""
    with closing(_connect(path)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            _check_schema(conn, path, create=True)
            conn.executemany(f"INSERT OR REPLACE INTO results VALUES ({marks})", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def trend(path: Path, fingerprint: str | None = None) -> pd.DataFrame:
    """Every (run, variant) row, oldest first; empty when there is no store yet."""
    if not Path(path).is_file():
        return pd.DataFrame()
    with closing(_connect(path)) as conn:
        if not _check_schema(conn, path, create=False):
            return pd.DataFrame()
        query, args = "SELECT * FROM results", ()
        if fingerprint:
            query, args = query + " WHERE fingerprint = ?", (fingerprint,)
        return pd.read_sql_query(query + " ORDER BY time, run_id, rowid", conn, params=args)


def runs(path: Path) -> pd.DataFrame:
    """One row per run: time, tag, model, verdict, variants audited and how many failed."""
    rows = trend(path)
    if rows.empty:
        return rows
    grouped = rows.groupby("run_id", sort=False)
    return pd.DataFrame({
        "run_id": grouped["run_id"].first(), "time": grouped["time"].first(), "tag": grouped["tag"].first(),
        "model": grouped["model_name"].first(), "fingerprint": grouped["fingerprint"].first(),
        "verdict": grouped["run_verdict"].first(), "variants": grouped.size(),
        "failed": grouped["verdict"].apply(lambda s: int((s == "fail").sum())),
        "baseline": grouped["baseline_run"].first(),
    }).reset_index(drop=True)


def resolve_baseline(path: Path, which: str, fingerprint: str, exclude: str | None = None) -> str | None:
    """``latest`` -> the newest run of this model (None when there is none); a run id -> itself.

    Raises:
        UserError: the run id is not in the store, or audited another model.
    """
    table = trend(path)
    if which == "latest":
        if table.empty:
            return None
        mine = table[(table["fingerprint"] == fingerprint) & (table["run_id"] != exclude)]
        return None if mine.empty else str(mine.iloc[-1]["run_id"])
    found = table[table["run_id"] == which] if not table.empty else table
    if found.empty:
        raise UserError(f"--baseline: run '{which}' is not in {path}")
    if found.iloc[0]["fingerprint"] != fingerprint:
        raise UserError(f"--baseline: run '{which}' audited model {found.iloc[0]['fingerprint'][:12]}, "
                        f"not this model ({fingerprint[:12]})")
    return which


def run_metrics(path: Path, run_id: str) -> dict[str, dict]:
    """variant -> metrics of one run."""
    table = trend(path)
    rows = table[table["run_id"] == run_id]
    return {r["variant"]: json.loads(r["metrics"]) for r in rows.to_dict("records")}
