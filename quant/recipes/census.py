"""What a quantized module is: compute nodes by precision, size, CPU latency, error against FP32.

- Precision of each MatMul/Conv/Gemm: ``int8`` when an input comes from ``DequantizeLinear``
  (QDQ) or the op is an integer kernel (``MatMulInteger``, ``ConvInteger``,
  ``DynamicQuantizeMatMul``, ``QLinear*``); ``fp16`` when its first input is float16 after type
  inference; ``fp32`` otherwise.
- Latency: median of ``runs`` ONNX Runtime CPU calls on one held-back calibration input after
  ``warmup`` calls.
- SQNR: of the module's output against the FP32 ONNX module's, over the held-back samples.
- Kernel SQNR (``kernel_sqnr_db``): the deployed graph (ONNX Runtime with every optimization, i.e.
  fused integer kernels) against its own float math (the same graph unoptimized, integer ops
  in float64; ``quant.recipes.emulate.float_math_model``), on the same samples. It separates what the
  kernels of this target lose from what quantization itself loses (``kernel_finding``).

Example::

    census = precision_census(Path("onnx/int8/transformer.onnx"))
    census["MatMul"]   # {"int8": 12, "fp16": 0, "fp32": 2}
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from metrics.tensor import sqnr_db
from quant.recipes.export import onnx_size_bytes
from quant.pipeline.ort_modules import open_session, run_session

COMPUTE_OPS = ("MatMul", "Conv", "Gemm", "ConvTranspose")
INTEGER_OPS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv", "DynamicQuantizeMatMul": "MatMul",
               "QLinearMatMul": "MatMul", "QLinearConv": "Conv", "MatMulIntegerToFloat": "MatMul"}


def _types(model: onnx.ModelProto, path: Path) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph type inference cannot take: fall back to declared types
        inferred = model
    types = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def precision_census(path: Path) -> dict:
    """Compute nodes by op type and precision, plus Q/DQ and float16-initializer counts."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    types = _types(model, path)
    census: dict[str, dict[str, int]] = {op: {"int8": 0, "fp16": 0, "fp32": 0} for op in COMPUTE_OPS}
    names: dict[str, list[str]] = {"int8": [], "fp16": [], "fp32": []}
    for node in model.graph.node:
        if node.op_type in INTEGER_OPS:
            precision, op = "int8", INTEGER_OPS[node.op_type]
        elif node.op_type not in COMPUTE_OPS:
            continue
        elif any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            precision, op = "int8", node.op_type
        elif node.input and types.get(node.input[0]) == TensorProto.FLOAT16:
            precision, op = "fp16", node.op_type
        else:
            precision, op = "fp32", node.op_type
        census[op][precision] += 1
        names[precision].append(node.name or node.output[0])
    ops = [n.op_type for n in model.graph.node]
    return {
        "compute_ops": {op: c for op, c in census.items() if sum(c.values())},
        "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
        "float16_initializers": sum(1 for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16),
        "nodes": len(ops),
        "fp32_compute_nodes": names["fp32"],
        "int8_compute_nodes": names["int8"],
        "fp16_compute_nodes": names["fp16"],
    }


def precision_counts(census: dict) -> dict[str, int]:
    """Compute nodes per precision (``int8``, ``fp16``, ``fp32``) from a ``precision_census``."""
    return {p: sum(c[p] for c in census["compute_ops"].values()) for p in ("int8", "fp16", "fp32")}


def timed_calls(session, inputs: dict[str, np.ndarray], warmup: int = 2, runs: int = 7) -> list[float]:
    """Milliseconds of ``runs`` calls of ``session`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run_session(session, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_session(session, inputs)
        times.append((time.perf_counter() - start) * 1000)
    return times


def latency_ms(session, inputs: dict[str, np.ndarray], warmup: int = 2, runs: int = 7) -> float:
    """Median ONNX Runtime CPU latency of one call of ``session``, in milliseconds."""
    return statistics.median(timed_calls(session, inputs, warmup, runs))


KERNEL_FLOAT_MATH_DB = 100.0  # kernel SQNR above this: the deployed graph computes its float math
KERNEL_LOSSY_MARGIN_DB = 10.0  # kernel noise >= 10% of the quantization noise: worth a warning


def holdout_errors(reference, candidate, float_math, reader) -> tuple[list[float], list[float], list[float]]:
    """Per sample of ``reader``, SQNR (dB) of: ``candidate`` against ``reference`` (FP32: all the
    error a deployment sees); ``candidate`` against ``float_math`` (its own float math: the kernel
    error); ``float_math`` against ``reference`` (the quantization itself)."""
    deployed, kernel, quantization = [], [], []
    while (inputs := reader.get_next()) is not None:
        out, fp32, math_out = (run_session(s, inputs)[0] for s in (candidate, reference, float_math))
        deployed.append(sqnr_db(out, fp32))
        kernel.append(sqnr_db(out, math_out))
        quantization.append(sqnr_db(math_out, fp32))
    return deployed, kernel, quantization


def kernel_finding(recipe: str, kernel_db: float | None, quantization_db: float | None, int8_path: str) -> dict:
    """What ``kernel_sqnr_db`` says about a module: ``status`` and a sentence for people.

    ``float-math``: the integer kernels are not used (no speed-up expected); ``lossy-kernels``:
    the kernels lose accuracy the quantization itself does not (with the likely cause and remedy);
    ``ok``; ``n/a`` for recipes without integer kernels (fp16) or without a number.
    """
    from quant.recipes.records import record

    if not recipe or not record(recipe).integer_kernels or kernel_db is None:
        return {"status": "n/a", "message": ""}
    if kernel_db >= KERNEL_FLOAT_MATH_DB:
        return {"status": "float-math", "message": f"runs as float math (kernel SQNR {kernel_db:.0f} dB: ONNX Runtime "
                "fuses none of its quantized nodes into integer kernels); no speed-up expected"}
    if quantization_db is not None and kernel_db < quantization_db + KERNEL_LOSSY_MARGIN_DB:
        if int8_path == "avx2":
            cause = ("u8 x s8 pair sums saturating at int16 in the integer kernels of this CPU without VNNI "
                     "(VPMADDUBSW)")
            remedy = ("quantize with int8_reduce_range = true (7-bit weights cannot saturate), deploy on a VNNI CPU, "
                      "or keep the module's most sensitive layers in FP32 (quant-audit search)")
        else:
            cause = "rounding and requantization inside the fused integer kernels"
            remedy = "try int8_activation_type = \"uint8\", or keep the most sensitive layers in FP32 (quant-audit search)"
        return {"status": "lossy-kernels", "message": f"the integer kernels lose accuracy the quantization does not: "
                f"kernel SQNR {kernel_db:.1f} dB against {quantization_db:.1f} dB for the quantization itself. "
                f"Likely cause: {cause}. Remedy: {remedy}"}
    return {"status": "ok", "message": ""}


def _finite_stats(values: list[float]) -> tuple[float | None, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        return min(finite), float(np.mean(finite))
    return (math.inf, math.inf) if values and all(v == math.inf for v in values) else (None, None)


def module_report(fp32_path: Path, path: Path, kept_fp32: dict, notes: list[str], holdout_reader, sample,
                  recipe: str = "", options: dict | None = None) -> dict:
    """Everything the quantization report says about one (module, recipe).

    SQNR statistics are over the finite values; ``identical_to_fp32`` says every held-back output
    was bit-identical (+inf), ``nonfinite_output`` that one had NaN/Inf (-inf). ``kernel_sqnr_db``
    is the minimum kernel SQNR (``None`` as JSON when every output matched its float math exactly:
    see ``kernel_identical``); ``float_math_sqnr_min_db`` the quantization's own error (float math
    against FP32), what the kernel error is compared with.
    """
    from quant.recipes.emulate import float_math_model
    from quant.support.target import current_target

    reference, candidate = open_session(fp32_path), open_session(path)
    with tempfile.TemporaryDirectory() as tmp:
        float_math = open_session(float_math_model(path, Path(tmp) / "float_math.onnx"), optimize=False)
    values, kernel, itself = holdout_errors(reference, candidate, float_math, holdout_reader)
    finite = [v for v in values if math.isfinite(v)]
    kernel_min, kernel_mean = _finite_stats(kernel)
    itself_min, _ = _finite_stats(itself)
    target = current_target()
    finding = kernel_finding(recipe, kernel_min, itself_min, target.int8_path)
    census = precision_census(path)
    why = {name: kept_fp32.get(name, "not selected by the quantizer (its op types/patterns do not cover this node, "
                                     "e.g. an activation x activation MatMul or a Conv3d)")
           for name in census["fp32_compute_nodes"]}
    return {
        "file": path.name,
        "size_bytes": onnx_size_bytes(path), "fp32_size_bytes": onnx_size_bytes(fp32_path),
        "census": census,
        "kept_fp32": kept_fp32, "fp32_compute_reasons": why, "notes": notes,
        "latency_ms": latency_ms(candidate, sample), "fp32_latency_ms": latency_ms(reference, sample),
        "samples": len(values),
        "sqnr_min_db": min(finite) if finite else None,
        "sqnr_mean_db": float(np.mean(finite)) if finite else None,
        "identical_to_fp32": bool(values) and all(v == math.inf for v in values),
        "nonfinite_output": any(v == -math.inf for v in values),
        "kernel_sqnr_db": None if kernel_min is None or math.isinf(kernel_min) else kernel_min,
        "kernel_sqnr_mean_db": None if kernel_mean is None or math.isinf(kernel_mean) else kernel_mean,
        "kernel_identical": kernel_min == math.inf,
        "float_math_sqnr_min_db": None if itself_min is None or math.isinf(itself_min) else itself_min,
        "kernel": finding,
        "target": target.id,
        "options": options or {},
    }
