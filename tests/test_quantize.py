"""Calibration on real inputs, FP16 with an overflow guard, INT8 static (QDQ) and dynamic."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SMALL, SMALL_ARGS
from quant.stages.calibrate import (MIN_CALIBRATION_PROMPTS, CalibrationSpec, NpzCalibrationReader,
                               calibrate, check_disjoint, load_calibration_prompts)
from quant.cli import main
from quant.errors import UserError
from quant.pipeline.modules import present_modules
from quant.pipeline.ort_modules import open_session, run_session
from quant.pipeline.sampling import generate_video
from quant.stages.generate import assemble
from quant.pipeline.prompts import DEFAULT_CALIBRATION_PROMPTS, DEFAULT_EVAL_PROMPTS, read_prompts
from quant.recipes.census import precision_census
from quant.recipes.quantize import QuantizeOptions, quantize
from quant.stages.quantize import quantize_pipeline
from quant.recipes.names import parse_variant

RECIPES = ("fp16", "int8", "int8-dynamic", "inc-int8")
CAL_PROMPTS = tuple(read_prompts(DEFAULT_CALIBRATION_PROMPTS))


@dataclass
class Quantized:
    model: object
    root: Path
    reports: dict


def _quantize_all(exported, tmp_path_factory, name) -> Quantized:
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(exported.root, root, dirs_exist_ok=True)
    calibrate(exported.model, CalibrationSpec(CAL_PROMPTS, (0,), 8), SMALL, root, show_progress=False)
    reports = {r: quantize_pipeline(exported.model, SMALL, root, r, show_progress=False) for r in RECIPES}
    return Quantized(exported.model, root, reports)


@pytest.fixture(scope="session")
def t2v_quant(t2v_export, tmp_path_factory) -> Quantized:
    return _quantize_all(t2v_export, tmp_path_factory, "t2v-quant")


@pytest.fixture(scope="session")
def ti2v_quant(ti2v_export, tmp_path_factory) -> Quantized:
    return _quantize_all(ti2v_export, tmp_path_factory, "ti2v-quant")


def test_shipped_calibration_prompts_are_enough_and_disjoint_from_eval():
    prompts = load_calibration_prompts(DEFAULT_CALIBRATION_PROMPTS, DEFAULT_EVAL_PROMPTS)
    assert len(prompts) >= MIN_CALIBRATION_PROMPTS
    assert not {p.lower() for p in prompts} & {p.lower() for p in read_prompts(DEFAULT_EVAL_PROMPTS)}


def test_overlapping_prompt_sets_are_refused(tmp_path):
    evaluation = read_prompts(DEFAULT_EVAL_PROMPTS)
    with pytest.raises(UserError, match="also in"):
        check_disjoint(["a new prompt", "  " + evaluation[1].upper() + " "], evaluation, tmp_path / "c.txt", tmp_path / "e.txt")


def test_each_expert_is_calibrated_on_its_own_timesteps(t2v_quant):
    manifest = (t2v_quant.root / "calibration" / "manifest.json").read_text()
    import json

    modules = json.loads(manifest)["modules"]
    boundary = 0.875 * 1000
    high = [s["timestep"] for s in modules["transformer"]["samples"]]
    low = [s["timestep"] for s in modules["transformer_2"]["samples"]]
    assert high and low and min(high) >= boundary and max(low) < boundary
    low_steps = {s["step"] for s in modules["transformer_2"]["samples"]}
    high_steps = {s["step"] for s in modules["transformer"]["samples"]}
    assert len(low_steps) + len(high_steps) == SMALL.num_inference_steps  # every step of each expert is sampled
    assert any(s["holdout"] for s in modules["transformer"]["samples"])


def test_calibration_cache_is_reused_and_recomputed_when_stale(t2v, tmp_path):
    spec = CalibrationSpec(CAL_PROMPTS[:4], (0,), 4)
    first = calibrate(t2v, spec, SMALL, tmp_path, show_progress=False)
    sample = first.files("transformer")[0]
    stamp = sample.stat().st_mtime_ns
    again = calibrate(t2v, spec, SMALL, tmp_path, show_progress=False)
    assert again.reused and sample.stat().st_mtime_ns == stamp
    sample.write_bytes(b"corrupt")
    repaired = calibrate(t2v, spec, SMALL, tmp_path, show_progress=False)
    assert not repaired.reused and np.load(sample, allow_pickle=False)["latent"].ndim == 5
    changed = calibrate(t2v, CalibrationSpec(CAL_PROMPTS[:4], (0,), 6), SMALL, tmp_path, show_progress=False)
    assert not changed.reused and changed.manifest["key"] != first.manifest["key"]


def test_spread_covers_every_call_position():
    from quant.stages.calibrate import spread_indices

    chosen = spread_indices(10, 20, 16)  # 10 calls per generation, 20 generations, 16 samples
    assert len(chosen) == 16 and {i % 10 for i in chosen} == set(range(10))
    assert len({i // 10 for i in chosen}) == 16  # and 16 different generations
    assert spread_indices(10, 1, 4) == [0, 2, 5, 7] and spread_indices(3, 1, 8) == [0, 1, 2]


def test_reader_streams_one_sample_at_a_time(t2v_quant):
    import json

    files = sorted((t2v_quant.root / "calibration" / "transformer").glob("*.npz"))
    reader = NpzCalibrationReader(files[:3])
    got = [reader.get_next() for _ in range(4)]
    assert [g is None for g in got] == [False, False, False, True]
    assert set(got[0]) == {"latent", "timestep", "text_emb"}
    reader.rewind()
    assert reader.get_next() is not None and len(reader) == 3
    assert json.loads((t2v_quant.root / "calibration" / "manifest.json").read_text())["model"]["fingerprint"]


@pytest.mark.parametrize("which", ["t2v_quant", "ti2v_quant"])
def test_int8_graphs_put_qdq_around_every_compute_op(request, which):
    quant = request.getfixturevalue(which)
    for module in present_modules(quant.model.pipe):
        path = quant.root / "onnx" / "int8" / f"{module}.onnx"
        model = onnx.load(str(path))
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        compute = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
        assert compute, module
        for node in compute:
            assert any(producers.get(i) == "DequantizeLinear" for i in node.input), f"{module}:{node.name}"
        census = precision_census(path)
        assert census["quantize_linear"] > 0 and sum(c["fp32"] for c in census["compute_ops"].values()) == 0
        assert quant.reports["int8"]["modules"][module]["census"] == census


@pytest.mark.parametrize("which", ["t2v_quant", "ti2v_quant"])
def test_fp16_graphs_hold_float16_weights_and_keep_fp32_io(request, which):
    quant = request.getfixturevalue(which)
    for module in present_modules(quant.model.pipe):
        fp32 = onnx.load(str(quant.root / "onnx" / "fp32" / f"{module}.onnx"))
        fp16 = onnx.load(str(quant.root / "onnx" / "fp16" / f"{module}.onnx"))
        assert sum(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer) > 0
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
        assert io(fp16) == io(fp32)


def test_dynamic_int8_uses_integer_matmuls(t2v_quant):
    model = onnx.load(str(t2v_quant.root / "onnx" / "int8-dynamic" / "transformer.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}


@pytest.mark.parametrize("which", ["t2v_quant", "ti2v_quant"])
def test_every_recipe_regenerates_videos(request, which):
    quant = request.getfixturevalue(which)
    modules = present_modules(quant.model.pipe)
    for recipe in RECIPES:
        pipe = assemble(quant.model, parse_variant(recipe, modules), quant.root, SMALL)
        video = generate_video(pipe, "a red kite", 0, SMALL)
        assert video.frames.shape == (5, 32, 32, 3) and not video.nonfinite


def test_quantization_report_has_size_latency_and_sqnr(t2v_quant):
    report = t2v_quant.reports["int8"]["modules"]["transformer"]
    assert report["size_bytes"] < report["fp32_size_bytes"]
    assert report["latency_ms"] > 0 and report["fp32_latency_ms"] > 0
    assert report["samples"] >= 1 and report["sqnr_min_db"] is not None and report["sqnr_min_db"] < 60
    fp16 = t2v_quant.reports["fp16"]["modules"]["transformer"]
    assert fp16["sqnr_min_db"] > report["sqnr_min_db"]  # FP16 is far closer to FP32 than INT8


def _overflowing_model(path: Path) -> None:
    """MatMul -> x1000 (past FP16's 65504) -> /1000: fine in FP32, Inf in FP16."""
    weight = numpy_helper.from_array(np.full((4, 4), 30.0, np.float32), "w")
    big, small = numpy_helper.from_array(np.array(1000.0, np.float32), "k"), numpy_helper.from_array(np.array(1000.0, np.float32), "k2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
         helper.make_node("Mul", ["h", "k"], ["big"], name="scale_up"),
         helper.make_node("Div", ["big", "k2"], ["y"], name="scale_down")],
        "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight, big, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(path))


def test_fp16_overflow_guard_keeps_the_overflowing_node_in_fp32(tmp_path):
    """FP16 numerics are checked with onnx's reference evaluator (true float16 arithmetic):
    ONNX Runtime's CPU provider runs ops that lack FP16 kernels as FP32 islands, which hides
    the overflow a GPU would show."""
    from onnx.reference import ReferenceEvaluator

    src = tmp_path / "overflow.onnx"
    _overflowing_model(src)
    inputs = [{"x": np.full((2, 4), v, np.float32)} for v in (0.5, 1.0, 1.5)]
    reader = lambda: NpzCalibrationReader([_npz(tmp_path, i, x) for i, x in enumerate(inputs)])  # noqa: E731
    reference = run_session(open_session(src), inputs[-1])[0]
    unguarded = quantize(src, tmp_path / "plain.onnx", "fp16", reader, QuantizeOptions(fp16_guard=False))
    assert not unguarded.kept_fp32
    assert not np.isfinite(ReferenceEvaluator(str(unguarded.path)).run(None, inputs[-1])[0]).all()
    guarded = quantize(src, tmp_path / "guarded.onnx", "fp16", reader)
    assert set(guarded.kept_fp32) == {"scale_up", "scale_down"} and "65504" in guarded.kept_fp32["scale_up"]
    assert "matmul" not in guarded.kept_fp32  # its output (180) fits FP16: it is converted
    out = ReferenceEvaluator(str(guarded.path)).run(None, inputs[-1])[0]
    assert np.isfinite(out).all() and np.allclose(out, reference, rtol=1e-2)
    assert np.allclose(run_session(open_session(guarded.path), inputs[-1])[0], reference, rtol=1e-2)


def _npz(folder: Path, i: int, inputs: dict) -> Path:
    path = folder / f"cal{i}.npz"
    np.savez(path, **inputs)
    return path


@pytest.fixture
def quant_root(t2v_quant, tmp_path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(t2v_quant.root, root, ignore=shutil.ignore_patterns("videos"))
    return root


@pytest.mark.parametrize("args, message", [
    (["--recipe", "int4"], "unknown recipe 'int4'"),
    (["--recipe", "onnx"], "not a quantization recipe"),
    (["--recipe", "int8", "--method", "kl"], "unknown calibration method 'kl'"),
    (["--recipe", "inc-int8", "--method", "percentile"], "minmax or entropy"),
    (["--recipe", "int8", "--module", "unet"], "unknown module 'unet'"),
])
def test_quantize_bad_arguments_exit_2(quant_root, capsys, args, message):
    code = main(["quantize", "--out", str(quant_root), *SMALL_ARGS, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_fp32_model_exits_2_naming_it(quant_root, capsys, damage):
    target = quant_root / "onnx" / "fp32" / "transformer.onnx"
    target.write_bytes(target.read_bytes()[:2000] if damage == "truncate" else b"\x00garbage")
    code = main(["quantize", "--out", str(quant_root), *SMALL_ARGS, "--recipe", "int8", "--module", "transformer"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(target) in err and "not a valid ONNX model" in err


def test_calibration_cache_from_another_model_exits_2(ti2v_export, quant_root, tmp_path, capsys):
    root = tmp_path / "ti2v-run"
    shutil.copytree(ti2v_export.root, root)
    shutil.copytree(quant_root / "calibration", root / "calibration")  # the t2v model's cache
    code = main(["quantize", "--model", "wan2.2-ti2v-tiny", "--out", str(root), *SMALL_ARGS, "--recipe", "int8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "calibration cache is from model" in err


def test_quantize_without_calibration_says_what_to_run(t2v_export, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(t2v_export.root, root)
    code = main(["quantize", "--out", str(root), *SMALL_ARGS, "--recipe", "fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "quant-audit calibrate" in err


def test_calibrate_command_reports_and_reuses(t2v_export, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(t2v_export.root, root)
    prompts = tmp_path / "cal.txt"
    prompts.write_text("\n".join(CAL_PROMPTS[:16]), encoding="utf-8")
    args = ["calibrate", "--out", str(root), "--prompts", str(prompts), "--samples", "4", *SMALL_ARGS]
    assert main(args) == 0 and "captured calibration" in capsys.readouterr().out
    assert main(args) == 0 and "reused calibration" in capsys.readouterr().out
    prompts.write_text("\n".join(CAL_PROMPTS[:5]), encoding="utf-8")
    assert main(args) == 2 and "at least 16 are needed" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["t2v_quant", "ti2v_quant"])
def test_inc_int8_graphs_are_qdq_and_leave_the_model_untouched(request, which):
    from quant.pipeline.models import fingerprint

    quant = request.getfixturevalue(which)
    assert fingerprint(quant.model.pipe) == quant.model.fingerprint  # PT2E worked on a copy of the graph
    for module in present_modules(quant.model.pipe):
        census = precision_census(quant.root / "onnx" / "inc-int8" / f"{module}.onnx")
        assert census["quantize_linear"] > 0 and sum(c["int8"] for c in census["compute_ops"].values()) > 0, module
    report = quant.reports["inc-int8"]["modules"]["transformer"]
    assert report["sqnr_min_db"] is not None and report["sqnr_min_db"] > 10
    graph = onnx.load(str(quant.root / "onnx" / "inc-int8" / "transformer.onnx")).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert not [n.name for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in floats]  # weights folded
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2 for t in graph.initializer)


def test_folding_inc_weight_chains_keeps_every_output_value(tmp_path):
    """PT2E's export pattern (FP32 weight -> QuantizeLinear -> Clip -> DequantizeLinear -> Transpose ->
    MatMul, a zero point behind a Cast) becomes an int8 weight -> DequantizeLinear -> Transpose ->
    MatMul with the same outputs, bit for bit, and a quarter of the weight bytes."""
    import onnxruntime as ort

    from quant.recipes.inc import fold_weight_chains

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 4)).astype(np.float32)  # (out, in), as torch stores it
    scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.zeros(6, np.int64), "zp64"),
             numpy_helper.from_array(np.int8(-127), "lo"), numpy_helper.from_array(np.int8(127), "hi")]
    nodes = [helper.make_node("Cast", ["zp64"], ["zp"], to=TensorProto.INT8),
             helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], axis=0),
             helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"]),
             helper.make_node("DequantizeLinear", ["wc", "s", "zp"], ["wd"], axis=0),
             helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    x = {"x": rng.normal(size=(3, 4)).astype(np.float32) * 3}

    def run(m):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, x)[0]

    before = run(model)
    assert fold_weight_chains(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Cast", "DequantizeLinear", "Transpose", "MatMul"]
    folded = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "w" not in folded and folded["w_int8"].dtype == np.int8 and folded["w_int8"].shape == (6, 4)
    assert np.array_equal(run(model), before)


def test_quantizing_one_module_keeps_the_others(t2v, quant_root):
    import json

    quantize_pipeline(t2v, SMALL, quant_root, "int8", modules=["transformer"], show_progress=False)
    manifest = json.loads((quant_root / "onnx" / "int8" / "manifest.json").read_text())
    report = json.loads((quant_root / "quantization" / "int8.json").read_text())
    assert set(manifest["modules"]) == set(report["modules"]) == set(present_modules(t2v.pipe))
    assemble(t2v, parse_variant("int8", present_modules(t2v.pipe)), quant_root, SMALL)  # all four still listed


def _calibrator_ranges(src: Path, reader) -> dict:
    """onnxruntime's MinMax calibrator, as the fp16 guard called it before ``tensor_ranges``."""
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(src), op_types_to_calibrate=None, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    return {name: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for name, v in data.data.items()}


def test_tensor_ranges_are_the_minmax_calibrators(t2v_quant, tmp_path):
    """The fp16 guard's ranges: the same tensors and the same min/max as onnxruntime's MinMax
    calibrator (which ``tensor_ranges`` replaces for speed), on a real module and its captured
    inputs; and its NaN rule: a sample whose tensor had a NaN does not count for that tensor, and a
    tensor NaN in every sample stays NaN (so the guard keeps its node FP32)."""
    from quant.recipes.quantize import tensor_ranges
    from quant.stages.calibrate import open_calibration

    calibration = open_calibration(t2v_quant.root, t2v_quant.model)
    src = t2v_quant.root / "onnx" / "fp32" / "transformer.onnx"
    ours = tensor_ranges(src, lambda: calibration.reader("transformer"))
    assert len(ours) > 100 and ours == _calibrator_ranges(src, calibration.reader("transformer"))

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"], name="log"), helper.make_node("Abs", ["y"], ["z"], name="abs")],
                              "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(tmp_path / "nan.onnx"))
    samples = [_npz(tmp_path, i, {"x": np.array(x, np.float32)}) for i, x in enumerate(([1.0, 2.0], [-1.0, 4.0]))]
    for used, y_range in ((samples, (0.0, np.log(2.0))), (samples[1:], (np.nan, np.nan))):
        reader = lambda: NpzCalibrationReader(used)  # noqa: E731
        ranges = tensor_ranges(tmp_path / "nan.onnx", reader)
        np.testing.assert_allclose(ranges["y"], y_range, rtol=1e-6)
        assert ranges["x"] == (min(np.load(p)["x"].min() for p in used), max(np.load(p)["x"].max() for p in used))
        expected = _calibrator_ranges(tmp_path / "nan.onnx", reader())
        assert set(ranges) == set(expected)
        for name in ranges:
            np.testing.assert_array_equal(ranges[name], expected[name])  # NaN equals NaN here


def test_tensor_ranges_leave_other_audits_files_beside_the_model_alone(tmp_path):
    """Two audits of one model file at once (two CI jobs): onnxruntime's shape-inference loader writes
    and then deletes ``<stem>-inferred.onnx`` beside the model, the other job's file included (one
    job ended with FileNotFoundError). Ours uses a name of its own and leaves nothing behind."""
    from quant.recipes.quantize import tensor_ranges

    graph = helper.make_graph([helper.make_node("Abs", ["x"], ["y"], name="abs")], "abs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(model))
    theirs = tmp_path / "m-inferred.onnx"  # what a concurrent onnxruntime load holds at this moment
    theirs.write_bytes(b"another job's file")
    sample = _npz(tmp_path, 0, {"x": np.array([-3.0, 2.0], np.float32)})
    assert tensor_ranges(model, lambda: NpzCalibrationReader([sample]))["y"] == (2.0, 3.0)
    assert theirs.read_bytes() == b"another job's file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".onnx") == ["m-inferred.onnx", "m.onnx"]
