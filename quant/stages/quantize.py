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

from pathlib import Path

from quant.pipeline.torch_modules import torch_module
from quant.stages.calibrate import CalibrationSet, open_calibration
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


def quantize_pipeline(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str,
                      options: QuantizeOptions = QuantizeOptions(), modules: list[str] | None = None,
                      show_progress: bool = True, calibration: CalibrationSet | None = None) -> dict:
    """Quantize every module (or ``modules``) of ``model`` with ``recipe``; returns the report.

    ``calibration``: the already opened (and verified) cache under ``root``, so callers that
    quantize module by module do not re-hash every sample each time.
    """
    check_recipe(recipe)
    if not record(recipe).quantizes:
        raise UserError(f"recipe '{recipe}' is not a quantization recipe (use fp16, int8, int8-dynamic, inc-int8)")
    root = Path(root)
    exported = check_onnx_folder(root, "onnx", model, settings)
    calibration = calibration or open_calibration(root, model)
    if shape_key(calibration.manifest["settings"]) != shape_key(settings):
        raise UserError(f"{calibration.folder}: calibration was captured at {shape_key(calibration.manifest['settings'])}, "
                        f"not {shape_key(settings)}; rerun `quant-audit calibrate` with these settings")
    available = present_modules(model.pipe)
    names = [check_module_name(m, available) for m in modules] if modules else available
    entries = {}
    for module in progress(names, f"quantize {recipe}", "module", show_progress):
        src, dst = verify_file(onnx_path(root, "onnx", module), exported, module), onnx_path(root, recipe, module)
        result = quantize(src, dst, base_recipe(recipe), lambda m=module: calibration.reader(m), options,
                          torch_module=lambda m=module: torch_module(model.pipe, m),
                          input_names=MODULE_IO[module].inputs, output_names=MODULE_IO[module].outputs)
        sample = calibration.reader(module, "holdout").get_next() or calibration.reader(module).get_next()
        entries[module] = module_report(src, dst, result.kept_fp32, result.notes, calibration.reader(module, "holdout"),
                                        sample, recipe=recipe, options=options.record())
    write_onnx_manifest(root, recipe, model, settings, {m: onnx_path(root, recipe, m) for m in entries})
    path = report_path(root, recipe)
    report = {"schema_version": SCHEMA_VERSION, "recipe": recipe, "model": model.identity(), "shape": shape_key(settings),
              "options": options.record(), "target": current_target().to_dict(),
              "calibration": {"key": calibration.manifest["key"], "spec": calibration.manifest["spec"]},
              "versions": versions(), "modules": {**previous_modules(path, model, settings, SCHEMA_VERSION), **entries}}
    atomic_write_json(path, report)
    return report
