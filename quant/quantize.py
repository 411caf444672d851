"""FP32 ONNX -> FP16 / INT8 ONNX, one entry point dispatched by recipe.

``quantize(src, dst, recipe, calibration, options)`` finds the handler registered for the
recipe; adding a recipe adds a handler (``@register("name")``), not an ``if`` chain.

- ``fp16``: onnxruntime's float16 converter (``onnxruntime.transformers.float16``) with FP32
  inputs/outputs kept, behind an overflow guard: the FP32 graph runs on the calibration inputs
  (onnxruntime's MinMax calibrator records every tensor's range), and nodes whose outputs leave
  the FP16 range (|x| > 65504) stay FP32 (node block list, reported with the range seen).
- ``int8``: ``quantize_static`` in QDQ format, per-channel weights, calibration method
  ``minmax``/``entropy``/``percentile``; op types and node exclusions configurable. The graph
  is first cleaned of stale ``value_info`` and pre-processed (``quant_pre_process``), falling
  back step by step where the pre-processor fails on a graph (recorded, not fatal).
- ``int8-dynamic``: ``quantize_dynamic`` (weights INT8, activations quantized at run time).

- ``inc-int8``: Intel Neural Compressor 3.x's PyTorch PT2E static INT8, calibrated on the same
  captured inputs, exported to ONNX QDQ and run in ONNX Runtime like the others.

Models over 2 GB are written with external data.

Example::

    result = quantize(Path("onnx/fp32/transformer.onnx"), Path("onnx/int8/transformer.onnx"), "int8",
                      lambda: cal.reader("transformer"), QuantizeOptions(method="entropy"))
    result.notes, result.kept_fp32
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from quant.errors import UserError, first_line
from quant.export import export_program, onnx_size_bytes, save_atomically, save_model
from quant.quiet import quiet

FP16_MAX = 65504.0
EXTERNAL_DATA_BYTES = 2 * 1024**3
METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("int8", "uint8")
DEFAULT_STATIC_OPS = ("MatMul", "Conv", "Gemm")
DEFAULT_DYNAMIC_OPS = ("MatMul", "Gemm")

ReaderFactory = Callable[[], object]  # returns a fresh CalibrationDataReader


@dataclass(frozen=True)
class QuantizeOptions:
    """How a recipe quantizes.

    Attributes:
        method: INT8 static calibration: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: per-output-channel weight scales.
        op_types: op types to quantize (default MatMul/Conv/Gemm static, MatMul/Gemm dynamic).
        nodes_to_exclude: node names kept in FP32.
        fp16_guard: keep FP32 the nodes whose calibration outputs overflow FP16.
        calibration_cache: ``int8``: a JSON file of tensor ranges (onnxruntime's calibration
            cache): read when present, written otherwise, so repeated quantizations of one
            model (sensitivity, search) calibrate once.
        preprocessed: ``int8``: the source is already ``quant_pre_process``'s output
            (``preprocess``), so repeated quantizations of one model pre-process once.
        reduce_range: ``int8``/``int8-dynamic``: 7-bit weights. The remedy for x86 CPUs without
            VNNI, whose u8 x s8 kernels saturate pair sums at int16: 255 * 2 * 63 fits, so no
            pair can saturate (``quant.emulate``), at some cost in weight precision.
        activation_type: ``int8``: activations ``int8`` (S8S8, ONNX Runtime's default for QDQ)
            or ``uint8`` (U8S8). ``int8-dynamic`` always quantizes activations to uint8.
    """

    method: str = "minmax"
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    fp16_guard: bool = True
    calibration_cache: str | None = None
    preprocessed: bool = False
    reduce_range: bool = False
    activation_type: str = "int8"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown calibration method '{self.method}' (methods: {', '.join(METHODS)})")
        if self.activation_type not in ACTIVATION_TYPES:
            raise UserError(f"unknown activation type '{self.activation_type}' (types: {', '.join(ACTIVATION_TYPES)})")

    def record(self) -> dict:
        """What the quantization report records (no cache paths: they say nothing about numbers)."""
        return {k: v for k, v in asdict(self).items() if k not in ("calibration_cache", "preprocessed")}


@dataclass(frozen=True)
class QuantizeJob:
    """One module to quantize: the FP32 ONNX file, the destination, calibration and options.

    ``torch_module`` builds the module's PyTorch adapter (``quant.adapters``) for recipes that
    quantize in PyTorch (``inc-int8``); ``input_names``/``output_names`` are its ONNX names.
    """

    src: Path
    dst: Path
    calibration: ReaderFactory
    options: "QuantizeOptions"
    torch_module: Callable[[], object] | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()


@dataclass
class QuantizeResult:
    """What a handler did: FP32-kept nodes with reasons, and notes on workarounds taken."""

    recipe: str
    path: Path
    kept_fp32: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


HANDLERS: dict[str, Callable[..., QuantizeResult]] = {}


def register(recipe: str):
    def wrap(fn):
        HANDLERS[recipe] = fn
        return fn
    return wrap


def quantize(src: Path, dst: Path, recipe: str, calibration: ReaderFactory, options: QuantizeOptions = QuantizeOptions(),
             torch_module: Callable[[], object] | None = None, input_names: tuple[str, ...] = (),
             output_names: tuple[str, ...] = ()) -> QuantizeResult:
    """Quantize the FP32 model ``src`` into ``dst`` with ``recipe``.

    Raises:
        UserError: no handler for the recipe, or ``src`` is not a loadable ONNX model.
    """
    if recipe not in HANDLERS:
        raise UserError(f"recipe '{recipe}' cannot quantize here (available: {', '.join(HANDLERS)})")
    check_onnx_file(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    job = QuantizeJob(Path(src), Path(dst), calibration, options, torch_module, tuple(input_names), tuple(output_names))
    with quiet("neural_compressor", "torch", "torchao", "onnxruntime"):
        return HANDLERS[recipe](job)


def check_onnx_file(path: Path) -> None:
    """Raise UserError for a missing, truncated or corrupt ONNX file (``onnx.checker`` by path,
    which follows external data without loading the model into Python)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf/checker raise several types for a bad file
        raise UserError(f"{path}: not a valid ONNX model ({first_line(exc, 200)})") from None


def _large(model_or_path) -> bool:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path.ByteSize() >= EXTERNAL_DATA_BYTES
    return onnx_size_bytes(Path(model_or_path)) >= EXTERNAL_DATA_BYTES


def tensor_ranges(src: Path, calibration: ReaderFactory) -> dict[str, tuple[float, float]]:
    """Min and max of every float tensor of ``src`` over the calibration inputs (ORT MinMax calibrator)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(src), op_types_to_calibrate=None, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_large(src))
        calibrator.collect_data(calibration())
        data = calibrator.compute_data()
    return {name: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for name, v in data.data.items()}


def fp16_overflow_nodes(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> dict[str, str]:
    """Nodes to keep in FP32 -> why: the producer of every tensor whose calibration range leaves
    FP16 (|x| > 65504), and every consumer of it, so the value is never cast to FP16 on the way
    (a consumer's own output, e.g. after a division, may be back in range and return to FP16)."""
    overflowing = {}
    for name, (lo, hi) in ranges.items():
        if max(abs(lo), abs(hi)) > FP16_MAX or not (np.isfinite(lo) and np.isfinite(hi)):
            overflowing[name] = f"[{lo:.4g}, {hi:.4g}]"
    blocked = {}
    for node in model.graph.node:
        out = next((o for o in node.output if o in overflowing), None)
        if out is not None:
            blocked[node.name] = f"output {out} reaches {overflowing[out]} on calibration inputs, beyond FP16's +-65504"
            continue
        inp = next((i for i in node.input if i in overflowing), None)
        if inp is not None:
            blocked[node.name] = f"input {inp} reaches {overflowing[inp]}, beyond FP16's +-65504 (kept FP32 so it is never cast to FP16)"
    return blocked


@register("fp16")
def _fp16(job: QuantizeJob) -> QuantizeResult:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst, calibration, options = job.src, job.dst, job.calibration, job.options
    model = onnx.load(str(src))
    result = QuantizeResult("fp16", dst)
    if options.fp16_guard:
        result.kept_fp32 = fp16_overflow_nodes(model, tensor_ranges(src, calibration))
    for name in options.nodes_to_exclude:
        result.kept_fp32.setdefault(name, "excluded by configuration")
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(result.kept_fp32) or None)
    removed = _drop_duplicate_nodes(converted)
    if removed:
        result.notes.append(f"removed {removed} duplicate Cast node(s) the float16 converter emits when one tensor "
                            "feeds several FP32-only inputs")
    collapsed = _collapse_fp16_round_trips(converted.graph)
    if collapsed:
        result.notes.append(f"collapsed {collapsed} FP32->FP16->FP32 Cast pair(s) between FP32-kept nodes")
    _sort_topologically(converted.graph)
    save_model(converted, dst, _large(converted))
    return result


def _collapse_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Bypass ``Cast(to=fp16) -> Cast(to=fp32)`` pairs; returns how many.

    The float16 converter wraps each FP32-kept node in Casts on its own, so two adjacent kept
    nodes exchange their tensor through FP16 -- exactly the overflow the guard keeps them in FP32
    to avoid. Only this pattern is collapsed (onnxruntime's ``remove_cascaded_cast_nodes`` would
    also fold a graph's own Cast chains, e.g. through an integer type, which changes values).
    """
    producers = {o: n for n in graph.node for o in n.output}
    to = lambda n: next((a.i for a in n.attribute if a.name == "to"), None)  # noqa: E731
    count = 0
    for node in graph.node:
        parent = producers.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if parent is not None and parent.op_type == "Cast" and to(parent) == TensorProto.FLOAT16 and to(node) == TensorProto.FLOAT:
            node.input[0] = parent.input[0]
            count += 1
    if count:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(keep)
    return count


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows its inputs' producers, as ONNX requires.

    The float16 converter appends the Casts it adds at the end of the node list; ONNX Runtime
    sorts on load, but other consumers (onnx's reference evaluator, other runtimes) do not.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:  # a cycle or an input produced nowhere: leave the rest in their order
            ordered.extend(pending)
            break
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes that repeat an earlier node exactly (op, inputs, outputs, attributes), and
    repeated ``value_info`` entries.

    ``convert_float_to_float16`` inserts one ``Cast(x) -> x_cast_to_fp32`` per consumer that needs
    FP32; when a tensor has two such consumers the two Casts are identical and the graph has two
    producers of one tensor, which ONNX Runtime refuses. Keeping the first is exactly equivalent.
    """
    seen, keep, removed = set(), [], 0
    for node in model.graph.node:
        key = (node.op_type, tuple(node.input), tuple(node.output), node.domain,
               tuple(a.SerializeToString() for a in node.attribute))
        if key in seen:
            removed += 1
            continue
        seen.add(key)
        keep.append(node)
    if removed:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        names, infos = set(), []
        for info in model.graph.value_info:
            if info.name not in names:
                names.add(info.name)
                infos.append(info)
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)
    return removed


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
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
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
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cleaned = _cleaned_copy(src, Path(tmp))
        save_atomically(lambda out: quantize_dynamic(
            str(cleaned), str(out), op_types_to_quantize=list(options.op_types or DEFAULT_DYNAMIC_OPS),
            per_channel=options.per_channel, weight_type=QuantType.QInt8, reduce_range=options.reduce_range,
            nodes_to_exclude=list(options.nodes_to_exclude) or None, use_external_data_format=_large(cleaned)), dst)
    result.kept_fp32 = {n: "excluded by configuration" for n in options.nodes_to_exclude}
    return result


_INC_ACT_ALGO = {"minmax": "minmax", "entropy": "kl"}


def _import_inc():
    """Import INC's PT2E API without its INFO chatter: INC's logger takes its level from the
    ``LOGLEVEL`` environment variable when first imported, so set it only for the import."""
    import logging
    import os

    previous = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "ERROR"
    try:
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare
    finally:
        if previous is None:
            os.environ.pop("LOGLEVEL", None)
        else:
            os.environ["LOGLEVEL"] = previous
    logging.getLogger("neural_compressor").setLevel(logging.ERROR)
    return export, StaticQuantConfig, convert, prepare


@register("inc-int8")
def _inc_int8(job: QuantizeJob) -> QuantizeResult:
    """Intel Neural Compressor 3.x, PyTorch PT2E static INT8, then ONNX QDQ via the dynamo exporter.

    neural-compressor 3.x no longer quantizes ONNX graphs, so the module is quantized in PyTorch
    (INC's ``export`` -> ``prepare`` -> calibration on the captured inputs -> ``convert``) and the
    quantized graph is exported; its quantize/dequantize ops become QuantizeLinear/DequantizeLinear.
    """
    import torch

    if job.torch_module is None:
        raise UserError("recipe 'inc-int8' quantizes the PyTorch module: give the model (quant-audit quantize --model)")
    if job.options.method not in _INC_ACT_ALGO:
        raise UserError(f"recipe 'inc-int8' calibrates with minmax or entropy (KL), not '{job.options.method}'")
    if job.options.op_types or job.options.nodes_to_exclude:
        raise UserError("recipe 'inc-int8' takes no --op-type/--exclude (INC's X86 quantizer picks the ops)")
    export, StaticQuantConfig, convert, prepare = _import_inc()

    reader = job.calibration()
    first = reader.get_next()
    if first is None:
        raise UserError(f"{job.src}: no calibration samples for this module")
    as_args = lambda sample: tuple(torch.from_numpy(sample[n]) for n in job.input_names)  # noqa: E731
    example = as_args(first)
    config = StaticQuantConfig(act_algo=_INC_ACT_ALGO[job.options.method],
                               w_granularity="per_channel" if job.options.per_channel else "per_tensor")
    # PT2E works on the exported graph; the pipeline's own module is left as it was (the FP32
    # reference every variant is scored against): tests/test_quantize.py checks its fingerprint.
    with torch.no_grad():
        prepared = prepare(export(job.torch_module(), example_inputs=example), quant_config=config)
        prepared(*example)
        while (sample := reader.get_next()) is not None:
            prepared(*as_args(sample))
        quantized = convert(prepared)
    program = export_program(quantized, example, job.input_names, job.output_names, 18, dynamic=False)
    save_atomically(lambda p: program.save(p, external_data=None), job.dst)
    result = QuantizeResult("inc-int8", job.dst)
    result.notes.append("batch axis is static (1, as the pipeline calls each module): the PT2E graph is exported as captured")
    return result
