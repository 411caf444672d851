"""``inc-int8``: Intel Neural Compressor 3.x's PyTorch PT2E static INT8, exported to ONNX QDQ.

neural-compressor 3.x no longer quantizes ONNX graphs itself (its ONNX Runtime backend was
removed), so the module is quantized in PyTorch and the quantized graph exported.

Example::

    quantize(src, dst, "inc-int8", lambda: cal.reader("transformer_2"), torch_module=lambda: adapter,
             input_names=("latent", "timestep", "text_emb"), output_names=("noise_pred",))
"""

from __future__ import annotations

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
    save_atomically(lambda p: program.save(p, external_data=None), job.dst)
    result = QuantizeResult("inc-int8", job.dst)
    result.notes.append("batch axis is static (1, as the pipeline calls each module): the PT2E graph is exported as captured")
    return result
