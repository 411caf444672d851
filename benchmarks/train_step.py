"""Benchmark: one denoiser step of ``make weights``, eager against ``--compile``, in one run.

``train_shapes.train_denoisers`` with the shipped recipe's shapes (batch 48, half per expert, the
object-weighted loss, 6 blocks per expert at width 64) on random latents of the real shape
(``[N, 16, 5, 16, 16]``, 4 clips of each of the 96 prompts), alternating eager and compiled rounds
so that both see the same minutes of this shared machine. Each round builds a fresh pipeline,
runs ``--warmup`` steps (compilation, the first time, or inductor's cache), then times ``--steps``
(one ``train_denoisers`` call: its setup, tokenizing the prompts and copying the weight averages,
is inside the timed seconds for both modes alike).
Prints ms a step per round, the medians and the eager / compiled ratio, with the CPU (``lscpu``
model name) and thread count. No thresholds.

Usage::

    .venv/bin/python benchmarks/train_step.py                  # 2 rounds of each, 40 steps
    .venv/bin/python benchmarks/train_step.py --rounds 3 --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_round(compile: bool, steps: int, warmup: int, batch: int) -> float:
    """Seconds a step of ``steps`` timed steps (after ``warmup`` untimed ones) on a fresh pipeline."""
    from metrics.shapes_world import all_specs
    from quant.pipeline import train_shapes
    from quant.pipeline.models import build_t2v_shapes_untrained

    torch.manual_seed(0)
    pipe = build_t2v_shapes_untrained(0)
    prompts = [spec.prompt() for spec in all_specs()] * 4
    latents = torch.randn(len(prompts), 16, 5, 16, 16)
    background = torch.randn(1, 16, 5, 16, 16)

    def run(n: int) -> None:
        train_shapes.train_denoisers(pipe, latents, prompts, n, batch, 1e-3, torch.Generator().manual_seed(0),
                                     np.random.default_rng(0), [], object_weight=5.0, background=background,
                                     compile=compile)

    run(warmup)
    started = time.perf_counter()
    run(steps)
    return (time.perf_counter() - started) / steps


def main() -> int:
    from benchmarks.metrics import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternating")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from quant.pipeline import train_shapes

    train_shapes.tqdm = partial(train_shapes.tqdm, disable=True)  # no progress bars inside the timed steps
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; batch {args.batch}, {args.steps} steps a round")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for mode in times:
            seconds = one_round(mode == "compiled", args.steps, args.warmup, args.batch)
            times[mode].append(seconds)
            print(f"{mode:9s} {seconds * 1000:7.1f} ms a step", flush=True)
    eager, compiled = (statistics.median(times[m]) for m in times)
    print(f"median: eager {eager * 1000:.1f} ms, compiled {compiled * 1000:.1f} ms a step; "
          f"compiled is {eager / compiled:.2f}x eager's speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
