"""FP32 ONNX -> FP16 / INT8 ONNX, one entry point dispatched by recipe.

``quantize(src, dst, recipe, calibration, options)`` finds the handler registered for the
recipe; adding a recipe adds a handler (``@register("name")``), not an ``if`` chain.

- ``fp16``: onnxruntime's float16 converter (``onnxruntime.transformers.float16``) with FP32
  inputs/outputs kept, behind an overflow guard: the FP32 graph runs on the calibration inputs
  (``tensor_ranges``: every tensor's range, selected and reduced as onnxruntime's MinMax
  calibrator does, in linear time), and nodes whose outputs leave the FP16 range (|x| > 65504)
  stay FP32 (node block list, reported with the range seen).
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

import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from quant.errors import UserError, first_line
from quant.recipes.export import onnx_size_bytes
from quant.support.quiet import quiet

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
            pair can saturate (``quant.recipes.emulate``), at some cost in weight precision.
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

    ``torch_module`` builds the module's PyTorch adapter (``quant.pipeline.torch_modules``) for recipes that
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


def _load_with_shape_infer(src: Path) -> onnx.ModelProto:
    """onnxruntime's ``load_model_with_shape_infer`` with a file name of this call's own.

    The inferred graph is written beside ``src`` (its external data paths are relative to it), but
    onnxruntime names it ``<stem>-inferred.onnx`` and deletes it after loading: two audits of the
    same file at once (two CI jobs on one shared model) deleted each other's, and one of them ended
    with FileNotFoundError. A unique hidden name, removed however the load ends, keeps the rest.
    """
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    handle, name = tempfile.mkstemp(prefix=f".{src.stem}-inferred-", suffix=".onnx", dir=src.parent)
    os.close(handle)
    try:
        onnx.shape_inference.infer_shapes_path(str(src), name)
        model = onnx.load(name)
    finally:
        os.unlink(name)
    add_infer_metadata(model)
    return model


def tensor_ranges(src: Path, calibration: ReaderFactory) -> dict[str, tuple[float, float]]:
    """Min and max of every float tensor of ``src`` over the calibration inputs.

    The tensors, the graph they are measured in and the reductions are those of onnxruntime's
    MinMax calibrator (``create_calibrator(op_types_to_calibrate=None)``): every FP32/FP16 tensor a
    node reads or writes, initializers excepted, as ``ReduceMin``/``ReduceMax`` outputs of the
    shape-inferred graph run with every optimization off. Its ``augment_graph`` inserts each pair
    after a scan of the whole node list and rebuilds a dict of every ``value_info`` per tensor:
    quadratic, 15 of the 23 s the fp16 recipe took on the 1601-node VAE decoder (measured). Here the
    pairs are appended after the last node (still topological order) in one pass.
    """
    from onnx import TensorProto, helper

    from quant.pipeline.ort_modules import open_session, run_session

    model = _load_with_shape_infer(Path(src))
    graph = model.graph
    infos = {vi.name: vi for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    initializers = {init.name for init in graph.initializer}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    names: dict[str, None] = {}  # insertion-ordered set
    for node in graph.node:
        for name in (*node.input, *node.output):
            info = infos.get(name)
            if (info is not None and name not in initializers and info.type.HasField("tensor_type")
                    and info.type.tensor_type.elem_type in floats):
                names[name] = None
    for i, name in enumerate(names):
        elem = infos[name].type.tensor_type.elem_type
        for op in ("ReduceMin", "ReduceMax"):  # keepdims: ONNX Runtime cannot drop a reduced axis of size 0
            out = f"range_{i}_{op}"
            graph.node.append(helper.make_node(op, [name], [out], keepdims=1, name=out))
            graph.output.append(helper.make_tensor_value_info(out, elem, None))
    lows: dict[str, list] = {name: [] for name in names}
    highs: dict[str, list] = {name: [] for name in names}
    reader = calibration()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ranges.onnx"
        onnx.save_model(model, str(path), save_as_external_data=_large(src), location="ranges.onnx.data")
        session = open_session(path, optimize=False)
        outputs = [o.name for o in session.get_outputs()]
        samples = 0
        while (feeds := reader.get_next()) is not None:
            samples += 1
            values = dict(zip(outputs, run_session(session, feeds)))
            for i, name in enumerate(names):
                lows[name].append(values[f"range_{i}_ReduceMin"])
                highs[name].append(values[f"range_{i}_ReduceMax"])
    if not samples:
        raise UserError(f"{src}: no calibration samples for this module")
    # over the samples as the calibrator's compute_data does: nanmin/nanmax, so a sample whose tensor
    # had a NaN does not count for it, and a tensor NaN in every sample stays NaN (the guard keeps it FP32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice encountered"
        return {name: (float(np.nanmin(lows[name])), float(np.nanmax(highs[name]))) for name in names}


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


# The handlers register themselves (``@register``) when their modules are imported.
from quant.recipes import fp16 as _fp16, inc as _inc, int8 as _int8  # noqa: E402,F401
