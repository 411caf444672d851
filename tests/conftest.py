"""Shared fixtures: tiny pipelines built once, and one export of each per test session.

Exports dominate the suite's time (the VAE decoder's frame loop is unrolled into the graph),
so every test that needs ONNX models reads the session-scoped ``t2v_export``/``ti2v_export``
instead of exporting again, at ``SMALL`` settings (32x32, 5 frames).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from quant.recipes.export import ExportOptions  # noqa: E402
from quant.stages.export import ExportReport, export_pipeline  # noqa: E402
from quant.pipeline.models import LoadedModel, load_model  # noqa: E402
from quant.pipeline.settings import GenerationSettings  # noqa: E402

SMALL = GenerationSettings(height=32, width=32, num_frames=5, num_inference_steps=8)
SMALL_ARGS = ["--height", "32", "--width", "32", "--frames", "5"]
PROMPTS = ["a red kite flying over a windy beach", "a cup of coffee on a wooden table"]


@dataclass
class Exported:
    model: LoadedModel
    root: Path
    report: ExportReport


@pytest.fixture(scope="session")
def t2v() -> LoadedModel:
    return load_model("wan2.2-t2v-tiny")


@pytest.fixture(scope="session")
def ti2v() -> LoadedModel:
    return load_model("wan2.2-ti2v-tiny")


@pytest.fixture(scope="session")
def t2v_export(t2v, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("t2v-run")
    report = export_pipeline(t2v, SMALL, root, PROMPTS, show_progress=False)
    return Exported(t2v, root, report)


@pytest.fixture(scope="session")
def ti2v_export(ti2v, tmp_path_factory) -> Exported:
    """TI2V is exported with onnxslim simplification on, so that path is covered too."""
    root = tmp_path_factory.mktemp("ti2v-run")
    report = export_pipeline(ti2v, SMALL, root, PROMPTS, options=ExportOptions(simplify=True), show_progress=False)
    return Exported(ti2v, root, report)


def copy_work(src_out: Path, dst_out: Path, stages: tuple[str, ...], folders: tuple[str, ...]) -> None:
    """Copy an audit's ``--out`` keeping only the work folders ``folders`` (``onnx``, ``calibration``,
    files such as ``parity.json``) and the ledger entries whose names start with ``stages``: the
    next run there reuses that work and does the rest again."""
    import json
    import shutil

    work_src = next((Path(src_out) / "work").iterdir())
    work = Path(dst_out) / "work" / work_src.name
    work.mkdir(parents=True)
    for name in folders:
        path = work_src / name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, work / name)
    ledger = json.loads((work_src / "stages.json").read_text())
    ledger["stages"] = {k: v for k, v in ledger["stages"].items() if k.startswith(stages)}
    (work / "stages.json").write_text(json.dumps(ledger))
