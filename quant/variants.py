"""Variants: which recipe runs each module (DESIGN.md, "Variants").

Recipes: ``torch`` (FP32 PyTorch, the reference), ``onnx`` (FP32 ONNX Runtime), ``fp16``,
``int8``, ``int8-dynamic``, ``inc-int8``. Every recipe but ``torch`` runs an ONNX file under
``<out>/onnx/<folder>/<module>.onnx``; ``onnx`` reads folder ``fp32``.

Variant names: ``<recipe>`` (every module), ``<recipe>@<module>`` (one module swapped, the rest
``torch``).

A module can also run a recipe with some nodes kept in FP32 (mixed precision inside a module):
``keep_recipe("int8", nodes)`` names it ``int8+keep-<hash of the nodes>``, with its own folder
``onnx/int8+keep-<hash>/``. ``base_recipe`` gives back ``int8``.

Example::

    >>> parse_variant("int8@transformer", ["text_encoder", "transformer", "vae_decoder"]).modules
    {'text_encoder': 'torch', 'transformer': 'int8', 'vae_decoder': 'torch'}
"""

from __future__ import annotations

import hashlib
import json
import re
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


KEEP_RECIPES = ("int8", "int8-dynamic", "fp16")  # their handlers keep named nodes in FP32
_KEEP = re.compile(r"^(?P<base>[a-z0-9-]+)\+keep-(?P<tag>[0-9a-f]{12})$")


def keep_recipe(recipe: str, nodes) -> str:
    """The name of ``recipe`` with ``nodes`` kept in FP32 (``recipe`` itself when there are none)."""
    nodes = sorted(set(nodes))
    if not nodes:
        return recipe
    tag = hashlib.sha256(json.dumps(nodes).encode()).hexdigest()[:12]
    return f"{recipe}+keep-{tag}"


def base_recipe(recipe: str) -> str:
    match = _KEEP.match(recipe)
    return match["base"] if match else recipe


def check_recipe(recipe: str) -> str:
    match = _KEEP.match(recipe)
    if match and match["base"] in KEEP_RECIPES:
        return recipe
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
    folder = RECIPES[base_recipe(check_recipe(recipe))]
    if folder is None:
        raise ValueError("recipe 'torch' has no ONNX files")
    return Path(root) / "onnx" / (recipe if recipe != base_recipe(recipe) else folder)


def onnx_path(root: Path, recipe: str, module: str) -> Path:
    """Where the ONNX model of ``module`` for ``recipe`` lives under ``root``."""
    return onnx_dir(root, recipe) / f"{module}.onnx"
