"""The command line: exit codes and one-line messages that name what was wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import SMALL_ARGS
from quant.cli import main


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture
def prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# just a comment\n   \n", encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    return {"empty": empty, "binary": binary, "folder": folder, "missing": tmp_path / "missing.txt"}


@pytest.mark.parametrize("argv, names", [
    (["generate", "--model", "wan9-huge"], ["unknown model 'wan9-huge'"]),
    (["generate", "--seeds", "0,x"], ["--seeds", "'x'"]),
    (["generate", "--seeds", "-1"], ["--seeds", "'-1'"]),
    (["generate", "--seeds", "1,1"], ["repeats"]),
    (["generate", "--variant", "int4"], ["unknown recipe 'int4'"]),
    (["generate", "--variant", "onnx@unet"], ["unknown module 'unet'"]),
    (["generate", "--variant", "onnx@transformer_2", "--model", "wan2.2-ti2v-tiny"], ["unknown module 'transformer_2'"]),
    (["generate", "--height", "33"], ["height 33", "multiple of 16"]),
    (["generate", "--frames", "abc"], ["--frames", "'abc'"]),
    (["generate", "--fps", "0"], ["--fps", "0"]),
    (["export", "--opset", "13"], ["opset", "13"]),
    (["export", "--module", "unet"], ["unknown module 'unet'"]),
    (["generate", "--variant", "onnx"], ["manifest.json", "quant-audit export"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_input_exits_2_with_one_line(argv, names, tmp_path, capsys):
    code, err = _run([*argv, "--out", str(tmp_path)] if argv[0] != "frobnicate" else argv, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for name in names:
        assert name in err


@pytest.mark.parametrize("kind, message", [
    ("empty", "prompt file is empty"), ("binary", "not UTF-8"), ("folder", "cannot read"), ("missing", "not found"),
])
def test_bad_prompt_files_exit_2_naming_the_file(prompt_files, kind, message, tmp_path, capsys):
    code, err = _run(["generate", "--prompts", str(prompt_files[kind]), "--out", str(tmp_path)], capsys)
    assert code == 2 and message in err and str(prompt_files[kind]) in err and len(err.splitlines()) == 1


def test_checkpoint_folder_missing_a_component_exits_2(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "tokenizer": ["transformers", "T5TokenizerFast"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "transformer": [None, None],
    }))
    code, err = _run(["generate", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "missing component 'transformer'" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_onnx_file_exits_2_naming_it(t2v_export, tmp_path, capsys, damage):
    root = tmp_path / "run"
    shutil.copytree(t2v_export.root, root)
    target = root / "onnx" / "fp32" / "transformer_2.onnx"
    target.write_bytes(target.read_bytes()[:1000] if damage == "truncate" else b"not a model at all")
    code, err = _run(["generate", "--variant", "onnx@transformer_2", "--out", str(root), "--seeds", "0", *SMALL_ARGS], capsys)
    assert code == 2 and str(target) in err and "not a valid ONNX model" in err  # the manifest check runs onnx.checker


def test_parity_failure_exits_1_naming_the_module(tmp_path, capsys, monkeypatch):
    import quant.stages.export as stage

    real_export = stage.export_module

    def export_then_damage(pipe, module, example, dest, options):
        record = real_export(pipe, module, example, dest, options)
        model = onnx.load(str(dest))
        biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        biggest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(biggest) * 1.05, biggest.name))
        onnx.save(model, str(dest))
        return record

    monkeypatch.setattr(stage, "export_module", export_then_damage)
    code = main(["export", "--module", "text_encoder", "--out", str(tmp_path), *SMALL_ARGS])
    captured = capsys.readouterr()
    assert code == 1
    assert "text_encoder" in captured.err and "parity failed" in captured.err
    assert "FAIL" in captured.out  # the table still shows every module's numbers
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["passed"] is False and parity["modules"]["text_encoder"]["passed"] is False


def test_console_script_is_installed_and_reports_usage_errors():
    exe = Path(sys.executable).with_name("quant-audit")
    assert exe.exists(), "quant-audit console script missing: is the package installed?"
    ok = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env={**os.environ, "CI": "1"})
    assert ok.returncode == 0 and "export" in ok.stdout and "generate" in ok.stdout
    bad = subprocess.run([str(exe), "generate", "--out", "/tmp/x", "--seeds", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--seeds" in bad.stderr


def test_a_tag_with_dollar_signs_is_text_in_charts():
    """Release tags like ``$v1$`` or ``rc_1^2`` are labels, never matplotlib math text (which would
    fail to parse and break every later dashboard)."""
    import pandas as pd

    from reports.plots import history_chart

    rows = pd.DataFrame({"run_id": ["r1", "r2"], "tag": ["$\\frac{$", "rc_1^2 $x$"], "time": ["t1", "t2"],
                         "variant": ["fp16", "fp16"], "psnr_mean": [40.0, 41.0], "verdict": ["pass", "pass"],
                         "regression_failed": [0, 0]})
    svg = history_chart(rows, "psnr_mean", ["fp16"])  # with math text on, this raises ValueError
    assert "$\\frac{$" in svg and "rc_1^2 $x$" in svg
