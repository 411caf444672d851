"""The quantize stage: every module's FP32 ONNX model -> ``<out>/onnx/<recipe>/<module>.onnx``.

Needs the export (``onnx/fp32``) and the calibration cache (``calibration/``) of the same model
and frame shape. Writes ``onnx/<recipe>/manifest.json`` (so ``generate --variant <recipe>``
refuses models of another model or shape) and ``quantization/<recipe>.json``: per module, the
compute nodes by precision, the nodes kept FP32 and why, size, CPU latency against FP32, and the
SQNR against FP32 on held-back calibration samples.

Example::

    report = quantize_pipeline(model, settings, Path("runs/r1"), "int8", QuantizeOptions(method="entropy"))
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from quant.pipeline.torch_modules import torch_module
from quant.stages.calibrate import CalibrationSet, open_calibration, task_calibration, task_inputs
from quant.stages.executor import TaskContext
from quant.support.environment import versions
from quant.errors import UserError
from quant.support.files import atomic_write_json
from quant.pipeline.models import LoadedModel
from quant.pipeline.modules import MODULE_IO, check_module_name, present_modules
from quant.pipeline.settings import shape_key
from quant.recipes.manifest import check_onnx_folder, previous_modules, verify_file, write_onnx_manifest
from quant.support.progress import progress
from quant.recipes.census import module_report
from quant.recipes.quantize import QuantizeOptions, quantize
from quant.recipes.records import record
from quant.pipeline.settings import GenerationSettings
from quant.support.target import current_target
from quant.recipes.names import base_recipe, check_recipe, onnx_path

SCHEMA_VERSION = 3  # 3: kernel_sqnr_db, the target and options per module; 2: frame shape, other modules kept


def report_path(root: Path, recipe: str) -> Path:
    return Path(root) / "quantization" / f"{recipe}.json"


def quantize_module(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str,
                    options: QuantizeOptions, module: str, calibration: CalibrationSet) -> dict:
    """Quantize one module's FP32 model under ``root`` into ``onnx/<recipe>/<module>.onnx``; returns its
    report entry (census, size, latency, SQNR on held-back samples). Writes no manifest or report."""
    exported = check_onnx_folder(root, "onnx", model, settings)
    src, dst = verify_file(onnx_path(root, "onnx", module), exported, module), onnx_path(root, recipe, module)
    result = quantize(src, dst, base_recipe(recipe), lambda: calibration.reader(module), options,
                      torch_module=lambda: torch_module(model.pipe, module),
                      input_names=MODULE_IO[module].inputs, output_names=MODULE_IO[module].outputs)
    sample = calibration.reader(module, "holdout").get_next() or calibration.reader(module).get_next()
    return module_report(src, dst, result.kept_fp32, result.notes, calibration.reader(module, "holdout"),
                         sample, recipe=recipe, options=options.record())


def record_quantized(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str,
                     options: QuantizeOptions, entries: dict[str, dict], calibration: dict) -> dict:
    """Write ``onnx/<recipe>/manifest.json`` and ``quantization/<recipe>.json`` for the modules in
    ``entries`` (earlier modules of the same model and shape kept); returns the report.
    ``calibration``: the calibration cache's manifest."""
    write_onnx_manifest(root, recipe, model, settings, {m: onnx_path(root, recipe, m) for m in entries})
    path = report_path(root, recipe)
    report = {"schema_version": SCHEMA_VERSION, "recipe": recipe, "model": model.identity(), "shape": shape_key(settings),
              "options": options.record(), "target": current_target().to_dict(),
              "calibration": {"key": calibration["key"], "spec": calibration["spec"]},
              "versions": versions(), "modules": {**previous_modules(path, model, settings, SCHEMA_VERSION), **entries}}
    atomic_write_json(path, report)
    return report


def quantize_task(context: TaskContext, recipe: str, module: str, options: QuantizeOptions,
                  settings: GenerationSettings, cache: str | None = None) -> dict:
    """``quantize_module`` as a task (``quant.stages.executor``) under ``context.root``: the calibration
    manifest was verified by the driver, and its samples arrive checked by content. ``cache``: the
    range cache (``QuantizeOptions.calibration_cache``) relative to the root."""
    calibration = task_calibration(context.root)
    if cache is not None:
        options = replace(options, calibration_cache=str(context.root / cache))
    return quantize_module(context.model, settings, context.root, recipe, options, module, calibration)


def quantize_inputs(root: Path, module: str, cache: str | None = None) -> tuple[str, ...]:
    """What ``quantize_task`` reads, relative to ``root``."""
    return task_inputs(root, module, ("onnx",)) + ((cache,) if cache else ())


def quantize_pipeline(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str,
                      options: QuantizeOptions = QuantizeOptions(), modules: list[str] | None = None,
                      show_progress: bool = True, calibration: CalibrationSet | None = None) -> dict:
    """Quantize every module (or ``modules``) of ``model`` with ``recipe`` in this process; returns the report.

    ``calibration``: the already opened (and verified) cache under ``root``, so callers that
    quantize module by module do not re-hash every sample each time.
    """
    check_quantize(recipe)
    root = Path(root)
    check_onnx_folder(root, "onnx", model, settings)
    calibration = calibration or open_calibration(root, model)
    check_calibration_shape(calibration.manifest, calibration.folder, settings)
    available = present_modules(model.pipe)
    names = [check_module_name(m, available) for m in modules] if modules else available
    entries = {module: quantize_module(model, settings, root, recipe, options, module, calibration)
               for module in progress(names, f"quantize {recipe}", "module", show_progress)}
    return record_quantized(model, settings, root, recipe, options, entries, calibration.manifest)


def check_quantize(recipe: str) -> None:
    """Raises UserError: ``recipe`` is unknown or does not quantize."""
    check_recipe(recipe)
    if not record(recipe).quantizes:
        raise UserError(f"recipe '{recipe}' is not a quantization recipe (use fp16, int8, int8-dynamic, inc-int8)")


def check_calibration_shape(manifest: dict, folder: Path, settings: GenerationSettings) -> None:
    """Raises UserError: the calibration was captured at another frame shape than ``settings``."""
    if shape_key(manifest["settings"]) != shape_key(settings):
        raise UserError(f"{folder}: calibration was captured at {shape_key(manifest['settings'])}, "
                        f"not {shape_key(settings)}; rerun `quant-audit calibrate` with these settings")
