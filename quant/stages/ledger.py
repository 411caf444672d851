"""The stage ledger: which stage of an audit finished, and from what inputs (its key).

An audit's work folder (``<out>/work/<fingerprint>/``) holds the models, calibration, videos
and scores, shared by every run of that model in ``<out>``. ``stages.json`` maps each finished
stage (``export:transformer``, ``quantize:int8:vae_decoder``, ``generate:fp16``...) to the key
of what produced it: a hash of the inputs, settings, upstream keys and tool versions. A stage
whose key matches is reused; a changed key reruns it. The ledger is written after each stage
(atomically), so a killed run keeps every stage it finished, and a stage's own files are only
trusted once its entry is written.

Example::

    ledger = Ledger(work)
    key = stage_key({"module": "transformer", "export": export_key})
    if not ledger.done("quantize:int8:transformer", key):
        ...  # do the work
        ledger.record("quantize:int8:transformer", key, seconds=12.5)
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from quant.support.files import atomic_write_json

SCHEMA_VERSION = 2  # 2: keys hash sources and input files; entries invalidated before work


def stage_key(inputs: dict) -> str:
    """A short stable hash of ``inputs`` (JSON-serialisable; paths and other objects via ``str``)."""
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Ledger:
    """``<work>/stages.json``: stage -> {key, seconds, finished}."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "stages.json"
        self.stages: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("schema_version") == SCHEMA_VERSION:
                self.stages = dict(data.get("stages", {}))
        except (OSError, json.JSONDecodeError, AttributeError):
            pass  # no ledger or a damaged one: every stage is redone

    def done(self, stage: str, key: str) -> bool:
        return self.stages.get(stage, {}).get("key") == key

    def invalidate(self, stage: str) -> None:
        """Forget ``stage`` (before its outputs are rewritten: a kill then leaves no valid entry)."""
        if self.stages.pop(stage, None) is not None:
            self._write()

    def record(self, stage: str, key: str, seconds: float) -> None:
        self.stages[stage] = {"key": key, "seconds": round(seconds, 3),
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, {"schema_version": SCHEMA_VERSION, "stages": self.stages})
