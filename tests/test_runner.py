"""The stage runner and the workspace, with fake stages and no model: reuse, invalidation on a
kill, key sensitivity (inputs, input files, source code), and deletion only inside work folders."""

from __future__ import annotations

import sys

import pytest

from quant.errors import UserError
from quant.stages.ledger import Ledger
from quant.stages.runner import Stage, StageRunner, source_hash
from quant.stages.workspace import Workspace


class Killed(Exception):
    """Stands in for SIGKILL half-way through a stage."""


def _writer(out, text: str, calls: list, die: bool = False):
    def work():
        calls.append(text)
        out.write_text(text[: len(text) // 2])  # outputs are touched before the stage is complete
        if die:
            raise Killed
        out.write_text(text)
    return work


def test_a_finished_stage_is_reused_and_fresh_redoes_it(tmp_path):
    out, calls = tmp_path / "out.txt", []
    stage = Stage("make", {"x": 1}, _writer(out, "A", calls), outputs=(out,))
    first = StageRunner(Ledger(tmp_path)).run(stage)
    again = StageRunner(Ledger(tmp_path)).run(stage)
    assert not first.reused and again.reused and again.key == first.key and calls == ["A"]
    assert not StageRunner(Ledger(tmp_path), fresh=True).run(stage).reused and calls == ["A", "A"]
    out.unlink()  # a missing output is never "done"
    assert not StageRunner(Ledger(tmp_path)).run(stage).reused


def test_a_stage_killed_after_touching_its_outputs_is_never_reused(tmp_path):
    """Run A, start B (another config) and kill it half-way, rerun A: A is recomputed, not
    reused on top of B's half-written files."""
    out, calls = tmp_path / "out.txt", []
    a = Stage("make", {"config": "A"}, _writer(out, "AAAA", calls), outputs=(out,))
    b = Stage("make", {"config": "B"}, _writer(out, "BBBB", calls, die=True), outputs=(out,))
    StageRunner(Ledger(tmp_path)).run(a)
    with pytest.raises(Killed):
        StageRunner(Ledger(tmp_path)).run(b)
    assert "make" not in Ledger(tmp_path).stages  # invalidated before B touched anything
    rerun = StageRunner(Ledger(tmp_path)).run(a)
    assert not rerun.reused and out.read_text() == "AAAA" and calls == ["AAAA", "BBBB", "AAAA"]


def test_the_key_sees_inputs_input_files_and_source_code(tmp_path, monkeypatch):
    source = tmp_path / "stage_code_probe.py"
    source.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "model.onnx"
    data.write_bytes(b"weights v1")
    runner = StageRunner(Ledger(tmp_path / "work"))

    def key(**change):
        fields = {"name": "s", "inputs": {"x": 1}, "work": lambda: None, "files": (data,),
                  "sources": ("stage_code_probe",), **change}
        source_hash.cache_clear()
        return runner.key(Stage(**fields))

    base = key()
    assert key() == base
    assert key(inputs={"x": 2}) != base
    data.write_bytes(b"weights v2")  # same path, other content
    assert key() != base
    data.write_bytes(b"weights v1")
    assert key() == base
    source.write_text("VALUE = 2\n")  # the code that produces the stage changed
    sys.modules.pop("stage_code_probe", None)
    assert key() != base


def test_workspace_deletes_only_inside_its_own_folders(tmp_path):
    ws = Workspace(tmp_path / "runs")
    work = ws.work("sha256:0123456789abcdef0123")
    videos = ws.videos(work, "int8")
    videos.mkdir(parents=True)
    (videos / "p00_s0.npz").write_bytes(b"x")
    ws.history.parent.mkdir(parents=True, exist_ok=True)
    ws.history.write_bytes(b"history")
    run = ws.run_dir("20261121-000000-abcd")
    run.mkdir()
    ws.remove(videos)
    assert not videos.exists() and work.exists()
    for path in (ws.out, run, ws.history, work, work / "videos" / "int8" / "..", tmp_path):
        with pytest.raises(ValueError, match="refusing to delete"):
            ws.remove(path)
    assert ws.history.read_bytes() == b"history" and run.is_dir()


@pytest.mark.parametrize("name", ["../../..", "..", "a/b", ".hidden", "", "x\ny"])
def test_names_that_are_not_folder_names_are_refused(tmp_path, name):
    ws = Workspace(tmp_path)
    with pytest.raises(UserError, match="cannot be a folder name"):
        ws.videos(tmp_path, name)


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # ``from metrics.x import NAME``: NAME is not a module
        return False


def test_the_score_stage_key_sees_every_metrics_module_it_runs():
    """A change to a metric's code must redo the scores: every ``metrics`` module the score stage's
    sources import (at any depth) is one of its sources (``metrics.fused``, the kernels, was not)."""
    import ast
    import importlib.util
    from pathlib import Path

    from quant.audit.run import SCORE_SOURCES

    seen, todo = set(), list(SCORE_SOURCES)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            todo += [n for n in names if n.startswith("metrics.") and _is_module(n)]
    metrics_modules = {n for n in seen if n.startswith("metrics.")}
    assert metrics_modules <= set(SCORE_SOURCES), sorted(metrics_modules - set(SCORE_SOURCES))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, as intended
def test_an_interrupt_python_drops_in_a_finalizer_still_stops_the_batch(tmp_path):
    """Ctrl-C or SIGTERM whose KeyboardInterrupt is raised inside a ``__del__`` is printed and
    dropped by Python; the run must still stop at the next task, keeping the stage it finished
    (before: it went on to the end and exited 0, as a CI cancel was seen to do once)."""
    import signal

    from quant.cli import _terminate
    from quant.stages.executor import LocalExecutor, Task
    from quant.support import interrupt

    class Finalized:
        def __del__(self):
            _terminate(signal.SIGTERM, None)  # the CLI's handler, run where Python swallows its exception

    ran: list[str] = []

    def task(context, name):
        ran.append(name)
        if name == "a":
            Finalized()  # collected at once: the interrupt is raised in __del__ and dropped
        return name

    def stage(name):
        return Stage(name, {}, work=lambda: None, tasks=lambda: [Task(name, task, {"name": name})],
                     collect=lambda result: None)

    ledger = Ledger(tmp_path)
    runner = StageRunner(ledger)
    interrupt.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_batch([stage("a"), stage("b"), stage("c")], LocalExecutor(None, tmp_path), "t",
                             show_progress=False)
    finally:
        interrupt.clear()
    assert ran == ["a"]  # the interrupt was dropped inside task a, and no later task started
    assert ledger.done("a", runner.keys["a"])  # the stage it finished is kept
    assert not ledger.done("b", runner.keys["b"]) and not ledger.done("c", runner.keys["c"])
