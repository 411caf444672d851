"""ONNX files exported elsewhere: a user's own export of a pipeline module, mapped to our contract.

``[modules] <name> = "path/to/model.onnx"`` in ``audit.toml`` makes that file the FP32 ONNX of
the module (``quant.stages.export.import_external``). Its inputs and outputs are mapped to the
module's contract (``quant.pipeline.modules.MODULE_IO``) by name:

1. names given in the config (``[modules.<name>] path = ..., inputs = {latent = "x"}``) first;
2. then the contract's own names, then the usual names of other exporters (``ALIASES``:
   diffusers' ``hidden_states``/``encoder_hidden_states``, ``sample``, ``latent_sample``...);
3. a lone remaining input (or output) maps to a lone remaining contract name.

What cannot be mapped is exit 2 naming the expected and the found names. The graph is then
saved under the contract's names (``rename_io``), weights followed wherever its external data
lies, and parity against the PyTorch module is measured as for our own exports.

Example::

    ext = ExternalModule(Path("their/transformer.onnx"), inputs=(("timestep", "t"),))
    mapping(ext, "transformer")   # {"hidden_states": "latent", "t": "timestep", ...} (theirs -> ours)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quant.errors import UserError
from quant.pipeline.modules import MODULE_IO
from quant.support.files import sha256_file

ALIASES: dict[str, tuple[str, ...]] = {
    "input_ids": ("ids", "tokens", "text_input_ids"),
    "attention_mask": ("mask", "text_attention_mask"),
    "text_emb": ("encoder_hidden_states", "last_hidden_state", "prompt_embeds", "context", "text_embeddings"),
    "latent": ("hidden_states", "latents", "latent_sample", "sample", "z", "x"),
    "timestep": ("timesteps", "t", "sigma"),
    "noise_pred": ("out_sample", "sample", "velocity", "output", "out"),
    "video": ("sample", "frames", "decoded", "output", "out"),
}


@dataclass(frozen=True)
class ExternalModule:
    """One ``[modules]`` entry: the file, and contract name -> their name pairs given explicitly."""

    path: Path
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()

    def to_toml(self):
        if not self.inputs and not self.outputs:
            return str(self.path)
        return {"path": str(self.path), "inputs": dict(self.inputs), "outputs": dict(self.outputs)}


def model_files(path: Path) -> list[Path]:
    """The graph file and every external-data file it names.

    Raises:
        UserError: a missing graph or data file.
    """
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a file that is not a model
        raise UserError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0][:160]})") from None
    names = sorted({ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)})
    files = [path]
    for name in names:
        data = path.parent / name
        if not data.is_file():
            raise UserError(f"{path}: external data file '{name}' not found beside it")
        files.append(data)
    return files


def fingerprint(files: list[Path]) -> str:
    """``sha256:`` of the files' names and contents: one ONNX model with its external data."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, dims (int, or None where symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        return f"{self.name} {self.type_text()}"

    def type_text(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


def _spec(info: onnx.ValueInfoProto) -> TensorSpec:
    t = info.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    except (KeyError, TypeError, ValueError):  # a type numpy has no name for
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    shape = None
    if t.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
    return TensorSpec(info.name, dtype, shape)


def signature(model: Path | onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs (without initializers) and outputs, from a file (weights not loaded) or a model."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return ([_spec(i) for i in model.graph.input if i.name not in weights], [_spec(o) for o in model.graph.output])


def _map(kind: str, wanted: tuple[str, ...], found: list[str], explicit: dict[str, str], path: Path,
         module: str) -> dict[str, str]:
    """theirs -> ours for one side (inputs or outputs), or UserError naming both lists."""
    out: dict[str, str] = {}
    for ours, theirs in explicit.items():
        if ours not in wanted:
            raise UserError(f"modules.{module}.{kind}: '{ours}' is not a {kind[:-1]} of {module} "
                            f"(expected: {', '.join(wanted)})")
        if theirs not in found:
            raise UserError(f"{path}: modules.{module}.{kind}: the model has no {kind[:-1]} '{theirs}' "
                            f"(found: {', '.join(found)})")
        out[theirs] = ours
    for ours in wanted:
        if ours in out.values():
            continue
        for candidate in (ours, *ALIASES.get(ours, ())):
            if candidate in found and candidate not in out:
                out[candidate] = ours
                break
    left_ours = [w for w in wanted if w not in out.values()]
    left_theirs = [f for f in found if f not in out]
    if len(left_ours) == 1 and len(left_theirs) == 1:
        out[left_theirs[0]] = left_ours[0]
    elif left_ours or left_theirs:
        raise UserError(
            f"{path}: cannot map its {kind} to {module}'s: expected {', '.join(wanted)}; found {', '.join(found)}"
            + (f" (unmapped: {', '.join(left_theirs)})" if left_theirs else "")
            + f"; name them in [modules.{module}] {kind} = {{{left_ours[0] if left_ours else wanted[0]} = \"...\"}}")
    return out


def mapping(ext: ExternalModule, module: str) -> dict[str, str]:
    """Their graph names -> the contract's, inputs and outputs (see the module doc).

    Raises:
        UserError: a missing or unreadable file, or names that cannot be mapped.
    """
    model_files(ext.path)
    inputs, outputs = ([t.name for t in side] for side in signature(ext.path))
    io = MODULE_IO[module]
    return {**_map("inputs", io.inputs, inputs, dict(ext.inputs), ext.path, module),
            **_map("outputs", io.outputs, outputs, dict(ext.outputs), ext.path, module)}


def rename_io(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them) in place; ``names`` old -> new."""
    names = {old: new for old, new in names.items() if old != new}
    if not names:
        return
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    clash = [new for old, new in names.items() if new in taken and new not in names]
    if clash:  # e.g. their graph has an inner tensor called "latent": move it out of the way first
        rename_io(model, {c: f"{c}__external" for c in clash})
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name in names:
            value.name = names[value.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for i, name in enumerate(node.output):
            if name in names:
                node.output[i] = names[name]


def opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def dynamic_batch(model: onnx.ModelProto) -> bool:
    """Whether the graph's first input has a symbolic (or unknown) first dimension."""
    inputs, _ = signature(model)
    return bool(inputs) and bool(inputs[0].shape) and inputs[0].shape[0] is None
