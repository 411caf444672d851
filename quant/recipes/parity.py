"""Parity of an ONNX module against its PyTorch module on captured inputs.

The error measures are the maximum absolute difference and the relative L2 error
``||onnx - torch||_2 / ||torch||_2``, taken per captured call; the worst call is reported.
An export whose relative L2 exceeds the threshold (1e-4 by default) has failed. Non-finite
output counts as an infinite error.

Example::

    result = measure_parity("transformer", adapter, session, samples)
    result.rel_l2, result.passed
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from quant.pipeline.modules import MODULE_IO
from quant.pipeline.ort_modules import run_session

PARITY_THRESHOLD = 1e-4


@dataclass(frozen=True)
class Parity:
    """Parity of one module. ``rel_l2`` and ``max_abs`` are worst over ``samples`` calls."""

    module: str
    max_abs: float
    rel_l2: float
    samples: int
    threshold: float = PARITY_THRESHOLD

    @property
    def passed(self) -> bool:
        return math.isfinite(self.rel_l2) and self.rel_l2 <= self.threshold

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("max_abs", "rel_l2"):  # JSON has no Infinity; a non-finite error is null + failed
            out[key] = out[key] if math.isfinite(out[key]) else None
        out["passed"] = self.passed
        return out


def errors(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max-abs, relative-L2) of ``candidate`` against ``reference``; inf when either is non-finite."""
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if candidate.shape != reference.shape:
        raise ValueError(f"shape {candidate.shape} != reference shape {reference.shape}")
    if not (np.isfinite(candidate).all() and np.isfinite(reference).all()):
        return math.inf, math.inf
    diff = candidate - reference
    norm = float(np.linalg.norm(reference))
    rel = float(np.linalg.norm(diff)) / norm if norm > 0 else (0.0 if not diff.any() else math.inf)
    return float(np.abs(diff).max(initial=0.0)), rel


@torch.no_grad()
def measure_parity(module: str, adapter: torch.nn.Module, session, samples: list[dict[str, np.ndarray]],
                   threshold: float = PARITY_THRESHOLD) -> Parity:
    """Run ``adapter`` (PyTorch) and ``session`` (ONNX) on each sample and compare outputs."""
    worst_abs = worst_rel = 0.0
    for inputs in samples:
        reference = adapter(*(torch.from_numpy(inputs[n]) for n in MODULE_IO[module].inputs)).numpy()
        candidate = run_session(session, inputs)[0]
        max_abs, rel = errors(candidate, reference)
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, rel)
    return Parity(module, worst_abs, worst_rel, len(samples), threshold)
