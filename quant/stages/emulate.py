"""The emulate stage: a quantized module's graph rewritten for another target's int8 kernels.

``onnx/<recipe>/<module>.onnx`` -> ``onnx/<recipe>~<target>/<module>.onnx`` (``quant.recipes.emulate``),
with a manifest so ``generate --variant <recipe>~<target>`` runs it, and
``quantization/<recipe>~<target>.json``: per module, the rewritten nodes, the weight pairs that
can saturate, the nodes left unemulated and why, and on the held-back calibration samples the
emulated graph's SQNR against FP32 and against its own float math (the kernel SQNR that target
would show).

Example::

    report = emulate_pipeline(model, settings, Path("runs/r1"), "int8~avx2", calibration=cal)
    report["modules"]["vae_decoder"]["kernel_sqnr_db"]
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from quant.stages.calibrate import CalibrationSet, task_calibration, task_inputs
from quant.recipes.emulate import emulate_model, float_math_model
from quant.support.files import atomic_write_json
from quant.pipeline.models import LoadedModel
from quant.pipeline.ort_modules import open_session
from quant.pipeline.settings import shape_key
from quant.recipes.manifest import check_onnx_folder, previous_modules, verify_file, write_onnx_manifest
from quant.recipes.census import holdout_errors
from quant.stages.quantize import report_path
from quant.pipeline.settings import GenerationSettings
from quant.support.target import INT8_PATHS, current_target
from quant.recipes.names import onnx_path, split_target

SCHEMA_VERSION = 1


def _finite_min(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else None


def _emulate_one(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str, module: str,
                 calibration: CalibrationSet) -> dict:
    """Write ``onnx/<recipe>/<module>.onnx`` from its source recipe's model; its report entry."""
    source, target = split_target(recipe)
    quantized = check_onnx_folder(root, source, model, settings)
    src, dst = verify_file(onnx_path(root, source, module), quantized, module), onnx_path(root, recipe, module)
    result = emulate_model(src, dst, target)
    reference = open_session(onnx_path(root, "onnx", module), cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        float_math = open_session(float_math_model(src, Path(tmp) / "float_math.onnx"), optimize=False)
    emulated = open_session(dst, optimize=False)
    quantization, kernel, _ = holdout_errors(reference, emulated, float_math, calibration.reader(module, "holdout"))
    return {"nodes": result.nodes, "saturable_pairs": result.pairs, "not_emulated": result.skipped,
            "sqnr_min_db": _finite_min(quantization), "kernel_sqnr_db": _finite_min(kernel),
            "kernel_identical": bool(kernel) and all(v == math.inf for v in kernel)}


def record_emulated(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str, entries: dict) -> dict:
    """The manifest of ``onnx/<recipe>/`` and ``quantization/<recipe>.json`` updated with ``entries``
    (module -> ``_emulate_one``'s entry), other modules' entries kept; returns the report."""
    source, target = split_target(recipe)
    write_onnx_manifest(root, recipe, model, settings, {m: onnx_path(root, recipe, m) for m in entries})
    path = report_path(root, recipe)
    report = {"schema_version": SCHEMA_VERSION, "recipe": recipe, "source_recipe": source, "emulates": target,
              "emulates_description": INT8_PATHS[target], "model": model.identity(), "shape": shape_key(settings),
              "target": current_target().to_dict(),
              "modules": {**previous_modules(path, model, settings, SCHEMA_VERSION), **entries}}
    atomic_write_json(path, report)
    return report


def emulate_task(context, recipe: str, module: str, settings: GenerationSettings) -> dict:
    """One module's emulation (a task, ``quant.stages.executor``) under ``context.root``; returns its
    report entry (the driver records it: ``record_emulated``)."""
    return _emulate_one(context.model, settings, Path(context.root), recipe, module, task_calibration(context.root))


def emulate_inputs(root: Path, recipe: str, module: str) -> tuple[str, ...]:
    """What ``emulate_task`` reads, relative to ``root``."""
    return task_inputs(root, module, ("onnx", split_target(recipe)[0]))


def emulate_pipeline(model: LoadedModel, settings: GenerationSettings, root: Path, recipe: str,
                     modules: list[str], calibration: CalibrationSet) -> dict:
    """Emulate ``recipe`` (``<quantized recipe>~<target>``) for ``modules`` in this process; returns the report."""
    entries = {module: _emulate_one(model, settings, root, recipe, module, calibration) for module in modules}
    return record_emulated(model, settings, root, recipe, entries)
