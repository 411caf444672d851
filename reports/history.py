"""The history store: ``<out>/history.sqlite``, one row per (run, variant), for trends and regressions.

Schema (version in table ``meta``): ``results`` with the run id, variant, time, tag, model name
and fingerprint, the variant's kind and module recipes, the gated metrics as columns (all of
them as JSON in ``metrics``), the variant's verdict, whether a regression gate failed, the
run's verdict and baseline, and the execution target (``target_id`` and the whole ``target``
block as JSON). ``--baseline latest`` picks the newest run of the same model on the same target.
Writers use WAL and ``BEGIN IMMEDIATE`` with a busy timeout, so two runs finishing at once both
land (switching a new store to WAL is retried while another writer holds it). Version 1 stores
are migrated by the first writer (their rows get no target: "unknown"); a store written by a
newer schema is refused, not guessed at.

Example::

    record_run(Path("runs/history.sqlite"), results)          # results.json's content
    resolve_baseline(Path("runs/history.sqlite"), "latest", fingerprint)   # -> run id or None
    trend(Path("runs/history.sqlite"))                        # pandas table, one row per (run, variant)
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pandas as pd

from quant.errors import UserError

DB_NAME = "history.sqlite"
SCHEMA_VERSION = 2  # 2: target_id, target
METRIC_COLUMNS = ("psnr_mean", "psnr_min", "psnr_p5", "ssim_mean", "ssim_min", "ssim_p5",
                  "motion_psnr_mean", "flicker_max", "latent_sqnr_min_db")
_DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL, variant TEXT NOT NULL, time TEXT NOT NULL, tag TEXT NOT NULL,
    model_name TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, modules TEXT NOT NULL,
    {", ".join(f"{c} REAL" for c in METRIC_COLUMNS)},
    metrics TEXT NOT NULL, verdict TEXT NOT NULL, regression_failed INTEGER NOT NULL,
    failed_gates TEXT NOT NULL, run_verdict TEXT NOT NULL, baseline_run TEXT, target_id TEXT, target TEXT,
    PRIMARY KEY (run_id, variant));
CREATE INDEX IF NOT EXISTS results_by_model ON results (fingerprint, time);
"""
_MIGRATIONS = {  # from version -> statements that bring a store to the next version
    1: ["ALTER TABLE results ADD COLUMN target_id TEXT", "ALTER TABLE results ADD COLUMN target TEXT"],
}
_LOCK_WAIT_S = 60.0


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another connection holds the lock: SQLite can answer BUSY to a
    journal-mode change without calling the busy handler (two writers creating one store)."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    delay = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _connect(path: Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=_LOCK_WAIT_S, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(_LOCK_WAIT_S * 1000)}")
        _wal(conn)
    except sqlite3.OperationalError as exc:
        if _locked(exc):
            raise UserError(f"{path}: history store stayed locked for {_LOCK_WAIT_S:g} s ({exc})") from None
        raise UserError(f"{path}: not a quant-audit history store ({exc})") from None
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
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise UserError(f"{path}: history schema version {row[0]} is newer than this quant-audit reads "
                        f"({SCHEMA_VERSION}); upgrade quant-audit")
    if version < SCHEMA_VERSION and create:  # a writer, inside its BEGIN IMMEDIATE: migrate in place
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
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
                    json.dumps(failed), results["verdict"], (results.get("baseline") or {}).get("run_id"),
                    (results.get("target") or {}).get("id"), json.dumps(results.get("target"))))
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
        table = pd.read_sql_query(query + " ORDER BY time, run_id, rowid", conn, params=args)
    for column in ("target_id", "target"):  # a version 1 store not yet migrated by a writer
        if column not in table.columns:
            table[column] = None
    return table


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
        "baseline": grouped["baseline_run"].first(), "target": grouped["target_id"].first(),
    }).reset_index(drop=True)


def resolve_baseline(path: Path, which: str, fingerprint: str, target: str,
                     exclude: str | None = None) -> tuple[str | None, str]:
    """The baseline run id (or None) and a line saying why, when there is something to say.

    ``latest``: the newest run of this model on this target; runs on other targets are never
    compared silently (the message names them). A run id: that run, whatever its target (the
    gate table then says where it ran).

    Raises:
        UserError: the run id is not in the store, or audited another model.
    """
    table = trend(path)
    if which == "latest":
        mine = table[(table["fingerprint"] == fingerprint) & (table["run_id"] != exclude)] if not table.empty else table
        if mine.empty:
            return None, f"no earlier run of this model in {path}: no regression check this time"
        here = mine[mine["target_id"] == target]
        if here.empty:
            others = ", ".join(sorted({_target_name(t) for t in mine["target_id"]}))
            return None, (f"--baseline latest: earlier runs of this model ran on other targets ({others}), not on "
                          f"{target}: no regression check this time (name a run id to compare across targets)")
        return str(here.iloc[-1]["run_id"]), ""
    found = table[table["run_id"] == which] if not table.empty else table
    if found.empty:
        raise UserError(f"--baseline: run '{which}' is not in {path}")
    if found.iloc[0]["fingerprint"] != fingerprint:
        raise UserError(f"--baseline: run '{which}' audited model {found.iloc[0]['fingerprint'][:12]}, "
                        f"not this model ({fingerprint[:12]})")
    there = _target_name(found.iloc[0]["target_id"])
    return which, "" if there == target else f"--baseline {which} ran on target {there}, not {target}"


def _target_name(value) -> str:
    """A ``target_id`` cell: SQL NULL (runs recorded before targets were) reads as NaN or None."""
    return "unknown" if value is None or pd.isna(value) or not value else str(value)


def run_target(path: Path, run_id: str) -> str | None:
    """The target id a run recorded (None for runs recorded before targets were)."""
    table = trend(path)
    rows = table[table["run_id"] == run_id] if not table.empty else table
    name = "unknown" if rows.empty else _target_name(rows.iloc[0]["target_id"])
    return None if name == "unknown" else name


def run_metrics(path: Path, run_id: str) -> dict[str, dict]:
    """variant -> metrics of one run."""
    table = trend(path)
    rows = table[table["run_id"] == run_id]
    return {r["variant"]: json.loads(r["metrics"]) for r in rows.to_dict("records")}
