"""``fp16``: onnxruntime's float16 converter with FP32 inputs/outputs kept, behind an overflow guard.

The FP32 graph runs on the calibration inputs (``quant.recipes.quantize.tensor_ranges`` records
every tensor's range as onnxruntime's MinMax calibrator would); nodes whose outputs (or inputs)
leave the FP16 range (|x| > 65504) stay FP32, reported with the range seen.

Example::

    quantize(src, dst, "fp16", lambda: cal.reader("vae_decoder"))   # quant.recipes.quantize
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from quant.recipes.export import save_model
from quant.recipes.quantize import QuantizeJob, QuantizeResult, _large, _sort_topologically, register, tensor_ranges

FP16_MAX = 65504.0


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
