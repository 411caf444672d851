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


# A tiny whole audit on the local executor, run once per session: what the Ray and process
# executors' runs are compared with (same video hashes, same metrics, same verdict).
TINY_AUDIT = """
model = "wan2.2-t2v-tiny"
[generation]
height = 32
width = 32
num_frames = 5
num_inference_steps = 4
[prompts]
eval = "{prompts}"
seeds = [0, 1]
[calibration]
samples_per_module = 4
[quantize]
recipes = ["int8-dynamic"]
[runtime]
threads = 1
emulate = ["avx2"]
[variants]
run = ["onnx", "int8-dynamic"]
attribution = false
floor = false
[gates.default]
psnr_mean = ">= 10"
"""
REPO = Path(__file__).resolve().parent.parent
COST = ("seconds", "rss", "model_mb", "speedup", "videos_timed", "warmup")


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT at its default, as a terminal's command has it. Where the
    suite itself was started in the background (``make test &``, ``nohup``), SIGINT is ignored and
    children inherit that; the CLI then rightly keeps ignoring Ctrl-C, which a test of Ctrl-C must
    not be run under."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(config: Path, out: Path, *extra: str):
    """``quant-audit run --config CONFIG --out OUT ...`` as a child process (``subprocess.Popen``),
    with SIGINT as a terminal gives it (:func:`_as_from_a_terminal`)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "quant.cli", "run", "--config", str(config), "--out", str(out), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)


def audit_outcome(out: Path) -> tuple[dict, dict]:
    """(results.json, {(variant, video file): frames SHA-256}) of the newest run in ``out``."""
    import json

    results = json.loads(max(Path(out).glob("2*/results.json")).read_text())
    work = next((Path(out) / "work").iterdir())
    hashes = {(m.parent.name, v["file"]): v["frames_sha256"]
              for m in (work / "videos").glob("*/manifest.json") for v in json.loads(m.read_text())["videos"]}
    return results, hashes


def audit_quality(results: dict) -> dict:
    """Every variant's metrics except what it cost (timings differ between any two runs)."""
    return {v["name"]: {k: x for k, x in v["metrics"].items() if not any(c in k for c in COST)} | {"passed": v["passed"]}
            for v in results["variants"]}


@dataclass
class TinyAudit:
    config: Path
    out: Path  # the local run's --out


@pytest.fixture(scope="session")
def tiny_audit(tmp_path_factory) -> TinyAudit:
    """``TINY_AUDIT`` run once on the local executor (one thread)."""
    root = tmp_path_factory.mktemp("tiny-audit")
    prompts = root / "eval.txt"
    prompts.write_text("a red circle moving left\na cup of coffee on a wooden table\n", encoding="utf-8")
    config = root / "audit.toml"
    config.write_text(TINY_AUDIT.format(prompts=prompts.as_posix()), encoding="utf-8")
    local = run_cli(config, root / "local")
    _, err = local.communicate(timeout=900)
    assert local.returncode == 0, err[-3000:]
    return TinyAudit(config, root / "local")
