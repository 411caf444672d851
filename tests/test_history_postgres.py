"""The history store on a real PostgreSQL server (started here, on 127.0.0.1): the same schema and
answers as SQLite, concurrent writers lose nothing, and two real audits writing at once both land."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reports import history
from postgres import binaries, create_database, postgres_server
from test_history import HERE, THERE, _results

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(binaries() is None, reason="PostgreSQL not installed (make test installs it)")


@pytest.fixture(scope="module")
def server():
    with postgres_server() as url:
        yield url


def test_same_rows_and_answers_as_sqlite(server, tmp_path):
    url = create_database(server, "same_answers")
    sqlite = tmp_path / "history.sqlite"
    for store in (url, sqlite):
        history.record_run(store, _results("r-01", 40.0))
        history.record_run(store, _results("r-02", 39.0, target=THERE))
        history.record_run(store, _results("r-02", 38.5, target=THERE))  # a rerun replaces its rows
    a, b = history.trend(url), history.trend(sqlite)
    assert a.to_dict("records") == b.to_dict("records")
    assert history.runs(url).to_dict("records") == history.runs(sqlite).to_dict("records")
    for store in (url, sqlite):
        assert history.resolve_baseline(store, "latest", "sha256:abc", HERE) == ("r-01", "")
        assert history.run_metrics(store, "r-02")["fp16"]["psnr_mean"] == 38.5


def _writer(args):
    url, worker = args
    for i in range(10):
        history.record_run(url, _results(f"w{worker}-{i:02d}"))


def test_concurrent_writers_on_a_fresh_database_lose_nothing(server):
    """Four processes create the schema and write at once: the first takes the lock and creates
    the tables, the others wait for it; every row arrives."""
    url = create_database(server, "concurrent")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(url, w) for w in range(4)])
    rows = history.trend(url)
    assert len(rows) == 4 * 10 * 2 and rows["run_id"].nunique() == 40


def _restorer(folder: Path) -> tuple[Path, Path]:
    from test_module_audit import _export, _images

    _export(folder / "restorer.onnx")
    samples = folder / "samples"
    samples.mkdir()
    for i in range(4):
        np.savez(samples / f"s{i}.npz", image=_images(i, 1))
    return folder / "restorer.onnx", samples


def test_two_audits_writing_one_postgres_history_at_once(server, tmp_path):
    url = create_database(server, "team")
    model, samples = _restorer(tmp_path)
    env = {**os.environ, history.ENV_URL: url}
    procs = [subprocess.Popen([sys.executable, "-m", "quant.cli", "module", "--onnx", str(model), "--inputs", str(samples),
                               "--out", str(tmp_path / f"ci-job-{i}"), "--recipes", "fp16,int8-dynamic", "--tag", f"job{i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    run_ids = {json.loads(next((tmp_path / f"ci-job-{i}").glob("*/results.json")).read_text())["run_id"] for i in range(2)}
    rows = history.trend(url)
    assert set(rows["run_id"]) == run_ids and len(rows) == 4 and set(rows["tag"]) == {"job0", "job1"}
    assert not (tmp_path / "ci-job-0" / "history.sqlite").exists()  # the team store, not a local file
    # and `quant-audit history` reads the same server
    shown = subprocess.run([sys.executable, "-m", "quant.cli", "history", "--out", str(tmp_path / "ci-job-0"),
                            "--history-url", url, "--metric", "sqnr_min_db"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and all(r in shown.stdout for r in run_ids)


def test_unreachable_server_is_exit_2_without_the_password(tmp_path, capsys):
    from quant.cli import main

    model, samples = _restorer(tmp_path)
    config = tmp_path / "team.toml"
    config.write_text('[history]\nurl = "postgresql://auditor:s3cret@127.0.0.1:9/none"\n')
    code = main(["module", "--onnx", str(model), "--inputs", str(samples), "--out", str(tmp_path / "o"),
                 "--config", str(config), "--recipes", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the history store" in err and "s3cret" not in err
