"""`quant-audit run` end to end on a small config: run files, gates and exit codes, baseline
regression, kill-and-resume, NaN outputs, the HTML report and dashboard in headless Chromium.

Two full audits run in this module (``audited`` and the kill-and-resume one, in separate output
folders); every other test reruns against ``audited``'s folder, where every finished stage is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import copy_work
from quant.cli import main

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "runs" / "screenshots"
HOSTILE_PROMPT = 'a <b>kite</b> & "sea" <script>window.__pwned = 1</script> at dusk'
SHAPES_PROMPT = "a red circle moving left"  # a shapes-world prompt: judged for adherence
HOSTILE_PROMPT_TAG = "<b>hard</b>"
HOSTILE_TAG = "<i>rc1</i>"
MODULES = ["text_encoder", "transformer", "transformer_2", "vae_decoder"]

CONFIG = """
model = "wan2.2-t2v-tiny"
[generation]
height = 32
width = 32
num_frames = 5
[prompts]
eval = "{prompts}"
seeds = [0]
[calibration]
samples_per_module = 8
[quantize]
recipes = ["fp16", "int8-dynamic"]
[runtime]
threads = 2
emulate = ["avx2"]
[variants]
run = ["onnx", "fp16", "int8-dynamic", "mixed"]
fps = {fps}
[mixes.mixed]
text_encoder = "fp16"
transformer = "fp16"
transformer_2 = "int8-dynamic"
vae_decoder = "fp16"
[gates.default]
psnr_mean = ">= {psnr_mean}"
ssim_min = ">= 0.5"
[gates.onnx]
psnr_min = ">= 60"
[regression]
psnr_mean = 0.5
ssim_mean = 0.005
"""


@dataclass
class Done:
    code: int
    out: str
    err: str
    run_dir: Path

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


def write_config(folder: Path, psnr_mean: float = 20, fps: int = 8, reduce_range: bool = False) -> Path:
    prompts = folder / "eval.txt"
    prompts.write_text(f"{SHAPES_PROMPT} | {HOSTILE_PROMPT_TAG}\n{HOSTILE_PROMPT}\n", encoding="utf-8")
    path = folder / f"audit-{psnr_mean:g}-{fps}{'-rr' if reduce_range else ''}.toml"
    text = CONFIG.format(prompts=prompts.as_posix(), psnr_mean=psnr_mean, fps=fps)
    if reduce_range:
        text = text.replace('recipes = ["fp16", "int8-dynamic"]', 'recipes = ["fp16", "int8-dynamic"]\nint8_reduce_range = true')
    path.write_text(text, encoding="utf-8")
    return path


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quant.cli", "run", "--config", str(config), "--out", str(out), *extra]


def _run_dir(out: Path, err: str) -> Path:
    line = next(l for l in err.splitlines() if l.startswith(("starting run", "resuming run")))
    return out / line.split()[2]


def run_cli(config: Path, out: Path, *extra: str) -> Done:
    proc = subprocess.run(_command(config, out, *extra), capture_output=True, text=True, cwd=REPO, timeout=1200)
    return Done(proc.returncode, proc.stdout, proc.stderr, _run_dir(out, proc.stderr))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="module")
def audited(folder) -> Done:
    """One uninterrupted audit; the other tests rerun in its output folder."""
    done = run_cli(write_config(folder), folder / "runs", "--tag", HOSTILE_TAG)
    assert done.code == 0, done.err[-3000:]
    return done


# --- run files -----------------------------------------------------------------------------------

def test_run_writes_the_design_run_files(audited):
    results = audited.results
    assert results["schema_version"] == 2 and results["verdict"] == "pass" and results["tag"] == HOSTILE_TAG
    assert results["model"]["name"] == "wan2.2-t2v-tiny" and results["model"]["fingerprint"].startswith("sha256:")
    assert set(results["parity"]) == set(MODULES) and all(p["passed"] for p in results["parity"].values())
    names = [v["name"] for v in results["variants"]]
    expected_attribution = [f"{r}@{m}" for r in ("fp16", "int8-dynamic") for m in MODULES]
    assert names == ["onnx", "fp16", "int8-dynamic", "mixed", "floor", "int8-dynamic~avx2", "mixed~avx2",
                     *expected_attribution]
    reference = results["reference_adherence"]
    assert [v["prompt_id"] for v in reference["videos"]] == ["p00"]  # the shapes prompt only
    assert results["prompts"][0]["tags"] == ["red", "circle", "left", HOSTILE_PROMPT_TAG]
    for variant in results["variants"]:
        assert variant["metrics"]["adherence"] in (0.0, 1.0)  # one judged video per variant
        assert variant["metrics"]["adherence"] == 1.0 or variant["metrics"]["adherence_worst_prompt"] == SHAPES_PROMPT
    mixed = next(v for v in results["variants"] if v["name"] == "mixed")
    assert mixed["modules"] == {"text_encoder": "fp16", "transformer": "fp16", "transformer_2": "int8-dynamic",
                                "vae_decoder": "fp16"}
    for variant in results["variants"]:
        assert {"psnr_mean", "psnr_min", "ssim_mean", "ssim_min"} <= set(variant["metrics"])
        for gate in variant["gates"]:
            assert {"metric", "op", "threshold", "value", "passed"} <= set(gate)
    fp16 = next(v for v in results["variants"] if v["name"] == "fp16")
    assert {g["metric"] for g in fp16["gates"]} == {"nonfinite_outputs", "psnr_mean", "ssim_min"}
    # quantization costs something, and int8 more than fp16
    assert fp16["metrics"]["psnr_mean"] > next(v for v in results["variants"] if v["name"] == "int8-dynamic")["metrics"]["psnr_mean"]
    # the noise floor: the FP32 pipeline itself, gated only for finiteness
    floor = next(v for v in results["variants"] if v["name"] == "floor")
    assert floor["kind"] == "floor" and floor["noise_ulps"] == 1 and set(floor["modules"].values()) == {"torch"}
    assert [g["metric"] for g in floor["gates"]] == ["nonfinite_outputs"]
    # emulated targets: int8 modules swapped for their ~avx2 graphs, gated like the variant they emulate
    emulated = next(v for v in results["variants"] if v["name"] == "mixed~avx2")
    assert emulated["emulates"] == "avx2" and emulated["kind"] == "mix"
    assert emulated["modules"] == {**mixed["modules"], "transformer_2": "int8-dynamic~avx2"}
    assert {g["metric"] for g in emulated["gates"]} == {g["metric"] for g in mixed["gates"]}
    assert set(results["emulation"]["int8-dynamic~avx2"]["modules"]) == set(MODULES)
    # the execution target: in results.json, the console, the history
    target = results["target"]
    assert target["threads"] == 2 and target["int8_path"] in ("avx2", "vnni", "other")
    assert {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c"} <= set(target["flags"])
    assert target["id"] in audited.out and target["id"] in audited.err
    with sqlite3.connect(audited.run_dir.parent / "history.sqlite") as conn:
        ids = {row[0] for row in conn.execute("SELECT target_id FROM results WHERE run_id = ?", (audited.run_dir.name,))}
    assert ids == {target["id"]}
    # kernel SQNR beside the SQNR against FP32, per quantized module
    quant = json.loads((audited.run_dir / "quantization" / "int8-dynamic.json").read_text())
    for module in MODULES:
        entry = quant["modules"][module]
        assert entry["kernel"]["status"] in ("ok", "float-math", "lossy-kernels")
        assert entry["kernel_identical"] or entry["kernel_sqnr_db"] is not None
    assert {f["module"] for f in results["kernel_findings"] if f["recipe"] == "int8-dynamic"} == set(MODULES)

    frames = pd.read_csv(audited.run_dir / "scores" / "frames.csv")
    assert len(frames) == len(names) * 2 * 1 * 5  # variants x prompts x seeds x frames
    assert {"variant", "prompt_id", "seed", "frame", "psnr_db", "ssim"} <= set(frames.columns)
    summary = pd.read_csv(audited.run_dir / "scores" / "summary.csv")
    assert list(summary["variant"]) == names
    row = summary.set_index("variant").loc["fp16"]
    assert row["psnr_mean"] == pytest.approx(fp16["metrics"]["psnr_mean"])
    # what each variant cost, measured while it generated: wall and per-module time, memory, size
    costs = summary.set_index("variant")
    assert (costs["video_seconds"] > 0).all() and (costs["peak_rss_mb"] > 0).all() and (costs["model_mb"] > 0).all()
    assert (costs["video_seconds_min"] <= costs["video_seconds"]).all()
    assert (costs["transformer_seconds"] > 0).all() and (costs["transformer_seconds"] < costs["video_seconds"]).all()
    assert costs.loc["onnx", "speedup_vs_onnx"] == 1.0
    # fp16 modules weigh less than the FP32 ONNX ones (a size, not a timing: the same on every machine;
    # not half, since the overflow guard keeps some nodes, and their weights, in FP32)
    assert costs.loc["fp16", "model_mb"] < costs.loc["onnx", "model_mb"]
    assert "speedup_vs_onnx" in fp16["metrics"]

    suites = ET.parse(audited.run_dir / "junit.xml").getroot()
    cases = suites.findall(".//testcase")
    assert len(cases) == sum(len(v["gates"]) for v in results["variants"]) + len(MODULES)
    assert suites.get("failures") == "0"

    resolved = tomllib.loads((audited.run_dir / "config.toml").read_text())
    assert resolved["generation"]["height"] == 32 and resolved["quantize"]["recipes"] == ["fp16", "int8-dynamic"]
    for path in ("onnx/fp32/transformer.onnx", "onnx/fp16/vae_decoder.onnx", "videos/torch/p00_s0.npz",
                 "videos/mixed/p01_s0.npz", "videos/int8-dynamic@transformer_2/p00_s0.webp", "report.html"):
        assert (audited.run_dir / path).is_file(), path
    assert (audited.run_dir.parent / "history.sqlite").is_file() and (audited.run_dir.parent / "dashboard.html").is_file()
    assert "verdict: PASS" in audited.out and "report.html" in audited.out
    # a CI log (no terminal) gets one line per stage that did work, not minutes of silence
    assert "export:transformer:" in audited.err and "generate:fp16:" in audited.err
    # times sort as times whatever the machine's zone; the reproduce line survives a shell
    assert results["finished"].endswith("Z") and results["started"].endswith("Z")
    assert shlex.split(results["reproduce"])[2:4] == ["--config", str(audited.run_dir / "config.toml")]


def test_same_config_reproduces_bit_identical_reference_videos(audited, t2v):
    """A generation in this process (another model build, another process than the run) gives the
    reference video the run recorded, byte for byte: same seed and config, same frames."""
    from quant.pipeline.sampling import generate_video
    from quant.pipeline.settings import GenerationSettings

    manifest = json.loads((audited.run_dir / "videos" / "torch" / "manifest.json").read_text())
    hashes = {v["file"]: v["frames_sha256"] for v in manifest["videos"]}
    video = generate_video(t2v.pipe, SHAPES_PROMPT, 0,
                           GenerationSettings(height=32, width=32, num_frames=5))
    assert hashlib.sha256(video.frames.tobytes()).hexdigest() == hashes["p00_s0.npz"]


# --- gates, exit codes, baseline ---------------------------------------------------------------

def test_impossible_thresholds_exit_1_and_name_the_gates(audited, folder):
    # what a killed quantizer leaves behind is never linked into a run folder
    work = next((folder / "runs").glob("work/*/stages.json")).parent
    leftover = work / "onnx" / "int8-dynamic" / ".tmp-killed" / "transformer.onnx"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a model")
    done = run_cli(write_config(folder, psnr_mean=200), folder / "runs")
    assert not list(done.run_dir.rglob(".tmp-killed"))
    assert done.code == 1, done.err[-2000:]
    assert "verdict: FAIL" in done.out
    last = done.err.strip().splitlines()[-1]
    assert "FAILED" in last and "fp16: psnr_mean >= 200" in last and "onnx: psnr_mean >= 200" in last
    results = done.results
    assert results["verdict"] == "fail"
    failed = {(g["variant"], g["metric"]) for g in results["failed_gates"]}
    assert ("mixed", "psnr_mean") in failed and ("onnx", "psnr_min") not in failed
    # 200 dB is tighter than the floor (FP32 with the noise moved by one ulp): marked as such
    gate = next(g for g in results["failed_gates"] if (g["variant"], g["metric"]) == ("fp16", "psnr_mean"))
    assert gate["note"].startswith("below the noise floor")
    onnx_min = next(g for v in results["variants"] if v["name"] == "onnx" for g in v["gates"] if g["metric"] == "psnr_min")
    assert "noise floor" not in onnx_min["note"]  # 60 dB is not
    assert int(ET.parse(done.run_dir / "junit.xml").getroot().get("failures")) == len(results["failed_gates"])
    # every model and video was reused from the first run, not recomputed
    stages = {s["name"]: s["reused"] for s in results["stages"]}
    assert all(stages[k] for k in stages if k.startswith(("export:", "quantize:", "generate:", "score:")))
    # a reader that goes away (`| head`) does not turn the FAIL into exit 0
    proc = subprocess.Popen(_command(write_config(folder, psnr_mean=200), folder / "runs"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.close()
    assert proc.wait(timeout=1200) == 1


def test_baseline_latest_compares_and_a_drop_fails(audited, folder):
    from reports.history import resolve_baseline

    db = folder / "runs" / "history.sqlite"
    previous, _ = resolve_baseline(db, "latest", audited.results["model"]["fingerprint"], audited.results["target"]["id"])
    config = write_config(folder)
    done = run_cli(config, folder / "runs", "--baseline", "latest")
    assert done.code == 0, done.err[-2000:]
    results = done.results
    assert results["baseline"]["run_id"] == previous
    regression = [g for v in results["variants"] for g in v["gates"] if g["kind"] == "regression"]
    assert {g["metric"] for g in regression} == {"psnr_mean", "ssim_mean"} and all(g["passed"] for g in regression)

    # Make the baseline look 3 dB better on fp16: this run's unchanged numbers are now a regression.
    with sqlite3.connect(db) as conn:
        (metrics,) = conn.execute("SELECT metrics FROM results WHERE run_id = ? AND variant = 'fp16'",
                                  (audited.run_dir.name,)).fetchone()
        better = {**json.loads(metrics)}
        better["psnr_mean"] += 3
        conn.execute("UPDATE results SET metrics = ? WHERE run_id = ? AND variant = 'fp16'",
                     (json.dumps(better), audited.run_dir.name))
    done = run_cli(config, folder / "runs", "--baseline", audited.run_dir.name)
    assert done.code == 1
    failed = done.results["failed_gates"]
    assert [(g["variant"], g["metric"], g["kind"]) for g in failed] == [("fp16", "psnr_mean", "regression")]
    assert audited.run_dir.name in failed[0]["reason"] and failed[0]["note"] == ""

    # Every earlier run now says it ran on another CPU: latest compares with none of them, and says so;
    # a baseline named by run id still compares, and the gate table says where it ran.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE results SET target_id = 'x86_64-avx512-vnni-ort1.31.1-t2-elsewh'")
    done = run_cli(config, folder / "runs", "--baseline", "latest")
    assert done.code == 0 and done.results["baseline"] is None
    assert "ran on other targets (x86_64-avx512-vnni-ort1.31.1-t2-elsewh)" in done.err
    assert not [g for v in done.results["variants"] for g in v["gates"] if g["kind"] == "regression"]
    done = run_cli(config, folder / "runs", "--baseline", audited.run_dir.name)
    assert done.code == 1 and done.results["baseline"]["target"] == "x86_64-avx512-vnni-ort1.31.1-t2-elsewh"
    (gate,) = done.results["failed_gates"]
    assert gate["note"] == "baseline ran on target x86_64-avx512-vnni-ort1.31.1-t2-elsewh"


@pytest.mark.parametrize("extra, message", [
    (["--baseline", "20000101-000000-dead"], "--baseline: run '20000101-000000-dead' is not in"),
    (["--config", "/nonexistent/audit.toml"], "/nonexistent/audit.toml: config file not found"),
])
def test_bad_run_input_is_exit_2(audited, folder, capsys, extra, message):
    argv = ["run", "--config", str(write_config(folder)), "--out", str(folder / "runs"), *extra]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_nan_in_a_module_output_fails_that_variant_not_the_run(audited, folder, monkeypatch, capsys):
    """transformer_2 of fp16 returns Inf: the variant fails its finite gate naming the module."""
    import quant.pipeline.ort_modules as om

    real = om.run_session

    def overflowing(session, feeds):
        out = real(session, feeds)
        if "/fp16/transformer_2.onnx" in Path(session._model_path).as_posix():
            out[0] = np.full_like(out[0], np.inf)
        return out

    monkeypatch.setattr(om, "run_session", overflowing)
    config = write_config(folder, fps=5)  # another preview rate: a new generate key, models reused
    code = main(["run", "--config", str(config), "--out", str(folder / "runs")])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    run_dir = _run_dir(folder / "runs", err)
    results = json.loads((run_dir / "results.json").read_text())
    failing = {g["variant"]: g for g in results["failed_gates"] if g["kind"] == "finite"}
    assert set(failing) == {"fp16", "fp16@transformer_2"}
    assert "transformer_2 output" in failing["fp16"]["reason"]
    assert next(v for v in results["variants"] if v["name"] == "onnx")["passed"]
    assert (run_dir / "report.html").is_file()


# --- kill and resume ---------------------------------------------------------------------------

def _quality(run_dir: Path) -> pd.DataFrame:
    """summary.csv without the cost columns that are timings or memory (they differ run to run)."""
    table = pd.read_csv(run_dir / "scores" / "summary.csv")
    return table.drop(columns=[c for c in table.columns if "seconds" in c or c in ("speedup_vs_onnx", "peak_rss_mb")])


def _files(work: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(work)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in work.rglob("*") if p.is_file() and p.name not in ("stages.json", ".lock")}


def test_kill_mid_generation_then_resume_recomputes_nothing_finished(audited, folder):
    out = folder / "killed"
    config = write_config(folder)
    # the models come from the uninterrupted audit (reused by key), so this run starts at generate
    copy_work(folder / "runs", out, ("export:", "quantize:", "emulate:"), ("onnx", "calibration", "quantization", "parity.json"))
    proc = subprocess.Popen(_command(config, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 900
    ledger = None
    while time.monotonic() < deadline and proc.poll() is None:
        ledgers = list(out.glob("work/*/stages.json"))
        stages = json.loads(ledgers[0].read_text())["stages"] if ledgers else {}
        if "generate:fp16" in stages:  # torch, onnx and fp16 finished; int8-dynamic is under way
            ledger = ledgers[0]
            break
        time.sleep(0.2)
    assert ledger is not None, "the run finished or failed before reaching the generate stage"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_run = next(out.glob("2*/run.json")).parent
    assert json.loads((killed_run / "run.json").read_text())["status"] == "running"
    finished = json.loads(ledger.read_text())["stages"]
    before = _files(ledger.parent)

    done = run_cli(config, out)
    assert done.code == 0, done.err[-2000:]
    assert done.run_dir == killed_run and "resuming run" in done.err
    after_ledger = json.loads(ledger.read_text())["stages"]
    for stage, entry in finished.items():
        assert after_ledger[stage] == entry, f"{stage} was recomputed"
    after = _files(ledger.parent)
    finished_prefixes = ("onnx/", "calibration/", "videos/torch/", "videos/onnx/", "videos/fp16/")
    for name, stamp in before.items():
        if name.startswith(finished_prefixes):
            assert after[name] == stamp, f"{name} was rewritten"
    reused = {s["name"] for s in done.results["stages"] if s["reused"]}
    assert set(finished) - {"calibrate"} <= reused

    # same results as the uninterrupted audit (timings aside: they are measurements, never equal)
    pd.testing.assert_frame_equal(_quality(done.run_dir), _quality(audited.run_dir))


def test_kill_mid_quantize_after_a_config_change_then_the_first_config_recomputes(audited, folder):
    """Run A (``audited``), start B (7-bit weights: new int8-dynamic models) and kill it while it
    quantizes, rerun A: every module B touched is quantized again (not reused on top of B's files),
    and A's numbers come back exactly."""
    out = folder / "runs"
    ledger = next(out.glob("work/*/stages.json"))
    mine = {k: v["key"] for k, v in json.loads(ledger.read_text())["stages"].items()
            if k.startswith("quantize:int8-dynamic:")}
    assert set(mine) == {f"quantize:int8-dynamic:{m}" for m in MODULES}
    proc = subprocess.Popen(_command(write_config(folder, reduce_range=True), out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    touched: set[str] = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not touched:
        stages = json.loads(ledger.read_text())["stages"]
        touched = {k for k, key in mine.items() if stages.get(k, {}).get("key") != key}
        time.sleep(0.02)
    assert touched, "B finished or failed before it quantized anything"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    done = run_cli(write_config(folder), out)
    assert done.code == 0, done.err[-2000:]
    recomputed = {s["name"] for s in done.results["stages"] if not s["reused"]}
    assert touched <= recomputed
    mine_now = {k: v["key"] for k, v in json.loads(ledger.read_text())["stages"].items() if k in mine}
    assert mine_now == mine  # A's own keys again
    pd.testing.assert_frame_equal(_quality(done.run_dir), _quality(audited.run_dir))


def test_sigterm_ends_a_run_like_ctrl_c_and_it_resumes(folder):
    """CI cancelling a job sends SIGTERM: the run stops with exit 130, keeps what it finished and
    stays resumable (run.json "running")."""
    out = folder / "terminated"
    proc = subprocess.Popen(_command(write_config(folder), out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        ledgers = list(out.glob("work/*/stages.json"))
        if ledgers and "export:text_encoder" in json.loads(ledgers[0].read_text())["stages"]:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "interrupted; finished files are kept" in err, (proc.returncode, err[-3000:])
    run = next(out.glob("2*/run.json"))
    assert json.loads(run.read_text())["status"] == "running"
    assert "export:text_encoder" in json.loads(next(out.glob("work/*/stages.json")).read_text())["stages"]


# --- HTML in a real browser ------------------------------------------------------------------------

def test_report_loads_in_chromium_with_every_section(audited):
    from browser import open_page

    html = (audited.run_dir / "report.html").read_text()
    assert "<script>window.__pwned" not in html and "&lt;script&gt;window.__pwned" in html
    assert "<i>rc1</i>" not in html and "&lt;i&gt;rc1&lt;/i&gt;" in html
    assert HOSTILE_PROMPT_TAG not in html and "&lt;b&gt;hard&lt;/b&gt;" in html
    page = open_page(audited.run_dir / "report.html")
    try:
        shot = page.screenshot(SCREENSHOTS / "report.png")
        assert page.errors == []
        sections = ["verdict", "gates", "attribution", "metrics", "frames", "latents", "playback", "parity",
                    "quantization", "environment"]
        assert audited.results["target"]["id"] in page.evaluate("document.getElementById('environment').nextElementSibling.innerText")
        assert page.evaluate(f"{json.dumps(sections)}.filter(id => !document.getElementById(id))") == []
        assert page.evaluate("document.querySelector('.banner').textContent.trim().startsWith('PASS')")
        assert page.evaluate("document.querySelectorAll('figure svg').length") >= 3  # attribution, frames, latents
        images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert len(images) == 2 * 7 and all(images)  # 2 prompts x (onnx, fp16, int8-dynamic, mixed, floor, 2 emulated)
        assert page.evaluate("window.__pwned === undefined")
        assert HOSTILE_PROMPT in page.evaluate("document.body.innerText")
        assert audited.results["model"]["fingerprint"] in page.evaluate("document.body.innerText")
        # adherence: only the shapes prompt is judged (the tiny model's noise shows no object: rate 0)
        assert page.evaluate("!!document.getElementById('adherence')")
        assert SHAPES_PROMPT in page.evaluate("document.getElementById('adherence').nextElementSibling.nextElementSibling.innerText")
        assert HOSTILE_PROMPT_TAG in page.evaluate("document.body.innerText")
    finally:
        page.close()
    assert shot.stat().st_size > 10_000
    print(f"report screenshot: {shot}")


def test_dashboard_and_history_command(audited, folder, capsys):
    from browser import open_page

    code = main(["history", "--out", str(folder / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert audited.run_dir.name in out and "psnr_mean across runs" in out and "fp16" in out
    page = open_page(folder / "runs" / "dashboard.html")
    try:
        page.screenshot(SCREENSHOTS / "dashboard.png")
        assert page.errors == []
        assert page.evaluate("document.querySelectorAll('section.model figure svg').length") == 4
        assert audited.run_dir.name in page.evaluate("document.body.innerText")
    finally:
        page.close()


def test_report_command_rerenders_a_run_and_names_a_non_run(audited, tmp_path, capsys):
    report = audited.run_dir / "report.html"
    report.unlink()
    assert main(["report", str(audited.run_dir)]) == 0
    assert report.is_file() and "quant-audit report" in report.read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'results.json'}: not found" in capsys.readouterr().err
