"""Benchmark: one Wan DiT block at TI2V-5B's real width, quantized with every recipe, against FP32 ONNX.

The tiny models of the audit are all per-call overhead (their int8 modules are slower than FP32);
this measures whether a recipe speeds up the GEMMs where they are the work. One
``WanTransformerBlock`` (hidden 3072, FFN 14336, 24 heads, QK RMS norm, cross-attention norm: the
TI2V-5B block), random seeded weights, ``--tokens`` video tokens (a few hundred: minutes on two
cores, not the 30k+ of a real clip) and 64 text tokens, is exported with the audit's own exporter
path (``torch.onnx.export(dynamo=True)``) and quantized with ``quant.recipes.quantize`` (the same
handlers the audit runs) on a few random calibration inputs. Every model then runs in ONNX Runtime
on the same held-out input: median of ``--runs`` timed calls after warm-up, with min and max,
the ratio against FP32 ONNX, and the output SQNR against FP32. The CPU (its model name, as ``lscpu`` prints it), its int8 path
and the thread count are printed and recorded. No thresholds; results also go to
``benchmarks/results/recipes-<time>.json``.

Usage::

    .venv/bin/python benchmarks/recipes.py                        # 288 tokens, every recipe
    .venv/bin/python benchmarks/recipes.py --tokens 128 --recipes fp16,int8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM, FFN, HEADS, TEXT_TOKENS = 3072, 14336, 24, 64  # Wan2.2-TI2V-5B's transformer block


class OneBlock(torch.nn.Module):
    """A Wan transformer block with its rotary embedding for a (frames, height, width) token grid built in."""

    def __init__(self, grid: tuple[int, int, int]):
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

        super().__init__()
        self.block = WanTransformerBlock(DIM, FFN, HEADS, qk_norm="rms_norm_across_heads", cross_attn_norm=True)
        rope = WanRotaryPosEmbed(DIM // HEADS, (1, 2, 2), max_seq_len=1024)
        cos, sin = rope(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return self.block(hidden_states, encoder_hidden_states, temb, (self.cos, self.sin))


def _inputs(seed: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"hidden_states": rng.standard_normal((1, tokens, DIM), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, DIM), dtype=np.float32),
            "temb": (0.1 * rng.standard_normal((1, 6, DIM))).astype(np.float32)}


class _Reader:
    def __init__(self, samples):
        self.samples, self.i = samples, 0

    def get_next(self):
        if self.i >= len(self.samples):
            return None
        self.i += 1
        return self.samples[self.i - 1]

    def rewind(self):
        self.i = 0


def main(argv: list[str] | None = None) -> int:
    from metrics.tensor import sqnr_db
    from quant.pipeline.ort_modules import open_session, run_session
    from quant.recipes.census import timed_calls
    from quant.recipes.export import export_program, onnx_size_bytes, save_atomically
    from quant.recipes.quantize import QuantizeOptions, quantize
    from quant.recipes.records import QUANTIZERS
    from quant.support.target import current_target, set_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=288, help="video tokens: 2 x 12 x 12 by default")
    parser.add_argument("--recipes", default=",".join(QUANTIZERS))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=4, help="random calibration inputs")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    target = current_target()
    side = int(round(math.sqrt(args.tokens / 2)))
    grid = (2, side, args.tokens // (2 * side))
    tokens = grid[0] * grid[1] * grid[2]
    print(f"CPU: {target.cpu} ({target.int8_path} int8 path; target {target.id}), {threads} threads")
    print(f"one WanTransformerBlock: hidden {DIM}, ffn {FFN}, {HEADS} heads; {tokens} video tokens {grid}, "
          f"{TEXT_TOKENS} text tokens", flush=True)
    torch.manual_seed(0)
    model = OneBlock(grid).eval()
    samples = [_inputs(i, tokens) for i in range(args.calibration)]
    held = _inputs(1000, tokens)
    names = ("hidden_states", "encoder_hidden_states", "temb")
    results: dict = {"cpu": target.cpu, "target": target.to_dict(), "threads": threads, "tokens": tokens,
                     "grid": grid, "recipes": {}}
    with tempfile.TemporaryDirectory(prefix="qa-bench-") as tmp:
        fp32 = Path(tmp) / "fp32" / "block.onnx"
        start = time.perf_counter()
        with torch.no_grad():
            program = export_program(model, tuple(torch.from_numpy(held[n]) for n in names), names, ("out",), 18, False)
        save_atomically(lambda p: program.save(p, external_data=True), fp32)
        print(f"exported in {time.perf_counter() - start:.0f} s ({onnx_size_bytes(fp32) / 1e6:.0f} MB)", flush=True)
        reference = open_session(fp32)  # the audit's sessions: every optimization, the threads set above
        expected = run_session(reference, held)[0]
        base = [ms / 1000 for ms in timed_calls(reference, held, args.warmup, args.runs)]
        results["recipes"]["onnx"] = {"median_s": statistics.median(base), "min_s": min(base), "max_s": max(base),
                                      "ratio": 1.0, "size_bytes": onnx_size_bytes(fp32), "sqnr_db": None}
        del reference
        for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            dst = Path(tmp) / recipe / "block.onnx"
            start = time.perf_counter()
            quantize(fp32, dst, recipe, lambda: _Reader(samples), QuantizeOptions(),
                     torch_module=lambda: model, input_names=names, output_names=("out",))
            made = time.perf_counter() - start
            session = open_session(dst)
            out = run_session(session, held)[0]
            times = [ms / 1000 for ms in timed_calls(session, held, args.warmup, args.runs)]
            del session
            entry = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "ratio": statistics.median(base) / statistics.median(times), "size_bytes": onnx_size_bytes(dst),
                     "sqnr_db": sqnr_db(out, expected), "quantize_s": made}
            results["recipes"][recipe] = entry
            print(f"  {recipe}: quantized in {made:.0f} s", flush=True)
    print(f"\n{'recipe':<14}{'median s':>10}{'min-max s':>16}{'speed-up vs FP32 ONNX':>24}{'MB':>8}{'SQNR dB':>9}")
    for recipe, e in results["recipes"].items():
        sq = "" if e["sqnr_db"] is None else f"{e['sqnr_db']:.1f}"
        print(f"{recipe:<14}{e['median_s']:>10.3f}{e['min_s']:>8.3f}-{e['max_s']:<7.3f}{e['ratio']:>24.2f}"
              f"{e['size_bytes'] / 1e6:>8.0f}{sq:>9}")
    out = ROOT / "benchmarks" / "results" / f"recipes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
