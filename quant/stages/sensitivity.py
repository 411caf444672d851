"""Per-node sensitivity of one module to one recipe: which quantized nodes cost the most.

For every compute layer the recipe quantizes (MatMul, Conv, Gemm nodes, grouped by the weight
they read, so a layer the exporter unrolled into several nodes is one unit; in ``fp16``, the
compute nodes the converter turns to FP16), two numbers on held-back calibration inputs:

- ``activation_sqnr_db``: SQNR of the node's output in the fully quantized module against the
  same tensor in FP32 (error accumulated up to that node, as onnxruntime's ``qdq_loss_debug``
  ``xmodel_err``). Both graphs come from the same quantizer call (the FP32 one with every
  node excluded), so tensor names match one to one.
- ``gain_db`` (the ranking): **keep-one-in-FP32**. The module is quantized with only this
  node excluded, and its output SQNR against FP32 is compared with the fully quantized
  module's: the dB this one node costs, measured at the module output. We use keep-one-in
  (not quantize-one-at-a-time) because it measures each node in the context the search
  starts from, a fully quantized module, and because ``int8`` reuses one calibration for
  every candidate (onnxruntime's calibration cache), so each costs a quantizer pass only.

Writes ``<root>/sensitivity/<module>.<recipe>.csv`` (ranked) and ``.json`` (method, the fully
quantized module's SQNR, versions).

Example::

    table = node_sensitivity(model, Path("runs/work/ab12"), "transformer_2", "int8")
    table.head()   # rank, node, op_type, nodes, weight, members, activation_sqnr_db, keep_fp32_sqnr_db, gain_db
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pandas as pd

from quant.stages.calibrate import open_calibration
from quant.support.environment import versions
from quant.errors import UserError
from quant.recipes.export import save_model
from quant.support.files import atomic_path, atomic_write_json, json_number
from quant.pipeline.models import LoadedModel
from quant.pipeline.modules import MODULE_IO
from quant.pipeline.ort_modules import open_session, run_session
from quant.support.progress import progress
from quant.recipes.census import precision_census
from quant.recipes.int8 import preprocess
from quant.recipes.quantize import QuantizeOptions, quantize
from quant.recipes.records import KEEPERS, RECIPES
from quant.stages.workspace import Workspace
from quant.recipes.names import onnx_path
from metrics.tensor import sqnr_db

SCHEMA_VERSION = 2  # 2: ranked per layer (nodes sharing a weight), with a members column
METHOD = ("keep-one-in-FP32: module-output SQNR against FP32 with only this node excluded, minus the fully "
          "quantized module's; activation SQNR: the node's output in the fully quantized module against FP32")


def sensitivity_paths(root: Path, module: str, recipe: str) -> tuple[Path, Path]:
    folder = Workspace.sensitivity(root)
    return folder / f"{module}.{recipe}.csv", folder / f"{module}.{recipe}.json"


def _holdout(calibration, module: str) -> list[dict]:
    reader = calibration.reader(module, "holdout")
    samples = []
    while (sample := reader.get_next()) is not None:
        samples.append(sample)
    if not samples:
        reader = calibration.reader(module)
        samples = [reader.get_next()]
    return samples


def _output_sqnr(path: Path, reference: list[np.ndarray], samples: list[dict]) -> float:
    """Mean SQNR (dB) over ``samples`` of the model's output against ``reference`` outputs."""
    session = open_session(path)
    values = [sqnr_db(run_session(session, s)[0], ref) for s, ref in zip(samples, reference)]
    finite = [v for v in values if math.isfinite(v)]
    if any(v == -math.inf for v in values):
        return -math.inf
    return float(np.mean(finite)) if finite else math.inf


def _with_outputs(path: Path, names: list[str], dst: Path) -> Path:
    """A copy of ``path`` that also outputs the tensors ``names`` (untyped outputs, as qdq_loss_debug)."""
    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    for name in names:  # a tensor only one of the two graphs has (the quantizer renamed it) is skipped
        if name not in existing and name in produced:
            info = onnx.ValueInfoProto()
            info.name = name
            model.graph.output.append(info)
    save_model(model, dst, model.ByteSize() > 1_800_000_000)
    return dst


def _activation_sqnr(quantized: Path, floating: Path, tensors: list[str], samples: list[dict], tmp: Path) -> dict:
    q = open_session(_with_outputs(quantized, tensors, tmp / "q-aug.onnx"))
    f = open_session(_with_outputs(floating, tensors, tmp / "f-aug.onnx"))
    q_names, f_names = [o.name for o in q.get_outputs()], [o.name for o in f.get_outputs()]
    values: dict[str, list[float]] = {t: [] for t in tensors}
    for sample in samples:
        q_out = dict(zip(q_names, run_session(q, sample)))
        f_out = dict(zip(f_names, run_session(f, sample)))
        for t in tensors:
            if t in q_out and t in f_out:
                values[t].append(sqnr_db(q_out[t], f_out[t]))
    return {t: (float(np.mean([x for x in v if math.isfinite(x)])) if any(math.isfinite(x) for x in v)
                else (v[0] if v else math.nan)) for t, v in values.items()}


def weight_groups(graph_path: Path, nodes: list[str]) -> dict[str, list[str]]:
    """``nodes`` grouped by the weight initializer they read (input 1): one layer whose graph
    was unrolled (the Wan VAE decoder repeats each conv per latent-frame chunk) is one unit.
    Nodes without an initializer weight (activation x activation MatMul) are their own unit."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    by_name = {n.name or n.output[0]: n for n in graph.node}
    groups: dict[str, list[str]] = {}
    for name in nodes:
        node = by_name.get(name)
        weight = node.input[1] if node is not None and len(node.input) > 1 and node.input[1] in initializers else name
        groups.setdefault(weight, []).append(name)
    return groups


def node_sensitivity(model: LoadedModel, root: Path, module: str, recipe: str = "int8",
                     options: QuantizeOptions = QuantizeOptions(), show_progress: bool = True) -> pd.DataFrame:
    """Rank the nodes ``recipe`` quantizes in ``module`` (see the module doc) and write the files.

    Raises:
        UserError: a recipe that cannot exclude single nodes, or no export/calibration under ``root``.
    """
    root = Path(root)
    src = onnx_path(root, "onnx", module)
    if not src.is_file():
        raise UserError(f"{src}: no FP32 export of '{module}' here; run `quant-audit export --out {root}` first")
    calibration = open_calibration(root, model)
    io = dict(input_names=MODULE_IO[module].inputs, output_names=MODULE_IO[module].outputs)
    table, extra = rank_nodes(src, lambda: calibration.reader(module), _holdout(calibration, module), recipe, options,
                              module, show_progress, io)
    write_sensitivity(root, module, recipe, table, extra)
    return table


def rank_nodes(src: Path, calibration, samples: list[dict], recipe: str, options: QuantizeOptions, name: str,
               show_progress: bool = True, io: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """The ranking of the module doc for the FP32 graph ``src``: ``calibration`` makes a fresh
    calibration reader, ``samples`` are the held-back inputs it is measured on. Returns the
    table (``rank``, ``module`` = ``name``, ...) and what ``write_sensitivity`` records beside it.

    Raises:
        UserError: a recipe that cannot exclude single nodes, or one that quantizes no node.
    """
    if recipe not in KEEPERS:
        raise UserError(f"sensitivity: recipe '{recipe}' cannot keep single nodes in FP32 (recipes: {', '.join(KEEPERS)})")
    fp32 = open_session(src)
    reference = [run_session(fp32, s)[0] for s in samples]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qa-sens-") as tmp_name:
        tmp = Path(tmp_name)
        source, cached = src, options
        if RECIPES[recipe].shares_calibration:  # pre-process and calibrate once; every candidate reuses both
            source, _ = preprocess(src, tmp)
            cached = QuantizeOptions(**{**options.__dict__, "calibration_cache": str(tmp / "ranges.json"),
                                        "preprocessed": True})

        def build(label: str, exclude: tuple[str, ...]) -> Path:
            opts = QuantizeOptions(**{**cached.__dict__, "nodes_to_exclude": tuple(options.nodes_to_exclude) + exclude})
            dst = tmp / f"{label}.onnx"
            quantize(source, dst, recipe, calibration, opts, **(io or {}))
            return dst

        full = build("full", ())
        census = precision_census(full)
        nodes = census["int8_compute_nodes" if recipe != "fp16" else "fp16_compute_nodes"]
        if not nodes:
            raise UserError(f"sensitivity: '{recipe}' quantizes no compute node of '{name}'; nothing to rank")
        graph = onnx.load(str(full), load_external_data=False).graph
        by_name = {n.name or n.output[0]: n for n in graph.node}
        full_sqnr = _output_sqnr(full, reference, samples)
        # fp16 keeps tensor names; int8 pre-processes, so its FP32 twin comes from the same quantizer call
        floating = src if recipe == "fp16" else build("float", tuple(nodes))
        activations = _activation_sqnr(full, floating, [by_name[n].output[0] for n in nodes], samples, tmp)
        units = weight_groups(floating, nodes)
        rows = []
        for weight, members in progress(list(units.items()), f"sensitivity {name} {recipe}", "layer", show_progress):
            keep = _output_sqnr(build("keep", tuple(members)), reference, samples)
            values = [activations.get(by_name[n].output[0], math.nan) for n in members]
            finite = [v for v in values if math.isfinite(v)]
            rows.append({"node": members[0], "op_type": by_name[members[0]].op_type, "nodes": len(members),
                         "weight": weight, "members": ";".join(members),
                         "activation_sqnr_db": float(np.mean(finite)) if finite else math.nan,
                         "keep_fp32_sqnr_db": keep, "gain_db": keep - full_sqnr})
    table = pd.DataFrame(rows).sort_values("gain_db", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.insert(1, "module", name)
    extra = {"full_sqnr_db": full_sqnr, "samples": len(samples), "seconds": round(time.perf_counter() - start, 2),
             "options": {k: v for k, v in cached.__dict__.items() if k != "calibration_cache"}}
    return table, extra


def write_sensitivity(root: Path, module: str, recipe: str, table: pd.DataFrame, extra: dict) -> None:
    csv_path, json_path = sensitivity_paths(root, module, recipe)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    atomic_write_json(json_path, {"schema_version": SCHEMA_VERSION, "module": module, "recipe": recipe,
                                  "method": METHOD, "nodes": len(table), "versions": versions(),
                                  **{k: json_number(v) if not isinstance(v, dict) else
                                     {a: json_number(b) for a, b in v.items()} for k, v in extra.items()},
                                  "ranking": [{k: json_number(v) for k, v in r.items()} for r in table.to_dict("records")]})


def read_sensitivity(root: Path, module: str, recipe: str) -> pd.DataFrame | None:
    csv_path, _ = sensitivity_paths(root, module, recipe)
    return pd.read_csv(csv_path) if csv_path.is_file() else None
