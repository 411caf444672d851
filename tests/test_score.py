"""`quant-audit score` on any two folders, its tables, its errors, and latent divergence per step."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import PROMPTS, SMALL
from quant.cli import main
from quant.stages.generate import generate_variant
from quant.pipeline.modules import present_modules
from quant.recipes.names import parse_variant

rng = np.random.default_rng(7)


def _video(frames=4, h=24, w=32) -> np.ndarray:
    return rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _save(folder, name, frames, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, frames=frames, **extra)


def _write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _score(tmp_path, capsys, *extra):
    code = main(["score", "--reference", str(tmp_path / "ref"), "--candidate", str(tmp_path / "cand"),
                 "--out", str(tmp_path / "out" / "frames.csv"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_scores_folders_it_did_not_produce(tmp_path, capsys):
    a, b = _video(), _video(frames=3, h=40, w=48)
    _save(tmp_path / "ref", "clip one.npz", a)
    _save(tmp_path / "cand", "clip one.npz", np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8))
    _save(tmp_path / "ref", "second.npz", b)
    _save(tmp_path / "cand", "second.npz", b)
    _save(tmp_path / "ref", "unused_extra.npz", a)
    code, out, _ = _score(tmp_path, capsys, "--variant", "mine")
    assert code == 0 and "clip one" in out
    frames = pd.read_csv(tmp_path / "out" / "frames.csv")
    assert {"video", "frame", "psnr_db", "ssim", "ssim_luma", "motion_psnr_db", "flicker_excess"} <= set(frames.columns)
    assert len(frames) == 4 + 3 and set(frames["variant"]) == {"mine"}
    assert frames.loc[frames.video == "second", "psnr_identical"].all()
    assert not frames[["psnr_db", "ssim"]].isna().any().any()
    summary = pd.read_csv(tmp_path / "out" / "frames.summary.csv")
    assert summary.loc[0, "frames"] == 7 and summary.loc[0, "videos"] == 2
    assert summary.loc[0, "psnr_p5"] <= summary.loc[0, "psnr_mean"]
    videos = pd.read_csv(tmp_path / "out" / "frames.videos.csv")
    assert set(videos["video"]) == {"clip one", "second"}
    meta = (tmp_path / "out" / "frames.metrics.json").read_text()
    assert "skimage.metrics.structural_similarity" in meta and "BT.601" in meta


def test_scores_mp4_files_through_pyav(tmp_path, capsys):
    a = np.repeat(_video(frames=1, h=32, w=32), 5, axis=0)
    (tmp_path / "ref").mkdir()
    (tmp_path / "cand").mkdir()
    _write_mp4(tmp_path / "ref" / "shot.mp4", a)
    _write_mp4(tmp_path / "cand" / "shot.mp4", a)
    code, out, _ = _score(tmp_path, capsys)
    assert code == 0
    frames = pd.read_csv(tmp_path / "out" / "frames.csv")
    assert len(frames) == 5 and (frames["psnr_db"] > 30).all()


@pytest.mark.parametrize("setup, message", [
    ("shape", "differs from reference"),
    ("missing_partner", "no reference video of the same name"),
    ("dtype", "must be uint8"),
    ("empty", "no videos to score"),
    ("no_folder", "reference folder not found"),
    ("tiny_frames", "smaller than the 11x11 SSIM window"),
    ("not_npz", "not a readable .npz video"),
])
def test_bad_pairs_exit_2_naming_the_file(tmp_path, capsys, setup, message):
    (tmp_path / "cand").mkdir()
    if setup != "no_folder":
        (tmp_path / "ref").mkdir()
    if setup == "shape":
        _save(tmp_path / "ref", "v.npz", _video())
        _save(tmp_path / "cand", "v.npz", _video(h=26))
    elif setup == "missing_partner":
        _save(tmp_path / "cand", "v.npz", _video())
    elif setup == "dtype":
        _save(tmp_path / "ref", "v.npz", _video())
        _save(tmp_path / "cand", "v.npz", _video().astype(np.float32))
    elif setup == "tiny_frames":
        _save(tmp_path / "ref", "v.npz", _video(h=8, w=8))
        _save(tmp_path / "cand", "v.npz", _video(h=8, w=8))
    elif setup == "not_npz":
        _save(tmp_path / "ref", "v.npz", _video())
        (tmp_path / "cand" / "v.npz").write_bytes(b"PK\x03\x04 truncated")
    elif setup == "no_folder":
        _save(tmp_path / "cand", "v.npz", _video())
    code, _, err = _score(tmp_path, capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    if setup in ("shape", "missing_partner", "dtype", "tiny_frames", "not_npz"):
        assert "v.npz" in err


def test_latent_divergence_shows_where_the_error_enters(t2v_export, tmp_path):
    """Only the low-noise expert runs in ONNX: latents stay identical through the high-noise
    steps, and the worst step is a transformer_2 step."""
    root = tmp_path / "run"
    shutil.copytree(t2v_export.root, root)
    modules = present_modules(t2v_export.model.pipe)
    for name in ("torch", "onnx@transformer_2"):
        generate_variant(t2v_export.model, parse_variant(name, modules), PROMPTS[:1], [0], SMALL, root,
                         show_progress=False)
    code = main(["score", "--reference", str(root / "videos" / "torch"), "--candidate",
                 str(root / "videos" / "onnx@transformer_2"), "--out", str(root / "scores" / "frames.csv")])
    assert code == 0
    latents = pd.read_csv(root / "scores" / "frames.latents.csv")
    high = latents[latents.expert == "transformer"]
    low = latents[latents.expert == "transformer_2"]
    assert len(high) and len(low) and len(latents) == SMALL.num_inference_steps
    assert (high["latent_sqnr_db"] == 200.0).all()  # identical: capped, the error has not entered yet
    assert (low["latent_sqnr_db"] < 200.0).all()
    summary = pd.read_csv(root / "scores" / "frames.summary.csv")
    assert summary.loc[0, "latent_worst_expert"] == "transformer_2"


def test_score_with_prompts_judges_adherence_and_names_the_worst_prompt(tmp_path, capsys):
    """`quant-audit score --prompts`: shapes-world videos are judged from their frames alone; the
    per-variant rate is a column of the summary and gateable, and the failed prompt is named."""
    from metrics.shapes_world import ShapeSpec, render_video
    from quant.gates import parse_gate

    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle moving left\na white square moving up | white\na red kite at dusk\n",
                       encoding="utf-8")
    ref, cand = tmp_path / "ref", tmp_path / "cand"
    shown = {"p00": ShapeSpec("red", "circle", "left"), "p01": ShapeSpec("yellow", "square", "up"),  # p01: wrong colour
             "p02": ShapeSpec("blue", "triangle", "down")}  # not a shapes prompt: PSNR/SSIM only
    for pid, spec in shown.items():
        truth = render_video(spec, seed=3)
        _save(ref, f"{pid}_s0.npz", truth)
        _save(cand, f"{pid}_s0.npz", truth)
    out = tmp_path / "scores" / "frames.csv"
    code = main(["score", "--reference", str(ref), "--candidate", str(cand), "--prompts", str(prompts),
                 "--out", str(out), "--variant", "v"])
    assert code == 0
    assert "WRONG (yellow square up)" in capsys.readouterr().out
    videos = pd.read_csv(out.with_name("frames.videos.csv")).set_index("video")
    assert videos.loc["p00_s0", "adherence"] == 1 and videos.loc["p01_s0", "adherence"] == 0
    assert videos.loc["p01_s0", "adherence_shape"] == 1 and pd.isna(videos.loc["p02_s0", "adherence"])
    summary = pd.read_csv(out.with_name("frames.summary.csv")).iloc[0]
    assert summary["adherence"] == 0.5 and summary["adherence_colour"] == 0.5
    assert summary["adherence_worst_prompt"] == "a white square moving up"
    assert summary["identical_frames"] == 3 * 17  # the candidates are the references: PSNR still scored
    assert not parse_gate("adherence", ">= 0.9").passes(summary["adherence"])


def test_frame_strip_lays_out_reference_variant_and_difference(tmp_path):
    from reports.strip import frame_strip

    reference = _video(frames=3, h=16, w=20)
    candidate = reference.copy()
    candidate[1, 4, 5] = 255 - candidate[1, 4, 5]
    strip = frame_strip(reference, candidate, [0, 1], scale=2)
    assert strip.shape == (2 * (2 * 16 + 2), 2 * (3 * 20 + 4), 3)
    assert np.array_equal(strip[0:32:2, 0:40:2], reference[0])          # row 1: reference | ...
    assert np.array_equal(strip[0:32:2, 44:84:2], candidate[0])         # ... | variant | ...
    diff0 = strip[0:32:2, 88:128:2]
    assert (diff0 == diff0[0, 0]).all()                                  # identical frame: one colour
    diff1 = strip[36:68:2, 88:128:2]
    assert not np.array_equal(diff1[4, 5], diff0[0, 0])                  # the changed pixel shows
