"""Stable module names and their ONNX signatures (DESIGN.md, "The pipeline and its modules").

Example::

    >>> MODULE_IO["transformer"].inputs
    ('latent', 'timestep', 'text_emb')
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.errors import UserError


@dataclass(frozen=True)
class ModuleIO:
    """ONNX input and output names of one pipeline module."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


MODULE_IO: dict[str, ModuleIO] = {
    "text_encoder": ModuleIO(("input_ids", "attention_mask"), ("text_emb",)),
    "transformer": ModuleIO(("latent", "timestep", "text_emb"), ("noise_pred",)),
    "transformer_2": ModuleIO(("latent", "timestep", "text_emb"), ("noise_pred",)),
    "vae_decoder": ModuleIO(("latent",), ("video",)),
}
MODULE_NAMES: tuple[str, ...] = tuple(MODULE_IO)


def present_modules(pipe) -> list[str]:
    """Module names this pipeline has, in pipeline order (``transformer_2`` only for two experts)."""
    names = ["text_encoder", "transformer"]
    if getattr(pipe, "transformer_2", None) is not None:
        names.append("transformer_2")
    names.append("vae_decoder")
    return names


def check_module_name(name: str, available: list[str] | None = None) -> str:
    """Return ``name`` if it is a module (of this pipeline, when ``available`` is given).

    Raises:
        UserError: the name is not a module, or this pipeline lacks it.
    """
    allowed = available if available is not None else list(MODULE_NAMES)
    if name not in allowed:
        raise UserError(f"unknown module '{name}' (this pipeline has: {', '.join(allowed)})")
    return name
