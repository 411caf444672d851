"""``inc-int8``: Intel Neural Compressor 3.x's PyTorch PT2E static INT8, exported to ONNX QDQ.

neural-compressor 3.x no longer quantizes ONNX graphs itself (its ONNX Runtime backend was
removed), so the module is quantized in PyTorch and the quantized graph exported.

Example::

    quantize(src, dst, "inc-int8", lambda: cal.reader("transformer_2"), torch_module=lambda: adapter,
             input_names=("latent", "timestep", "text_emb"), output_names=("noise_pred",))
"""

from __future__ import annotations

from pathlib import Path

from quant.errors import UserError
from quant.recipes.export import export_program, save_atomically
from quant.recipes.quantize import QuantizeJob, QuantizeResult, register

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
    model = program.model_proto
    folded = fold_weight_chains(model)
    save_atomically(lambda p: _save(model, p), job.dst)
    result = QuantizeResult("inc-int8", job.dst)
    if folded:
        result.notes.append(f"{folded} weight(s) stored as int8: the exported QuantizeLinear -> Clip -> DequantizeLinear "
                            "(-> Transpose) chains on FP32 weights folded, so ONNX Runtime can fuse integer kernels")
    result.notes.append("batch axis is static (1, as the pipeline calls each module): the PT2E graph is exported as captured")
    return result


def _save(model, path) -> None:
    import onnx

    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to a data file
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{Path(path).name}.data")


def fold_weight_chains(model) -> int:
    """Rewrite, in ``model`` (an ``onnx.ModelProto``), every ``W -> QuantizeLinear -> [Clip] ->
    DequantizeLinear`` whose ``W``, scale, zero point and clip bounds are constants into ``W_int8 ->
    DequantizeLinear``, with ``W_int8`` computed once here. PT2E's export keeps FP32 weights and
    quantizes them inside the graph; folded, the file holds int8 weights (a quarter of the bytes)
    and the dequantized values are the ones the chain computed (ONNX rounding: half to even, then
    saturation and the clip). The DequantizeLinear keeps its axis (a ``Transpose`` after it stays:
    dequantizing along the inner axis instead was 1.1x slower in ONNX Runtime, measured).
    Returns how many weights were folded."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def attr(node, key, default):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)

    def const(name):
        """An initializer's value, or a Cast of one (how the exporter writes some zero points)."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Cast" and node.input[0] in inits:
            return numpy_helper.to_array(inits[node.input[0]]).astype(helper.tensor_dtype_to_np_dtype(attr(node, "to", 1)))
        return None

    def only_feeds(name, node) -> bool:
        return name not in outputs and [id(n) for n in consumers.get(name, [])] == [id(node)]

    removed, folded = set(), 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        src = producer.get(dq.input[0])
        clip = None
        if src is not None and src.op_type == "Clip":
            clip, src = src, producer.get(src.input[0])
        if src is None or src.op_type != "QuantizeLinear" or len(src.input) < 3:
            continue
        weight, scale, zero = (const(x) for x in src.input[:3])
        bounds = [const(x) for x in clip.input[1:3]] if clip is not None else []
        if weight is None or scale is None or zero is None or any(b is None for b in bounds) or weight.dtype != np.float32:
            continue
        if not only_feeds(src.output[0], clip or dq) or (clip is not None and not only_feeds(clip.output[0], dq)):
            continue
        shape = [1] * weight.ndim
        if scale.ndim == 1:
            shape[attr(src, "axis", 1) % weight.ndim] = -1
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(weight / scale.reshape(shape)) + zero.reshape(shape).astype(np.float32), info.min, info.max)
        if bounds:
            q = np.clip(q, bounds[0], bounds[1])
        name = f"{src.input[0]}_int8"
        graph.initializer.append(numpy_helper.from_array(q.astype(zero.dtype), name))
        dq.input[0] = name
        removed.update(id(n) for n in (src, clip) if n is not None)
        folded += 1
    dropped = [n for n in graph.node if id(n) in removed]
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    # the FP32 weights, scales and bounds only the removed nodes read (subgraphs never read these)
    used = {x for n in graph.node for x in n.input} | outputs
    orphans = {x for n in dropped for x in n.input if x in inits and x not in used}
    for t in [t for t in graph.initializer if t.name in orphans]:
        graph.initializer.remove(t)
    return folded
