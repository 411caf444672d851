"""The execution target and the emulated int8 kernels, checked against ONNX Runtime on this CPU.

Every test here passes on an AVX2-only and on a VNNI CPU: the expected number is computed for
the int8 path this machine has (``current_target().int8_path``), never written as a constant
that holds on one kind only. The hand-worked case has its numbers for both paths in the test.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.recipes.emulate import emulate_model, float_math_model, kernel_weights
from quant.errors import UserError
from quant.pipeline.ort_modules import open_session, run_session
from quant.support.target import current_target, int8_path, set_threads

OUT_SCALE = 512.0  # a power of two: requantization rounds the same in the kernel and in float math


def _qdq_model(op: str, weight: np.ndarray, x_zero: int, pads=None, requantize: bool = False) -> onnx.ModelProto:
    """DQ(Q(x)) x DQ(int8 weight) -> MatMul or Conv (optionally followed by Q/DQ), unit scales."""
    channels = weight.shape[1] if op == "MatMul" else weight.shape[0]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "sx"),
             numpy_helper.from_array(np.array(x_zero, np.int8), "zx"),
             numpy_helper.from_array(weight.astype(np.int8), "wq"),
             numpy_helper.from_array(np.ones(channels, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(channels, np.int8), "zw"),
             numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "so"),
             numpy_helper.from_array(np.array(0, np.int8), "zo")]
    compute = (helper.make_node("MatMul", ["xd", "wd"], ["c"]) if op == "MatMul"
               else helper.make_node("Conv", ["xd", "wd"], ["c"], pads=pads))
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1 if op == "MatMul" else 0),
             compute]
    if requantize:
        nodes += [helper.make_node("QuantizeLinear", ["c", "so", "zo"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "so", "zo"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _matmulinteger_model(weight: np.ndarray, a_zero: int, a_shape: tuple) -> onnx.ModelProto:
    """int8-dynamic's integer op alone: ``MatMulInteger(a uint8, weight int8, a_zero)`` -> int32."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "za"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a_shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [a_shape[0], weight.shape[1]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(a_zero, np.uint8), "za")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _save(model: onnx.ModelProto, path):
    onnx.save(model, str(path))
    return path


def _run(path, x, optimize=True):
    return run_session(open_session(path, optimize=optimize), {"x": x})[0]


def test_hand_worked_saturation(tmp_path):
    """x = 127 (s8; the kernel sees u8 255), w = 127: the pair sum 255*127*2 = 64770 saturates to 32767;
    minus the zero-point term 128 * (127 + 127) = 32512 leaves 255. Exact: 127*127*2 = 32258."""
    weight = np.array([[127], [127], [0], [0]])
    x = np.array([[127, 127, 0, 0]], np.float32)
    src = _save(_qdq_model("MatMul", weight, x_zero=0), tmp_path / "m.onnx")
    expected = {"avx2": 255.0, "vnni": 32258.0}
    for target, value in expected.items():
        emulate_model(src, tmp_path / f"{target}.onnx", target)
        assert _run(tmp_path / f"{target}.onnx", x, optimize=False)[0, 0] == value
    # the same weights split over two pairs (k = 1, 2) cannot saturate: both paths give the exact sum
    split = _save(_qdq_model("MatMul", np.array([[0], [127], [127], [0]]), 0), tmp_path / "split.onnx")
    emulate_model(split, tmp_path / "split-avx2.onnx", "avx2")
    assert _run(tmp_path / "split-avx2.onnx", np.array([[0, 127, 127, 0]], np.float32), optimize=False)[0, 0] == 32258.0
    # and this CPU's ONNX Runtime kernels agree with the path it has
    path = current_target().int8_path
    if path in expected:
        assert _run(src, x)[0, 0] == expected[path]


def _paired_weights(op: str, kernel: tuple, rng) -> np.ndarray:
    """Two large same-sign weights per output: even outputs in one kernel pair (adjacent K entries
    of a MatMul; adjacent input channels at one tap of a Conv), odd outputs straddling two pairs
    (the pairing a wrong emulation would saturate). Few nonzeros keep outputs inside int8."""
    weight = np.zeros(kernel, np.int64)
    outputs = kernel[1] if op == "MatMul" else kernel[0]
    for o in range(outputs):
        big = rng.integers(110, 128, size=2) * rng.choice([-1, 1])
        if op == "MatMul":
            j = 2 * rng.integers(0, kernel[0] // 2 - 1) + (o % 2)
            weight[j, o], weight[j + 1, o] = big
        else:
            tap = tuple(rng.integers(0, k) for k in kernel[2:])
            c = 2 * rng.integers(0, kernel[1] // 2 - (o % 2)) + (o % 2)
            weight[(o, c, *tap)], weight[(o, c + 1, *tap)] = big
    return weight


@pytest.mark.parametrize("op, shape, kernel, pads", [
    ("MatMul", (3, 40), (40, 24), None),
    ("Conv", (1, 6, 7, 7), (24, 6, 3, 3), [0, 0, 0, 0]),
    ("Conv", (1, 16, 4, 5, 5), (24, 16, 3, 3, 3), [1] * 6),
    ("Conv", (1, 8, 4, 5, 5), (24, 8, 1, 1, 1), [0] * 6),
    ("Conv", (1, 32, 6, 6), (24, 32, 3, 3), [1, 1, 1, 1]),
])
def test_emulation_of_this_cpu_matches_onnx_runtime_bit_for_bit(tmp_path, op, shape, kernel, pads):
    """Large activations and weights, so many pairs saturate without VNNI: ONNX Runtime's fused
    kernels on this CPU equal the emulation of this CPU's int8 path exactly, and the other
    path's emulation does not (the two differ on this input)."""
    rng = np.random.default_rng(0)
    weight = _paired_weights(op, kernel, rng)
    x = rng.integers(90, 128, size=shape).astype(np.float32)
    src = _save(_qdq_model(op, weight, x_zero=-10, pads=pads, requantize=True), tmp_path / "m.onnx")
    assert "wq" in kernel_weights(src)  # ORT fuses this node into an integer kernel
    outputs = {}
    for target in ("avx2", "vnni"):
        emulate_model(src, tmp_path / f"{target}.onnx", target)
        outputs[target] = _run(tmp_path / f"{target}.onnx", x, optimize=False)
    assert not np.array_equal(outputs["avx2"], outputs["vnni"])  # the input does saturate
    deployed = _run(src, x)
    path = current_target().int8_path
    if path not in outputs:
        pytest.skip(f"this CPU has no x86 int8 SIMD path ({path})")
    assert np.array_equal(deployed, outputs[path])


def test_float_math_of_a_dynamic_graph_replaces_matmulinteger(tmp_path):
    """int8-dynamic graphs compute MatMulInteger even unoptimized: their float math rewrites it
    (float64, exact) and matches numpy's integer product."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(3, 10)).astype(np.uint8)
    w = rng.integers(-127, 128, size=(10, 5)).astype(np.int8)
    src = _save(_matmulinteger_model(w, 7, a.shape), tmp_path / "d.onnx")
    math_path = float_math_model(src, tmp_path / "float.onnx")
    assert math_path != src and "MatMulInteger" not in {n.op_type for n in onnx.load(str(math_path)).graph.node}
    out = run_session(open_session(math_path, optimize=False), {"a": a})[0]
    assert np.array_equal(out, (a.astype(np.int64) - 7) @ w.astype(np.int64))


def test_target_records_what_changes_numbers():
    set_threads(1)
    one = current_target()
    set_threads(None)
    everything = current_target()
    assert one.threads == 1 and one.torch_threads == 1 and one.id != everything.id
    assert everything.id == current_target().id  # stable
    for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c"):
        assert flag in everything.flags
    record = everything.to_dict()
    assert record["id"] == everything.id and record["onnxruntime"] and record["providers"] == ["CPUExecutionProvider"]
    assert everything.id.startswith(f"{everything.arch}-") and f"-t{everything.threads}-" in everything.id


def test_int8_path_follows_the_flags():
    assert int8_path({"avx2": True, "avx512_vnni": True}) == "vnni"
    assert int8_path({"avx2": True, "avx_vnni": True}) == "vnni"
    assert int8_path({"avx2": True, "amx_int8": True}) == "vnni"
    assert int8_path({"avx2": True, "avx512bw": True}) == "avx2"  # AVX-512 without VNNI still saturates
    assert int8_path({"avx2": True}) == "avx2"
    assert int8_path({}) == "other"


def test_bad_thread_count_is_a_user_error():
    with pytest.raises(UserError, match="runtime.threads must be a positive integer, got 0"):
        set_threads(0)
    set_threads(None)


def test_dynamic_matmulinteger_emulation_matches_onnx_runtime(tmp_path):
    """int8-dynamic's MatMulInteger (u8 activations, s8 weights) on this CPU equals the emulation of
    this CPU's int8 path; large values make adjacent pairs saturate without VNNI."""
    rng = np.random.default_rng(2)
    a = rng.integers(200, 256, size=(4, 12)).astype(np.uint8)
    w = np.zeros((12, 6), np.int8)
    for n in range(6):  # one same-sign pair per column, even columns in a kernel pair, odd ones straddling two
        j = 2 * rng.integers(0, 5) + (n % 2)
        w[j, n], w[j + 1, n] = (rng.integers(110, 128, size=2) * rng.choice([-1, 1])).astype(np.int8)
    src = _save(_matmulinteger_model(w, 3, a.shape), tmp_path / "d.onnx")
    outputs = {}
    for target in ("avx2", "vnni"):
        emulate_model(src, tmp_path / f"{target}.onnx", target)
        outputs[target] = run_session(open_session(tmp_path / f"{target}.onnx", optimize=False), {"a": a})[0]
    assert np.array_equal(outputs["vnni"], (a.astype(np.int64) - 3) @ w.astype(np.int64))
    assert not np.array_equal(outputs["avx2"], outputs["vnni"])  # the input does saturate
    path = current_target().int8_path
    if path not in outputs:
        pytest.skip(f"this CPU has no x86 int8 SIMD path ({path})")
    assert np.array_equal(run_session(open_session(src), {"a": a})[0], outputs[path])
