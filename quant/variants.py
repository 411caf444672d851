"""Variants: which recipe runs each module (DESIGN.md, "Variants").

Recipes: ``torch`` (FP32 PyTorch, the reference), ``onnx`` (FP32 ONNX Runtime), ``fp16``,
``int8``, ``int8-dynamic``, ``inc-int8``. Every recipe but ``torch`` runs an ONNX file under
``<out>/onnx/<folder>/<module>.onnx``; ``onnx`` reads folder ``fp32``.

Variant names: ``<recipe>`` (every module), ``<recipe>@<module>`` (one module swapped, the rest
``torch``).

Example::

    >>> parse_variant("int8@transformer", ["text_encoder", "transformer", "vae_decoder"]).modules
    {'text_encoder': 'torch', 'transformer': 'int8', 'vae_decoder': 'torch'}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quant.errors import UserError
from quant.modules import check_module_name

RECIPES: dict[str, str | None] = {
    "torch": None,
    "onnx": "fp32",
    "fp16": "fp16",
    "int8": "int8",
    "int8-dynamic": "int8-dynamic",
    "inc-int8": "inc-int8",
}


@dataclass(frozen=True)
class Variant:
    """A named assignment of recipes to modules."""

    name: str
    modules: dict[str, str]

    @property
    def onnx_modules(self) -> dict[str, str]:
        return {m: r for m, r in self.modules.items() if r != "torch"}


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}' (recipes: {', '.join(RECIPES)})")
    return recipe


def parse_variant(name: str, modules: list[str]) -> Variant:
    """Parse ``<recipe>`` or ``<recipe>@<module>`` for a pipeline with ``modules``.

    Raises:
        UserError: unknown recipe or module.
    """
    recipe, sep, module = name.partition("@")
    check_recipe(recipe)
    if not sep:
        return Variant(name, {m: recipe for m in modules})
    check_module_name(module, modules)
    return Variant(name, {m: (recipe if m == module else "torch") for m in modules})


def onnx_dir(root: Path, recipe: str) -> Path:
    """The folder holding ``recipe``'s ONNX models under the run folder ``root``."""
    folder = RECIPES[check_recipe(recipe)]
    if folder is None:
        raise ValueError("recipe 'torch' has no ONNX files")
    return Path(root) / "onnx" / folder


def onnx_path(root: Path, recipe: str, module: str) -> Path:
    """Where the ONNX model of ``module`` for ``recipe`` lives under ``root``."""
    return onnx_dir(root, recipe) / f"{module}.onnx"
