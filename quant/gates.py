"""Gates: thresholds on a variant's aggregate metrics, finiteness, and regression against a baseline.

A gate is written ``psnr_mean = ">= 30"`` in the config (or a bare number, which takes the
metric's good direction: ``>=`` for quality, ``<=`` for flicker). NaN never passes. Every
variant also gets a ``finite`` gate: a module output with NaN/Inf fails it, with the module
named. A regression gate fails when a metric dropped more than its tolerance below the
baseline run's value for the same model fingerprint and variant.

Example::

    gate = parse_gate("psnr_mean", ">= 30")
    check_gates("int8", {"psnr_mean": 29.3}, [gate], nonfinite={})[0].passed    # False
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass

from quant.errors import UserError
from quant.support.files import json_number

# metric -> +1 where higher is better, -1 where lower is better (columns of scores/summary.csv)
METRIC_DIRECTIONS: dict[str, int] = {
    "psnr_mean": 1, "psnr_min": 1, "psnr_p5": 1, "psnr_video_db": 1,
    "ssim_mean": 1, "ssim_min": 1, "ssim_p5": 1, "ssim_luma_mean": 1, "ssim_luma_min": 1,
    "motion_psnr_mean": 1, "motion_psnr_min": 1, "motion_ssim_mean": 1, "motion_ssim_min": 1,
    "flicker_max": -1, "flicker_frames": -1,
    "latent_sqnr_min_db": 1, "latent_sqnr_final_db": 1,
    # the shapes world (metrics.adherence): the fraction of videos that show what their prompt asked
    "adherence": 1, "adherence_colour": 1, "adherence_shape": 1, "adherence_motion": 1,
    # `quant-audit module` (one ONNX model): its outputs against the FP32 model's, and its speed
    "sqnr_min_db": 1, "sqnr_mean_db": 1, "kernel_sqnr_db": 1, "speedup_vs_onnx": 1,
    # what a variant costs (quant.stages.generate.variant_cost): never gated in our tests, a user's call
    "video_seconds": -1, "peak_rss_mb": -1, "model_mb": -1,
}
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_GATE = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    """``metric op threshold``, e.g. ``psnr_mean >= 30``."""

    metric: str
    op: str
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.op} {self.threshold:g}"

    def passes(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False  # NaN or missing never passes
        return bool(_OPS[self.op](value, self.threshold))


@dataclass
class GateResult:
    """One checked gate, as written to ``results.json`` and ``junit.xml``."""

    variant: str
    metric: str
    op: str
    threshold: float | None
    value: float | None
    passed: bool
    kind: str = "threshold"  # threshold | finite | regression | parity
    reason: str = ""
    note: str = ""  # e.g. "below the noise floor ...", "baseline ran on target X"

    def to_dict(self) -> dict:
        return {k: (json_number(v) if k in ("threshold", "value") else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Baseline:
    """The run a regression check compares with: its id, variant -> metrics, and its target id."""

    run_id: str
    metrics: dict
    target: str | None

    def note(self, target: str) -> str:
        """What the gate table says when the baseline ran elsewhere (its numbers are not this target's)."""
        if self.target == target:
            return ""
        return f"baseline ran on target {self.target or 'unknown (recorded before targets were)'}"


def mark_noise_floor(results: list[GateResult], floor: dict | None) -> list[GateResult]:
    """Mark threshold gates tighter than the ``floor`` variant's own score: even a round-off-sized
    change of the FP32 pipeline would fail them, so they gate numerical noise, not quantization."""
    if not floor:
        return results
    for result in results:
        value = floor.get(result.metric)
        if result.kind != "threshold" or value is None or result.threshold is None or math.isnan(float(value)):
            continue
        if not Gate(result.metric, result.op, result.threshold).passes(float(value)):
            result.note = (f"below the noise floor: the floor variant (FP32, initial noise moved by one ulp) scores "
                           f"{result.metric} = {float(value):.6g}")
    return results


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def parse_gate(metric: str, value) -> Gate:
    """Parse one config entry (``">= 30"`` or ``30``) for ``metric``.

    Raises:
        UserError: unknown metric, or a value that is not ``<op> <number>`` / a number.
    """
    if metric not in METRIC_DIRECTIONS:
        raise UserError(f"unknown metric (metrics: {', '.join(METRIC_DIRECTIONS)})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        op, threshold = (">=" if METRIC_DIRECTIONS[metric] > 0 else "<="), float(value)
    elif isinstance(value, str) and (match := _GATE.match(value)):
        op, threshold = match[1], float(match[2])
    else:
        raise UserError(f"expected '>= <number>', '<= <number>' (or > <) or a number, got {value!r}")
    if not math.isfinite(threshold):
        raise UserError(f"threshold must be finite, got {value!r}")
    return Gate(metric, op, threshold)


def finite_gate(variant: str, nonfinite: dict[str, int]) -> GateResult:
    """Fails when any module output (or decoded frame) of ``variant`` held NaN/Inf."""
    bad = {m: n for m, n in nonfinite.items() if n}
    reason = ""
    if bad:
        reason = "NaN/Inf in " + ", ".join(f"{m} output ({n} call{'s' if n != 1 else ''})" for m, n in bad.items())
    return GateResult(variant, "nonfinite_outputs", "==", 0.0, float(sum(bad.values())), not bad, "finite", reason)


def check_gates(variant: str, row: dict, gates, nonfinite: dict[str, int]) -> list[GateResult]:
    """The finite gate plus every threshold gate of ``variant`` on its summary ``row``."""
    results = [finite_gate(variant, nonfinite)]
    for gate in gates:
        value = row.get(gate.metric)
        value = None if value is None else float(value)
        passed = gate.passes(value)
        reason = "" if passed else ("metric is NaN or missing" if value is None or math.isnan(value)
                                    else f"{gate.metric} = {value:.6g}, needs {gate.op} {gate.threshold:g}")
        results.append(GateResult(variant, gate.metric, gate.op, gate.threshold, value, passed, "threshold", reason))
    return results


def check_regression(variant: str, row: dict, baseline: dict, tolerances: dict[str, float],
                     baseline_run: str, note: str = "") -> list[GateResult]:
    """A gate per tolerated metric: fails when ``row`` is worse than ``baseline`` by more than the tolerance."""
    results = []
    for metric, tolerance in tolerances.items():
        base = baseline.get(metric)
        if base is None or (isinstance(base, float) and math.isnan(base)):
            continue  # the baseline did not measure it: nothing to regress from
        direction = METRIC_DIRECTIONS[metric]
        limit = base - tolerance if direction > 0 else base + tolerance
        gate = Gate(metric, ">=" if direction > 0 else "<=", limit)
        value = row.get(metric)
        value = None if value is None else float(value)
        passed = gate.passes(value)
        reason = "" if passed else (f"{metric} {_num(value)} vs {_num(base)} in baseline run {baseline_run} "
                                    f"(tolerance {tolerance:g})")
        results.append(GateResult(variant, metric, gate.op, limit, value, passed, "regression", reason, note))
    return results
