"""The history store: versioned schema, one row per (run, variant), safe with concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pandas as pd
import pytest

from quant.errors import UserError
from reports import history


HERE, THERE = "x86_64-avx2-novnni-ort1.31.1-t2-aaaaaa", "x86_64-avx512-vnni-ort1.31.1-t2-bbbbbb"


def _results(run_id: str, psnr: float = 40.0, fingerprint: str = "sha256:abc", tag: str = "", target: str = HERE) -> dict:
    variant = {"name": "fp16", "kind": "full", "modules": {"transformer": "fp16"},
               "metrics": {"psnr_mean": psnr, "psnr_min": psnr - 2, "ssim_mean": 0.99}, "passed": True,
               "gates": [{"metric": "psnr_mean", "kind": "threshold", "passed": True}]}
    return {"run_id": run_id, "finished": f"2026-11-21T10:{int(run_id[-2:]):02d}:00", "tag": tag, "verdict": "pass",
            "model": {"name": "tiny", "fingerprint": fingerprint}, "baseline": None,
            "target": {"id": target, "cpu": "some CPU", "int8_path": "avx2"},
            "variants": [variant, {**variant, "name": "int8", "passed": False,
                                   "gates": [{"metric": "psnr_mean", "kind": "regression", "passed": False}]}]}


def _writer(args):
    path, worker = args
    for i in range(15):
        history.record_run(path, _results(f"w{worker}-{i:02d}"))


def test_two_processes_writing_at_once_lose_no_row(tmp_path):
    path = tmp_path / "history.sqlite"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_writer, [(path, 0), (path, 1)])
    rows = history.trend(path)
    assert len(rows) == 2 * 15 * 2 and rows["run_id"].nunique() == 30


def test_rows_runs_and_baselines(tmp_path):
    path = tmp_path / "history.sqlite"
    history.record_run(path, _results("r-01", 40.0, tag="v1"))
    history.record_run(path, _results("r-02", 39.0, tag="v2"))
    history.record_run(path, _results("r-03", 30.0, fingerprint="sha256:other"))
    rows = history.trend(path, "sha256:abc")
    assert list(rows["run_id"]) == ["r-01", "r-01", "r-02", "r-02"]
    assert list(rows.loc[rows["variant"] == "int8", "regression_failed"]) == [1, 1]
    runs = history.runs(path)
    assert list(runs["run_id"]) == ["r-01", "r-02", "r-03"] and list(runs["failed"]) == [1, 1, 1]
    assert history.resolve_baseline(path, "latest", "sha256:abc", HERE) == ("r-02", "")
    assert history.resolve_baseline(path, "latest", "sha256:abc", HERE, exclude="r-02") == ("r-01", "")
    run, why = history.resolve_baseline(path, "latest", "sha256:new", HERE)
    assert run is None and "no earlier run of this model" in why
    assert history.run_metrics(path, "r-01")["fp16"]["psnr_mean"] == 40.0
    assert history.run_target(path, "r-01") == HERE and list(history.runs(path)["target"]) == [HERE] * 3
    with pytest.raises(UserError, match="audited model sha256:other"):
        history.resolve_baseline(path, "r-03", "sha256:abc", HERE)
    with pytest.raises(UserError, match="run 'r-99' is not in"):
        history.resolve_baseline(path, "r-99", "sha256:abc", HERE)
    # rerecording a run replaces its rows instead of duplicating them
    history.record_run(path, _results("r-02", 41.0, tag="v2"))
    assert len(history.trend(path)) == 6


def test_a_newer_schema_or_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "history.sqlite"
    history.record_run(path, _results("r-01"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UserError, match="schema version 99 is newer"):
        history.trend(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="junk.sqlite: not a quant-audit history store"):
        history.trend(junk)


def test_baseline_latest_never_compares_across_targets(tmp_path):
    path = tmp_path / "history.sqlite"
    history.record_run(path, _results("r-01", 40.0, target=HERE))
    history.record_run(path, _results("r-02", 30.0, target=THERE))
    # the newest run of this model ran elsewhere: latest is the newest one here
    assert history.resolve_baseline(path, "latest", "sha256:abc", HERE) == ("r-01", "")
    assert history.resolve_baseline(path, "latest", "sha256:abc", THERE) == ("r-02", "")
    # only other-target runs: say so, compare nothing
    run, why = history.resolve_baseline(path, "latest", "sha256:abc", "x86_64-avx2-novnni-ort9-t8-cccccc")
    assert run is None and HERE in why and THERE in why and "no regression check" in why
    # an explicit run id on another target is allowed, and the reason names where it ran
    run, why = history.resolve_baseline(path, "r-02", "sha256:abc", HERE)
    assert run == "r-02" and f"ran on target {THERE}" in why


def test_a_version_1_store_is_migrated_by_the_next_writer(tmp_path):
    path = tmp_path / "history.sqlite"
    metrics = ", ".join(f"{c} REAL" for c in history.METRIC_COLUMNS)
    v1 = f"""
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE results (
        run_id TEXT NOT NULL, variant TEXT NOT NULL, time TEXT NOT NULL, tag TEXT NOT NULL,
        model_name TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, modules TEXT NOT NULL, {metrics},
        metrics TEXT NOT NULL, verdict TEXT NOT NULL, regression_failed INTEGER NOT NULL,
        failed_gates TEXT NOT NULL, run_verdict TEXT NOT NULL, baseline_run TEXT, PRIMARY KEY (run_id, variant));
    CREATE INDEX results_by_model ON results (fingerprint, time);
    """  # the schema version 1 stores were written with
    with sqlite3.connect(path) as conn:
        conn.executescript(v1)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO results (run_id, variant, time, tag, model_name, fingerprint, kind, modules, metrics,"
                     " verdict, regression_failed, failed_gates, run_verdict) VALUES ('old-01', 'fp16', "
                     "'2026-11-20T10:00:00', '', 'tiny', 'sha256:abc', 'full', '{}', '{}', 'pass', 0, '[]', 'pass')")
    assert history.trend(path)["target_id"].isna().all()  # readable before migration, target unknown
    history.record_run(path, _results("r-01"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    rows = history.trend(path)
    assert list(rows["run_id"]) == ["old-01", "r-01", "r-01"] and pd.isna(rows["target_id"].iloc[0])
    # the old run is never a silent baseline for a run with a target
    run, why = history.resolve_baseline(path, "latest", "sha256:abc", THERE)
    assert run is None and "unknown" in why
