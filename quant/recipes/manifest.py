"""ONNX folder manifests: ``<root>/onnx/<folder>/manifest.json`` says which model, frame shape and
files a folder of exported or quantized modules holds, so nothing runs a graph made for another
model or shape.

Example::

    write_onnx_manifest(root, "int8", model, settings, {"transformer": onnx_path(root, "int8", "transformer")})
    check_onnx_folder(root, "int8", model, settings)["modules"]["transformer"]["sha256"]
"""

from __future__ import annotations

import json
from pathlib import Path

from quant.errors import UserError
from quant.pipeline.models import LoadedModel
from quant.pipeline.modules import MODULE_IO
from quant.pipeline.settings import GenerationSettings, shape_key
from quant.recipes.names import onnx_dir
from quant.support.files import atomic_write_json, file_hash, sha256_file

MANIFEST = "manifest.json"


def previous_modules(path: Path, model: LoadedModel, settings: GenerationSettings, schema_version: int = 1) -> dict:
    """The ``modules`` of an earlier record at ``path`` made for the same model and frame shape,
    else {}: a run over some modules (``--module``) keeps the others' entries."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = (doc.get("schema_version") == schema_version and doc.get("shape") == shape_key(settings)
            and doc.get("model", {}).get("fingerprint") == model.fingerprint)
    return dict(doc.get("modules", {})) if same else {}


def write_onnx_manifest(root: Path, recipe: str, model: LoadedModel, settings: GenerationSettings,
                        files: dict[str, Path], extra: dict[str, dict] | None = None) -> None:
    """Write ``<root>/onnx/<folder>/manifest.json`` for ``files`` (module -> ONNX path), keeping
    earlier entries of the same model and shape. ``check_onnx_folder`` reads it back."""
    path = onnx_dir(root, recipe) / MANIFEST
    entries = previous_modules(path, model, settings)
    for module, onnx_file in files.items():
        entries[module] = {"file": Path(onnx_file).name, "sha256": sha256_file(Path(onnx_file)),
                           "inputs": list(MODULE_IO[module].inputs), "outputs": list(MODULE_IO[module].outputs),
                           **(extra or {}).get(module, {})}
    atomic_write_json(path, {"schema_version": 1, "recipe": recipe, "model": model.identity(),
                             "shape": shape_key(settings), "modules": entries})


def verify_file(path: Path, manifest: dict, module: str) -> Path:
    """``path`` as its manifest recorded it: a file replaced since (by hand, or by another tool)
    is refused instead of being run under the old name.

    Raises:
        UserError: the module is not listed, or the file's SHA-256 differs from the recorded one.
    """
    entry = manifest.get("modules", {}).get(module)
    if entry is None:
        raise UserError(f"{Path(path).parent / MANIFEST}: no '{module}' model listed; export or quantize it first")
    if not Path(path).is_file():
        raise UserError(f"{path}: ONNX model not found")
    if entry.get("sha256") and file_hash(Path(path)) != entry["sha256"]:
        from quant.recipes.quantize import check_onnx_file

        check_onnx_file(Path(path))  # a damaged file says so; a valid one was replaced:
        raise UserError(f"{path}: changed since {Path(path).parent / MANIFEST} recorded it (SHA-256 differs); "
                        "export or quantize it again")
    return Path(path)


def check_onnx_folder(root: Path, recipe: str, model: LoadedModel, settings: GenerationSettings) -> dict:
    """Read ``<root>/onnx/<folder>/manifest.json`` and check it was made for this model and shape.

    Raises:
        UserError: no models there, another model's models, or another frame/text shape.
    """
    folder = onnx_dir(root, recipe)
    manifest_path = folder / MANIFEST
    hint = "quant-audit export" if recipe == "onnx" else f"quant-audit quantize --recipe {recipe}"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: no '{recipe}' models here; run `{hint} --out {root}` first")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest_path}: unreadable manifest ({exc})") from None
    found = manifest.get("model", {}).get("fingerprint")
    if found != model.fingerprint:
        raise UserError(
            f"{manifest_path}: models were exported from fingerprint {found}, not {model.fingerprint} "
            f"('{model.name}'); rerun `{hint}` for this model"
        )
    if manifest.get("shape") != shape_key(settings):
        raise UserError(
            f"{manifest_path}: models were exported for {manifest.get('shape')}, not {shape_key(settings)}; "
            f"rerun `{hint}` with these settings"
        )
    return manifest
