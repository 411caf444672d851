"""Variants: which recipe runs each module (DESIGN.md, "Variants").

Recipes: ``torch`` (FP32 PyTorch, the reference), ``onnx`` (FP32 ONNX Runtime), ``fp16``,
``int8``, ``int8-dynamic``, ``inc-int8``. Every recipe but ``torch`` runs an ONNX file under
``<out>/onnx/<folder>/<module>.onnx``; ``onnx`` reads folder ``fp32``.

Variant names: ``<recipe>`` (every module), ``<recipe>@<module>`` (one module swapped, the rest
``torch``), ``floor`` (the FP32 PyTorch pipeline with the initial noise moved by one float32 ulp:
the noise floor), and ``<variant>~<target>``: the variant's int8 modules run as graphs that
emulate another execution target's integer kernels (``quant.recipes.emulate``; recipe ``int8~avx2``,
folder ``onnx/int8~avx2/``).

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
from quant.pipeline.modules import check_module_name

from quant.recipes.records import INTEGER, KEEPERS, RECIPES  # noqa: E402 - the records name the recipes


@dataclass(frozen=True)
class Variant:
    """A named assignment of recipes to modules.

    Attributes:
        noise_ulps: float32 ulps the initial noise is moved by (``floor``: 1; every other variant 0).
    """

    name: str
    modules: dict[str, str]
    noise_ulps: int = 0

    @property
    def onnx_modules(self) -> dict[str, str]:
        return {m: r for m, r in self.modules.items() if r != "torch"}


FLOOR = "floor"
_KEEP = re.compile(r"^(?P<base>[a-z0-9-]+)\+keep-(?P<tag>[0-9a-f]{12})$")
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(name: str, what: str = "variant") -> str:
    """A user-given name that becomes a path (variant, mix, search result): no ``/``, ``\\``, ``..``,
    leading dot, control characters, or empty name (DESIGN.md).

    Raises:
        UserError: naming the offending value.
    """
    if not isinstance(name, str) or not name or name.startswith(".") or ".." in name or _BAD_NAME.search(name):
        raise UserError(f"{what} name {name!r} cannot be a folder name (no '/', '..', leading dot, control "
                        "characters or empty names)")
    return name


def split_target(recipe: str) -> tuple[str, str | None]:
    """``int8~avx2`` -> (``int8``, ``avx2``); ``int8`` -> (``int8``, None)."""
    recipe, sep, target = recipe.partition("~")
    return recipe, (target if sep else None)


def emulated(recipe: str, target: str | None) -> str:
    """``recipe`` on ``target``'s emulated kernels when it runs integer kernels, else ``recipe``."""
    return f"{recipe}~{target}" if target and base_recipe(recipe) in INTEGER else recipe


def keep_recipe(recipe: str, nodes) -> str:
    """The name of ``recipe`` with ``nodes`` kept in FP32 (``recipe`` itself when there are none)."""
    nodes = sorted(set(nodes))
    if not nodes:
        return recipe
    tag = hashlib.sha256(json.dumps(nodes).encode()).hexdigest()[:12]
    return f"{recipe}+keep-{tag}"


def base_recipe(recipe: str) -> str:
    """``int8+keep-<tag>~avx2`` -> ``int8``: the handler that quantizes it."""
    recipe, _ = split_target(recipe)
    match = _KEEP.match(recipe)
    return match["base"] if match else recipe


def check_recipe(recipe: str) -> str:
    from quant.support.target import check_emulation_target

    plain, target = split_target(recipe)
    if target is not None:
        check_emulation_target(target, f"recipe '{recipe}'")
        if base_recipe(plain) not in INTEGER:
            raise UserError(f"recipe '{recipe}': only int8 recipes ({', '.join(INTEGER)}) run on an emulated target")
    match = _KEEP.match(plain)
    if match and match["base"] in KEEPERS:
        return recipe
    if plain not in RECIPES:
        raise UserError(f"unknown recipe '{plain}' (recipes: {', '.join(RECIPES)})")
    return recipe


def parse_variant(name: str, modules: list[str]) -> Variant:
    """Parse ``<recipe>`` or ``<recipe>@<module>`` for a pipeline with ``modules``.

    Raises:
        UserError: unknown recipe or module.
    """
    if name == FLOOR:
        return Variant(FLOOR, {m: "torch" for m in modules}, noise_ulps=1)
    plain, target = split_target(name)
    recipe, sep, module = plain.partition("@")
    check_recipe(emulated(recipe, target) if target else recipe)
    if target and base_recipe(recipe) not in INTEGER:
        raise UserError(f"variant '{name}': only int8 recipes ({', '.join(INTEGER)}) run on an emulated target")
    recipe = emulated(recipe, target)
    if not sep:
        return Variant(name, {m: recipe for m in modules})
    check_module_name(module, modules)
    return Variant(name, {m: (recipe if m == module else "torch") for m in modules})


def onnx_dir(root: Path, recipe: str) -> Path:
    """The folder holding ``recipe``'s ONNX models under the run folder ``root``."""
    folder = RECIPES[base_recipe(check_recipe(recipe))].folder
    if folder is None:
        raise ValueError("recipe 'torch' has no ONNX files")
    return Path(root) / "onnx" / (recipe if recipe != base_recipe(recipe) else folder)


def source_recipe(recipe: str) -> str:
    """The recipe whose ONNX models an emulated recipe rewrites (``int8~avx2`` -> ``int8``)."""
    return split_target(recipe)[0]


def onnx_path(root: Path, recipe: str, module: str) -> Path:
    """Where the ONNX model of ``module`` for ``recipe`` lives under ``root``."""
    return onnx_dir(root, recipe) / f"{module}.onnx"
