"""``int8`` (ONNX Runtime ``quantize_static``, QDQ, calibrated) and ``int8-dynamic`` (``quantize_dynamic``).

The graph is first cleaned of stale ``value_info`` and pre-processed (``quant_pre_process``),
falling back step by step where the pre-processor fails on a graph (recorded, not fatal).

Example::

    quantize(src, dst, "int8", lambda: cal.reader("transformer"), QuantizeOptions(method="entropy", reduce_range=True))
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from quant.errors import first_line
from quant.recipes.export import save_atomically, save_model
from quant.recipes.quantize import DEFAULT_DYNAMIC_OPS, DEFAULT_STATIC_OPS, QuantizeJob, QuantizeResult, _large, register


def _cleaned_copy(src: Path, work: Path) -> Path:
    """``src`` without intermediate ``value_info``, saved in ``work``: exported graphs carry shapes
    that later passes make stale, and shape inference in the quantizers trips over them. It is
    recomputed."""
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    cleaned = work / "clean.onnx"
    save_model(model, cleaned, _large(src))
    return cleaned


def preprocess(src: Path, work: Path) -> tuple[Path, list[str]]:
    """``quant_pre_process`` (with fallbacks) of ``src`` into ``work``: (the graph, notes)."""
    result = QuantizeResult("int8", Path(src))
    return _preprocess(Path(src), Path(work), result), result.notes


def _preprocess(src: Path, work: Path, result: QuantizeResult) -> Path:
    """``quant_pre_process`` with fallbacks: full, then without symbolic shape inference, then
    without optimization, then the cleaned graph as is. Each fallback is noted."""
    from onnxruntime.quantization import quant_pre_process

    cleaned = _cleaned_copy(src, work)
    attempts = [("full", {}), ("no symbolic shape inference", {"skip_symbolic_shape": True}),
                ("no optimization", {"skip_symbolic_shape": True, "skip_optimization": True})]
    for label, kwargs in attempts:
        out = work / f"pre-{len(result.notes)}.onnx"
        try:
            quant_pre_process(str(cleaned), str(out), save_as_external_data=_large(cleaned), **kwargs)
            if label != "full":
                result.notes.append(f"quant_pre_process: used '{label}' (the full pass failed on this graph)")
            return out
        except Exception as exc:  # noqa: BLE001 - the pre-processor raises many types on graphs it cannot take
            result.notes.append(f"quant_pre_process ({label}) failed: {first_line(exc, 160)}")
    result.notes.append("quantizing the cleaned graph without pre-processing")
    return cleaned


_METHOD = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@register("int8")
def _int8_static(job: QuantizeJob) -> QuantizeResult:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst, calibration, options = job.src, job.dst, job.calibration, job.options
    result = QuantizeResult("int8", dst)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=dst.parent) as tmp:
        pre = src if options.preprocessed else _preprocess(src, Path(tmp), result)
        # The quantizer writes into save_atomically's private folder (its external data is named
        # <file>.data, as ours), so the result is moved into place without a reload.
        save_atomically(lambda out: quantize_static(
            str(pre), str(out), calibration(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types or DEFAULT_STATIC_OPS), per_channel=options.per_channel,
            activation_type=QuantType.QUInt8 if options.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, reduce_range=options.reduce_range,
            nodes_to_exclude=list(options.nodes_to_exclude) or None, use_external_data_format=_large(pre),
            calibrate_method=getattr(CalibrationMethod, _METHOD[options.method]),
            calibration_cache_path=options.calibration_cache,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        ), dst)
    result.kept_fp32 = {n: "excluded by configuration" for n in options.nodes_to_exclude}
    return result


@register("int8-dynamic")
def _int8_dynamic(job: QuantizeJob) -> QuantizeResult:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst, options = job.src, job.dst, job.options
    result = QuantizeResult("int8-dynamic", dst)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=dst.parent) as tmp:
        cleaned = _cleaned_copy(src, Path(tmp))
        save_atomically(lambda out: quantize_dynamic(
            str(cleaned), str(out), op_types_to_quantize=list(options.op_types or DEFAULT_DYNAMIC_OPS),
            per_channel=options.per_channel, weight_type=QuantType.QInt8, reduce_range=options.reduce_range,
            nodes_to_exclude=list(options.nodes_to_exclude) or None, use_external_data_format=_large(cleaned)), dst)
    result.kept_fp32 = {n: "excluded by configuration" for n in options.nodes_to_exclude}
    return result
