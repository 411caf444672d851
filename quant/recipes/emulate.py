"""The int8 kernels of another execution target, emulated; and a quantized graph's own float math.

ONNX Runtime fuses QDQ patterns into integer kernels (``DequantizeLinear -> MatMul/Conv ->
QuantizeLinear`` becomes ``QLinearMatMul``/``QLinearConv``, ``DQ -> MatMul`` becomes
``MatMulIntegerToFloat``); a dynamic graph's ``MatMulInteger`` is an integer kernel already.
On x86 those kernels flip s8 activations to u8 (+128) and multiply u8 x s8. Measured on an
AVX2-only CPU (``tests/test_emulate.py`` checks it against ONNX Runtime on whatever CPU runs it):

- MatMul pairs adjacent K entries ``(2j, 2j+1)``; Conv pairs adjacent *input channels at the same
  kernel tap* (ONNX Runtime's NHWC/ConvSym packing), padding with the activation zero point;
- without VNNI each pair sum of raw u8 x s8 products saturates to int16 before int32
  accumulation (VPMADDUBSW); with VNNI nothing saturates.

``emulate_model(src, dst, "avx2")`` rewrites a quantized graph so that ONNX Runtime, run
without graph optimizations (``open_session(optimize=False)``), computes what the saturating
kernels compute: the float math of the QDQ graph plus, for every node the kernels would run
and every (output channel, input pair) whose weights can saturate (255 * (|w0| + |w1|) > 32767),
the correction ``clip(s, -32768, 32767) - s`` of the raw pair sum ``s``, scaled like the output.
``"vnni"`` is the exact integer math (the float math, with integer ops computed in float64).
``float_math_model`` is the reference ``kernel_sqnr_db`` compares the deployed graph with.

Limits, left to the float math and listed in ``EmulationResult.skipped`` with the reason:
activation x activation MatMuls (attention: both operands known only at run time), grouped Conv,
weights with a non-zero zero point, and weights that reach the node through a layout op or are
quantized inside the graph (inc-int8's export; ONNX Runtime folds those under new names); the rewrite's extra Conv has one output channel per weight pair
that can saturate, so it grows with the model (fine for the built-in models).

Example::

    result = emulate_model(Path("onnx/int8/vae_decoder.onnx"), Path("onnx/int8~avx2/vae_decoder.onnx"), "avx2")
    result.pairs          # weight pairs that can saturate on an AVX2-only CPU
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quant.recipes.export import save_model
from quant.support.target import check_emulation_target

KERNEL_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger",
              "ConvInteger", "NhwcQLinearConv")
INT16 = (-32768.0, 32767.0)
_EXTERNAL = 2 * 1024**3


@dataclass
class EmulationResult:
    """What ``emulate_model`` did: nodes rewritten, weight pairs that can saturate, nodes left as is."""

    target: str
    nodes: list[str] = field(default_factory=list)
    pairs: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def kernel_weights(path: Path) -> set[str]:
    """Names of the weight tensors ONNX Runtime feeds to integer kernels in ``path``'s graph.

    ORT's extended optimizations (where QDQ fusions happen) are applied and the optimized graph
    read back; initializer names survive fusion, so they identify the original compute nodes.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return {i for n in graph.node if n.op_type in KERNEL_OPS for i in n.input if i}


class _Graph:
    """Lookups over one model's graph, and helpers that append nodes and initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.count = 0

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"emu_{self.count}_{stem}"

    def add_init(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs) -> str:
        out = self.fresh(stem)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reroute(self, node: onnx.NodeProto, make_output) -> None:
        """Rename ``node``'s output and let ``make_output(raw)`` produce the old name (consumers and
        graph outputs keep reading it)."""
        out = node.output[0]
        node.output[0] = self.fresh("raw")
        self.graph.node.append(helper.make_node("Identity", [make_output(node.output[0])], [out]))


@dataclass
class _QdqNode:
    """A compute node reading DQ(activation) and DQ(int8 weight): what the rewrite needs."""

    node: onnx.NodeProto
    x_q: str            # the quantized activation tensor (int8 or uint8)
    x_scale: float
    x_zero: int
    x_signed: bool
    weight: np.ndarray  # int values, MatMul [K, N] or Conv [O, C, *k]
    w_scale: np.ndarray  # per output channel (broadcast from per-tensor)


def _qdq(g: _Graph, node: onnx.NodeProto) -> tuple[_QdqNode | None, str]:
    """Match ``node`` to DQ(x_q) x DQ(weight); returns (match, why not)."""
    if len(node.input) < 2:
        return None, "no weight input"
    act, wt = (g.producer.get(node.input[0]), g.producer.get(node.input[1]))
    if not (act and wt and act.op_type == wt.op_type == "DequantizeLinear"):
        return None, ("weights reach it through a layout op (e.g. inc-int8's DequantizeLinear -> Transpose), "
                      "which ONNX Runtime constant-folds under new names: not matched")
    weight = g.const(wt.input[0])
    w_scale = g.const(wt.input[1])
    x_scale = g.const(act.input[1])
    x_zero = g.const(act.input[2]) if len(act.input) > 2 and act.input[2] else np.zeros((), np.uint8)
    w_zero = g.const(wt.input[2]) if len(wt.input) > 2 and wt.input[2] else np.zeros(())
    if weight is None or w_scale is None or x_scale is None or x_zero is None or x_scale.size != 1:
        return None, ("weights, scales or zero points are not constants (an activation x activation MatMul, "
                      "or weights quantized inside the graph)")
    if w_zero is not None and np.any(w_zero != 0):
        return None, "weight zero point is not 0"
    if node.op_type == "Conv" and next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
        return None, "grouped Conv"
    channels = weight.shape[0] if node.op_type == "Conv" else weight.shape[-1]
    w_scale = np.broadcast_to(np.asarray(w_scale, np.float64).reshape(-1), (channels,)).copy()
    return _QdqNode(node, act.input[0], float(x_scale.reshape(())), int(x_zero.reshape(())),
                    x_zero.dtype == np.int8, weight.astype(np.int64), w_scale), ""


def _reads_quantized(g: _Graph, node: onnx.NodeProto) -> bool:
    """Whether an input of ``node`` comes from a DequantizeLinear, directly or through a layout op."""
    for name in node.input[:2]:
        producer = g.producer.get(name)
        while producer is not None and producer.op_type in ("Transpose", "Reshape", "Identity"):
            producer = g.producer.get(producer.input[0])
        if producer is not None and producer.op_type == "DequantizeLinear":
            return True
    return False


def _risky(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """Weight pairs whose u8 x s8 pair sum can leave int16 for some u8 activations."""
    high = 255 * (np.maximum(w0, 0) + np.maximum(w1, 0))
    low = 255 * (np.minimum(w0, 0) + np.minimum(w1, 0))
    return (high > INT16[1]) | (low < INT16[0])


def _pair_selection(w: np.ndarray, scale: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """For a MatMul weight ``w`` [K, N]: ``pick`` [K, R], the two weights of each of the R pairs
    ``(2j, 2j+1)`` that can saturate (so ``a @ pick`` is every such raw pair sum), and ``gather``
    [R, N], which output column each pair belongs to times ``scale[n]``. None when none can."""
    K, N = w.shape
    wp = np.pad(w.astype(np.int64), ((0, K % 2), (0, 0)))
    risky = np.argwhere(_risky(wp[0::2], wp[1::2]))  # (pair j, column n)
    if not len(risky):
        return None
    pick = np.zeros((wp.shape[0], len(risky)), dtype)
    gather = np.zeros((len(risky), N), dtype)
    for r, (j, n) in enumerate(risky):
        pick[2 * j, r], pick[2 * j + 1, r] = wp[2 * j, n], wp[2 * j + 1, n]
        gather[r, n] = scale[n]
    return pick[:K], gather


def _saturation(g: _Graph, pair_sums: str) -> str:
    clip = g.node("Clip", [pair_sums, g.add_init("lo", np.array(INT16[0], np.float32)),
                           g.add_init("hi", np.array(INT16[1], np.float32))], "clipped")
    return g.node("Sub", [clip, pair_sums], "lost")


def _u8(g: _Graph, m: _QdqNode, dtype=np.float32) -> str:
    """The activation as the kernel sees it: raw u8 values (s8 + 128), as floats."""
    cast = g.node("Cast", [m.x_q], "act", to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    return g.node("Add", [cast, g.add_init("flip", np.array(128, dtype))], "u8") if m.x_signed else cast


def _matmul_correction(g: _Graph, m: _QdqNode) -> tuple[str, int] | None:
    """Correction added to a MatMul's output: sum of ``clip(s) - s`` over saturating K pairs."""
    selection = _pair_selection(m.weight, m.x_scale * m.w_scale, np.float32) if m.weight.ndim == 2 else None
    if selection is None:
        return None
    pick, gather = selection
    sums = g.node("MatMul", [_u8(g, m), g.add_init("pairs", pick)], "pair_sums")
    return g.node("MatMul", [_saturation(g, sums), g.add_init("gather", gather)], "correction"), pick.shape[1]


def _conv_correction(g: _Graph, m: _QdqNode) -> tuple[str, int] | None:
    """The same for a Conv: pairs of adjacent input channels at one kernel tap."""
    w = m.weight
    O, C = w.shape[:2]
    taps = w.shape[2:]
    wp = np.pad(w, [(0, 0), (0, C % 2)] + [(0, 0)] * len(taps))
    risky = np.argwhere(_risky(wp[:, 0::2], wp[:, 1::2]))  # (o, pair i, *tap)
    if not len(risky):
        return None
    R = len(risky)
    pick = np.zeros((R, C, *taps), np.float32)
    bias = np.zeros(R, np.float32)
    gather = np.zeros((O, R) + (1,) * len(taps), np.float32)
    zero_u8 = m.x_zero + 128 if m.x_signed else m.x_zero
    for r, (o, i, *tap) in enumerate(risky):
        for c in (2 * i, 2 * i + 1):
            if c < C:
                pick[(r, c, *tap)] = w[(o, c, *tap)]
        bias[r] = zero_u8 * pick[(r, slice(None), *tap)].sum()
        gather[(o, r) + (0,) * len(taps)] = m.x_scale * m.w_scale[o]
    # Centred activations pad with 0 where the kernel pads with the zero point: the bias adds
    # zero_point x weights back, so every pair sum is the raw u8 one.
    centred = g.node("Sub", [g.node("Cast", [m.x_q], "act", to=TensorProto.FLOAT),
                             g.add_init("zero", np.array(m.x_zero, np.float32))], "centred")
    attrs = {a.name: helper.get_attribute_value(a) for a in m.node.attribute if a.name != "group"}
    sums = g.node("Conv", [centred, g.add_init("pairs", pick), g.add_init("bias", bias)], "pair_sums", **attrs)
    return g.node("Conv", [_saturation(g, sums), g.add_init("gather", gather)], "correction"), R


def _integer_matmul(g: _Graph, node: onnx.NodeProto, saturate: bool) -> int:
    """``MatMulInteger(a_u8, w_s8, za, zw)`` as float64 math, with the saturation correction."""
    a, b = node.input[0], node.input[1]
    zero = lambda i: node.input[i] if len(node.input) > i and node.input[i] else None  # noqa: E731
    as_f64 = lambda name, stem: g.node("Cast", [name], stem, to=TensorProto.DOUBLE)  # noqa: E731
    a64, b64 = as_f64(a, "a64"), as_f64(b, "b64")
    ac = g.node("Sub", [a64, as_f64(zero(2), "za64")], "ac") if zero(2) else a64
    bc = g.node("Sub", [b64, as_f64(zero(3), "zb64")], "bc") if zero(3) else b64
    exact = g.node("MatMul", [ac, bc], "exact")
    pairs = 0
    w = g.const(b)
    a_dtype = g.const(zero(2)).dtype if zero(2) and g.const(zero(2)) is not None else np.uint8
    selection = None
    if saturate and w is not None and w.ndim == 2 and a_dtype == np.uint8:
        selection = _pair_selection(w, np.ones(w.shape[1]), np.float64)
    if selection is not None:
        pick, gather = selection
        sums = g.node("MatMul", [a64, g.add_init("pairs", pick)], "pair_sums")
        clip = g.node("Clip", [sums, g.add_init("lo", np.array(INT16[0])), g.add_init("hi", np.array(INT16[1]))],
                      "clipped")
        lost = g.node("MatMul", [g.node("Sub", [clip, sums], "lost"), g.add_init("gather", gather)], "correction")
        exact = g.node("Add", [exact, lost], "saturated")
        pairs = pick.shape[1]
    g.graph.node.append(helper.make_node("Cast", [exact], [node.output[0]], to=TensorProto.INT32))
    return pairs


def _rewrite(src: Path, target: str | None, kernel_only: bool = True) -> tuple[onnx.ModelProto, EmulationResult]:
    model = onnx.load(str(src))
    g = _Graph(model)
    result = EmulationResult(target or "float")
    saturate = target == "avx2"
    kernels = kernel_weights(src) if saturate else set()
    for node in list(g.graph.node):
        if node.op_type == "MatMulInteger":
            g.graph.node.remove(node)
            pairs = _integer_matmul(g, node, saturate and node.input[1] in kernels)
            result.pairs += pairs
            result.nodes.append(node.name)
            continue
        if not saturate or node.op_type not in ("MatMul", "Conv"):
            continue
        match, why = _qdq(g, node)
        weight_name = g.producer[node.input[1]].input[0] if match else ""
        if match is None or weight_name not in kernels:
            if match is None and _reads_quantized(g, node):
                result.skipped[node.name] = why
            continue
        made = _matmul_correction(g, match) if node.op_type == "MatMul" else _conv_correction(g, match)
        if made is None:
            continue
        correction, pairs = made
        g.reroute(node, lambda raw, c=correction: g.node("Add", [raw, c], "emulated"))
        result.nodes.append(node.name)
        result.pairs += pairs
    _sort(g.graph)
    return model, result


def _sort(graph: onnx.GraphProto) -> None:
    from quant.recipes.quantize import _sort_topologically  # noqa: F811

    _sort_topologically(graph)


def float_math_model(src: Path, dst: Path) -> Path:
    """``src`` with integer ops (``MatMulInteger``) computed in float64; ``src`` itself when it has none.

    Run the result with ``open_session(optimize=False)``: a QDQ graph then computes the float
    math of its QuantizeLinear/DequantizeLinear nodes.
    """
    ops = {n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node}
    if "MatMulInteger" not in ops:
        return Path(src)
    model, _ = _rewrite(Path(src), None)
    save_model(model, Path(dst), model.ByteSize() >= _EXTERNAL)
    return Path(dst)


def emulate_model(src: Path, dst: Path, target: str) -> EmulationResult:
    """Write ``dst``: ``src`` computing what ``target``'s int8 kernels compute (run it unoptimized)."""
    check_emulation_target(target)
    model, result = _rewrite(Path(src), target)
    model.metadata_props.append(onnx.StringStringEntryProto(key="quant_audit.emulates", value=target))
    save_model(model, Path(dst), model.ByteSize() >= _EXTERNAL)
    return result
