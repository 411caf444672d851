"""Bad input, one row each: exit 2, one line naming the file, field or value, within seconds
(before any export or generation), and nothing already under ``--out`` is lost.

Each row builds its input in a fresh folder whose ``--out`` already holds an earlier run's
files (a run folder, the history store, a dashboard, work files); the test checks they are all
still there, byte for byte, after the command failed.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from quant.cli import main

EVAL = "a red kite flying over a windy beach at sunset\n"


def _out_with_earlier_run(out: Path) -> dict[str, str]:
    """An --out as an earlier audit leaves it; returns {relative path: sha256} of every file."""
    from reports import history

    (out / "20261120-101010-abcd").mkdir(parents=True)
    (out / "20261120-101010-abcd" / "results.json").write_text('{"verdict": "pass"}')
    (out / "dashboard.html").write_text("<html></html>")
    work = out / "work" / "0123456789abcdef" / "videos" / "int8"
    work.mkdir(parents=True)
    (work / "p00_s0.npz").write_bytes(b"video")
    history.record_run(out / "history.sqlite", {
        "run_id": "20261120-101010-abcd", "finished": "2026-11-20T10:10:10Z", "tag": "", "verdict": "pass",
        "model": {"name": "m", "fingerprint": "sha256:x"}, "baseline": None, "target": {"id": "t"},
        "variants": [{"name": "fp16", "kind": "full", "modules": {}, "metrics": {"psnr_mean": 50.0}, "passed": True,
                      "gates": []}]})
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def _config(folder: Path, body: str) -> Path:
    (folder / "eval.txt").write_text(EVAL)
    path = folder / "audit.toml"
    path.write_text(f'model = "wan2.2-t2v-tiny"\n[prompts]\neval = "eval.txt"\nseeds = [0]\n{body}\n')
    return path


def _run(folder: Path, body: str) -> list[str]:
    return ["run", "--config", str(_config(folder, body)), "--out", str(folder / "out")]


def _score_pair(folder: Path, damage) -> list[str]:
    ref, cand = folder / "ref", folder / "cand"
    ref.mkdir()
    cand.mkdir()
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    np.savez_compressed(ref / "v.npz", frames=frames)
    damage(cand / "v.npz", frames)
    return ["score", "--reference", str(ref), "--candidate", str(cand), "--out", str(folder / "out" / "s.csv")]


def _flip_a_byte(path: Path, frames) -> None:
    np.savez_compressed(path, frames=frames + 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the compressed member
    path.write_bytes(bytes(data))


def _renamed_npy(path: Path, frames) -> None:
    np.save(path.with_suffix(".npy"), frames)
    path.with_suffix(".npy").rename(path)


def _corrupt_history(folder: Path) -> list[str]:
    argv = _run(folder, "")
    (folder / "out" / "history.sqlite").write_bytes(b"not a database, a truncated copy" * 64)
    return argv


def _reference_of_another_size(folder: Path) -> list[str]:
    manifest = folder / "out" / "videos" / "torch" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"settings": {"height": 64, "width": 64, "num_frames": 17, "max_sequence_length": 32}}')
    return ["generate", "--variant", "onnx", "--height", "32", "--width", "32", "--frames", "5",
            "--out", str(folder / "out")]


ROWS = {
    # config values that become paths (a typo here once deleted every earlier run)
    "mix name is a path": (lambda f: _run(f, '[mixes."../../.."]\ntext_encoder = "fp16"\ntransformer = "fp16"\n'
                                            'transformer_2 = "fp16"\nvae_decoder = "fp16"\n[variants]\nrun = ["../../.."]'),
                           "mixes.../../..: mix name '../../..' cannot be a folder name"),
    "variant name is a path": (lambda f: _run(f, '[variants]\nrun = ["../../.."]'),
                               "variants.run: variant name '../../..' cannot be a folder name"),
    "variant name with a leading dot": (lambda f: _run(f, '[variants]\nrun = [".int8"]'),
                                        "variant name '.int8' cannot be a folder name"),
    # values that used to end in a traceback (exit 3)
    "superscript seed": (lambda f: ["generate", "--seeds", "²", "--out", str(f / "out")], "--seeds: '²'"),
    "byte-flipped npz": (lambda f: _score_pair(f, _flip_a_byte), "v.npz: not a readable .npz video"),
    "npy renamed npz": (lambda f: _score_pair(f, _renamed_npy), "v.npz: not an .npz archive"),
    "expert never called": (lambda f: _run(f, "[generation]\nnum_inference_steps = 1"),
                            "with 1 step(s) transformer_2 is never called"),
    # mistakes that used to surface only after all the work
    "sensitivity module the model lacks": (lambda f: _run_model(f, "wan2.2-ti2v-tiny", '[sensitivity]\nmodules = ["transformer_2"]'),
                                           "sensitivity.modules: model 'wan2.2-ti2v-tiny' has no transformer_2"),
    "gate table for a variant not run": (lambda f: _run(f, '[variants]\nrun = ["fp16"]\n[gates.int8]\npsnr_mean = 30'),
                                         "gates.int8: variant 'int8' is not audited"),
    "no variant to audit": (lambda f: _run(f, '[quantize]\nrecipes = []\n[variants]\nrun = []'),
                            "variants: nothing to audit"),
    "CUDA asked for": (lambda f: _run(f, '[runtime]\ndevice = "cuda"'), 'runtime.device = "cuda": '),
    "no Ray cluster at the address": (lambda f: _run(f, "") + ["--ray-address", "127.0.0.1:9"],
                                      "runtime.ray_address: no Ray cluster answers at 127.0.0.1:9"),
    "corrupt history store": (_corrupt_history, "history.sqlite: not a quant-audit history store"),
    "reference of another frame size": (_reference_of_another_size,
                                        "the reference videos here were generated at"),
}


def _run_model(folder: Path, model: str, body: str) -> list[str]:
    (folder / "eval.txt").write_text(EVAL)
    path = folder / "audit.toml"
    path.write_text(f'model = "{model}"\n[prompts]\neval = "eval.txt"\nseeds = [0]\n{body}\n')
    return ["run", "--config", str(path), "--out", str(folder / "out")]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_exits_2_naming_it_and_loses_nothing(row, tmp_path, capsys):
    build, message = ROWS[row]
    before = _out_with_earlier_run(tmp_path / "out")
    argv = build(tmp_path)
    before = {k: v for k, v in _snapshot(tmp_path / "out").items() if k in before or k.startswith("videos/")}
    start = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert time.monotonic() - start < 60  # refused before any export or generation
    after = _snapshot(tmp_path / "out")
    assert {k: after.get(k) for k in before} == before  # nothing already there was lost or changed
