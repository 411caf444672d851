"""One sampling loop for every variant: reproducible references, ONNX stand-ins, video files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import PROMPTS, SMALL, SMALL_ARGS
from metrics.psnr import psnr_frames
from quant.cli import main
from quant.errors import UserError
from quant.stages.generate import generate_variant
from quant.pipeline.models import load_model
from quant.pipeline.modules import present_modules
from quant.pipeline.ort_modules import OrtModule, OrtTransformer
from quant.pipeline.sampling import generate_video
from quant.stages.generate import assemble
from quant.pipeline.prompts import DEFAULT_EVAL_PROMPTS, read_prompts
from quant.pipeline.settings import GenerationSettings
from quant.recipes.names import parse_variant


def test_reference_video_is_bit_identical_across_two_builds():
    first = generate_video(load_model("wan2.2-t2v-tiny").pipe, PROMPTS[0], 7, SMALL)
    second = generate_video(load_model("wan2.2-t2v-tiny").pipe, PROMPTS[0], 7, SMALL)
    assert first.frames.dtype == np.uint8 and first.frames.shape == (5, 32, 32, 3)
    assert np.array_equal(first.frames, second.frames)
    other_seed = generate_video(load_model("wan2.2-t2v-tiny").pipe, PROMPTS[0], 8, SMALL)
    assert not np.array_equal(first.frames, other_seed.frames)


def _initial_noise(pipe, seed):
    seen = []
    original = pipe.prepare_latents

    def spy(*args, **kwargs):
        latents = original(*args, **kwargs)
        seen.append(latents.clone())
        return latents

    pipe.prepare_latents = spy
    generate_video(pipe, PROMPTS[0], seed, SMALL)
    return seen[0]


@pytest.mark.parametrize("which", ["t2v_export", "ti2v_export"])
def test_every_variant_starts_from_the_same_noise(request, which):
    exported = request.getfixturevalue(which)
    modules = present_modules(exported.model.pipe)
    noises = [_initial_noise(assemble(exported.model, parse_variant(v, modules), exported.root, SMALL), 5)
              for v in ("torch", "onnx", "onnx@transformer")]
    assert all(n.numpy().tobytes() == noises[0].numpy().tobytes() for n in noises[1:])


@pytest.mark.parametrize("which", ["t2v_export", "ti2v_export"])
def test_onnx_variant_matches_torch_above_60_db_on_every_frame(request, which):
    exported = request.getfixturevalue(which)
    modules = present_modules(exported.model.pipe)
    torch_pipe = assemble(exported.model, parse_variant("torch", modules), exported.root, SMALL)
    onnx_pipe = assemble(exported.model, parse_variant("onnx", modules), exported.root, SMALL)
    assert all(isinstance(getattr(onnx_pipe, m), OrtModule) for m in ("text_encoder", "transformer", "vae"))
    for prompt in read_prompts(DEFAULT_EVAL_PROMPTS):
        for seed in (0, 1):
            reference = generate_video(torch_pipe, prompt, seed, SMALL).frames
            candidate = generate_video(onnx_pipe, prompt, seed, SMALL)
            assert not candidate.nonfinite
            assert psnr_frames(reference, candidate.frames).min() >= 60.0


def test_attribution_variant_swaps_only_its_module(t2v_export):
    pipe = assemble(t2v_export.model, parse_variant("onnx@transformer_2", present_modules(t2v_export.model.pipe)),
                    t2v_export.root, SMALL)
    assert isinstance(pipe.transformer_2, OrtTransformer)
    assert pipe.transformer is t2v_export.model.pipe.transformer
    assert pipe.vae is t2v_export.model.pipe.vae and pipe.text_encoder is t2v_export.model.pipe.text_encoder
    video = generate_video(pipe, PROMPTS[0], 0, SMALL)
    reference = generate_video(t2v_export.model.pipe, PROMPTS[0], 0, SMALL)
    assert psnr_frames(reference.frames, video.frames).min() >= 60.0
    assert pipe.transformer_2.calls > 0  # the low-noise expert really ran through ONNX Runtime


def test_generate_command_writes_npz_webp_and_manifest(t2v_export, tmp_path, capsys):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(t2v_export.root, root)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse in fog\n\n# comment\na paper boat <b>&</b> rain\n", encoding="utf-8")
    for variant in ("torch", "onnx"):
        code = main(["generate", "--variant", variant, "--out", str(root), "--prompts", str(prompts),
                     "--seeds", "0,3", *SMALL_ARGS])
        assert code == 0
    printed = capsys.readouterr().out
    assert "PSNR of 'onnx' against 'torch'" in printed and "p01_s3.npz" in printed
    folder = root / "videos" / "onnx"
    assert sorted(p.name for p in folder.glob("*.npz")) == ["p00_s0.npz", "p00_s3.npz", "p01_s0.npz", "p01_s3.npz"]
    with np.load(folder / "p01_s3.npz", allow_pickle=False) as data:
        assert data["frames"].dtype == np.uint8 and data["frames"].shape == (5, 32, 32, 3)
        assert str(data["prompt"]) == "a paper boat <b>&</b> rain" and int(data["seed"]) == 3
    with Image.open(folder / "p01_s3.webp") as image:
        assert image.n_frames == 5 and image.size == (32, 32)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["modules"] == {m: "onnx" for m in ("text_encoder", "transformer", "transformer_2", "vae_decoder")}
    assert manifest["model"]["fingerprint"] == t2v_export.model.fingerprint
    torch_manifest = json.loads((root / "videos" / "torch" / "manifest.json").read_text())
    assert {v["file"] for v in torch_manifest["videos"]} == {v["file"] for v in manifest["videos"]}


def test_generate_twice_gives_the_same_frame_hashes(t2v, tmp_path):
    variant = parse_variant("torch", present_modules(t2v.pipe))
    first = generate_variant(t2v, variant, PROMPTS[:1], [0, 1], SMALL, tmp_path / "a", show_progress=False)
    second = generate_variant(t2v, variant, PROMPTS[:1], [0, 1], SMALL, tmp_path / "b", show_progress=False)
    assert [r.frames_sha256 for r in first] == [r.frames_sha256 for r in second]


def test_onnx_models_of_another_shape_or_model_are_refused(t2v_export, ti2v):
    modules = present_modules(t2v_export.model.pipe)
    other_shape = GenerationSettings(height=48, width=48, num_frames=5)
    with pytest.raises(UserError, match="exported for"):
        assemble(t2v_export.model, parse_variant("onnx", modules), t2v_export.root, other_shape)
    with pytest.raises(UserError, match="fingerprint"):
        assemble(ti2v, parse_variant("onnx", present_modules(ti2v.pipe)), t2v_export.root, SMALL)


def test_a_model_file_replaced_after_export_is_refused(t2v_export, tmp_path):
    """The manifest's SHA-256 is checked when a module is loaded: a file swapped in by hand (here a
    valid model of the other expert) is refused by name, not run under the old name."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(t2v_export.root / "onnx", root / "onnx")
    fp32 = root / "onnx" / "fp32"
    shutil.copyfile(fp32 / "transformer_2.onnx", fp32 / "transformer.onnx")
    variant = parse_variant("onnx@transformer", present_modules(t2v_export.model.pipe))
    with pytest.raises(UserError, match=r"transformer\.onnx: changed since .*manifest\.json recorded it"):
        assemble(t2v_export.model, variant, root, SMALL)
    assemble(t2v_export.model, parse_variant("onnx@transformer_2", present_modules(t2v_export.model.pipe)), root, SMALL)
