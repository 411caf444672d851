"""The generate stage: fixed-seed videos for one variant.

Writes ``<out>/videos/<variant>/<prompt_id>_s<seed>.npz`` (``frames`` uint8 (F, H, W, 3), plus
the prompt, seed and variant), an animated ``.webp`` beside each, the latent trajectory in
``latents/<prompt_id>_s<seed>.npz``, and ``manifest.json`` with the
model fingerprint, settings, module recipes and a SHA-256 of each video's frames (same
frames, same hash: two runs can be compared at a glance). The manifest is rewritten
after every video, so an interrupted run keeps what it finished; called again with the same
``key``, the videos it lists (and whose frames still hash the same) are reused, not regenerated.
A different ``key`` clears the folder first, so stale videos are never scored.

Example::

    records = generate_variant(model, parse_variant("onnx", mods), prompts, [0, 1], settings, Path("runs/r1"))
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quant.stages.executor import LocalExecutor, Task, TaskContext, TaskResult
from quant.stages.workspace import Workspace

from quant.support.environment import versions
from quant.support.files import atomic_write_json, file_hash
from quant.support.target import torch_device
from quant.pipeline.models import LoadedModel
from quant.pipeline.cost import ModuleClock, PeakRSS, model_bytes
from quant.pipeline.ort_modules import STAND_INS, open_session
from quant.recipes.export import onnx_size_bytes
from quant.pipeline.sampling import generate_video
from quant.recipes.manifest import check_onnx_folder, verify_file
from quant.pipeline.prompts import prompt_id
from quant.pipeline.settings import GenerationSettings, shape_key
from quant.recipes.names import Variant, onnx_path, split_target
from quant.pipeline.video_io import LATENTS_DIR, load_frames, save_npz, save_trajectory, save_webp

SCHEMA_VERSION = 3  # 3: wall and per-module seconds per video, the variant's cost; 2: key, NaN/Inf modules


@dataclass
class VideoRecord:
    """One generated video file and how it was made."""

    file: str
    prompt_id: str
    prompt: str
    seed: int
    frames: int
    nonfinite: bool
    frames_sha256: str
    nonfinite_modules: dict[str, int] = field(default_factory=dict)  # ONNX module -> calls with NaN/Inf output
    seconds: float = 0.0  # wall time of the generation (quant.pipeline.cost)
    module_seconds: dict[str, float] = field(default_factory=dict)  # module -> seconds in its calls


def video_dir(root: Path, variant: str) -> Path:
    """``<root>/videos/<variant>``; the name is checked to be a plain folder name."""
    return Workspace.videos(root, variant)


def _manifest(model: LoadedModel, variant: Variant, settings: GenerationSettings, records: list[VideoRecord],
              key: str | None, cost: dict | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "variant": variant.name,
        "modules": variant.modules,
        "noise_ulps": variant.noise_ulps,
        "model": model.identity(),
        "settings": settings.to_dict(),
        "versions": versions(),
        "videos": [asdict(r) for r in records],
        "cost": cost or {},
    }


def _finished(folder: Path, key: str | None) -> dict[tuple[str, int], VideoRecord]:
    """Videos a previous call with the same ``key`` finished; a different key clears ``folder``."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = None
    if key is None or manifest is None or manifest.get("key") != key or manifest.get("schema_version") != SCHEMA_VERSION:
        if folder.is_dir():
            Workspace.remove(folder)
        return {}
    done = {}
    for entry in manifest.get("videos", []):
        record = VideoRecord(**entry)
        try:
            frames = load_frames(folder / record.file)
        except Exception:  # noqa: BLE001 - a damaged file is regenerated, not trusted
            continue
        if hashlib.sha256(frames.tobytes()).hexdigest() == record.frames_sha256:
            done[(record.prompt, record.seed)] = record
    return done


def check_variant_files(model: LoadedModel, variant: Variant, root: Path, settings: GenerationSettings) -> None:
    """Every ONNX file ``variant`` runs is listed in its folder's manifest, for this model and shape,
    with the recorded SHA-256.

    Raises:
        UserError: naming the folder or file.
    """
    manifests = {r: check_onnx_folder(root, r, model, settings) for r in sorted(set(variant.onnx_modules.values()))}
    for module, recipe in variant.onnx_modules.items():
        verify_file(onnx_path(root, recipe, module), manifests[recipe], module)


def _stand_in(model: LoadedModel, module: str, recipe: str, path: Path):
    original = model.pipe.vae if module == "vae_decoder" else getattr(model.pipe, module)
    emulated = split_target(recipe)[1] is not None  # an emulation is float math: never fused by ORT
    return STAND_INS[module](open_session(path, optimize=not emulated), original.config, str(path))


def assemble(model: LoadedModel, variant: Variant, root: Path, settings: GenerationSettings):
    """A ``WanPipeline`` running ``variant``: PyTorch modules where the recipe is ``torch``,
    ONNX stand-ins from ``<root>/onnx/...`` elsewhere; on the audit's device
    (``quant.support.target.set_device``: the stand-ins take and give tensors there)."""
    from diffusers import WanPipeline

    check_variant_files(model, variant, root, settings)
    device = torch_device()
    ref = model.pipe_on(device)
    parts = {"text_encoder": ref.text_encoder, "transformer": ref.transformer,
             "transformer_2": ref.transformer_2, "vae_decoder": ref.vae}
    for module, recipe in variant.onnx_modules.items():
        parts[module] = _stand_in(model, module, recipe, onnx_path(root, recipe, module))
    pipe = WanPipeline(
        tokenizer=ref.tokenizer, text_encoder=parts["text_encoder"], vae=parts["vae_decoder"],
        scheduler=ref.scheduler.__class__.from_config(ref.scheduler.config),
        transformer=parts["transformer"], transformer_2=parts["transformer_2"],
        boundary_ratio=ref.config.boundary_ratio, expand_timesteps=ref.config.expand_timesteps,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if device.type == "cpu" else pipe.to(device)


def nonfinite_counts(pipe) -> dict[str, int]:
    """module -> calls so far whose output held NaN/Inf, for the ONNX stand-ins in ``pipe``."""
    parts = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer,
             "transformer_2": pipe.transformer_2, "vae_decoder": pipe.vae}
    return {m: part.nonfinite_calls for m, part in parts.items() if hasattr(part, "nonfinite_calls")}


PIPES = 2  # assembled pipelines kept per process (a variant's videos reuse its ORT sessions)
_PIPES: dict[tuple, object] = {}


def _pipe(model: LoadedModel, variant: Variant, root: Path, settings: GenerationSettings):
    """``assemble`` once per (model, variant modules, model files' content) in this process."""
    paths = {m: onnx_path(root, r, m) for m, r in variant.onnx_modules.items()}
    if not all(p.is_file() for p in paths.values()):
        return assemble(model, variant, root, settings)  # says which file is missing
    files = tuple(sorted((m, file_hash(p)) for m, p in paths.items()))
    key = (model.fingerprint, tuple(sorted(variant.modules.items())), files, json.dumps(shape_key(settings), sort_keys=True))
    if key not in _PIPES:
        while len(_PIPES) >= PIPES:
            _PIPES.pop(next(iter(_PIPES)))
        _PIPES[key] = assemble(model, variant, root, settings)
    return _PIPES[key]


def video_name(index: int, seed: int) -> str:
    return f"{prompt_id(index)}_s{seed}"


def video_task(context: TaskContext, variant: Variant, settings: GenerationSettings, prompt: str, index: int,
               seed: int, fps: int, save_latents: bool) -> dict:
    """One video (a task, ``quant.stages.executor``): generated with ``variant``'s models under
    ``context.root``, timed (wall and per module), its files written to ``videos/<variant>/``;
    returns its ``VideoRecord`` and the process's peak RSS while it ran."""
    model, root = context.model, context.root
    pipe = _pipe(model, variant, root, settings)
    folder = video_dir(root, variant.name)
    with ModuleClock(pipe) as clock, PeakRSS() as rss:
        before = nonfinite_counts(pipe)
        start = time.perf_counter()
        video = generate_video(pipe, prompt, seed, settings, trajectory=save_latents, noise_ulps=variant.noise_ulps)
        seconds = time.perf_counter() - start
        after = nonfinite_counts(pipe)
    name = video_name(index, seed)
    path = folder / f"{name}.npz"
    if video.trajectory is not None:
        save_trajectory(folder / LATENTS_DIR / f"{name}.npz", video.trajectory)
    save_npz(path, video.frames, prompt=prompt, seed=seed, variant=variant.name, nonfinite=video.nonfinite)
    save_webp(folder / f"{name}.webp", video.frames, fps=fps)
    record = VideoRecord(path.name, prompt_id(index), prompt, seed, int(video.frames.shape[0]), video.nonfinite,
                         hashlib.sha256(video.frames.tobytes()).hexdigest(),
                         {m: after[m] - before[m] for m in after if after[m] - before[m]}, round(seconds, 6),
                         {m: round(t, 6) for m, t in clock.seconds.items()})
    return {"record": asdict(record), "peak_rss_bytes": rss.peak_bytes, "peak_rss_reset": rss.reset,
            "gpu_peak_bytes": rss.gpu_peak_bytes}


def videos_task(context: TaskContext, variant: Variant, settings: GenerationSettings, videos: list[tuple[str, int, int]],
                fps: int, save_latents: bool) -> list[dict]:
    """``video_task`` for each (prompt, index, seed) of ``videos`` in turn (one task): the variant's
    sessions are built once for them in this process."""
    return [video_task(context, variant, settings, prompt, index, seed, fps, save_latents)
            for prompt, index, seed in videos]


class VariantVideos:
    """A variant's videos as tasks (``tasks``: ``per_task`` videos each), gathered as they arrive
    (``collect``: the manifest is rewritten after each task, so an interrupted run keeps them) and
    finished with its cost (``finish``). ``generate_variant`` runs it here; the audit sends the
    tasks of every variant to its executor at once. A task builds the variant's ONNX Runtime
    sessions where it runs (0.3-1.3 s a variant on the demo), so videos of one variant are sent
    together unless the executor has more room than there are variants."""

    def __init__(self, model: LoadedModel, variant: Variant, prompts: list[str], seeds: list[int],
                 settings: GenerationSettings, root: Path, fps: int = 8, save_latents: bool = True,
                 key: str | None = None, per_task: int = 1):
        self.model, self.variant, self.settings, self.root = model, variant, settings, Path(root)
        self.jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
        self.fps, self.save_latents, self.key = fps, save_latents, key
        self.per_task = max(1, per_task)
        self.folder = video_dir(self.root, variant.name)
        self.records: dict[tuple[str, int], VideoRecord] = {}
        self.peak: tuple[int | None, bool] = (None, False)
        self.gpu_peak: int | None = None  # torch's peak GPU bytes over the videos, on device = "cuda"

    def _inputs(self) -> tuple[str, ...]:
        """The variant's ONNX files and their folders' manifests, relative to ``root``."""
        out = []
        for module, recipe in sorted(self.variant.onnx_modules.items()):
            path = onnx_path(self.root, recipe, module)
            out += [path.with_name("manifest.json"), path, Path(str(path) + ".data")]
        return tuple(dict.fromkeys(str(p.relative_to(self.root)) for p in out))

    def tasks(self) -> list[Task]:
        self.settings.check_for(self.model.pipe)
        check_variant_files(self.model, self.variant, self.root, self.settings)  # before any task is sent
        self.records = _finished(self.folder, self.key)
        inputs = self._inputs()
        rel = self.folder.relative_to(self.root)
        todo = [(prompt, index, seed) for index, prompt, seed in self.jobs if (prompt, seed) not in self.records]
        tasks = []
        for start in range(0, len(todo), self.per_task):
            videos = todo[start:start + self.per_task]
            names = [video_name(index, seed) for _, index, seed in videos]
            label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
            tasks.append(Task(f"generate:{self.variant.name}:{label}", videos_task,
                              {"variant": self.variant, "settings": self.settings, "videos": videos, "fps": self.fps,
                               "save_latents": self.save_latents},
                              inputs=inputs, outputs=tuple(out for name in names for out in (
                                  f"{rel}/{name}.npz", f"{rel}/{name}.webp", f"{rel}/{LATENTS_DIR}/{name}.npz"))))
        return tasks

    def ordered(self) -> list[VideoRecord]:
        return [self.records[(p, s)] for _, p, s in self.jobs if (p, s) in self.records]

    def collect(self, result: TaskResult) -> None:
        for value in result.value:
            record = VideoRecord(**value["record"])
            self.records[(record.prompt, record.seed)] = record
            peak, reset = self.peak
            if value["peak_rss_bytes"] is not None and (peak is None or value["peak_rss_bytes"] > peak):
                self.peak = (value["peak_rss_bytes"], value["peak_rss_reset"])
            gpu = value.get("gpu_peak_bytes")
            if gpu is not None and (self.gpu_peak is None or gpu > self.gpu_peak):
                self.gpu_peak = gpu
        atomic_write_json(self.folder / "manifest.json",
                          _manifest(self.model, self.variant, self.settings, self.ordered(), self.key))

    def finish(self) -> None:
        records = self.ordered()
        onnx_bytes = {m: onnx_size_bytes(onnx_path(self.root, r, m)) for m, r in self.variant.onnx_modules.items()}
        cost = {"peak_rss_bytes": self.peak[0], "peak_rss_reset": self.peak[1],
                "model_bytes": model_bytes(self.model.pipe, onnx_bytes), "videos_timed": sum(1 for r in records if r.seconds)}
        if self.gpu_peak is not None:
            cost["gpu_peak_bytes"] = self.gpu_peak
        atomic_write_json(self.folder / "manifest.json",
                          _manifest(self.model, self.variant, self.settings, records, self.key, cost))


def generate_variant(model: LoadedModel, variant: Variant, prompts: list[str], seeds: list[int],
                     settings: GenerationSettings, root: Path, fps: int = 8,
                     show_progress: bool = True, save_latents: bool = True, key: str | None = None) -> list[VideoRecord]:
    """Generate every (prompt, seed) with ``variant`` in this process and write the files described above.

    With ``save_latents`` the latents after every step go to ``latents/<name>.npz`` beside the
    video, so ``quant-audit score`` can say at which step (and expert) a variant's error enters.
    With ``key`` (what produced the videos, e.g. a hash of model files and settings), videos
    finished by an interrupted call with the same key are kept.
    """
    job = VariantVideos(model, variant, prompts, seeds, settings, root, fps, save_latents, key)
    LocalExecutor(model, root).run(job.tasks(), f"generate {variant.name}", job.collect, show_progress)
    job.finish()
    return job.ordered()


WARMUP_VIDEOS = 1  # with at least 3 timed videos, the first is warm-up (ORT arenas, torch allocator) and not counted


def variant_cost(folder: Path) -> dict:
    """A variant's cost from its manifest (``generate_variant`` measured it): per video the
    median wall time with min and max (the first video left out as warm-up when there are at
    least three), per module the median seconds per video, peak RSS and model size."""
    import statistics

    manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    timed = [VideoRecord(**v) for v in manifest.get("videos", [])]
    timed = [r for r in timed if r.seconds]
    warmup = len(timed) >= 3
    if warmup:
        timed = timed[WARMUP_VIDEOS:]
    cost = manifest.get("cost") or {}
    row: dict = {"videos_timed": len(timed), "warmup_excluded": int(warmup)}
    if timed:
        walls = [r.seconds for r in timed]
        row.update(video_seconds=statistics.median(walls), video_seconds_min=min(walls), video_seconds_max=max(walls))
        for module in sorted({m for r in timed for m in r.module_seconds}):
            row[f"{module}_seconds"] = statistics.median(r.module_seconds.get(module, 0.0) for r in timed)
    if cost.get("peak_rss_bytes"):
        row["peak_rss_mb"] = cost["peak_rss_bytes"] / 2**20
    if cost.get("gpu_peak_bytes"):
        row["gpu_peak_mb"] = cost["gpu_peak_bytes"] / 2**20
    if cost.get("model_bytes"):
        row["model_mb"] = cost["model_bytes"] / 2**20
    return row

