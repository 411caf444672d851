"""Recipe records: what each recipe is, in one place.

Code that needs to know whether a recipe reads calibration, can keep nodes in FP32, runs integer
kernels or takes an option asks its record, instead of testing the name
(``if recipe in ("int8", "inc-int8")``). Adding a recipe adds a record here and a handler
(``@register`` in its own file under ``quant/recipes/``).

Example::

    record("int8+keep-0123456789ab~avx2").integer_kernels   # True: the base recipe decides
    [r.name for r in RECIPES.values() if r.keeps_nodes]     # ["fp16", "int8", "int8-dynamic"]
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """One recipe.

    Attributes:
        name: as written in configs, variant names and folders.
        folder: the folder under ``onnx/`` holding its models (None: PyTorch, no files).
        quantizes: has a quantize handler (``quant.recipes.quantize``).
        calibrated: its handler reads the calibration samples.
        keeps_nodes: its handler can keep named nodes in FP32 (mixes, sensitivity, search).
        integer_kernels: runs int8 kernels: kernel SQNR is interpreted and ``~<target>`` emulated.
        methods: the calibration methods it takes (empty: none).
        reduce_range: takes ``int8_reduce_range`` (7-bit weights).
        activation_type: takes ``int8_activation_type``.
        shares_calibration: repeated quantizations of one module (sensitivity, search) can reuse
            one pre-processed graph and onnxruntime's calibration range cache.
        needs_torch: quantizes the PyTorch module, not the ONNX graph (unavailable to
            ``quant-audit module``, which has only the user's ONNX file).
    """

    name: str
    folder: str | None
    quantizes: bool = False
    calibrated: bool = False
    keeps_nodes: bool = False
    integer_kernels: bool = False
    methods: tuple[str, ...] = ()
    reduce_range: bool = False
    activation_type: bool = False
    shares_calibration: bool = False
    needs_torch: bool = False
    source: str = ""  # the module that implements it (its code is part of every stage key)

    def handler(self):
        """The function that quantizes with this recipe (``QuantizeJob -> QuantizeResult``)."""
        from quant.recipes.quantize import HANDLERS

        return HANDLERS[self.name]


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("torch", None),
    Recipe("onnx", "fp32"),
    Recipe("fp16", "fp16", quantizes=True, calibrated=True, keeps_nodes=True, source="quant.recipes.fp16"),
    Recipe("int8", "int8", quantizes=True, calibrated=True, keeps_nodes=True, integer_kernels=True,
           methods=("minmax", "entropy", "percentile"), reduce_range=True, activation_type=True,
           shares_calibration=True, source="quant.recipes.int8"),
    Recipe("int8-dynamic", "int8-dynamic", quantizes=True, keeps_nodes=True, integer_kernels=True, reduce_range=True,
           source="quant.recipes.int8"),
    Recipe("inc-int8", "inc-int8", quantizes=True, calibrated=True, integer_kernels=True, methods=("minmax", "entropy"),
           needs_torch=True, source="quant.recipes.inc"),
)}
QUANTIZERS = tuple(n for n, r in RECIPES.items() if r.quantizes)
KEEPERS = tuple(n for n, r in RECIPES.items() if r.keeps_nodes)
INTEGER = tuple(n for n, r in RECIPES.items() if r.integer_kernels)
ONNX_ONLY = tuple(n for n in QUANTIZERS if not RECIPES[n].needs_torch)  # what `quant-audit module` can run


def record(recipe: str) -> Recipe:
    """The record of ``recipe``, or of its base for ``<recipe>+keep-<tag>`` / ``<recipe>~<target>``.

    Raises:
        UserError: an unknown recipe.
    """
    from quant.recipes.names import base_recipe

    base = base_recipe(recipe)
    if base not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}' (recipes: {', '.join(RECIPES)})")
    return RECIPES[base]
