"""Per-node sensitivity and the mixed-precision search on wan2.2-t2v-tiny (small settings).

A module fixture builds the condition it tests on whatever CPU runs it: a first `quant-audit run`
measures plain int8's psnr_mean here (integer kernels differ between CPUs, so no constant gate
fails int8 everywhere), then a run with `[search] enabled = true` and the gate 3 dB above it:
the search must find a mix that passes where int8 fails, with INT8 coverage, and the report
must show it. The other tests reuse its work folder (sensitivity and videos are cached stages).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from quant.cli import main
from quant.config import load_config

REPO = Path(__file__).resolve().parent.parent

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
recipes = ["fp16", "int8"]
[variants]
run = ["int8", "fp16"]
attribution = false
[gates.default]
psnr_mean = ">= 20"
[search]
enabled = {enabled}
modules = ["text_encoder", "transformer", "transformer_2"]   # the VAE stays fp16 (fallback)
inc_compare = "transformer_2"
[search.gates]
psnr_mean = ">= {psnr_mean}"
ssim_min = ">= 0.9"
"""


def write_config(folder: Path, psnr_mean: float, enabled: bool = True) -> Path:
    prompts = folder / "eval.txt"
    prompts.write_text("a red kite flying over a windy beach at sunset\na steaming cup of coffee on a wooden table\n")
    path = folder / f"search-{psnr_mean:g}-{enabled}.toml"
    path.write_text(CONFIG.format(prompts=prompts.as_posix(), psnr_mean=psnr_mean, enabled=str(enabled).lower()))
    return path


def _run(config: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "quant.cli", "run", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stderr.splitlines() if l.startswith(("starting run", "resuming run")))
    return out / line.split()[2]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    # 1. what plain int8 scores on this CPU (the default gate is loose: this run passes)
    first = json.loads((_run(write_config(folder, 0, enabled=False), folder / "runs") / "results.json").read_text())
    int8 = next(v for v in first["variants"] if v["name"] == "int8")["metrics"]["psnr_mean"]
    # 2. a search gate int8 fails here by 3 dB; every stage of the first run is reused
    gate = math.ceil((int8 + 3) * 10) / 10
    config = write_config(folder, gate)
    run_dir = _run(config, folder / "runs")
    return folder, config, run_dir, json.loads((run_dir / "results.json").read_text())


def test_search_finds_a_mix_that_passes_where_int8_fails(searched):
    _, _, run_dir, results = searched
    search = results["search"]
    gate = float(search["settings"]["gates"][0].split()[-1])
    assert search["finished"] and search["settings"]["gates"] == [f"psnr_mean >= {gate:g}", "ssim_min >= 0.9"]
    references = search["references"]
    assert not references["int8"]["passed"] and references["fp16"]["passed"]
    chosen = search["chosen"]
    assert chosen["passed"] and chosen["metrics"]["psnr_mean"] >= gate and chosen["metrics"]["ssim_min"] >= 0.9
    assert chosen["coverage"] > references["fp16"]["coverage"] == 0.0 and chosen["int8_nodes"] > 0
    assert chosen["modules"]["vae_decoder"] == "fp16"  # not searched: the fallback
    # bisection: every verified candidate with fewer moves than the chosen one fails the gate
    assert all(not c["passed"] for c in search["candidates"] if c["index"] < chosen["index"])
    # the chosen mix joined the run as a variant, regenerated and gated like the others
    variant = next(v for v in results["variants"] if v["name"] == "searched")
    assert variant["passed"] and variant["kind"] == "mix"
    assert variant["metrics"]["psnr_mean"] == pytest.approx(chosen["metrics"]["psnr_mean"])
    assert {g["metric"] for g in variant["gates"]} == {"nonfinite_outputs", "psnr_mean", "ssim_min"}


def test_the_snippet_pins_the_mix_in_a_config(searched, tmp_path):
    folder, config, _, results = searched
    snippet = results["search"]["snippet"]
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(config.read_text().replace("[search]", snippet + "\n[search]")
                      .replace('run = ["int8", "fp16"]', 'run = ["int8", "fp16", "searched"]'))
    mix = load_config(pinned).variant_modules("searched", ["text_encoder", "transformer", "transformer_2", "vae_decoder"])
    assert mix == results["search"]["chosen"]["modules"]


def test_sensitivity_ranking_is_in_results_and_report(searched):
    folder, _, run_dir, results = searched
    ranking = results["sensitivity"]["modules"]
    assert set(ranking) == {"text_encoder", "transformer", "transformer_2"}
    rows = pd.DataFrame(ranking["transformer_2"])
    assert list(rows["rank"]) == list(range(1, len(rows) + 1))
    assert rows["gain_db"].is_monotonic_decreasing and rows["gain_db"].iloc[0] > 0
    assert set(rows["op_type"]) <= {"MatMul", "Conv", "Gemm"} and rows["activation_sqnr_db"].notna().all()
    csv = next((folder / "runs" / "work").glob("*/sensitivity/transformer_2.int8.csv"))
    assert len(pd.read_csv(csv)) == len(rows)
    html = (run_dir / "report.html").read_text()
    assert 'id="sensitivity"' in html and 'id="search"' in html and "[mixes.searched" in html


def test_report_with_search_loads_in_chromium(searched):
    from browser import open_page

    _, _, run_dir, _ = searched
    page = open_page(run_dir / "report.html")
    try:
        page.screenshot(REPO / "runs" / "screenshots" / "report-search.png")
        assert page.errors == []
        assert page.evaluate("document.querySelectorAll('#search ~ figure svg').length") >= 1
        assert page.evaluate("!!document.getElementById('sensitivity') && !!document.getElementById('search')")
    finally:
        page.close()


def test_search_stops_with_exit_1_when_no_mix_can_pass(searched, capsys):
    folder, _, _, _ = searched
    config = write_config(folder, 99)
    code = main(["search", "--config", str(config), "--out", str(folder / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert "no mix can pass psnr_mean >= 99" in err and "even fp16 everywhere" in err


def test_a_run_whose_search_fails_says_so_in_junit_and_the_gate_table(searched):
    """The exit code is 1 because the search gate failed: junit.xml and the report say which gate."""
    import xml.etree.ElementTree as ET

    folder, _, _, _ = searched
    proc = subprocess.run([sys.executable, "-m", "quant.cli", "run", "--config", str(write_config(folder, 99)),
                           "--out", str(folder / "runs")], capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = next(l for l in proc.stderr.splitlines() if l.startswith(("starting run", "resuming run")))
    run_dir = folder / "runs" / line.split()[2]
    results = json.loads((run_dir / "results.json").read_text())
    (gate,) = results["search_gates"]
    assert not gate["passed"] and "no mix can pass psnr_mean >= 99" in gate["reason"]
    suite = ET.parse(run_dir / "junit.xml").getroot().find("testsuite[@name='search']")
    assert suite is not None and suite.get("failures") == "1"
    assert "no mix can pass psnr_mean &gt;= 99" in (run_dir / "report.html").read_text()


def test_sensitivity_command_writes_the_ranking(searched, capsys):
    folder, _, _, _ = searched
    work = next((folder / "runs" / "work").glob("*/stages.json")).parent
    code = main(["sensitivity", "--module", "text_encoder", "--recipe", "int8-dynamic", "--out", str(work),
                 "--top", "5"])
    out = capsys.readouterr().out
    assert code == 0 and "gain_db" in out
    table = pd.read_csv(work / "sensitivity" / "text_encoder.int8-dynamic.csv")
    assert len(table) > 5 and (work / "sensitivity" / "text_encoder.int8-dynamic.svg").read_text().startswith("<svg")
    assert main(["sensitivity", "--module", "text_encoder", "--recipe", "inc-int8", "--out", str(work)]) == 2


class _Stub:
    """A search whose candidate i passes from ``k`` on; counts verifications."""

    def __init__(self, k: int, n: int):
        from quant.config import SearchSettings

        self.k, self.n, self.evaluated, self.calls = k, n, {}, 0
        self.settings, self.metric = SearchSettings(), "psnr_mean"

    def assignment(self, moves):
        return {"m": len(moves)}, {}

    def verify(self, index, modules, keep):
        from quant.audit.search import Candidate

        self.calls += 1
        passed = index >= self.k
        self.evaluated[index] = Candidate(index, modules, {}, {"psnr_mean": 40.0 if passed else 20.0}, passed,
                                          [] if passed else ["psnr_mean >= 30"], 1 - index / self.n, self.n - index, 0.0)
        return self.evaluated[index]


@pytest.mark.parametrize("k", [0, 1, 17, 63, 64])
def test_bisection_finds_the_first_passing_candidate_in_log_steps(k):
    from quant.audit.search import _bisect

    stub = _Stub(k, 64)
    assert _bisect(stub, list(range(64))).index == k
    assert stub.calls <= 2 + math.ceil(math.log2(64))


def test_bisection_refuses_when_even_the_fallback_fails():
    from quant.audit.search import SearchFailed, _bisect

    stub = _Stub(65, 64)
    with pytest.raises(SearchFailed, match="no mix can pass psnr_mean >= 30"):
        _bisect(stub, list(range(64)))
    assert stub.calls == 2


def test_inc_autotune_is_compared_on_the_same_video_metric(searched):
    _, _, run_dir, results = searched
    comparison = results["search"]["inc_compare"]
    assert comparison["module"] == "transformer_2"
    inc, ours = comparison["inc"], comparison["ours"]
    # INC's own FP32 baseline evaluation went through our eval function: the exported FP32
    # module regenerates the reference videos (PSNR capped at 100 dB where identical)
    assert inc["trials"][0]["config"] == "fp32 baseline" and inc["trials"][0]["value"] > 80
    assert inc["fp32_baseline"] > 80 and 0 < inc["tolerable_loss"] < 1
    trials = inc["trials"][1:]
    assert trials and all(t["metric"] == "psnr_mean" and 0 < t["value"] < 100 for t in trials)
    # autotune stops at the first trial that passes the gate
    assert [t["passed"] for t in trials].count(True) <= 1 and inc["passed"] == trials[-1]["passed"]
    gate = float(results["search"]["settings"]["gates"][0].split()[-1])
    assert ours["recipe"] == "int8" and ours["value"] >= gate and 0 < ours["int8_nodes"] <= ours["compute_nodes"]
    assert "neural-compressor" in (run_dir / "report.html").read_text()


def test_overhead_benchmark_reads_a_run_whose_search_deleted_its_candidates_videos(searched, tmp_path):
    """``benchmarks/overhead.py`` on a run with a search: the candidates' stages are in
    ``results.json`` but their videos were deleted; it says so and measures the rest (it used to
    stop with "candidate folder not found")."""
    _, _, run_dir, results = searched
    candidates = [s["name"] for s in results["stages"] if s["name"].startswith("score:")
                  and not (run_dir / "videos" / s["name"].partition(":")[2]).is_dir()]
    assert candidates  # the condition this test is about
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "overhead.py"), str(run_dir),
                           "--results", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("generate ", "score "))}
    for name in ("generate", "score"):
        assert "whose videos the run did not keep" in rows[name] and "nan" not in rows[name]
    assert f"{len(candidates)} stage(s)" in rows["score"]
    assert len(list(tmp_path.glob("overhead-*.json"))) == 1
