"""The history store: one row per (run, variant), for trends and regressions, in SQLite or PostgreSQL.

Where: ``[history] url`` in ``audit.toml``, else ``QUANT_AUDIT_HISTORY_URL``, else
``<out>/history.sqlite`` (``location``). A store is named by a path (SQLite) or a URL
(``sqlite:///...``, ``postgresql://...``; ``postgresql://`` uses the psycopg 3 driver).

One schema for both (SQLAlchemy Core, ``RESULTS``): ``results`` with the run id, variant, time,
tag, model name and fingerprint, the variant's kind and module recipes, the gated metrics as
columns (all of them as JSON in ``metrics``), the variant's verdict, whether a regression gate
failed, the run's verdict and baseline, and the execution target (``target_id`` and the whole
``target`` block as JSON); ``meta`` holds the schema version. ``--baseline latest`` picks the
newest run of the same model on the same target.

Concurrent writers: every write is one transaction that first takes the store's write lock
(SQLite: WAL and ``BEGIN IMMEDIATE`` with a busy timeout; PostgreSQL: a transaction-scoped
advisory lock), so two runs finishing at once both land, and the first writer creates or
migrates the schema while the others wait. Versioned migrations (``_MIGRATIONS``) bring older
stores forward (version 1 SQLite stores get the target columns; their rows read "unknown"); a
store written by a newer schema is refused, not guessed at.

Example::

    store = location(Path("runs"))                     # runs/history.sqlite, or the configured URL
    record_run(store, results)                         # results.json's content
    resolve_baseline(store, "latest", fingerprint, target_id)   # -> (run id or None, why)
    trend(store)                                       # pandas table, one row per (run, variant)
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from functools import lru_cache
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from quant.errors import UserError

DB_NAME = "history.sqlite"
ENV_URL = "QUANT_AUDIT_HISTORY_URL"
SCHEMA_VERSION = 2  # 2: target_id, target
METRIC_COLUMNS = ("psnr_mean", "psnr_min", "psnr_p5", "ssim_mean", "ssim_min", "ssim_p5",
                  "motion_psnr_mean", "flicker_max", "latent_sqnr_min_db")
_METADATA = sa.MetaData()
META = sa.Table("meta", _METADATA, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text, nullable=False))
RESULTS = sa.Table(
    "results", _METADATA,
    sa.Column("run_id", sa.Text, primary_key=True), sa.Column("variant", sa.Text, primary_key=True),
    sa.Column("time", sa.Text, nullable=False), sa.Column("tag", sa.Text, nullable=False),
    sa.Column("model_name", sa.Text, nullable=False), sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False), sa.Column("modules", sa.Text, nullable=False),
    *[sa.Column(c, sa.Float) for c in METRIC_COLUMNS],
    sa.Column("metrics", sa.Text, nullable=False), sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("regression_failed", sa.Integer, nullable=False), sa.Column("failed_gates", sa.Text, nullable=False),
    sa.Column("run_verdict", sa.Text, nullable=False), sa.Column("baseline_run", sa.Text),
    sa.Column("target_id", sa.Text), sa.Column("target", sa.Text),
    sa.Index("results_by_model", "fingerprint", "time"),
)
_MIGRATIONS = {  # from version -> statements that bring a store to the next version
    1: ["ALTER TABLE results ADD COLUMN target_id TEXT", "ALTER TABLE results ADD COLUMN target TEXT"],
}
_LOCK_WAIT_S = 60.0
_PG_LOCK = zlib.crc32(b"quant-audit history") & 0x7FFFFFFF  # the advisory lock every writer takes


def location(out: Path, url: str | None = None):
    """The store of ``out``: ``url`` (``[history] url``), else ``$QUANT_AUDIT_HISTORY_URL``, else
    ``<out>/history.sqlite``."""
    chosen = url or os.environ.get(ENV_URL) or None
    return chosen if chosen else Path(out) / DB_NAME


def describe(store) -> str:
    """The store for messages, without a password."""
    if isinstance(store, Path) or "://" not in str(store):
        return str(store)
    return sa.engine.make_url(str(store)).render_as_string(hide_password=True)


def _sqlite_path(store) -> Path | None:
    if isinstance(store, Path) or "://" not in str(store):
        return Path(store)
    url = sa.engine.make_url(str(store))
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def exists(store) -> bool:
    """Whether there is a store to read (a server always counts; a SQLite file when present)."""
    path = _sqlite_path(store)
    return path.is_file() if path is not None else True


@lru_cache(maxsize=8)
def _engine(store_key: str) -> sa.Engine:
    path = _sqlite_path(store_key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": _LOCK_WAIT_S},
                                  poolclass=sa.pool.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi, _record):
            dbapi.isolation_level = None  # we issue BEGIN ourselves (IMMEDIATE for writers)
            dbapi.execute(f"PRAGMA busy_timeout={int(_LOCK_WAIT_S * 1000)}")
            _wal(dbapi)

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")
        return engine
    url = sa.engine.make_url(store_key)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() != "postgresql":
        raise UserError(f"{describe(store_key)}: history url must be sqlite:///PATH or postgresql://...")
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _key(store) -> str:
    path = _sqlite_path(store)
    return str(path.resolve()) if path is not None else str(store)


def _locked(exc: BaseException) -> bool:
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


class _Store:
    """One connection to a store, as a context manager: ``write`` takes the write lock first."""

    def __init__(self, store, write: bool):
        self.store, self.write = store, write

    def __enter__(self) -> sa.Connection:
        try:
            self.conn = _engine(_key(self.store)).connect()
            self.conn.info["write"] = self.write
            self.conn.begin()
            if self.write and self.conn.dialect.name == "postgresql":
                self.conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        except (sa_exc.OperationalError, sa_exc.DatabaseError) as exc:
            raise self._error(exc) from None
        return self.conn

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()
        if isinstance(value, (sa_exc.OperationalError, sa_exc.DatabaseError)):
            raise self._error(value) from None

    def _error(self, exc: BaseException) -> UserError:
        first = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        if _locked(exc):
            return UserError(f"{describe(self.store)}: history store stayed locked for {_LOCK_WAIT_S:g} s ({first})")
        if self.conn_failed(exc):
            return UserError(f"{describe(self.store)}: cannot reach the history store ({first})")
        return UserError(f"{describe(self.store)}: not a quant-audit history store ({first})")

    @staticmethod
    def conn_failed(exc: BaseException) -> bool:
        return "connection" in str(exc).lower() or "could not" in str(exc).lower()


def _version(conn: sa.Connection) -> int | None:
    if not sa.inspect(conn).has_table("meta"):
        return None
    row = conn.execute(sa.select(META.c.value).where(META.c.key == "schema_version")).fetchone()
    return None if row is None else int(row[0])


def _check_schema(conn: sa.Connection, store, create: bool) -> bool:
    """True when the store has our tables; creates or migrates them when ``create`` (a writer,
    holding the write lock). Refuses newer schemas."""
    version = _version(conn)
    if version is None:
        if create:
            _METADATA.create_all(conn)
            conn.execute(sa.delete(META).where(META.c.key == "schema_version"))
            conn.execute(sa.insert(META).values(key="schema_version", value=str(SCHEMA_VERSION)))
        return create
    if version > SCHEMA_VERSION:
        raise UserError(f"{describe(store)}: history schema version {version} is newer than this quant-audit reads "
                        f"({SCHEMA_VERSION}); upgrade quant-audit")
    if version < SCHEMA_VERSION and create:
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                conn.execute(sa.text(statement))
        conn.execute(sa.update(META).where(META.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    return True


def _rows(results: dict) -> list[dict]:
    out = []
    for v in results["variants"]:
        metrics = v["metrics"]
        failed = [g for g in v["gates"] if not g["passed"]]
        out.append({"run_id": results["run_id"], "variant": v["name"], "time": results["finished"],
                    "tag": results.get("tag", ""), "model_name": results["model"]["name"],
                    "fingerprint": results["model"]["fingerprint"], "kind": v["kind"], "modules": json.dumps(v["modules"]),
                    **{c: metrics.get(c) for c in METRIC_COLUMNS}, "metrics": json.dumps(metrics),
                    "verdict": "pass" if v["passed"] else "fail",
                    "regression_failed": int(any(g["kind"] == "regression" for g in failed)),
                    "failed_gates": json.dumps(failed), "run_verdict": results["verdict"],
                    "baseline_run": (results.get("baseline") or {}).get("run_id"),
                    "target_id": (results.get("target") or {}).get("id"), "target": json.dumps(results.get("target"))})
    return out


def record_run(store, results: dict) -> None:
    """Add (or replace) the rows of one run, in one transaction."""
    rows = _rows(results)
    with _Store(store, write=True) as conn:
        _check_schema(conn, store, create=True)
        conn.execute(sa.delete(RESULTS).where(RESULTS.c.run_id == results["run_id"]))
        if rows:
            conn.execute(sa.insert(RESULTS), rows)


def trend(store, fingerprint: str | None = None) -> pd.DataFrame:
    """Every (run, variant) row, oldest first; empty when there is no store yet."""
    if not exists(store):
        return pd.DataFrame()
    with _Store(store, write=False) as conn:
        if not _check_schema(conn, store, create=False):
            return pd.DataFrame()
        columns = [c["name"] for c in sa.inspect(conn).get_columns("results")]
        query = sa.select(*[RESULTS.c[c] for c in columns if c in RESULTS.c])
        if fingerprint:
            query = query.where(RESULTS.c.fingerprint == fingerprint)
        last = sa.literal_column("rowid") if conn.dialect.name == "sqlite" else RESULTS.c.variant  # SQLite: insertion order
        table = pd.read_sql_query(query.order_by(RESULTS.c.time, RESULTS.c.run_id, last), conn)
    for column in ("target_id", "target"):  # a version 1 store not yet migrated by a writer
        if column not in table.columns:
            table[column] = None
    return table


def runs(store) -> pd.DataFrame:
    """One row per run: time, tag, model, verdict, variants audited and how many failed."""
    rows = trend(store)
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


def resolve_baseline(store, which: str, fingerprint: str, target: str,
                     exclude: str | None = None) -> tuple[str | None, str]:
    """The baseline run id (or None) and a line saying why, when there is something to say.

    ``latest``: the newest run of this model on this target; runs on other targets are never
    compared silently (the message names them). A run id: that run, whatever its target (the
    gate table then says where it ran).

    Raises:
        UserError: the run id is not in the store, or audited another model.
    """
    table = trend(store)
    if which == "latest":
        mine = table[(table["fingerprint"] == fingerprint) & (table["run_id"] != exclude)] if not table.empty else table
        if mine.empty:
            return None, f"no earlier run of this model in {describe(store)}: no regression check this time"
        here = mine[mine["target_id"] == target]
        if here.empty:
            others = ", ".join(sorted({_target_name(t) for t in mine["target_id"]}))
            return None, (f"--baseline latest: earlier runs of this model ran on other targets ({others}), not on "
                          f"{target}: no regression check this time (name a run id to compare across targets)")
        return str(here.iloc[-1]["run_id"]), ""
    found = table[table["run_id"] == which] if not table.empty else table
    if found.empty:
        raise UserError(f"--baseline: run '{which}' is not in {describe(store)}")
    if found.iloc[0]["fingerprint"] != fingerprint:
        raise UserError(f"--baseline: run '{which}' audited model {found.iloc[0]['fingerprint'][:12]}, "
                        f"not this model ({fingerprint[:12]})")
    there = _target_name(found.iloc[0]["target_id"])
    return which, "" if there == target else f"--baseline {which} ran on target {there}, not {target}"


def _target_name(value) -> str:
    """A ``target_id`` cell: SQL NULL (runs recorded before targets were) reads as NaN or None."""
    return "unknown" if value is None or pd.isna(value) or not value else str(value)


def run_target(store, run_id: str) -> str | None:
    """The target id a run recorded (None for runs recorded before targets were)."""
    table = trend(store)
    rows = table[table["run_id"] == run_id] if not table.empty else table
    name = "unknown" if rows.empty else _target_name(rows.iloc[0]["target_id"])
    return None if name == "unknown" else name


def run_metrics(store, run_id: str) -> dict[str, dict]:
    """variant -> metrics of one run."""
    table = trend(store)
    rows = table[table["run_id"] == run_id]
    return {r["variant"]: json.loads(r["metrics"]) for r in rows.to_dict("records")}
