"""The audit on worker processes of this machine (``[runtime] executor = "processes"``): the same
video hashes, numbers and verdict as the local executor at the same threads; a task's own error
reaches the driver as itself, a worker that dies is named, and more workers than cores is refused."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil

import pytest

from conftest import audit_outcome, audit_quality, run_cli
from quant.config import load_config
from quant.errors import TaskFailed, UserError
from quant.stages.executor import ProcessExecutor, Task
from quant.support.target import current_target, set_threads, usable_cores


def test_process_run_equals_local_run(tiny_audit, tmp_path):
    out = tmp_path / "processes"  # from nothing: exports, quantizations, emulations, videos and scores are tasks
    run = run_cli(tiny_audit.config, out, "--executor", "processes")
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    (a, videos_a), (b, videos_b) = audit_outcome(tiny_audit.out), audit_outcome(out)
    assert len(videos_a) == 4 * 2 * 2 and videos_a == videos_b  # (torch, onnx, int8-dynamic, ~avx2) x prompts x seeds
    assert audit_quality(a) == audit_quality(b) and a["verdict"] == b["verdict"]
    assert a["target"]["id"] == b["target"]["id"]  # both one thread per process
    assert b["executor"] == "processes" and b["workers"] == usable_cores() and "workers" not in a
    stages = {s["name"]: s for s in b["stages"]}
    kinds = ("export:", "quantize:", "emulate:", "generate:", "score:")
    assert all(any(n.startswith(k) for n in stages) for k in kinds) and all(not s["reused"] for s in stages.values())
    work_a, work_b = (next((o / "work").iterdir()) for o in (tiny_audit.out, out))
    for folder in ("onnx/fp32", "onnx/int8-dynamic", "onnx/int8-dynamic~avx2"):  # the same models, the same records
        for path in sorted((work_a / folder).glob("*.onnx")):
            assert path.read_bytes() == (work_b / folder / path.name).read_bytes(), path
        manifest_a, manifest_b = (json.loads((w / folder / "manifest.json").read_text()) for w in (work_a, work_b))
        assert manifest_a["modules"] == manifest_b["modules"], folder
    parity_a, parity_b = ({m: {**e, "export": {k: v for k, v in e["export"].items() if k != "seconds"}}
                           for m, e in json.loads((w / "parity.json").read_text())["modules"].items()}
                          for w in (work_a, work_b))
    assert parity_a == parity_b and len(parity_a) == 4


def test_ctrl_c_stops_the_workers_and_a_rerun_keeps_what_finished(tiny_audit, tmp_path):
    out = tmp_path / "interrupted"
    run = run_cli(tiny_audit.config, out, "--executor", "processes")
    deadline, ledger = time.monotonic() + 600, None
    while time.monotonic() < deadline and run.poll() is None:
        ledgers = list(out.glob("work/*/stages.json"))
        stages = json.loads(ledgers[0].read_text())["stages"] if ledgers else {}
        if "calibrate" in stages and any(n.startswith("export:") for n in stages):
            ledger = ledgers[0]
            break
        time.sleep(0.1)
    assert ledger is not None, "the run ended before its first batch did"
    workers = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGINT)  # the driver only, as a terminal's Ctrl-C reaches it first
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "interrupted; finished files are kept" in err, err[-2000:]
    _, alive = psutil.wait_procs(workers, timeout=30)  # the workers and their fork server end with the driver
    assert workers and not alive, alive
    finished = set(json.loads(ledger.read_text())["stages"])
    again = run_cli(tiny_audit.config, out, "--executor", "processes")
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    results, _ = audit_outcome(out)
    reused = {s["name"] for s in results["stages"] if s["reused"]}
    assert finished <= reused and "calibrate" in reused
    assert audit_quality(results) == audit_quality(audit_outcome(tiny_audit.out)[0])


def _fails(context, name: str):
    raise ValueError(f"cannot make video {name}")


def _dies(context):
    os.kill(os.getpid(), signal.SIGKILL)


def _pid(context) -> int:
    return os.getpid()


@pytest.fixture()
def one_thread():
    set_threads(1)
    try:
        yield current_target()
    finally:
        set_threads(None)


def test_a_tasks_error_reaches_the_driver_and_a_dead_worker_is_named(t2v, tmp_path, one_thread):
    executor = ProcessExecutor(t2v, tmp_path, one_thread, 1, None, ("quant.stages.executor",))
    try:
        with pytest.raises(ValueError, match="cannot make video p00_s0"):
            executor.run([Task("generate:int8:p00_s0", _fails, {"name": "p00_s0"})], "test", lambda r: None,
                         show_progress=False)
        with pytest.raises(TaskFailed, match="generate:int8:p01_s0: its worker process died"):
            executor.run([Task("generate:int8:p01_s0", _dies, {})], "test", lambda r: None, show_progress=False)
        results = []  # a new pool after the broken one; the tasks spread over the workers
        executor.run([Task(f"score:{i}", _pid, {}) for i in range(8)], "test", results.append, show_progress=False)
        assert len(results) == 8 and os.getpid() not in {r.value for r in results}
    finally:
        executor.close()


def test_more_workers_than_cores_is_refused(t2v, tmp_path, one_thread):
    with pytest.raises(UserError, match=r"runtime.workers: \d+ workers x 1 threads is more than the \d+ usable cores"):
        ProcessExecutor(t2v, tmp_path, one_thread, 1, usable_cores() + 1, ("quant.stages.executor",))


def test_processes_run_one_thread_each_unless_told(tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text('[runtime]\nexecutor = "processes"\n', encoding="utf-8")
    assert load_config(config).run_threads == 1
    config.write_text('[runtime]\nexecutor = "processes"\nthreads = 2\nworkers = 1\n', encoding="utf-8")
    assert load_config(config).run_threads == 2 and load_config(config).workers == 1
    config.write_text('[runtime]\nworkers = 2\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"workers.*only read with executor = \"processes\""):
        load_config(config)
