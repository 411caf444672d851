"""Generate one video through diffusers' own sampling loop, and record its latent trajectory.

Whatever modules the pipeline holds (PyTorch originals, or ONNX Runtime stand-ins assembled by
``quant.stages.generate.assemble``), the loop is diffusers' own, unchanged; the same (prompt,
seed) draws the same initial noise on every variant.

Example::

    video = generate_video(model.pipe, "a red kite", seed=0, settings=settings)
    video.frames.shape    # (17, 64, 64, 3) uint8
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quant.pipeline.settings import GenerationSettings
from quant.pipeline.video_io import to_uint8



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
