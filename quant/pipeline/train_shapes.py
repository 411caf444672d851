"""Train ``wan2.2-t2v-shapes`` from a seed on clips the package renders itself (``make weights``).

Two phases, both on CPU:

1. the Wan VAE as an autoencoder on single frames, foreground pixels weighted up, after its
   temporal layers are set to act per frame (``per_frame_temporal_init``): every frame of a
   17-frame clip then goes the path single-frame training trains, at a ninth of the cost of
   clip training. Optional 9-frame clip steps follow (``--vae-steps``; they hurt shapes in a
   probe, so the default is none). Reconstructions of held-out clips are judged by
   ``metrics.adherence`` and recorded;
2. the UMT5 text encoder and the two experts together, by flow matching on the VAE's latents of
   rendered 17-frame clips: each expert on its own timestep range (``transformer`` above the
   boundary 0.875, ``transformer_2`` below), as Wan2.2's are; 10% of prompts dropped to ``""``
   so classifier-free guidance has an unconditional model. The experts' and encoder's weights
   are exponential moving averages. The experts patch 5x2x2 (every latent frame of a place in
   one token), which is what made their objects move coherently (``build_t2v_shapes_untrained``).

The saved scheduler samples with flow shift 8 (``--sample-shift``); training draws its sigmas at
the untrained pipeline's shift 3 (``--train-shift``; training at 8 too was worse). Eight steps at
shift 8 give the high-noise expert five of them.

The defaults are the committed checkpoint's recipe (6 blocks per expert, 9000 denoiser steps,
object weight 5): ``make weights`` (seed 0) retrains it, about 41 min expected on 2 cores (Xeon,
AVX-512: the VAE phases 5.2 min, the denoisers 35.9; the committed checkpoint was made in those two
runs, ``training.json``'s ``provenance``; a whole run from the seed was last timed before the
object weight, 36.6 min).
``--compile`` runs the denoiser phase through ``torch.compile``: about 1.3x a step, repeatable on one
machine, other bits than the committed eager run (README, "Prompt adherence").

The result is a diffusers checkpoint folder (safetensors) with ``training.json`` (seed, steps,
losses, versions, time). Usage::

    python -m quant.pipeline.train_shapes --out quant/pipeline/weights/wan2.2-t2v-shapes --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from metrics.shapes_world import BACKGROUND, SHAPES, all_specs, parse_prompt, render_video
from quant.pipeline.models import (SHAPES_DIT_WIDTH, SHAPES_MODEL, SHAPES_TRAIN_SHIFT, SHAPES_WEIGHTS,
                                   build_t2v_shapes_untrained, head_dim_fits)
from quant.pipeline.settings import GenerationSettings
from quant.pipeline.video_io import to_uint8

# Trained at the audit's default settings (64x64, 17 frames, 32 text tokens).
_SETTINGS = GenerationSettings()
FRAMES, SIZE, MAX_TOKENS = _SETTINGS.num_frames, _SETTINGS.height, _SETTINGS.max_sequence_length


def _to_tensor(videos: np.ndarray) -> torch.Tensor:
    """uint8 [N, F, H, W, 3] -> float32 [N, 3, F, H, W] in [-1, 1] (the VAE's range)."""
    x = torch.from_numpy(videos).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def _foreground_weight(x: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """Per-pixel loss weights: the object's pixels count ``weight`` times the background's."""
    background = torch.tensor(BACKGROUND, dtype=x.dtype).div(127.5).sub(1.0).view(1, 3, 1, 1, 1)
    foreground = (x - background).abs().amax(dim=1, keepdim=True) > 0.05
    return 1.0 + (weight - 1.0) * foreground.float()


def _random_clips(rng: np.random.Generator, batch: int, frames: int) -> np.ndarray:
    specs = all_specs()
    clips = []
    for _ in range(batch):
        spec = specs[rng.integers(len(specs))]
        video = render_video(spec, FRAMES, SIZE, seed=int(rng.integers(2**31)))
        start = int(rng.integers(0, FRAMES - frames + 1))
        clips.append(video[start:start + frames])
    return np.stack(clips)


def _edge_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between the image gradients of ``x`` and ``y`` (along H and W): what corners and tips
    are made of, and what a weighted MSE alone lets the small decoder round off."""
    return sum((torch.diff(x, dim=d) - torch.diff(y, dim=d)).abs().mean() for d in (3, 4))


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR with 5% warm-up. It divides by ``pct_start * steps - 1``, so at exactly 20 steps
    (a warm-up of one step) the warm-up is made 6% instead of ending the run with ZeroDivisionError."""
    pct = 0.05 if abs(0.05 * steps - 1.0) > 1e-9 else 0.06
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct)


def per_frame_temporal_init(vae) -> int:
    """Start the causal VAE's temporal layers as per-frame ones; returns how many were set.

    A causal 3D conv (kernel 3 in time) sees frames t-2, t-1, t; the first frame's path pads the
    past with zeros, so single-frame training never trains (or even touches) the two past taps,
    and their random initial weights add noise to every later frame: a VAE trained on single
    frames then 9-frame clips reconstructed frame 0's shape 75% right and frames 1-16 at chance
    (12-31%). So the past taps start at zero, and the temporal resamplers start as selectors:
    the encoder's stride-2 ``time_conv`` passes the later frame of each pair, the decoder's
    ``time_conv`` copies its input to both frames it makes. Every frame then goes the path the
    single-frame phase trains: after it alone, 17-frame reconstructions were 100% right in shape,
    colour and motion (README, Prompt adherence). Clip training may still learn the taps.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    count, resamplers = 0, set()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanResample) and hasattr(module, "time_conv"):
                conv = module.time_conv
                resamplers.add(id(conv))
                conv.weight.zero_()
                conv.bias.zero_()
                out_channels, in_channels = conv.weight.shape[:2]
                for o in range(out_channels):  # upsampling: two copies of the input, one per new frame
                    conv.weight[o, o % in_channels, -1, 0, 0] = 1.0
                count += 1
        for module in vae.modules():
            if isinstance(module, WanCausalConv3d) and id(module) not in resamplers and module.kernel_size[0] > 1:
                module.weight[:, :, :-1].zero_()  # the past taps; the last one is the current frame
                count += 1
    return count


def train_vae(vae, steps: int, batch: int, lr: float, rng: np.random.Generator, log: list, frames: int = 9,
              edge_weight: float = 0.0) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = one_cycle(opt, lr, steps)
    for step in (bar := tqdm(range(steps), desc="vae", unit="step")):
        x = _to_tensor(_random_clips(rng, batch, frames=frames))
        z = vae.encode(x).latent_dist.mean
        z = z + 0.05 * z.detach().std() * torch.randn_like(z)  # a decoder robust to imperfect latents
        y = vae.decode(z).sample
        loss = (_foreground_weight(x) * (y - x).pow(2)).mean()
        if edge_weight:
            loss = loss + edge_weight * _edge_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0 or step == steps - 1:
            log.append({"phase": "vae", "step": step, "loss": round(loss.item(), 6)})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def check_vae(vae, seed: int, clips: int = 24) -> dict:
    """Adherence of the VAE's reconstructions of held-out 17-frame clips: the ceiling for the pipeline."""
    from metrics.adherence import judge_video

    specs = all_specs()
    rng = np.random.default_rng(seed + 99)
    counts = dict.fromkeys(("colour_ok", "shape_ok", "motion_ok", "ok"), 0)
    for _ in range(clips):
        spec = specs[int(rng.integers(len(specs)))]
        x = _to_tensor(render_video(spec, FRAMES, SIZE, seed=int(rng.integers(2**31)))[None])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        frames = to_uint8((y[0].permute(1, 2, 3, 0).numpy() + 1) / 2)  # as the pipeline's postprocessing
        verdict = judge_video(frames, spec)
        for key in counts:
            counts[key] += int(getattr(verdict, key))
    return {k: round(v / clips, 3) for k, v in counts.items()}


def shape_clip_weights(prompts: list[str], shape_weights: dict[str, float] | None) -> np.ndarray | None:
    """The probability of drawing each clip (of ``prompts``) into a denoiser batch when the clips of
    a shape count ``shape_weights[shape]`` times (1 for shapes not named); None: uniform. Weights,
    even all 1 (``--shape-weight square=1``), draw through numpy's ``choice``, not ``integers``: the
    same distribution as the default's, other draws."""
    if not shape_weights:
        return None
    weights = np.array([shape_weights.get(parse_prompt(p).shape, 1.0) for p in prompts])
    return weights / weights.sum()


@torch.no_grad()
def encode_dataset(vae, seeds_per_spec: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Latents (unnormalised) of every combination x ``seeds_per_spec`` rendered clips, and their prompts."""
    specs = all_specs()
    items = [(spec, seed * 1_000_003 + 7919 * k + i) for k in range(seeds_per_spec) for i, spec in enumerate(specs)]
    latents, prompts = [], []
    for start in tqdm(range(0, len(items), 16), desc="encode", unit="batch"):
        chunk = items[start:start + 16]
        x = _to_tensor(np.stack([render_video(spec, FRAMES, SIZE, seed=s) for spec, s in chunk]))
        latents.append(vae.encode(x).latent_dist.mean)
        prompts.extend(spec.prompt() for spec, _ in chunk)
    return torch.cat(latents), prompts


def _encode_text(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WanPipeline's prompt embedding: the encoder's output, zero past each prompt's length."""
    return text_encoder(ids, mask).last_hidden_state * mask.unsqueeze(-1).to(torch.float32)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def posterior_x0(xt: torch.Tensor, sigma: torch.Tensor, own: torch.Tensor, latents: torch.Tensor,
                 groups: list[torch.Tensor]) -> torch.Tensor:
    """E[x0 | x_t] over a reference set: the stable-target-field estimate of the clean latents.

    For sample ``i`` (noised ``x_t = (1 - s) x0 + s n`` from ``latents[own[i]]``), the references are
    ``latents[groups[i]]`` (the clips of the same prompt; ``own[i]`` among them), weighted by the
    likelihood of ``x_t`` under each: ``w_j ~ exp(-|x_t - (1 - s) x0_j|^2 / 2 s^2)``. Near pure noise
    the plain target ``n - x0`` is mostly noise: one clip out of every trajectory the prompt allows.
    This one is what a perfect denoiser outputs, a trajectory-wise average over whole clips, meant to
    let the experts learn at a fraction of the variance (Xu et al., 2023, "Stable Target Field for
    Reduced Variance Score Estimation in Diffusion Models"). At low noise it is ``x0`` itself. The one
    run with it (``--target stf``, README "Prompt adherence") came out worse than the plain target.

    Args:
        xt: ``[B, C, T, H, W]`` noised latents; sigma: ``[B]``; own: ``[B]`` indices into ``latents``.
        groups: per sample, a 1-D index tensor of reference clips that contains ``own[i]``.
    Returns:
        ``[B, C, T, H, W]`` posterior means.
    """
    out = torch.empty_like(xt)
    for i in range(xt.shape[0]):
        refs = latents[groups[i]]
        s = float(sigma[i])
        d = (xt[i].unsqueeze(0) - (1.0 - s) * refs).flatten(1).pow(2).sum(1)
        w = torch.softmax(-d / (2.0 * s * s), dim=0)
        out[i] = torch.einsum("j,j...->...", w, refs)
    return out


@contextlib.contextmanager
def _compiling(enabled: bool):
    """While ``enabled``: inductor draws random numbers from ATen's generator as eager does, and
    only deterministic kernels run (what makes a compiled run repeat bit for bit on one machine;
    measured: without it, two compiled runs of the same 40 steps ended with different weights)."""
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with inductor_config.patch(fallback_random=True):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)


def train_denoisers(pipe, latents: torch.Tensor, prompts: list[str], steps: int, batch: int, lr: float,
                    generator: torch.Generator, rng: np.random.Generator, log: list, ema_decay: float = 0.998,
                    high_share: float = 0.5, target: str = "sample", unconditional_refs: int = 512,
                    object_weight: float = 1.0, background: torch.Tensor | None = None,
                    train_shift: float | None = None, compile: bool = False,
                    clip_weights: np.ndarray | None = None) -> None:
    """Flow matching of the text encoder and both experts; ``high_share`` of each batch goes to the
    high-noise expert (``transformer``), the rest to ``transformer_2`` (each gets one sample at least).

    ``target``: ``"stf"`` regresses on ``(x_t - E[x0 | x_t]) / sigma`` with the posterior over the
    clips of the same prompt (:func:`posterior_x0`; ``unconditional_refs`` random clips, the sample's
    own among them, for the dropped prompts); ``"sample"`` on the usual ``noise - x0``.

    ``object_weight`` > 1: the squared error where the object is (latent positions that differ from
    ``background``, the latents of an empty clip, by over a quarter of the clip's largest
    difference) counts that many times the rest's.

    ``train_shift``: the flow shift of the sigmas each expert draws (None: the pipeline's scheduler's,
    the untrained pipeline's 3); a larger one puts more of each expert's steps near the top of its range.

    ``clip_weights``: each clip's probability of being drawn into a batch (:func:`shape_clip_weights`;
    None: uniform draws, those of the committed recipe).

    ``compile``: the text encoder's and the experts' passes run through ``torch.compile`` (inductor's
    C++ kernels fuse the many small elementwise ops, RoPE's among them, that a step of these tiny
    networks spends most of its time in). The same random numbers are drawn (dropout takes ATen's
    generator, ``fallback_random``) and kernels are deterministic, so a run repeats bit for bit on
    one machine; the float rounding differs from eager's, so the weights differ from an eager run's."""
    if target not in ("stf", "sample"):
        raise ValueError(f"target must be 'stf' or 'sample', got {target!r}")
    if not is_share(high_share):
        raise ValueError(f"high_share must be between 0 and 1, got {high_share}")
    if train_shift is not None and not is_positive(train_shift):
        raise ValueError(f"train_shift must be a positive, finite flow shift, got {train_shift}")
    tokens = pipe.tokenizer(sorted(set(prompts)) + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    index = {p: i for i, p in enumerate(sorted(set(prompts)) + [""])}
    prompt_rows = torch.tensor([index[p] for p in prompts])
    empty_row = index[""]
    by_row = {int(r): torch.nonzero(prompt_rows == r).flatten() for r in prompt_rows.unique()}
    modules = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    emas = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}
    calls = {name: torch.compile(m, dynamic=False) if compile else m for name, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = one_cycle(opt, lr, steps)
    half = min(max(1, round(batch * high_share)), batch - 1)  # the high-noise expert's part of a batch
    # Each expert samples its own range of shifted sigmas, sigma = s u / (1 + (s - 1) u) with u
    # uniform: u below u_b gives sigma below the pipeline's boundary, s u_b = b (1 + (s - 1) u_b).
    boundary = pipe.config.boundary_ratio
    shift = pipe.scheduler.config.flow_shift if train_shift is None else train_shift
    u_boundary = boundary / (shift - boundary * (shift - 1))
    with _compiling(compile):
        for step in (bar := tqdm(range(steps), desc="denoisers", unit="step")):
            if clip_weights is None:
                pick = torch.from_numpy(rng.integers(0, len(latents), size=batch))
            else:
                pick = torch.from_numpy(rng.choice(len(latents), size=batch, p=clip_weights))
            x0 = latents[pick]
            rows = prompt_rows[pick].clone()
            rows[torch.from_numpy(rng.random(batch) < 0.1)] = empty_row
            emb = _encode_text(calls["text_encoder"], tokens.input_ids[rows], tokens.attention_mask[rows])
            u = torch.rand(batch, generator=generator)
            u[:half] = u_boundary + u[:half] * (1.0 - u_boundary)  # transformer: at or above the boundary
            u[half:] = u[half:] * u_boundary  # transformer_2: below it
            sigma = shift * u / (1 + (shift - 1) * u)
            noise = torch.randn(x0.shape, generator=generator)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            if target == "stf":
                groups = []
                for i, row in zip(pick.tolist(), rows.tolist()):
                    if row == empty_row:  # unconditional: a random subset of all clips, this one included
                        others = torch.from_numpy(rng.choice(len(latents), size=min(unconditional_refs, len(latents)),
                                                             replace=False))
                        groups.append(torch.cat([torch.tensor([i]), others[others != i]]))
                    else:
                        groups.append(by_row[row])
                goal = (xt - posterior_x0(xt, sigma, pick, latents, groups)) / s
            else:
                goal = noise - x0
            weight = None
            if object_weight != 1.0:
                far = (x0 - background).abs().sum(dim=1, keepdim=True)
                weight = 1.0 + (object_weight - 1.0) * (far > 0.25 * far.amax(dim=(2, 3, 4), keepdim=True)).float()
            loss = 0.0
            for name, part in (("transformer", slice(0, half)), ("transformer_2", slice(half, batch))):
                pred = calls[name](hidden_states=xt[part], timestep=sigma[part] * 1000, encoder_hidden_states=emb[part],
                                     return_dict=False)[0]
                if weight is None:
                    loss = loss + F.mse_loss(pred, goal[part]) / 2
                else:
                    w = weight[part]
                    loss = loss + ((pred - goal[part]).pow(2) * w).mean() / w.mean() / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            for name, m in modules.items():
                _ema_update(emas[name], m, ema_decay if step > steps // 10 else 0.0)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % 50 == 0 or step == steps - 1:
                log.append({"phase": "denoisers", "step": step, "loss": round(loss.item(), 6)})
    for name, m in modules.items():
        m.load_state_dict(emas[name].state_dict())
        m.eval().requires_grad_(False)


def train(out: Path, seed: int, vae_steps: int, vae_batch: int, dit_steps: int, dit_batch: int,
          seeds_per_spec: int, threads: int | None, check_clips: int = 24, vae_frame_steps: int = 0,
          vae_frame_batch: int = 16, vae_lr: float = 3e-3, edge_weight: float = 0.0,
          vae_from: Path | None = None, dit_lr: float = 1e-3, patch: int = 2, layers: int = 6, head_dim: int = 16,
          high_share: float = 0.5, target: str = "sample", temporal_patch: int = 5, object_weight: float = 5.0,
          sample_shift: float | None = 8.0, train_shift: float = SHAPES_TRAIN_SHIFT, compile: bool = False,
          shape_weights: dict[str, float] | None = None) -> dict:
    """Train and write the checkpoint folder ``out`` (atomically); returns ``training.json``'s content.

    ``vae_from``: a checkpoint folder whose VAE is taken as trained (its VAE phases are skipped),
    to train denoisers again on the same latents. ``sample_shift``: the flow shift the saved
    scheduler samples with (None: the training shift, 3); training draws its sigmas with the
    untrained pipeline's shift either way, as Wan2.2 separates its sampling shift from training.
    """
    from quant.support.environment import versions

    for shape, weight in (shape_weights or {}).items():
        if shape not in SHAPES or not is_positive(weight):
            raise ValueError(f"shape_weights: expected a shape of {SHAPES} and a positive, finite weight, "
                             f"got {shape!r}: {weight}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    pipe = build_t2v_shapes_untrained(seed, patch=patch, layers=layers, head_dim=head_dim, temporal_patch=temporal_patch)
    per_frame_temporal_init(pipe.vae)
    denoiser_state = torch.get_rng_state()  # the denoiser phase starts here whether the VAE trains or not
    log: list = []
    if vae_from is not None:
        from safetensors.torch import load_file

        state = load_file(str(next(Path(vae_from, "vae").glob("*.safetensors"))))
        pipe.vae.load_state_dict(state)
        pipe.vae.eval().requires_grad_(False)
        vae_frame_steps = vae_steps = 0
    if vae_frame_steps:  # single frames: every frame's path once the temporal layers are per-frame
        train_vae(pipe.vae, vae_frame_steps, vae_frame_batch, 1e-3, rng, log, frames=1, edge_weight=edge_weight)
    if vae_steps:
        train_vae(pipe.vae, vae_steps, vae_batch, vae_lr, rng, log, edge_weight=edge_weight)
    vae_seconds = time.monotonic() - started
    vae_check = check_vae(pipe.vae, seed, check_clips)
    print(f"vae reconstructions judged: {vae_check}", flush=True)
    raw, prompts = encode_dataset(pipe.vae, seeds_per_spec, seed)
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    pipe.vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean],
                                latents_std=[round(float(v), 6) for v in std])
    mean_t = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std_t = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (raw - mean_t) / std_t  # what the pipeline's sampler works in
    background = None
    if object_weight != 1.0:  # the latents of a clip of background only
        with torch.no_grad():
            empty = np.full((1, FRAMES, SIZE, SIZE, 3), BACKGROUND, np.uint8)
            background = (pipe.vae.encode(_to_tensor(empty)).latent_dist.mean - mean_t) / std_t
    # The VAE phases draw from torch's and numpy's streams; the denoiser phase (batches, noise, the
    # text encoder's dropout) starts from the same state with or without them, so training the
    # denoisers on a VAE taken as trained (--vae-from) gives what a whole run from the seed gives.
    torch.set_rng_state(denoiser_state)
    rng = np.random.default_rng(seed)
    if dit_steps:  # 0: a checkpoint whose VAE is trained, for --vae-from
        train_denoisers(pipe, latents, prompts, dit_steps, dit_batch, dit_lr, generator, rng, log,
                        high_share=high_share, target=target, object_weight=object_weight, background=background,
                        train_shift=train_shift, compile=compile,
                        clip_weights=shape_clip_weights(prompts, shape_weights))
    if sample_shift is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=sample_shift)
    seconds = time.monotonic() - started
    info = {
        "model": SHAPES_MODEL, "seed": seed, "vae_frame_steps": vae_frame_steps, "vae_frame_batch": vae_frame_batch,
        "vae_steps": vae_steps, "vae_batch": vae_batch, "vae_lr": vae_lr, "edge_weight": edge_weight,
        "denoiser_steps": dit_steps, "denoiser_batch": dit_batch, "clips_per_combination": seeds_per_spec,
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1), "vae_seconds": round(vae_seconds, 1),
        "vae_reconstruction_adherence": vae_check, "vae_from": str(vae_from) if vae_from else None, "denoiser_lr": dit_lr,
        "patch": patch, "temporal_patch": temporal_patch, "layers": layers, "head_dim": head_dim,
        "high_noise_share": high_share, "denoiser_target": target, "object_weight": object_weight,
        "sample_shift": pipe.scheduler.config.flow_shift, "train_shift": train_shift, "compiled": compile,
        "shape_weights": shape_weights or None, "versions": versions(), "log": log,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _checked(convert, test, what: str):
    """An argparse ``type`` that converts a value and refuses it, by its flag, unless ``test`` holds:
    a bad ``make weights`` option is a one-line usage error (exit 2) at once, not an error after
    minutes of VAE training and clip encoding."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def is_positive(value: float) -> bool:
    """A finite number above 0 (a learning rate, a weight, a flow shift)."""
    return 0 < value < float("inf")


def is_share(value: float) -> bool:
    """A share of a batch strictly between 0 and 1 (each expert gets part of it)."""
    return 0 < value < 1


# The command line refuses what train_denoisers and build_t2v_shapes_untrained would refuse, with the same predicates.
_POSITIVE = _checked(float, is_positive, "a positive, finite number")
_NON_NEGATIVE = _checked(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_SHARE = _checked(float, is_share, "a share between 0 and 1")
_COUNT = _checked(int, lambda v: v >= 0, "a whole number >= 0")
_AT_LEAST_ONE = _checked(int, lambda v: v >= 1, "a whole number >= 1")
_AT_LEAST_TWO = _checked(int, lambda v: v >= 2, "a whole number >= 2 (one sample per expert at least)")
# The experts' patches tile the 16 x 16 latent places and the 5 latent frames of a 64x64x17 clip.
_LATENT_FRAMES, _LATENT_SIZE = (FRAMES - 1) // 4 + 1, SIZE // 4
_PATCH = _checked(int, lambda v: v >= 1 and _LATENT_SIZE % v == 0, f"a divisor of the latent size {_LATENT_SIZE}")
_TEMPORAL_PATCH = _checked(int, lambda v: v >= 1 and _LATENT_FRAMES % v == 0,
                           f"a divisor of the latent frame count {_LATENT_FRAMES}")
_HEAD_DIM = _checked(int, head_dim_fits,
                     f"a divisor of the experts' width {SHAPES_DIT_WIDTH}")


def _shape_weight(text: str) -> tuple[str, float]:
    """``--shape-weight``'s ``SHAPE=WEIGHT``."""
    shape, equals, weight = text.partition("=")
    if not equals or shape not in SHAPES:
        raise argparse.ArgumentTypeError(f"expected SHAPE=WEIGHT with SHAPE one of {', '.join(SHAPES)}, got {text!r}")
    return shape, _POSITIVE(weight)


def build_parser() -> argparse.ArgumentParser:
    """``make weights``' command line; its defaults are the committed checkpoint's recipe
    (``tests/test_models.py`` compares them with its ``training.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHAPES_WEIGHTS, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-frame-steps", type=_COUNT, default=600,
                        help="single-frame VAE pretraining steps first (a probe: frame-0 shapes and colours 100%% after 600)")
    parser.add_argument("--vae-frame-batch", type=_AT_LEAST_ONE, default=16)
    parser.add_argument("--vae-steps", type=_COUNT, default=0,
                        help="9-frame VAE steps after the single-frame ones (100 took per-frame shapes from 100%% to 44-88%%)")
    parser.add_argument("--vae-batch", type=_AT_LEAST_ONE, default=4)
    parser.add_argument("--vae-lr", type=_POSITIVE, default=1e-3, help="peak learning rate of the 9-frame VAE phase")
    parser.add_argument("--edge-weight", type=_NON_NEGATIVE, default=0.0,
                        help="VAE loss: + this x L1 of image gradients (0.5 took frame-0 shape from 40%% to 73%%)")
    parser.add_argument("--steps", type=_COUNT, default=9000, help="denoiser steps")
    parser.add_argument("--batch", type=_AT_LEAST_TWO, default=48, help="denoiser batch (half per expert)")
    parser.add_argument("--clips", type=_AT_LEAST_ONE, default=16, help="rendered clips per combination for the denoisers")
    parser.add_argument("--lr", type=_POSITIVE, default=1e-3,
                        help="denoisers' peak learning rate (2e-3 lowered the training loss and took the reference's "
                             "shape on the 88 non-eval combinations x seeds 0, 1 from 83.5%% to 67.6%%)")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="take the VAE of this checkpoint folder as trained (skip the VAE phases)")
    parser.add_argument("--patch", type=_PATCH, default=2, help="the experts' spatial patch (2: 8x8-pixel tokens)")
    parser.add_argument("--temporal-patch", type=_TEMPORAL_PATCH, default=5,
                        help="the experts' patch along latent frames (5: one token spans all five latent frames of its place)")
    parser.add_argument("--layers", type=_AT_LEAST_ONE, default=6, help="blocks per expert")
    parser.add_argument("--head-dim", type=_HEAD_DIM, default=16,
                        help="the experts' attention head width (width 64 in 64 / head-dim heads); RoPE gives H and W "
                             "2 * (head-dim // 6) dims each")
    parser.add_argument("--high-share", type=_SHARE, default=0.5,
                        help="the share of each denoiser batch that trains the high-noise expert")
    parser.add_argument("--target", choices=("stf", "sample"), default="sample",
                        help="denoiser regression target: stf (posterior mean over the prompt's clips) or sample (noise - x0)")
    parser.add_argument("--object-weight", type=_POSITIVE, default=5.0,
                        help="denoiser loss: the object's latent positions count this many times the background's "
                             "(1: plain MSE; 5 took shape over all 96 prompts from 61.5%% to 74%%)")
    parser.add_argument("--sample-shift", type=_POSITIVE, default=8.0,
                        help=f"the flow shift the checkpoint's scheduler samples with (training keeps shift "
                             f"{SHAPES_TRAIN_SHIFT:g}; 8 took the reference's shape on the 88 non-eval combinations x "
                             "seeds 0, 1 from 68%% to 79%%)")
    parser.add_argument("--train-shift", type=_POSITIVE, default=SHAPES_TRAIN_SHIFT,
                        help="the flow shift of the sigmas the experts train on (%(default)g: the untrained "
                             "pipeline's; 8, the sampling shift, took the reference's shape on the 88 non-eval "
                             "combinations x seeds 0, 1 from 83.5%% to 70.5%%)")
    parser.add_argument("--compile", action="store_true",
                        help="run the denoiser phase's passes through torch.compile (needs a C++ compiler; faster, "
                             "repeatable on one machine, other weights than an eager run)")
    parser.add_argument("--shape-weight", type=_shape_weight, action="append", default=[], metavar="SHAPE=WEIGHT",
                        help="denoiser batches draw the clips of SHAPE WEIGHT times as often as the others' "
                             "(repeatable, one shape once; square=1.5, and square=1, the default's distribution "
                             "drawn otherwise, both took the reference's shape on the 88 non-eval combinations x "
                             "seeds 0, 1 from 83.5%% to 71.6%%: the draws, not the weight)")
    parser.add_argument("--threads", type=_AT_LEAST_ONE, default=None)
    return parser


def cpp_compiler() -> str | None:
    """The C++ compiler ``torch.compile`` would build its CPU kernels with (inductor's own search:
    ``CXX``, else ``g++``), or None where there is none."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shapes = [shape for shape, _ in args.shape_weight]
    if len(set(shapes)) < len(shapes):
        parser.error(f"argument --shape-weight: a shape given twice: {', '.join(shapes)}")
    if args.compile and cpp_compiler() is None:  # else an error at the first denoiser step, minutes in
        parser.error("argument --compile: torch.compile finds no C++ compiler (install g++, or set CXX)")
    info = train(args.out, args.seed, args.vae_steps, args.vae_batch, args.steps, args.batch, args.clips, args.threads,
                 vae_frame_steps=args.vae_frame_steps, vae_frame_batch=args.vae_frame_batch,
                 vae_lr=args.vae_lr, edge_weight=args.edge_weight, vae_from=args.vae_from, dit_lr=args.lr,
                 patch=args.patch, layers=args.layers, head_dim=args.head_dim,
                 high_share=args.high_share, target=args.target, temporal_patch=args.temporal_patch,
                 object_weight=args.object_weight, sample_shift=args.sample_shift,
                 train_shift=args.train_shift, compile=args.compile,
                 shape_weights=dict(args.shape_weight))
    print(f"wrote {args.out} in {info['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
