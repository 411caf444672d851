"""Calibration: each module's real inputs across the denoising steps, cached on disk.

The FP32 PyTorch pipeline generates every calibration (prompt, seed); each module's calls are
recorded (``quant.pipeline.capture``) and ``samples_per_module`` of them, spread evenly over the module's
calls, are written as ``.npz`` files (``allow_pickle=False``). A DiT's activations move with the
timestep, so evenly spread calls cover the range; the high-noise ``transformer`` only ever sees
t >= boundary and ``transformer_2`` only t < boundary, so each expert is calibrated on its own
range. One sample in ``HOLDOUT_EVERY`` is held back to measure quantization error (SQNR) on
inputs the quantizer did not see.

The cache lives in ``<out>/calibration/`` with ``manifest.json`` keyed by model fingerprint,
prompts, seeds, generation settings and sample count. A rerun with the same key reuses it; a
changed key, a missing or corrupt file recomputes it. The manifest is written last, so an
interrupted capture is never mistaken for a finished one.

Example::

    cal = calibrate(model, CalibrationSpec(prompts, seeds=(0,)), settings, Path("runs/r1"))
    reader = cal.reader("transformer")          # CalibrationDataReader: get_next() -> dict | None
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from quant.pipeline.capture import Sample, record_inputs
from quant.errors import UserError
from quant.support.files import atomic_path, atomic_write_json, sha256_file
from quant.pipeline.models import LoadedModel
from quant.pipeline.modules import present_modules
from quant.pipeline.sampling import expert_for, generate_video
from quant.stages.workspace import Workspace
from quant.support.progress import progress
from quant.support.target import torch_device
from quant.pipeline.prompts import read_prompts
from quant.recipes.names import onnx_path
from quant.pipeline.settings import GenerationSettings

SCHEMA_VERSION = 2  # 2: samples stratified over call positions (spread_indices)
MIN_CALIBRATION_PROMPTS = 16
HOLDOUT_EVERY = 4  # every 4th sample is held back for SQNR


@dataclass(frozen=True)
class CalibrationSpec:
    """What to capture.

    Attributes:
        prompts: calibration prompts (never evaluation prompts).
        seeds: seeds each prompt is generated with.
        samples_per_module: calls kept per module, spread evenly over its calls.
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    samples_per_module: int = 16

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UserError("calibration needs at least one prompt")
        if isinstance(self.samples_per_module, bool) or not isinstance(self.samples_per_module, int) \
                or self.samples_per_module < 2:
            raise UserError(f"samples_per_module must be an integer >= 2, got {self.samples_per_module!r}")

    def key(self, fingerprint: str, settings: GenerationSettings, device: str = "cpu") -> str:
        """The cache's key; samples captured on a GPU (``device``) are another cache than the CPU's."""
        fields = {"model": fingerprint, "spec": asdict(self), "settings": settings.to_dict()}
        if device != "cpu":
            fields["device"] = device
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def check_disjoint(calibration: list[str], evaluation: list[str], calibration_path: Path, evaluation_path: Path) -> None:
    """Raise UserError naming the first prompt that is in both sets (compared case- and space-insensitively;
    prompts of the shapes world by the combination they ask for, so a rephrasing is still the same)."""
    from metrics.shapes_world import parse_prompt

    def norm(prompt: str):
        return parse_prompt(prompt) or " ".join(prompt.lower().split())

    evaluation_set = {norm(p) for p in evaluation}
    for prompt in calibration:
        if norm(prompt) in evaluation_set:
            raise UserError(f"{calibration_path}: calibration prompt '{prompt}' is also in {evaluation_path}"
                            + (" (the same combination)" if parse_prompt(prompt) else "")
                            + "; calibration and evaluation prompts must not overlap")


def load_calibration_prompts(path: Path, evaluation_path: Path, minimum: int = MIN_CALIBRATION_PROMPTS) -> list[str]:
    """Read calibration prompts, checking there are enough and none is an evaluation prompt."""
    prompts = read_prompts(path)
    if len(prompts) < minimum:
        raise UserError(f"{path}: {len(prompts)} calibration prompts, at least {minimum} are needed")
    check_disjoint(prompts, read_prompts(evaluation_path), Path(path), Path(evaluation_path))
    return prompts


def calls_per_generation(pipe, settings: GenerationSettings) -> dict[str, int]:
    """How many times each module is called in one generation (CFG doubles text and denoiser calls)."""
    cfg = 2 if settings.guidance_scale > 1 else 1
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.num_inference_steps)
    experts = [expert_for(pipe, float(t)) for t in scheduler.timesteps]
    counts = {"text_encoder": cfg, "vae_decoder": 1}
    for module in ("transformer", "transformer_2"):
        if module in present_modules(pipe):
            counts[module] = cfg * experts.count(module)
    return counts


def check_modules_called(pipe, settings: GenerationSettings) -> dict[str, int]:
    """``calls_per_generation``, refusing settings under which a module is never called (with too
    few steps one expert gets none: it cannot be exported, calibrated or audited).

    Raises:
        UserError: naming the module and the step count.
    """
    calls = calls_per_generation(pipe, settings)
    never = [m for m, n in calls.items() if n == 0]
    if never:
        raise UserError(f"generation.num_inference_steps: with {settings.num_inference_steps} step(s) "
                        f"{', '.join(never)} is never called (the expert boundary splits the steps); use more steps")
    return calls


def spread_indices(calls_per_generation: int, generations: int, k: int) -> list[int]:
    """``min(k, total)`` call indices spread over generations *and* over the call positions
    (step x cond/uncond) inside a generation.

    A plain even stride over all calls aliases with the calls per generation and can skip a
    step entirely (seen: 16 of 200 calls never sampled step 5); here sample j takes generation
    ``j * G // k`` and position ``j mod C`` (or ``j * C // k`` when k < C), so every step is
    covered whenever k >= C.
    """
    total = calls_per_generation * generations
    if total <= 0:
        return []
    if k >= total:
        return list(range(total))
    chosen = set()
    for j in range(k):
        generation = (j * generations) // k
        position = j % calls_per_generation if k >= calls_per_generation else (j * calls_per_generation) // k
        chosen.add(generation * calls_per_generation + position)
    return sorted(chosen)


@dataclass
class CalibrationSet:
    """A finished capture: files per module, and which are held back."""

    folder: Path
    manifest: dict
    reused: bool = False

    def files(self, module: str, split: str = "calibration") -> list[Path]:
        entries = self.manifest["modules"][module]["samples"]
        keep = [e for e in entries if (e["holdout"] if split == "holdout" else not e["holdout"])]
        return [self.folder / e["file"] for e in keep]

    def reader(self, module: str, split: str = "calibration", input_types: dict | None = None) -> "NpzCalibrationReader":
        return NpzCalibrationReader(self.files(module, split), input_types)


class NpzCalibrationReader(CalibrationDataReader):
    """Streams calibration samples from ``.npz`` files, one in memory at a time.

    Args:
        files: sample files (each holds the module's inputs under their ONNX names).
        input_types: optional name -> numpy dtype to cast to (what the graph declares).
    """

    def __init__(self, files: list[Path], input_types: dict | None = None):
        self.files = list(files)
        self.input_types = input_types or {}
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self.files):
            return None
        path = self.files[self._next]
        self._next += 1
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k].astype(self.input_types.get(k, data[k].dtype), copy=False) for k in data.files}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.files)


class _DiskSink:
    """Writes the chosen calls of each module to ``<folder>/<module>/<n>.npz`` as they happen."""

    def __init__(self, folder: Path, chosen: dict[str, set[int]]):
        self.folder, self.chosen = folder, chosen
        self.seen: dict[str, int] = {m: 0 for m in chosen}
        self.entries: dict[str, list[dict]] = {m: [] for m in chosen}

    def __call__(self, sample: Sample) -> None:
        index = self.seen[sample.module]
        self.seen[sample.module] += 1
        if index not in self.chosen[sample.module]:
            return
        rel = f"{sample.module}/{len(self.entries[sample.module]):04d}.npz"
        with atomic_path(self.folder / rel) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **sample.inputs)
        self.entries[sample.module].append({
            "file": rel, "call": index, "step": sample.step, "timestep": sample.timestep,
            "holdout": len(self.entries[sample.module]) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1,
            "sha256": sha256_file(self.folder / rel),
        })


def _valid_cache(folder: Path, key: str) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("key") != key:
        return None
    for entry in (e for m in manifest.get("modules", {}).values() for e in m["samples"]):
        path = folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return None
    return manifest


def calibration_dir(root: Path) -> Path:
    return Path(root) / "calibration"


def task_calibration(root: Path) -> CalibrationSet:
    """The calibration cache under a task's ``root``: its manifest was verified by the driver, and
    its samples arrive checked by content (``quant.stages.executor``)."""
    folder = calibration_dir(root)
    return CalibrationSet(folder, json.loads((folder / "manifest.json").read_text(encoding="utf-8")))


def task_inputs(root: Path, module: str, folders: tuple[str, ...]) -> tuple[str, ...]:
    """What a task on ``module``'s models reads, relative to ``root``: each ONNX folder's manifest,
    the module's model and its external data, and the module's calibration samples."""
    paths = []
    for folder in folders:
        model = onnx_path(root, folder, module)
        paths += [model.with_name("manifest.json"), model, Path(f"{model}.data")]
    paths += [calibration_dir(root) / "manifest.json", calibration_dir(root) / module]
    return tuple(str(p.relative_to(root)) for p in paths)


def calibrate(model: LoadedModel, spec: CalibrationSpec, settings: GenerationSettings, root: Path,
              show_progress: bool = True) -> CalibrationSet:
    """Capture (or reuse) calibration samples for every module of ``model``, running it on the
    audit's device (``quant.support.target.set_device``)."""
    settings.check_for(model.pipe)
    folder = calibration_dir(root)
    device = torch_device()
    key = spec.key(model.fingerprint, settings, device.type)
    manifest = _valid_cache(folder, key)
    if manifest is not None:
        return CalibrationSet(folder, manifest, reused=True)
    if folder.exists():
        Workspace.remove(folder)  # another key, or damaged: recompute from scratch
    jobs = [(p, s) for p in spec.prompts for s in spec.seeds]
    per_gen = calls_per_generation(model.pipe, settings)
    chosen = {m: set(spread_indices(n, len(jobs), spec.samples_per_module)) for m, n in per_gen.items()}
    sink = _DiskSink(folder, chosen)
    pipe = model.pipe_on(device)
    with record_inputs(pipe, sink):
        for prompt, seed in progress(jobs, "calibrate", "video", show_progress):
            generate_video(pipe, prompt, seed, settings)
    manifest = {
        "schema_version": SCHEMA_VERSION, "key": key,
        "model": model.identity(),
        "spec": asdict(spec), "settings": settings.to_dict(),
        "modules": {m: {"calls": sink.seen[m], "samples": sink.entries[m]} for m in per_gen},
    }
    atomic_write_json(folder / "manifest.json", manifest)
    return CalibrationSet(folder, manifest)


def calibrate_task(context, spec: CalibrationSpec, settings: GenerationSettings) -> bool:
    """``calibrate`` as a task (``quant.stages.executor``): the samples under ``context.root``;
    returns whether an earlier capture with the same key was reused."""
    return calibrate(context.model, spec, settings, context.root, show_progress=False).reused


def open_calibration(root: Path, model: LoadedModel) -> CalibrationSet:
    """The calibration cache under ``root`` for ``model``, for the quantize stage.

    Raises:
        UserError: no finished cache, one from another model, or a damaged file.
    """
    folder = calibration_dir(root)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{folder / 'manifest.json'}: no calibration here; run `quant-audit calibrate --out {root}` first") from None
    found = manifest.get("model", {}).get("fingerprint")
    if found != model.fingerprint:
        raise UserError(f"{folder}: calibration cache is from model {found}, not {model.fingerprint} ('{model.name}'); "
                        f"rerun `quant-audit calibrate` for this model")
    if _valid_cache(folder, manifest.get("key")) is None:
        raise UserError(f"{folder}: calibration cache is damaged (a sample is missing or changed); rerun `quant-audit calibrate`")
    return CalibrationSet(folder, manifest)
