"""The stage runner: one typed ``Stage`` at a time, reused when its key matches, never trusted half-done.

A stage is keyed by everything that reaches its output:
- ``inputs``: settings, upstream stage keys, the target;
- ``sources``: the quant-audit modules that produce it (a hash of their source files, so a
  change of code redoes the stage; the package version alone never changes);
- ``files``: input files (ONNX models...), by content.

Before a stage touches its outputs its ledger entry is removed, and it is written again only
after the outputs are complete. A stage killed half-way is therefore redone by the next run,
whatever configuration that run has (the failure mode it fixes: run A, start B, kill it, rerun
A: A's key still matched while B's half-written files sat in its place).

A stage whose work is split into tasks (``quant.stages.executor``: videos, scores,
quantizations) gives ``tasks`` and ``collect``; ``run_batch`` sends the tasks of many stages to
one executor at once, hands each result to its stage's ``collect`` as it arrives, and finishes
a stage (``work``, then its ledger entry) as soon as its last task is in, so a batch that fails
or is interrupted keeps every stage it completed.

Example::

    runner = StageRunner(Ledger(work))
    done = runner.run(Stage("quantize:int8:transformer", {"method": "minmax"}, work=do_it,
                            outputs=(dst,), files=(src,), sources=("quant.recipes.int8",)))
    done.reused, done.key
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from quant.stages.ledger import Ledger, stage_key
from quant.support import interrupt
from quant.support.files import file_hash


@dataclass(frozen=True)
class Stage:
    """One unit of work (see the module doc)."""

    name: str
    inputs: dict
    work: Callable[[], object]
    outputs: tuple[Path, ...] = ()
    files: tuple[Path, ...] = ()
    sources: tuple[str, ...] = ()
    tasks: Callable[[], list] | None = None  # the stage's tasks (run_batch); ``work`` then finishes it
    collect: Callable[[object], None] | None = None  # each TaskResult, as it arrives


@dataclass(frozen=True)
class StageRun:
    name: str
    key: str
    seconds: float
    reused: bool
    where: str = "local"  # where its work ran: "local", or Ray nodes with task counts


@lru_cache(maxsize=None)
def source_hash(modules: tuple[str, ...]) -> str:
    """A hash of the source files of ``modules`` (dotted names; once per process)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"stage source {name!r} is not an importable module")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs stages against one ledger; ``fresh`` redoes every stage; ``done`` is told of each."""

    ledger: Ledger
    fresh: bool = False
    done: Callable[[StageRun], None] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, stage: Stage) -> str:
        files = {str(p): file_hash(p) for p in stage.files}
        return stage_key({**stage.inputs, "sources": source_hash(tuple(stage.sources)), "files": files})

    def _reusable(self, stage: Stage, key: str) -> bool:
        return not self.fresh and self.ledger.done(stage.name, key) and all(Path(p).exists() for p in stage.outputs)

    def _report(self, result: StageRun) -> StageRun:
        if self.done is not None:
            self.done(result)
        return result

    def run(self, stage: Stage) -> StageRun:
        interrupt.check()  # a stop the signal handler could not deliver (quant.support.interrupt)
        key = self.key(stage)
        self.keys[stage.name] = key
        if self._reusable(stage, key):
            result = StageRun(stage.name, key, 0.0, True)
        else:
            self.ledger.invalidate(stage.name)  # before any output is touched
            start = time.perf_counter()
            stage.work()
            seconds = time.perf_counter() - start
            self.ledger.record(stage.name, key, seconds)  # after every output is complete
            result = StageRun(stage.name, key, seconds, False)
        return self._report(result)

    def run_batch(self, stages: list[Stage], executor, label: str, show_progress: bool = True) -> list[StageRun]:
        """Run ``stages`` (each with ``tasks``) with their tasks on ``executor`` together (see the
        module doc); stages whose key matches are reused without planning any task.

        Raises:
            quant.errors.TaskFailed: tasks failed on every attempt (completed stages are recorded).
        """
        from quant.stages.executor import summarize_where

        interrupt.check()
        runs: dict[str, StageRun] = {}
        open_: dict[str, dict] = {}
        owner: dict[int, str] = {}
        for stage in stages:
            key = self.key(stage)
            self.keys[stage.name] = key
            if self._reusable(stage, key):
                runs[stage.name] = self._report(StageRun(stage.name, key, 0.0, True))
                continue
            self.ledger.invalidate(stage.name)  # before any output is touched
            tasks = stage.tasks()
            open_[stage.name] = {"stage": stage, "key": key, "tasks": tasks, "left": len(tasks), "seconds": 0.0,
                                 "where": []}
            for task in tasks:
                owner[id(task)] = stage.name

        def finish(name: str) -> None:
            entry = open_.pop(name)
            start = time.perf_counter()
            entry["stage"].work()
            seconds = entry["seconds"] + time.perf_counter() - start
            self.ledger.record(name, entry["key"], seconds)  # after every output is complete
            runs[name] = self._report(StageRun(name, entry["key"], seconds, False, summarize_where(entry["where"])))

        def collect(result) -> None:
            name = owner[id(result.task)]
            entry = open_[name]
            entry["stage"].collect(result)
            entry["seconds"] += result.seconds
            entry["where"].append(result.where)
            entry["left"] -= 1
            if entry["left"] == 0:
                finish(name)
            interrupt.check()  # after the task's result is kept (quant.support.interrupt)

        planned = [t for e in open_.values() for t in e["tasks"]]
        for name in [n for n, e in open_.items() if e["left"] == 0]:  # nothing left to do: finish now
            finish(name)
        executor.run(planned, label, collect, show_progress)
        return [runs[s.name] for s in stages if s.name in runs]
