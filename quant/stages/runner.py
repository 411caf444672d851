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


@dataclass(frozen=True)
class StageRun:
    name: str
    key: str
    seconds: float
    reused: bool


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

    def run(self, stage: Stage) -> StageRun:
        key = self.key(stage)
        self.keys[stage.name] = key
        if not self.fresh and self.ledger.done(stage.name, key) and all(Path(p).exists() for p in stage.outputs):
            result = StageRun(stage.name, key, 0.0, True)
        else:
            self.ledger.invalidate(stage.name)  # before any output is touched
            start = time.perf_counter()
            stage.work()
            seconds = time.perf_counter() - start
            self.ledger.record(stage.name, key, seconds)  # after every output is complete
            result = StageRun(stage.name, key, seconds, False)
        if self.done is not None:
            self.done(result)
        return result
