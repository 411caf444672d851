"""The export stage: capture real inputs, export every module, prove parity, write the record.

1. Generate with the FP32 PyTorch pipeline and record each module's inputs (``quant.pipeline.capture``).
2. Export each module to ``<out>/onnx/fp32/<module>.onnx`` (``quant.recipes.export``).
3. Compare each ONNX module with its PyTorch module on the recorded inputs (``quant.recipes.parity``);
   with ``simplify``, simplify and keep the result only if parity still holds.
4. Write ``<out>/parity.json`` and ``<out>/onnx/fp32/manifest.json`` (model fingerprint and
   shape, so later stages refuse models from another model or size).

Example::

    report = export_pipeline(model, settings, Path("runs/r1"), prompts=["a red kite"])
    [p.module for p in report.parity if not p.passed]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from quant.pipeline.torch_modules import torch_module
from quant.pipeline.capture import Sample, SampleList, record_inputs
from quant.support.environment import versions
from quant.errors import UserError
from quant.recipes.export import (ExportOptions, ExportRecord, batch_of_two, export_module, onnx_size_bytes, save_model,
                                  simplify_onnx)
from quant.recipes.external import ExternalModule, dynamic_batch, mapping, model_files, opset as external_opset, rename_io
from quant.recipes.quantize import EXTERNAL_DATA_BYTES
from quant.support.files import atomic_write_json
from quant.pipeline.models import LoadedModel
from quant.pipeline.modules import check_module_name, present_modules
from quant.pipeline.ort_modules import open_session
from quant.recipes.parity import PARITY_THRESHOLD, Parity, measure_parity
from quant.support.progress import progress
from quant.pipeline.sampling import generate_video
from quant.stages.calibrate import check_modules_called
from quant.pipeline.settings import shape_key
from quant.recipes.manifest import previous_modules, write_onnx_manifest
from quant.pipeline.settings import GenerationSettings
from quant.recipes.names import onnx_path

SCHEMA_VERSION = 1
PARITY_SAMPLES = 4


@dataclass
class ExportReport:
    """Per-module export records and parity, in pipeline order."""

    records: list[ExportRecord] = field(default_factory=list)
    parity: list[Parity] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [p.module for p in self.parity if not p.passed]


def spread(samples: list[Sample], k: int) -> list[Sample]:
    """``k`` samples evenly spaced over the recording (a DiT's inputs move with the timestep)."""
    if len(samples) <= k:
        return list(samples)
    step = (len(samples) - 1) / (k - 1) if k > 1 else 0
    return [samples[round(i * step)] for i in range(k)]


def capture_inputs(model: LoadedModel, settings: GenerationSettings, prompts: list[str], seed: int) -> SampleList:
    """Record every module call of FP32 PyTorch generations of ``prompts`` (at most two) with ``seed``."""
    recorded = SampleList(per_module=10_000)
    with record_inputs(model.pipe, recorded):
        for prompt in prompts[:2]:
            generate_video(model.pipe, prompt, seed, settings)
    return recorded


def _export_one(model, module, samples, root, options, bar) -> tuple[ExportRecord, Parity]:
    dest = onnx_path(root, "onnx", module)
    inputs = [s.inputs for s in samples]
    bar.set_postfix_str(f"{module}: export")
    record = export_module(model.pipe, module, batch_of_two(inputs), dest, options)
    adapter = torch_module(model.pipe, module)
    bar.set_postfix_str(f"{module}: parity")
    parity = measure_parity(module, adapter, open_session(dest, cpu=True), inputs)  # the graph, CPU against CPU
    if options.simplify and parity.passed:
        bar.set_postfix_str(f"{module}: simplify")
        checked: dict[str, Parity] = {}

        def verify(candidate: Path) -> bool:
            checked["p"] = measure_parity(module, adapter, open_session(candidate, cpu=True), inputs)
            return checked["p"].passed

        record.simplified = simplify_onnx(dest, record.external_data, verify)
        if record.simplified:
            parity = checked["p"]
            record.size_bytes = onnx_size_bytes(dest)
        else:
            record.simplify_note = f"simplified graph rejected: rel-L2 {checked['p'].rel_l2:.3g}"
    return record, parity


def import_external(model: LoadedModel, settings: GenerationSettings, root: Path, prompts: list[str], module: str,
                    external: ExternalModule, seed: int = 0, show_progress: bool = True) -> ExportReport:
    """Make the user's file ``external`` the FP32 ONNX of ``module``: its inputs and outputs renamed
    to the contract (``quant.recipes.external``), saved as ``onnx/fp32/<module>.onnx`` with its
    weights (external data followed), and parity measured against the PyTorch module on the
    same captured inputs as our own exports.

    Raises:
        UserError: the file is missing or unmappable, or ONNX Runtime cannot run it on the
            pipeline's inputs (shapes, types), naming the file.
    """
    check_modules_called(model.pipe, settings)
    settings.check_for(model.pipe)
    root = Path(root)
    names = mapping(external, module)
    recorded = capture_inputs(model, settings, prompts, seed)
    dest = onnx_path(root, "onnx", module)
    start = time.perf_counter()
    with progress([module], "import", "module", show_progress):
        graph = onnx.load(str(external.path))  # external data loaded from wherever the file names it
        rename_io(graph, names)
        save_model(graph, dest, graph.ByteSize() >= EXTERNAL_DATA_BYTES)
        record = ExportRecord(module=module, path=str(dest), seconds=round(time.perf_counter() - start, 2),
                              opset=external_opset(graph), dynamic_batch=dynamic_batch(graph),
                              external_data=len(model_files(external.path)) > 1, size_bytes=onnx_size_bytes(dest),
                              source=str(external.path), mapping=names)
        samples = [s.inputs for s in spread(recorded[module], PARITY_SAMPLES)]
        try:
            parity = measure_parity(module, torch_module(model.pipe, module), open_session(dest, cpu=True), samples)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for shape/type mismatches
            shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in samples[0].items())
            raise UserError(f"{external.path}: ONNX Runtime cannot run it on {module}'s inputs ({shapes}): "
                            f"{str(exc).splitlines()[0][:200]}") from None
    report = ExportReport([record], [parity])
    _write_records(model, settings, root, report, prompts, seed, ExportOptions())  # the record holds its opset
    return report


def _write_records(model, settings, root, report, prompts, seed, options) -> None:
    parity_path = root / "parity.json"
    modules = previous_modules(parity_path, model, settings, SCHEMA_VERSION)
    for record, parity in zip(report.records, report.parity):
        modules[record.module] = {**parity.to_dict(), "export": {**record.to_dict(), "path": Path(record.path).name}}
    atomic_write_json(parity_path, {
        "schema_version": SCHEMA_VERSION,
        "model": model.identity(),
        "settings": settings.to_dict(),
        "shape": shape_key(settings),
        "capture": {"prompts": prompts[:2], "seed": seed, "samples_per_module": PARITY_SAMPLES},
        "threshold": PARITY_THRESHOLD,
        "metric": "worst per-call relative L2 (||onnx-torch||/||torch||) and max-abs over captured calls",
        "options": {"opset": options.opset, "force_external_data": options.force_external_data,
                    "dynamic_batch": options.dynamic_batch, "simplify": options.simplify},
        "versions": versions(),
        "passed": all(m["passed"] for m in modules.values()),
        "modules": modules,
    })
    write_onnx_manifest(root, "onnx", model, settings, {r.module: Path(r.path) for r in report.records},
                        {p.module: {"parity_passed": p.passed} for p in report.parity})


class _Quiet:
    def set_postfix_str(self, text: str) -> None:
        pass


def export_task(context, module: str, settings: GenerationSettings, prompts: list[str], options: ExportOptions,
                seed: int = 0) -> tuple[ExportRecord, Parity]:
    """One module's export and parity (a task, ``quant.stages.executor``): inputs captured from
    FP32 generations of ``prompts``, ``onnx/fp32/<module>.onnx`` written under ``context.root``.
    The records shared by the modules are the driver's to write (``record_export``)."""
    model = context.model
    check_modules_called(model.pipe, settings)
    settings.check_for(model.pipe)
    recorded = capture_inputs(model, settings, prompts, seed)
    return _export_one(model, module, spread(recorded[module], PARITY_SAMPLES), Path(context.root), options, _Quiet())


def record_export(model: LoadedModel, settings: GenerationSettings, root: Path, prompts: list[str],
                  options: ExportOptions, record: ExportRecord, parity: Parity, seed: int = 0) -> None:
    """``parity.json`` and the FP32 manifest updated with one ``export_task``'s module."""
    record = replace(record, path=str(onnx_path(root, "onnx", record.module)))  # where the driver has it
    _write_records(model, settings, Path(root), ExportReport([record], [parity]), prompts, seed, options)


def export_pipeline(model: LoadedModel, settings: GenerationSettings, root: Path, prompts: list[str],
                    seed: int = 0, options: ExportOptions = ExportOptions(),
                    modules: list[str] | None = None, show_progress: bool = True) -> ExportReport:
    """Export and parity-check every module (or ``modules``) of ``model``; see the module doc."""
    check_modules_called(model.pipe, settings)
    settings.check_for(model.pipe)
    root = Path(root)
    available = present_modules(model.pipe)
    names = [check_module_name(m, available) for m in modules] if modules else available
    recorded = capture_inputs(model, settings, prompts, seed)
    report = ExportReport()
    with progress(names, "export", "module", show_progress) as bar:
        for module in bar:
            record, parity = _export_one(model, module, spread(recorded[module], PARITY_SAMPLES), root, options, bar)
            report.records.append(record)
            report.parity.append(parity)
    _write_records(model, settings, root, report, prompts, seed, options)
    return report
