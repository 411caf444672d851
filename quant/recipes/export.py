"""Export pipeline modules to FP32 ONNX with ``torch.onnx.export(..., dynamo=True)``.

Each module is exported through its adapter (``quant.pipeline.torch_modules``) with the DESIGN.md input and
output names, a dynamic batch axis where the graph allows it (falling back to a static batch,
recorded, where ``torch.export`` cannot keep it symbolic), checked with ``onnx.checker``, and
saved atomically. Models over the exporter's size threshold go to the external-data format;
``force_external_data`` takes that path on any model so it is tested on tiny ones. Optional
simplification with onnxslim happens in ``quant.exporting`` so that it is re-verified.

Example::

    record = export_module(pipe, "transformer", example_inputs, Path("out/onnx/fp32/transformer.onnx"))
    record.seconds, record.dynamic_batch, record.external_data
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from quant.pipeline.torch_modules import torch_module
from quant.errors import CheckFailed, UserError, first_line
from quant.pipeline.modules import MODULE_IO
from quant.support.quiet import quiet

MIN_OPSET = 18
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportOptions:
    """How modules are exported.

    Attributes:
        opset: ONNX opset (>= 18: the dynamo exporter's minimum for these graphs).
        force_external_data: always write weights to ``<module>.onnx.data`` (else only > 1.5 GB,
            torch's threshold, well under protobuf's 2 GB limit).
        dynamic_batch: try a symbolic batch axis on every input.
        simplify: run onnxslim after export and keep its graph only if parity still holds.
    """

    opset: int = DEFAULT_OPSET
    force_external_data: bool = False
    dynamic_batch: bool = True
    simplify: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise UserError(f"opset must be an integer >= {MIN_OPSET}, got {self.opset!r}")


@dataclass
class ExportRecord:
    """What one export did. ``path`` is the final ONNX file."""

    module: str
    path: str
    seconds: float
    opset: int
    dynamic_batch: bool
    external_data: bool
    size_bytes: int
    simplified: bool = False
    simplify_note: str = ""
    source: str = ""  # an external file ([modules] in audit.toml) this module was imported from
    mapping: dict | None = None  # its graph names -> ours, when imported

    def to_dict(self) -> dict:
        return asdict(self)


def batch_of_two(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Example inputs with batch 2, from two captured calls (or one repeated).

    ``torch.export`` specialises a size-1 dimension, so a batch axis only stays symbolic when
    the example batch is larger than one.
    """
    first = samples[0]
    second = next((s for s in samples[1:] if all(s[k].shape == first[k].shape for k in first)), first)
    return {k: np.concatenate([first[k], second[k]], axis=0) for k in first}


def export_program(adapter, args, names, outputs, opset, dynamic):
    """``torch.onnx.export(dynamo=True)`` of ``adapter``, optimized by ``optimize_graph``."""
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = {name: {0: batch} for name in names}
    with quiet("torch", "torch.onnx", "torch.export", "onnxscript", "torch._dynamo", level=logging.CRITICAL):
        program = torch.onnx.export(
            adapter, args, None, dynamo=True, opset_version=opset, input_names=list(names),
            output_names=list(outputs), dynamic_shapes=dynamic_shapes, verbose=False, optimize=False,
        )
        optimize_graph(program.model)
    return program


def optimize_graph(model) -> None:
    """What ``torch.onnx.export(optimize=True)`` does to the graph (onnxscript's ``optimize_ir``: constant
    folding and its default rewrite rules, twice, then the clean-up passes; then its ONNX fusions), in
    place on ``model`` (an ``onnx_ir.Model``), without the ``SlicesSplit`` rule.

    ``SlicesSplit`` (two Slices halving a tensor's last axis -> one Split) is a two-node pattern
    tried on pairs of Slices; on the unrolled VAE decoder's cache Slices that took most of the
    optimizer's time (8.5 of 12 s a pass on the ``inc-int8`` graph, measured), and it rewrote
    nothing in any of our exports (it wants Slices without steps; the exporter writes steps, and
    these Slices cut the time axis). The passes are onnxscript 0.7's ``optimize_ir`` with the rule
    list as a parameter, which it does not take (``tests/test_export.py`` compares the two).
    """
    import onnx_ir.passes.common as common
    from onnx_ir.passes import PassManager, Sequential
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import onnx_fusions
    from onnxscript.rewriter.rules.common import slice_split_rule

    rules = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule]
    Sequential(
        common.InlinePass(),
        PassManager([_constant_folding.FoldConstantsPass(
                         shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                         output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                     rewriter.RewritePass(rules),
                     common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
                    steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    onnx_fusions.fuse(model)


def save_atomically(save, dest: Path, verify=None) -> bool:
    """Call ``save(tmp_model_path)`` in a private folder, then move its files beside ``dest``.

    If ``verify(tmp_model_path)`` is given and returns False, nothing is moved (returns False).

    External data keeps the file name the model was saved under, so the model is saved under
    its final name inside the temporary folder; the model file is moved last, so a reader never
    sees a model whose data file is missing.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save(tmpdir / dest.name)
        if verify is not None and not verify(tmpdir / dest.name):
            return False
        stale = dest.parent / (dest.name + ".data")
        for produced in sorted(tmpdir.iterdir(), key=lambda p: p.name == dest.name):
            os.replace(produced, dest.parent / produced.name)
        if stale.exists() and not _uses_external_data(dest):
            stale.unlink()  # left by an earlier export of this module with external data
        return True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def onnx_size_bytes(path: Path) -> int:
    """Size of the model file plus its external data file, if any."""
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def check_onnx(path: Path, module: str) -> None:
    """``onnx.checker`` on the saved file (by path, so external data is followed).

    Raises:
        CheckFailed: the checker rejects the graph.
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"{module}: exported ONNX fails onnx.checker: {first_line(exc)}") from None


def export_module(pipe, module: str, example: dict[str, np.ndarray], dest: Path,
                  options: ExportOptions = ExportOptions()) -> ExportRecord:
    """Export ``module`` of ``pipe`` to ``dest`` (FP32 ONNX) and check it.

    Args:
        example: inputs under the DESIGN.md names, batch >= 2 for a dynamic batch axis.
        dest: the ``.onnx`` path; its external data, if any, goes to ``dest + ".data"``.

    Returns:
        An ``ExportRecord``; ``dynamic_batch`` is False where the graph had to be specialised.
    """
    io_names = MODULE_IO[module]
    adapter = torch_module(pipe, module)
    args = tuple(torch.from_numpy(example[name]) for name in io_names.inputs)
    start = time.perf_counter()
    dynamic = options.dynamic_batch
    try:
        program = export_program(adapter, args, io_names.inputs, io_names.outputs, options.opset, dynamic)
    except Exception:  # noqa: BLE001 - retried static; a second failure propagates as an export bug
        if not dynamic:
            raise
        dynamic = False
        program = export_program(adapter, args, io_names.inputs, io_names.outputs, options.opset, False)
    external = True if options.force_external_data else None
    save_atomically(lambda p: program.save(p, external_data=external), dest)
    seconds = time.perf_counter() - start
    check_onnx(dest, module)
    return ExportRecord(
        module=module, path=str(dest), seconds=round(seconds, 2), opset=options.opset, dynamic_batch=dynamic,
        external_data=_uses_external_data(dest), size_bytes=onnx_size_bytes(dest),
    )


def save_model(model: onnx.ModelProto, dest: Path, external: bool, verify=None) -> bool:
    """Save ``model`` to ``dest`` (weights in ``dest.data`` when ``external``) through
    ``save_atomically``; returns False if ``verify`` rejected it."""
    return save_atomically(lambda p: onnx.save_model(model, str(p), save_as_external_data=external,
                                                     location=p.name + ".data" if external else None), dest, verify)


def simplify_onnx(path: Path, external_data: bool, verify) -> bool:
    """Replace ``path`` by onnxslim's simplification of it if ``verify(candidate_path)`` holds.

    Returns:
        True if the simplified graph was kept.
    """
    import onnxslim

    with quiet("onnxslim"):
        model = onnxslim.slim(str(path))
    return save_model(model, path, external_data, verify)
