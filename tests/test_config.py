"""The audit config (audit.toml) and gates: every bad key or value is named; NaN never passes."""

from __future__ import annotations

import math

import pytest

from quant.config import DEFAULT_CONFIG, AuditConfig, load_config, parse_config
from quant.errors import UserError
from quant.gates import Gate, check_gates, check_regression, parse_gate

MODULES = ["text_encoder", "transformer", "transformer_2", "vae_decoder"]


def test_repository_audit_toml_is_the_default_and_round_trips(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    # the shipped audit is the trained shapes model on its own prompt files; a config that names no
    # model gets the code's default, the seeded tiny one (fast, the subcommands' default too)
    assert config.model == "wan2.2-t2v-shapes" and config.seeds == (0, 1)
    assert config.eval_prompts.name == "shapes_eval.txt" and config.calibration_prompts.name == "shapes_calibration.txt"
    from quant.pipeline.models import DEFAULT_MODEL

    assert AuditConfig().model == DEFAULT_MODEL == "wan2.2-t2v-tiny"  # written out in config.py: no torch import
    assert config.variants == ("onnx", "fp16", "int8", "int8-dynamic", "inc-int8", "mixed")
    # the defaults in code agree with the file (nothing drifts apart)
    defaults = AuditConfig()
    for name in ("settings", "seeds", "recipes", "variants", "mixes", "calibration_samples", "int8_method",
                 "int8_reduce_range", "int8_activation_type", "threads", "floor"):
        assert getattr(config, name) == getattr(defaults, name), name
    assert config.emulate == ("avx2", "vnni")
    assert config.executor == "processes" and config.run_threads == 1 and config.workers is None  # one per core
    names = config.variant_names(MODULES)
    assert names[:6] == list(config.variants) and names[6] == "floor"
    emulated = {f"{v}~{t}" for v in ("int8", "int8-dynamic", "inc-int8", "mixed") for t in ("avx2", "vnni")}
    assert set(names[7:15]) == emulated and len(names) == 15 + 4 * 4  # fp16 and onnx run no int8 kernels
    assert "inc-int8@transformer_2" in names
    assert config.variant_modules("mixed~avx2", MODULES)["transformer_2"] == "inc-int8~avx2"
    assert config.variant_modules("mixed~avx2", MODULES)["vae_decoder"] == "fp16"
    assert config.gates_for("int8~avx2") == config.gates_for("int8")  # gated like the variant it emulates
    assert config.variant("floor", MODULES).noise_ulps == 1 and config.variant("int8", MODULES).noise_ulps == 0
    # the resolved config a run writes reads back to the same configuration
    written = tmp_path / "config.toml"
    written.write_text(config.to_toml())
    again = load_config(written)
    assert again.to_dict() == config.to_dict()


def test_gates_for_merges_default_and_variant_tables():
    config = load_config(DEFAULT_CONFIG)
    fp16 = {g.metric: g for g in config.gates_for("fp16")}
    assert fp16["psnr_mean"].threshold == 50 and fp16["ssim_mean"].threshold == 0.9 and "psnr_min" in fp16
    assert config.gates_for("int8@transformer") == ()  # attribution variants: only their own tables


@pytest.mark.parametrize("text, message", [
    ('modle = "x"', "modle: unknown key"),
    ("[generation]\nheight = -3", "generation: generation setting 'height' must be a positive integer"),
    ('[generation]\nheight = "64"', "generation.height: expected int"),
    ("[prompts]\nseeds = [0, 0]", "prompts.seeds: expected distinct integers"),
    ('[quantize]\nrecipes = ["int4"]', "quantize.recipes: unknown quantization recipe 'int4'"),
    ('[quantize]\nint8_method = "mse"', "quantize.int8_method: unknown method 'mse'"),
    ('[quantize]\nint8_method = "percentile"', "quantize.int8_method: inc-int8 calibrates with minmax or entropy"),
    ('[variants]\nrun = ["fp8"]', "variants.run: unknown variant 'fp8'"),
    ('[variants]\nrun = ["int8@unet"]', "variant 'int8@unet': unknown module 'unet'"),
    ('[variants]\natribution = true', "variants.atribution: unknown key"),
    ('[quantize]\nrecipes = ["fp16"]\n[variants]\nrun = ["int8"]', "'int8' needs recipe(s) int8"),
    ('[mixes.m]\nunet = "fp16"', "mixes.m.unet: unknown module"),
    ('[mixes.m]\nvae_decoder = "fp8"', "mixes.m.vae_decoder: unknown recipe 'fp8'"),
    ('[gates.fp16]\npsnr_avg = ">= 3"', "gates.fp16.psnr_avg: unknown metric"),
    ('[gates.fp16]\npsnr_mean = "at least 30"', "gates.fp16.psnr_mean: expected '>= <number>'"),
    ('[gates.fp8]\npsnr_mean = 30', "gates.fp8: unknown variant 'fp8'"),
    ("[regression]\npsnr_mean = -1", "regression.psnr_mean: tolerance must be a finite number >= 0"),
    ("schema_version = 9", "schema_version: this quant-audit reads version 1, got 9"),
    ('[runtime]\nemulate = ["arm"]', "runtime.emulate: unknown target 'arm' (targets: avx2, vnni)"),
    ("[runtime]\nthreads = 0", "runtime.threads: must be a positive integer, got 0"),
    ('[runtime]\nexecutor = "dask"', "runtime.executor: expected one of local, processes, ray, got 'dask'"),
    ('[runtime]\nray_address = "auto"', 'runtime.ray_address: is only read with executor = "ray"'),
    ('[runtime]\ndevice = "tpu"', "runtime.device: expected one of cpu, cuda, got 'tpu'"),
    ('[quantize]\nint8_activation_type = "int4"', "quantize.int8_activation_type: expected one of int8, uint8"),
    ('[quantize]\nint8_reduce_range = "yes"', "quantize.int8_reduce_range: expected bool"),
    ('[variants]\nrun = ["fp16~avx2"]', "'fp16~avx2' runs no int8 recipe"),
    ('[variants]\nrun = ["int8~arm"]', "variant 'int8~arm': unknown target 'arm'"),
    ('[variants]\nrun = ["floor~avx2"]', "the floor runs no int8 kernels to emulate"),
    ('[variants]\nrun = ["../../.."]', "variant name '../../..' cannot be a folder name"),
    ('[mixes."../../.."]\nvae_decoder = "fp16"', "mixes.../../..: mix name '../../..' cannot be a folder name"),
    ('[mixes.".hidden"]\nvae_decoder = "fp16"', "mix name '.hidden' cannot be a folder name"),
    ('[mixes.floor]\nvae_decoder = "fp16"', "a mix name must not be a recipe or 'floor'"),
    ('[search]\nname = "a/b"', "search.name: search name 'a/b' cannot be a folder name"),
    ("[export]\nsimplify = 1", "export.simplify: expected bool"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "audit.toml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_config_paths_are_relative_to_the_file_and_toml_errors_are_named(tmp_path):
    (tmp_path / "p.txt").write_text("a prompt\n")
    path = tmp_path / "audit.toml"
    path.write_text('[prompts]\neval = "p.txt"\n')
    assert load_config(path).eval_prompts == (tmp_path / "p.txt").resolve()
    # a checkpoint folder too: relative to the config file, not to wherever the command runs
    path.write_text('model = "checkpoints/wan"\n')
    assert load_config(path).model == str((tmp_path / "checkpoints" / "wan").resolve())
    path.write_text('model = "wan2.2-ti2v-tiny"\n')
    assert load_config(path).model == "wan2.2-ti2v-tiny"
    path.write_text("[prompts\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(path)


def test_a_mix_must_cover_every_module_of_the_model():
    config = parse_config({"mixes": {"half": {"transformer": "fp16"}}, "variants": {"run": ["half"]},
                           "quantize": {"recipes": ["fp16"]}}, "cfg.toml", __import__("pathlib").Path("."))
    with pytest.raises(UserError, match="mixes.half: no recipe for module"):
        config.variant_modules("half", MODULES)


def test_gate_parsing_and_nan_never_passes():
    assert parse_gate("psnr_mean", ">= 30") == Gate("psnr_mean", ">=", 30.0)
    assert parse_gate("flicker_max", 2) == Gate("flicker_max", "<=", 2.0)  # bare number: the good direction
    assert parse_gate("ssim_min", "<0.5").op == "<"
    results = check_gates("int8", {"psnr_mean": math.nan, "ssim_min": 0.7},
                          [Gate("psnr_mean", ">=", 0.0), Gate("ssim_min", ">=", 0.9)], nonfinite={})
    assert [r.passed for r in results] == [True, False, False]
    assert results[1].reason == "metric is NaN or missing" and "needs >= 0.9" in results[2].reason


def test_nonfinite_outputs_fail_the_finite_gate_with_the_module_named():
    (finite,) = check_gates("fp16", {}, [], nonfinite={"vae_decoder": 3, "transformer": 0})
    assert not finite.passed and finite.reason == "NaN/Inf in vae_decoder output (3 calls)"


def test_regression_is_a_drop_beyond_the_tolerance():
    baseline = {"psnr_mean": 40.0, "flicker_max": 1.0, "ssim_mean": math.nan}
    tolerances = {"psnr_mean": 0.5, "flicker_max": 0.2, "ssim_mean": 0.01}
    ok = check_regression("fp16", {"psnr_mean": 39.6, "flicker_max": 1.1}, baseline, tolerances, "r0")
    assert [g.passed for g in ok] == [True, True]  # ssim_mean: nothing to regress from
    bad = check_regression("fp16", {"psnr_mean": 39.4, "flicker_max": 1.3}, baseline, tolerances, "r0")
    assert [g.passed for g in bad] == [False, False]
    assert "baseline run r0" in bad[0].reason and bad[1].op == "<="
