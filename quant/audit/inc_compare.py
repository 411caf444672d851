"""Intel Neural Compressor's accuracy-aware tuning (``autotune``) driven by our video metric.

For comparison with ``quant.audit.search`` on one denoiser module: INC 3.x quantizes the PyTorch
module with PT2E (as the ``inc-int8`` recipe does) and ``autotune`` tries its tuning set, each
trial scored by ``eval_fn`` = the gate's metric of the eval videos regenerated with that module
quantized (every other module FP32 PyTorch), against the reference videos. ``tolerable_loss``
is set so that INC stops at the first trial that passes the gate threshold.

What INC can tune here is whole-module settings: on the PT2E path without IPEX,
``INT8StaticQuantConfig.get_config_set_for_tuning()`` is activation symmetry x calibration
algorithm (4 trials), and ``to_config_mapping`` applies one config to the whole graph, so it has
no per-node FP32 fallback to search. Our search's answer for the same module is scored the
same way (that module alone quantized) so the two numbers compare directly.

Example::

    report = inc_autotune(audit, "transformer_2", gates)
    report["trials"], report["best"]
"""

from __future__ import annotations

import math
import time

import pandas as pd
import torch

from quant.pipeline.torch_modules import torch_module
from quant.errors import UserError
from quant.stages.generate import video_dir
from quant.pipeline.modules import MODULE_IO
from quant.pipeline.ort_modules import OrtTransformer
from quant.pipeline.sampling import generate_video
from quant.stages.generate import assemble
from quant.pipeline.prompts import prompt_id
from quant.recipes.names import Variant
from quant.pipeline.video_io import load_frames
from metrics.scores import score_video

TUNABLE = ("transformer", "transformer_2")


class TorchTransformer(OrtTransformer):
    """The ``OrtTransformer`` face over a PyTorch callable ``(latent, timestep, text_emb) -> noise``;
    INC's quantized module runs on the CPU whatever device the pipeline is on, so inputs go to
    the CPU and the output comes back to the pipeline's device."""

    def __init__(self, function, config, dtypes: dict[str, torch.dtype]):
        super().__init__(None, config, "inc-autotune")
        self.function, self.dtypes = function, dtypes

    def run(self, **feeds: torch.Tensor) -> torch.Tensor:
        args = [feeds[n].cpu().to(self.dtypes[n]) for n in MODULE_IO["transformer"].inputs]
        with torch.no_grad():
            out = self.function(*args)
        out = out[0] if isinstance(out, (tuple, list)) else out
        self.calls += 1
        if not torch.isfinite(out).all():
            self.nonfinite_calls += 1
        return out.float().to(self.device)


def _video_metric(audit, module: str, function, dtypes, metric: str) -> float:
    """``metric`` (e.g. psnr_mean) of the eval videos with ``module`` replaced by ``function``."""
    variant = Variant(f"torch-{module}", {m: "torch" for m in audit.modules})
    pipe = assemble(audit.model, variant, audit.work, audit.settings)
    original = getattr(pipe, module)
    setattr(pipe, module, TorchTransformer(function, original.config, dtypes).to(pipe.device))
    frames = []
    for index, prompt in enumerate(audit.prompts):
        for seed in audit.config.seeds:
            video = generate_video(pipe, prompt, seed, audit.settings)
            reference = load_frames(video_dir(audit.work, "torch") / f"{prompt_id(index)}_s{seed}.npz")
            frames.append(score_video(reference, video.frames, luma=False))
    table = pd.concat(frames, ignore_index=True)
    column = {"psnr_mean": "psnr_db", "psnr_min": "psnr_db", "ssim_mean": "ssim", "ssim_min": "ssim"}.get(metric)
    if column is None:
        raise UserError(f"search: INC autotune compares on psnr_mean/psnr_min/ssim_mean/ssim_min, not {metric}")
    values = table[column]
    return float(values.min() if metric.endswith("_min") else values.mean())


def inc_autotune(audit, module: str, gates) -> dict:
    """Run INC's ``autotune`` on ``module`` with our video metric (see the module doc)."""
    from neural_compressor.torch.quantization import INT8StaticQuantConfig, TuningConfig, autotune

    from quant.recipes.inc import _import_inc

    if module not in TUNABLE or module not in audit.modules:
        raise UserError(f"search: inc_compare takes a denoiser module of this model ({', '.join(m for m in TUNABLE if m in audit.modules)}), got '{module}'")
    export, _, _, _ = _import_inc()
    gate = gates[0]
    calibration = audit.calibration
    names = MODULE_IO[module].inputs
    samples = []
    reader = calibration.reader(module)
    while (sample := reader.get_next()) is not None:
        samples.append(tuple(torch.from_numpy(sample[n]) for n in names))
    dtypes = dict(zip(names, (t.dtype for t in samples[0])))
    expanded = INT8StaticQuantConfig.get_config_set_for_tuning().expand()
    configs = [c.to_dict() for c in expanded]
    trials: list[dict] = []

    def eval_fn(model) -> float:
        value = _video_metric(audit, module, model, dtypes, gate.metric)
        value = value if math.isfinite(value) else -1e9  # NaN/Inf video: the worst score, never a pass
        index = len(trials)  # INC evaluates the FP32 model first, then one trial per config
        trials.append({"trial": index, "config": "fp32 baseline" if index == 0 else configs[index - 1],
                       "metric": gate.metric, "value": value, "passed": gate.passes(value)})
        return value if gate.op in (">=", ">") else -value

    def run_fn(prepared) -> None:
        for args in samples:
            prepared(*args)

    start = time.perf_counter()
    with torch.no_grad():
        exported = export(torch_module(audit.model.pipe, module), example_inputs=samples[0])
        baseline = _video_metric(audit, module, exported, dtypes, gate.metric)
        tolerable = max(0.0, (baseline - gate.threshold) / baseline) if gate.op in (">=", ">") and baseline > 0 else 0.0
        best = autotune(exported, TuningConfig(config_set=list(expanded), tolerable_loss=tolerable, max_trials=8),
                        eval_fn=eval_fn, run_fn=run_fn, example_inputs=samples[0])
    chosen = next((t for t in trials[1:] if t["passed"]), None)
    return {"module": module, "gate": f"{gate.metric} {gate.op} {gate.threshold:g}", "fp32_baseline": baseline,
            "tolerable_loss": tolerable, "trials": trials, "config_set": configs,
            "passed": chosen is not None, "best_value": max((t["value"] for t in trials[1:] if math.isfinite(t["value"])), default=None),
            "returned_model": best is not None, "seconds": round(time.perf_counter() - start, 1)}
