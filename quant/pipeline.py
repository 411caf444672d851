"""Assemble a variant's pipeline from PyTorch modules and ONNX stand-ins, and generate videos.

The assembled pipeline is a new ``WanPipeline`` sharing the reference's tokenizer and a fresh
copy of its scheduler, with each module either the PyTorch original (``torch``) or an ONNX
Runtime stand-in (every other recipe). The sampling loop is diffusers' own, unchanged; the
same (prompt, seed) draws the same initial noise on every variant.

Example::

    variant = parse_variant("onnx", present_modules(model.pipe))
    pipe = assemble(model, variant, Path("runs/r1"), settings)
    video = generate_video(pipe, "a red kite", seed=0, settings=settings)
    video.frames.shape    # (17, 64, 64, 3) uint8
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quant.errors import UserError
from quant.io_utils import atomic_write_json, sha256_file
from quant.models import LoadedModel
from quant.modules import MODULE_IO
from quant.ort_modules import STAND_INS, open_session
from quant.settings import GenerationSettings
from quant.variants import Variant, onnx_dir, onnx_path, split_target
from quant.video_io import to_uint8

MANIFEST = "manifest.json"
# Exported graphs have static shapes in these settings (latent T/H/W, text length).
SHAPE_SETTINGS = ("height", "width", "num_frames", "max_sequence_length")


@dataclass
class Trajectory:
    """The latents after every denoising step.

    Attributes:
        latents: float32 (S, C, T, H, W), the scheduler's output after step s.
        timesteps: float64 (S,), the timestep of each step.
        experts: (S,) the module that denoised each step (``transformer`` or ``transformer_2``).
    """

    latents: np.ndarray
    timesteps: np.ndarray
    experts: np.ndarray


@dataclass
class GeneratedVideo:
    """One generated video.

    Attributes:
        frames: uint8 (F, H, W, 3), RGB.
        nonfinite: True if the decoded video had NaN/Inf pixels (mapped to 0 in ``frames``).
        trajectory: the latents after each step, when asked for.
    """

    frames: np.ndarray
    nonfinite: bool
    trajectory: Trajectory | None = None


def expert_for(pipe, timestep: float) -> str:
    """Which denoiser ``WanPipeline`` uses at ``timestep`` (high-noise ``transformer`` at t >= boundary)."""
    ratio = pipe.config.boundary_ratio
    if ratio is None or pipe.transformer_2 is None:
        return "transformer"
    return "transformer" if timestep >= ratio * pipe.scheduler.config.num_train_timesteps else "transformer_2"


class _TrajectoryRecorder:
    """A ``callback_on_step_end`` that keeps each step's latents (as float32 numpy)."""

    def __init__(self):
        self.latents, self.timesteps, self.experts = [], [], []

    def __call__(self, pipe, step, timestep, kwargs):
        self.latents.append(kwargs["latents"].detach().float().cpu().numpy().copy())
        self.timesteps.append(float(timestep))
        self.experts.append(expert_for(pipe, float(timestep)))
        return {}

    def result(self) -> Trajectory:
        return Trajectory(np.stack([l[0] for l in self.latents]), np.array(self.timesteps),  # noqa: E741
                          np.array(self.experts))


def shape_key(settings: GenerationSettings | dict) -> dict:
    """The settings an exported graph's static shapes depend on."""
    get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k)
    return {k: get(k) for k in SHAPE_SETTINGS}


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


def _stand_in(model: LoadedModel, module: str, recipe: str, path: Path, manifest: dict):
    if module not in manifest.get("modules", {}):
        raise UserError(f"{path.parent / MANIFEST}: no '{module}' model listed; export or quantize it first")
    original = model.pipe.vae if module == "vae_decoder" else getattr(model.pipe, module)
    emulated = split_target(recipe)[1] is not None  # an emulation is float math: never fused by ORT
    return STAND_INS[module](open_session(path, optimize=not emulated), original.config, str(path))


def assemble(model: LoadedModel, variant: Variant, root: Path, settings: GenerationSettings):
    """A ``WanPipeline`` running ``variant``: PyTorch modules where the recipe is ``torch``,
    ONNX stand-ins from ``<root>/onnx/...`` elsewhere."""
    from diffusers import WanPipeline

    ref = model.pipe
    parts = {"text_encoder": ref.text_encoder, "transformer": ref.transformer,
             "transformer_2": ref.transformer_2, "vae_decoder": ref.vae}
    manifests = {r: check_onnx_folder(root, r, model, settings) for r in sorted(set(variant.onnx_modules.values()))}
    for module, recipe in variant.onnx_modules.items():
        parts[module] = _stand_in(model, module, recipe, onnx_path(root, recipe, module), manifests[recipe])
    pipe = WanPipeline(
        tokenizer=ref.tokenizer, text_encoder=parts["text_encoder"], vae=parts["vae_decoder"],
        scheduler=ref.scheduler.__class__.from_config(ref.scheduler.config),
        transformer=parts["transformer"], transformer_2=parts["transformer_2"],
        boundary_ratio=ref.config.boundary_ratio, expand_timesteps=ref.config.expand_timesteps,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nonfinite_counts(pipe) -> dict[str, int]:
    """module -> calls so far whose output held NaN/Inf, for the ONNX stand-ins in ``pipe``."""
    parts = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer,
             "transformer_2": pipe.transformer_2, "vae_decoder": pipe.vae}
    return {m: part.nonfinite_calls for m, part in parts.items() if hasattr(part, "nonfinite_calls")}


def initial_noise(pipe, seed: int, settings: GenerationSettings, ulps: int = 0) -> torch.Tensor:
    """The initial latents ``WanPipeline`` draws for ``seed`` (its own ``prepare_latents``), moved
    by ``ulps`` float32 ulps towards +inf (``floor``: a round-off-sized change of every element)."""
    denoiser = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = pipe.prepare_latents(1, denoiser.config.in_channels, settings.height, settings.width, settings.num_frames,
                                   torch.float32, torch.device("cpu"), generator)
    up = torch.full_like(latents, float("inf"))
    for _ in range(ulps):
        latents = torch.nextafter(latents, up)
    return latents


@torch.no_grad()
def generate_video(pipe, prompt: str, seed: int, settings: GenerationSettings, callback=None,
                   trajectory: bool = False, noise_ulps: int = 0) -> GeneratedVideo:
    """Generate one video; the initial noise comes from a CPU generator seeded with ``seed``.

    Args:
        callback: diffusers ``callback_on_step_end(pipe, step, timestep, kwargs) -> dict``.
        trajectory: also return the latents after every step (cannot be combined with ``callback``).
        noise_ulps: move the initial noise by this many float32 ulps (the ``floor`` variant).
    """
    recorder = None
    if trajectory:
        if callback is not None:
            raise ValueError("trajectory=True records through the step callback; pass one or the other")
        callback = recorder = _TrajectoryRecorder()
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = initial_noise(pipe, seed, settings, noise_ulps) if noise_ulps else None
    out = pipe(
        prompt=prompt, latents=latents, negative_prompt=settings.negative_prompt, height=settings.height, width=settings.width,
        num_frames=settings.num_frames, num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale, generator=generator,
        max_sequence_length=settings.max_sequence_length, output_type="np", callback_on_step_end=callback,
    )
    frames = np.asarray(out.frames[0])
    return GeneratedVideo(frames=to_uint8(frames), nonfinite=not bool(np.isfinite(frames).all()),
                          trajectory=recorder.result() if recorder else None)
