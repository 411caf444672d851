"""`quant-audit module`: a single ONNX model a user already has, audited on their own .npz samples.

The model is a small conv image-to-image network built here, exported with a dynamic batch axis
and saved with its weights as external data under a name of its own (as users' exporters do),
plus a second, non-image output.
"""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from metrics.psnr import psnr_frames
from quant.audit.module import detect_range, image_layout, to_frames
from quant.cli import main

SAMPLES = 8


class Restorer(torch.nn.Module):
    """(N,3,H,W) in [-1,1] -> (restored image in [-1,1], per-image features)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 3, 3, padding=1))
        self.head = torch.nn.Linear(3, 4)

    def forward(self, image):
        restored = torch.tanh(image + 0.5 * self.body(image))
        return restored, self.head(restored.mean(dim=(2, 3)))


def _export(dest: Path) -> None:
    torch.manual_seed(0)
    model = Restorer().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), None, dynamo=True, input_names=["image"],
                                output_names=["restored", "features"], dynamic_shapes={"image": {0: batch}})
    proto = program.model_proto
    onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="restorer.weights", size_threshold=1024)


def _images(seed: int, n: int = 2) -> np.ndarray:
    """Smooth colour fields with edges: content an image model sees, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32] / 31.0
    out = np.empty((n, 3, 32, 32), np.float32)
    for i in range(n):
        for c in range(3):
            a, b, k = rng.uniform(-1, 1, 3)
            out[i, c] = np.tanh(a * x + b * y + 0.5 * np.sin(6 * k * x)) * (1 - 0.3 * (x > rng.uniform(0.3, 0.7)))
    return out


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-model")
    _export(root / "restorer.onnx")
    samples = root / "samples"
    samples.mkdir()
    for i in range(SAMPLES):
        np.savez(samples / f"s{i:02d}.npz", image=_images(i, n=1 + i % 3))  # batch sizes 1-3: the dynamic axis
    return root


@pytest.fixture(scope="module")
def audited(user_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("module-runs")
    config = user_model / "gates.toml"
    config.write_text('[gates.default]\nsqnr_min_db = ">= 10"\n[gates.fp16]\nsqnr_min_db = ">= 200"\n')
    code = main(["module", "--onnx", str(user_model / "restorer.onnx"), "--inputs", str(user_model / "samples"),
                 "--out", str(out), "--config", str(config), "--tag", "<b>rc1</b>", "--sensitivity"])
    run_dir = next(p.parent for p in out.glob("*/results.json"))
    return code, out, run_dir, json.loads((run_dir / "results.json").read_text())


def test_every_onnx_recipe_is_measured_on_held_back_samples(audited):
    code, out, run_dir, results = audited
    assert [v["name"] for v in results["variants"]] == ["fp16", "int8", "int8-dynamic"]
    assert results["samples"]["held_back"] == ["s03.npz", "s07.npz"]
    assert len(results["samples"]["calibration"]) == SAMPLES - 2
    assert results["outputs"]["restored"]["image"] and results["outputs"]["restored"]["range"] == [-1.0, 1.0]
    assert not results["outputs"]["features"]["image"]
    m = {v["name"]: v["metrics"] for v in results["variants"]}
    # FP16 keeps ~11 bits of mantissa, INT8 8: on this network FP16's error is far below INT8's on any CPU
    assert m["fp16"]["sqnr_min_db"] > m["int8"]["sqnr_min_db"] + 10
    assert m["int8"]["int8_compute_nodes"] > 0 and m["fp16"]["fp16_compute_nodes"] > 0
    for v in m.values():
        assert v["psnr_mean"] is not None and 0 < v["ssim_min"] <= 1
        assert v["latency_ms"] > 0 and v["speedup_vs_onnx"] > 0
    # the int8 model really is a smaller file than the FP32 model with its external weights
    assert m["int8"]["size_ratio"] < 1
    assert (run_dir / "quantization" / "int8.json").is_file() and (run_dir / "previews" / "int8.restored.png").is_file()
    # the reproduce line carries what made the numbers: the resolved config (gates, tag) and the options
    assert f"--config {run_dir / 'config.toml'}" in results["reproduce"] and "--sensitivity" in results["reproduce"]
    assert '">= 200"' in (run_dir / "config.toml").read_text()


def test_gates_verdict_junit_report_and_history(audited):
    code, out, run_dir, results = audited
    # fp16's own table asks 200 dB (only bit-identical output passes): fp16 fails, so the run fails
    assert code == 1 and results["verdict"] == "fail"
    failed = [(g["variant"], g["metric"]) for g in results["failed_gates"]]
    assert ("fp16", "sqnr_min_db") in failed
    assert all(v["gates"][0]["kind"] == "finite" and v["gates"][0]["passed"] for v in results["variants"])
    cases = ET.parse(run_dir / "junit.xml").getroot().iter("testcase")
    assert any(c.find("failure") is not None and "fp16" in c.get("classname", "") + c.get("name", "") for c in cases)
    page = (run_dir / "report.html").read_text()
    assert "&lt;b&gt;rc1&lt;/b&gt;" in page and "<b>rc1</b>" not in page  # the tag is escaped
    assert "data:image/png;base64," in page and "restorer.onnx" in page
    # per-node sensitivity on the user's model: every int8 layer ranked, the convs by what they cost
    ranking = results["sensitivity"]["ranking"]
    assert {r["op_type"] for r in ranking} >= {"Conv"} and [r["rank"] for r in ranking] == list(range(1, len(ranking) + 1))
    assert ranking == sorted(ranking, key=lambda r: -r["gain_db"])
    with sqlite3.connect(out / "history.sqlite") as db:
        rows = db.execute("SELECT variant, kind, tag FROM results").fetchall()
    assert sorted(rows) == [("fp16", "module", "<b>rc1</b>"), ("int8", "module", "<b>rc1</b>"),
                            ("int8-dynamic", "module", "<b>rc1</b>")]


def test_psnr_is_the_video_metric_on_the_mapped_frames(audited, user_model):
    """The reported PSNR of a held-back sample equals PSNR of the FP32 and quantized outputs
    mapped to 8-bit frames by hand, through onnxruntime directly."""
    import csv

    import onnxruntime as ort

    code, out, run_dir, results = audited
    sample = dict(np.load(user_model / "samples" / "s03.npz"))
    ref = ort.InferenceSession(str(user_model / "restorer.onnx")).run(["restored"], sample)[0]
    model = run_dir.parent / "work"
    quantized = next(model.glob("*/onnx/fp16/model.onnx"))
    got = ort.InferenceSession(str(quantized)).run(["restored"], sample)[0]
    frames = lambda x: np.clip(np.rint((x.transpose(0, 2, 3, 1) + 1) / 2 * 255), 0, 255).astype(np.uint8)  # noqa: E731
    expected = float(np.mean(psnr_frames(frames(ref), frames(got))))
    with open(run_dir / "scores" / "samples.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["variant"] == "fp16" and r["sample"] == "s03"
                   and r["output"] == "restored")
    assert float(row["psnr_db"]) == pytest.approx(expected, rel=1e-9)


def test_a_rerun_reuses_the_quantized_models(audited, user_model):
    code, out, run_dir, results = audited
    assert main(["module", "--onnx", str(user_model / "restorer.onnx"), "--inputs", str(user_model / "samples"),
                 "--out", str(out), "--recipes", "int8", "--baseline", "latest"]) == 0
    second = json.loads(max(out.glob("*/results.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert [s["reused"] for s in second["stages"] if s["name"].startswith("quantize:")] == [True]
    # the history row of the first run is found as this model's latest on this target
    assert second["baseline"]["run_id"] == results["run_id"]


@pytest.mark.parametrize("change, message", [
    (lambda a: {"other": a["image"]}, "missing input 'image'"),
    (lambda a: {**a, "mask": a["image"]}, "'mask' is not an input"),
    (lambda a: {"image": a["image"][:, :, :16]}, "input 'image' has shape (1, 3, 16, 32)"),
    (lambda a: {"image": a["image"].astype(np.float64)}, "input 'image' is float64, the model takes float32"),
])
def test_a_sample_that_does_not_fit_is_exit_2_naming_it(user_model, tmp_path, capsys, change, message):
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(3):
        np.savez(samples / f"s{i}.npz", image=_images(i, 1))
    np.savez(samples / "s1.npz", **change({"image": _images(9, 1)}))
    code = main(["module", "--onnx", str(user_model / "restorer.onnx"), "--inputs", str(samples), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "s1.npz" in err and message in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*/results.json"))


def test_bad_recipe_range_and_model_are_exit_2(user_model, tmp_path, capsys):
    args = ["module", "--onnx", str(user_model / "restorer.onnx"), "--inputs", str(user_model / "samples"),
            "--out", str(tmp_path)]
    assert main([*args, "--recipes", "inc-int8"]) == 2
    assert "needs the model's PyTorch source" in capsys.readouterr().err
    assert main([*args, "--output-range", "nope=0:1"]) == 2
    assert "no output 'nope'" in capsys.readouterr().err
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    assert main(["module", "--onnx", str(tmp_path / "broken.onnx"), "--inputs", str(user_model / "samples"),
                 "--out", str(tmp_path)]) == 2
    assert "broken.onnx" in capsys.readouterr().err


def test_image_layouts_and_ranges():
    assert image_layout((2, 3, 32, 32)) == "N3HW" and image_layout((2, 32, 32, 3)) == "NHW3"
    assert image_layout((1, 3, 5, 16, 16)) == "N3FHW" and image_layout((2, 3, 4, 4)) is None
    assert detect_range(-0.98, 0.97) == (-1.0, 1.0) and detect_range(0.0, 0.99) == (0.0, 1.0)
    assert detect_range(-3.0, 254.0) == (0.0, 255.0) and detect_range(-30.0, 40.0) is None
    assert detect_range(0.0, 3.0) is None  # a non-negative feature map, not 8-bit pixels
    video = np.zeros((1, 3, 2, 12, 12), np.float32)
    video[0, 0, 1] = 1.0  # frame 1 red
    frames = to_frames(video, "N3FHW", (0.0, 1.0))
    assert frames.shape == (2, 12, 12, 3) and frames[1, 0, 0].tolist() == [255, 0, 0] and frames[0].max() == 0
