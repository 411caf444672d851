"""`quant-audit run`: export -> calibrate -> quantize -> generate -> score -> gates -> report -> history.

Work is shared between the runs of one model in ``<out>``: models, calibration, videos and
score tables live in ``<out>/work/<fingerprint>/``, and ``quant.stages.ledger`` keys every stage by
what produced it, so a rerun (after a kill, or a new run of an unchanged model) reuses every
finished stage and redoes only what changed. A run folder ``<out>/<run_id>/`` holds what
DESIGN.md lists: ``config.toml``, ``results.json``, ``scores/``, ``junit.xml``, ``report.html``,
and ``onnx/``, ``videos/`` as hard links to the files the numbers came from (a later run
replaces work files by rename, so the links keep this run's bytes). A killed run is resumed
by the next run with the same configuration (same run id). One audit of a model at a time
holds ``<work>/.lock``; a second waits.

Example::

    result = run_audit(load_config(None), Path("runs"), tag="rc1", baseline="latest")
    result.verdict, result.run_dir / "report.html"
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from quant.stages.calibrate import (CalibrationSpec, calibrate_task, calibration_dir, check_modules_called,
                                    load_calibration_prompts, open_calibration)
from quant.config import AuditConfig
from quant.errors import UserError
from quant.support.environment import utc_now, versions
from quant.recipes.export import ExportOptions
from quant.gates import Baseline, GateResult, check_gates, check_regression, mark_noise_floor
from quant.stages.executor import Task
from quant.stages.generate import VariantVideos, VideoRecord, variant_cost, video_dir
from quant.support.files import atomic_path, atomic_write_json, atomic_write_text, json_number
from quant.stages.ledger import Ledger, stage_key
from quant.stages.runner import Stage, StageRun, StageRunner
from quant.stages.workspace import Workspace
from quant.pipeline.models import LoadedModel, load_model
from quant.pipeline.modules import present_modules
from quant.pipeline.settings import shape_key
from quant.support.progress import progress
from quant.pipeline.prompts import read_prompts
from quant.recipes.quantize import QuantizeOptions
from quant.recipes.records import record
from quant.stages.quantize import quantize_inputs, quantize_task, record_quantized, report_path
from quant.stages.score import PromptSet, judge_folder, score_inputs, score_outputs, score_task, table_paths
from quant.support.target import Target, current_target, ort_providers, set_device, set_threads
from quant.recipes.names import FLOOR, Variant, base_recipe, onnx_dir, onnx_path, split_target

SCHEMA_VERSION = 2  # 2: target block, floor, emulated variants, kernel findings
RUN_FILE = "run.json"
# The code behind each stage: a change in any of these files redoes the stage (quant.stages.runner).
EXPORT_SOURCES = ("quant.recipes.export", "quant.recipes.parity", "quant.stages.export", "quant.pipeline.torch_modules",
                  "quant.pipeline.capture", "quant.pipeline.sampling")
QUANTIZE_SOURCES = ("quant.recipes.quantize", "quant.recipes.census", "quant.recipes.emulate", "quant.stages.quantize")
CALIBRATE_SOURCES = ("quant.stages.calibrate", "quant.pipeline.capture", "quant.pipeline.sampling")
EMULATE_SOURCES = ("quant.recipes.emulate", "quant.stages.emulate", "quant.recipes.census")
GENERATE_SOURCES = ("quant.pipeline.sampling", "quant.pipeline.ort_modules", "quant.pipeline.video_io",
                    "quant.stages.generate")
SCORE_SOURCES = ("quant.stages.score", "metrics.psnr", "metrics.ssim", "metrics.fused", "metrics.torch_kernels",
                 "metrics.temporal", "metrics.tensor", "metrics.scores", "metrics.adherence", "metrics.shapes_world")
# What Ray workers must run the same code of (quant.stages.executor): every task function's stage.
TASK_SOURCES = tuple(dict.fromkeys(
    EXPORT_SOURCES + CALIBRATE_SOURCES + QUANTIZE_SOURCES + EMULATE_SOURCES + GENERATE_SOURCES + SCORE_SOURCES
    + ("quant.stages.executor", "quant.recipes.int8", "quant.recipes.fp16", "quant.recipes.inc")))
SENSITIVITY_SOURCES = ("quant.stages.sensitivity", "quant.recipes.quantize", "quant.recipes.int8", "quant.recipes.fp16")


# Which tasks of a batch go first: the longest, so that no worker is left alone with one at the end
# (make demo, export: vae_decoder 19 s of 43; quantize: inc-int8's three largest take 58 s of 97).
_MODULE_ORDER = ("vae_decoder", "transformer", "transformer_2", "text_encoder")
_RECIPE_ORDER = ("inc-int8", "int8", "fp16", "int8-dynamic")


def cost_rank(module: str, recipe: str = "") -> tuple[int, int]:
    """Sorts a batch's (recipe, module) work with the usually longest first."""
    recipe = base_recipe(recipe) if recipe else ""
    return (_RECIPE_ORDER.index(recipe) if recipe in _RECIPE_ORDER else len(_RECIPE_ORDER),
            _MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER))


@dataclass
class StageTime:
    name: str
    seconds: float
    reused: bool
    where: str = "local"  # the driver, or the Ray nodes its tasks ran on (quant.stages.executor)


@dataclass
class AuditResult:
    run_id: str
    run_dir: Path
    verdict: str
    results: dict
    failed: list[GateResult] = field(default_factory=list)


# --- run folders -------------------------------------------------------------------------------

def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


def _resumable_run(out: Path, config_key: str) -> str | None:
    """The newest run in ``out`` that did not finish and used the same configuration."""
    candidates = []
    for path in Workspace(out).run_files():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("status") == "running" and info.get("config_key") == config_key:
            candidates.append((info.get("started", ""), info["run_id"]))
    return max(candidates)[1] if candidates else None


def work_dir(out: Path, fingerprint: str) -> Path:
    """Where the runs of one model in ``out`` share their models, calibration, videos and scores."""
    return Workspace(out).work(fingerprint)


def _link_file(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (a copy where links are not possible), replacing ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """``_link_file`` for every file under ``src``, except temporary files and folders (any part of
    the path starting with a dot: what atomic writes and a killed quantizer leave behind)."""
    for path in src.rglob("*"):
        relative = path.relative_to(src)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            _link_file(path, dst / relative)


# --- the audit ---------------------------------------------------------------------------------

def quantize_options(config: AuditConfig, recipe: str, keep: tuple[str, ...] = (),
                     cache: str | None = None) -> QuantizeOptions:
    """The options ``recipe`` quantizes with under ``config`` (method, reduce_range, activation type)."""
    r = record(recipe)
    return QuantizeOptions(method=config.int8_method if r.methods else "minmax", nodes_to_exclude=keep,
                           calibration_cache=cache, reduce_range=config.int8_reduce_range and r.reduce_range,
                           activation_type=config.int8_activation_type if r.activation_type else "int8")


class Audit:
    """One run: the stages in order, each a small method; ``run_audit`` drives it."""

    def __init__(self, config: AuditConfig, model: LoadedModel, out: Path, run_id: str, show_progress: bool,
                 fresh: bool = False, target: Target | None = None):
        self.config, self.model, self.out, self.run_id = config, model, out, run_id
        self.workspace = Workspace(out, config.history_url)
        self.run_dir = self.workspace.run_dir(run_id)
        self.work = self.workspace.work(model.fingerprint)
        self.ledger = Ledger(self.work)
        self.runner = StageRunner(self.ledger, fresh, self._finished)
        self.show, self.fresh = show_progress, fresh
        self.settings = config.settings
        self.modules = present_modules(model.pipe)
        self.prompt_set = PromptSet.from_file(config.eval_prompts)
        self.prompts = self.prompt_set.prompts
        self.calibration_prompts = load_calibration_prompts(config.calibration_prompts, config.eval_prompts)
        self.variants = [config.variant(n, self.modules) for n in config.variant_names(self.modules)]
        self.keys: dict[str, str] = {}
        self.calibration = None  # the CalibrationSet, once `calibrate` ran
        self.keep_fp32: dict[str, tuple[str, ...]] = dict(config.keep_fp32)
        self.extra_gates: dict[str, tuple] = {}  # variant -> gates not in the config (the searched mix)
        self.times: list[StageTime] = []
        self._executor = None
        self.executor_workers: int | None = None  # worker processes (executor = "processes"), once started
        self.records: dict[str, list[VideoRecord]] = {}
        self.adherence: dict | None = None  # the reference's own adherence (reference_adherence), once judged
        # Every stage's numbers depend on the target (ORT kernels, float SIMD paths, threads), so
        # its id is in every key: one --out shared by two machines never mixes their numbers.
        self.target = target or current_target()
        self.base = {"model": model.fingerprint, "shape": shape_key(self.settings), "versions": versions(),
                     "target": self.target.id}

    def _stage(self, name: str, inputs: dict, work, outputs=(), files=(), sources=()) -> str:
        """Run one stage through the runner (``quant.stages.runner``); returns its key."""
        stage = Stage(name, {**self.base, **inputs}, work, tuple(outputs), tuple(files), tuple(sources))
        return self.runner.run(stage).key

    def _task_stage(self, name: str, inputs: dict, tasks, collect, outputs=(), files=(), sources=(),
                    finish=None) -> Stage:
        """A stage whose work is ``tasks`` (a list, or a function planning them) on the executor."""
        return Stage(name, {**self.base, **inputs}, finish or (lambda: None), tuple(outputs), tuple(files), tuple(sources),
                     tasks=tasks if callable(tasks) else (lambda: tasks), collect=collect)

    @property
    def executor(self):
        """``[runtime] executor``: this process, its worker processes, or a Ray cluster (connected
        on first use)."""
        if self._executor is None:
            from quant.stages.executor import make_executor

            self._executor = make_executor(self.config.executor, self.model, self.work, self.target,
                                           self.config.run_threads, self.config.ray_address, TASK_SOURCES,
                                           self.config.workers)
            self.executor_workers = getattr(self._executor, "workers", None)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def _batch(self, stages: list[Stage], label: str) -> None:
        if stages:
            self.runner.run_batch(stages, self.executor, label, self.show)

    def _finished(self, done: StageRun) -> None:
        self.keys[done.name] = done.key
        self.times.append(StageTime(done.name, done.seconds, done.reused, done.where))
        if not done.reused and not sys.stderr.isatty():  # a CI log: one line per stage that did work
            print(f"{done.name}: {done.seconds:.1f} s", file=sys.stderr, flush=True)

    def prepare(self) -> None:
        """Export every module and capture the calibration samples: independent work, so one batch
        of tasks (the calibration among the exports, after the longest)."""
        stages = self.export_stages()
        stages.insert(min(3, len(stages)), self.calibrate_stage())
        self._batch(stages, "export + calibrate")
        self.calibration = open_calibration(self.work, self.model)

    def calibrate_stage(self) -> Stage:
        spec = CalibrationSpec(tuple(self.calibration_prompts), self.config.calibration_seeds,
                               self.config.calibration_samples)
        if self.fresh and (self.work / "calibration").exists():
            Workspace.remove(self.work / "calibration")
        folder = calibration_dir(self.work)
        task = Task("calibrate", calibrate_task, {"spec": spec, "settings": self.settings},
                    outputs=(str(folder.relative_to(self.work)),))
        inputs = {"stage": "calibrate", "spec": asdict(spec), "settings": self.settings.to_dict()}
        return self._task_stage("calibrate", inputs, [task], lambda r: None, [folder / "manifest.json"],
                                sources=CALIBRATE_SOURCES)

    def export_stages(self) -> list[Stage]:
        """Every module's export (tasks on the executor); a module ``[modules]`` names is imported
        from the user's file here and now."""
        from quant.recipes.external import model_files
        from quant.stages.export import export_task, import_external, record_export

        options = ExportOptions(simplify=self.config.simplify)
        stages = []
        for module in sorted(self.modules, key=cost_rank):
            inputs = {"stage": "export", "module": module, "simplify": options.simplify, "opset": options.opset,
                      "capture": self.prompts[:2], "settings": self.settings.to_dict()}
            external = self.config.modules.get(module)
            if external is not None:
                self._stage(f"export:{module}", {**inputs, "external": external.to_toml()},
                            lambda m=module, e=external: import_external(
                                self.model, self.settings, self.work, self.prompts, m, e, show_progress=False),
                            [onnx_path(self.work, "onnx", module)], files=model_files(external.path),
                            sources=EXPORT_SOURCES + ("quant.recipes.external",))
                continue
            dest = onnx_path(self.work, "onnx", module)
            task = Task(f"export:{module}", export_task,
                        {"module": module, "settings": self.settings, "prompts": self.prompts[:2], "options": options},
                        outputs=tuple(str(p.relative_to(self.work)) for p in (dest, Path(f"{dest}.data"))))
            stages.append(self._task_stage(
                f"export:{module}", inputs, [task], lambda r: record_export(
                    self.model, self.settings, self.work, self.prompts[:2], options, *r.value),
                [dest], sources=EXPORT_SOURCES))
        return stages

    def _model_key(self, recipe: str, module: str) -> str:
        if recipe == "torch":
            return self.model.fingerprint
        if recipe == "onnx":
            return self.keys[f"export:{module}"]
        if split_target(recipe)[1] is not None:
            return self.keys[f"emulate:{recipe}:{module}"]
        return self.keys[f"quantize:{recipe}:{module}"]

    def quantize_options(self, recipe: str, keep: tuple[str, ...] = (), cache: str | None = None) -> QuantizeOptions:
        return quantize_options(self.config, recipe, keep, cache)

    def quantize(self, variants: list[Variant] | None = None, label: str = "quantize") -> None:
        """Quantize every (recipe, module) the variants use; ``<recipe>+keep-<tag>`` keeps its nodes FP32,
        ``<recipe>~<target>`` is then emulated from ``<recipe>``'s models."""
        variants = self.variants if variants is None else variants
        used = list(dict.fromkeys((r, m) for v in variants for m, r in v.modules.items() if r not in ("torch", "onnx")))
        jobs = sorted(dict.fromkeys((split_target(r)[0], m) for r, m in used),
                      key=lambda job: cost_rank(job[1], job[0]))
        stages = []
        for recipe, module in jobs:
            keep = self.keep_fp32.get(recipe, ())
            cache = None
            if keep and record(recipe).shares_calibration:  # mixes of one module share one range cache
                cache = (f"calibration/ranges.{module}.{self.config.int8_method}."
                         f"{self.keys[f'export:{module}']}.json")
            options = self.quantize_options(recipe, keep)
            inputs = {"stage": "quantize", "recipe": base_recipe(recipe), "module": module,
                      "options": options.record(), "export": self.keys[f"export:{module}"],
                      "calibration": self.keys["calibrate"]}
            task = Task(f"quantize:{recipe}:{module}", quantize_task,
                        {"recipe": recipe, "module": module, "options": options, "settings": self.settings,
                         "cache": cache},
                        inputs=quantize_inputs(self.work, module, cache if cache and (self.work / cache).is_file() else None),
                        outputs=tuple(str(p.relative_to(self.work)) for p in (
                            onnx_path(self.work, recipe, module), Path(f"{onnx_path(self.work, recipe, module)}.data")))
                        + ((cache,) if cache else ()))
            stages.append(self._task_stage(
                f"quantize:{recipe}:{module}", inputs, [task], lambda r, rec=recipe, o=options: record_quantized(
                    self.model, self.settings, self.work, rec, o, {r.task.kwargs["module"]: r.value},
                    self.calibration.manifest),
                [onnx_path(self.work, recipe, module)], files=[onnx_path(self.work, "onnx", module)],
                sources=QUANTIZE_SOURCES + (record(recipe).source,)))
        self._batch(stages, label)
        self.emulate([(r, m) for r, m in used if split_target(r)[1] is not None])

    def emulate(self, jobs: list[tuple[str, str]]) -> None:
        """``<recipe>~<target>`` models rewritten from ``<recipe>``'s (``quant.stages.emulate``), tasks on
        the executor."""
        from quant.stages.emulate import emulate_inputs, emulate_task, record_emulated

        stages = []
        for recipe, module in sorted(jobs, key=lambda job: cost_rank(job[1], job[0])):
            source = split_target(recipe)[0]
            inputs = {"stage": "emulate", "recipe": recipe, "module": module,
                      "quantize": self.keys[f"quantize:{source}:{module}"]}
            dest = onnx_path(self.work, recipe, module)
            task = Task(f"emulate:{recipe}:{module}", emulate_task,
                        {"recipe": recipe, "module": module, "settings": self.settings},
                        inputs=emulate_inputs(self.work, recipe, module),
                        outputs=tuple(str(p.relative_to(self.work)) for p in (dest, Path(f"{dest}.data"))))
            stages.append(self._task_stage(
                f"emulate:{recipe}:{module}", inputs, [task], lambda r, rec=recipe, m=module: record_emulated(
                    self.model, self.settings, self.work, rec, {m: r.value}),
                [dest], files=[onnx_path(self.work, source, module)], sources=EMULATE_SOURCES))
        self._batch(stages, "emulate")

    def _generate_inputs(self, variant: Variant) -> dict:
        return {"stage": "generate", "noise_ulps": variant.noise_ulps, "settings": self.settings.to_dict(),
                "prompts": self.prompts, "seeds": list(self.config.seeds),
                "latents": self.config.save_latents, "fps": self.config.fps,
                "modules": {m: [r, self._model_key(r, m)] for m, r in variant.modules.items()}}

    def generate(self, variants: list[Variant] | None = None, label: str = "generate") -> None:
        """The reference (``torch``) and every variant's videos, each a stage keyed by its models."""
        reference = Variant("torch", {m: "torch" for m in self.modules})
        variants = [reference] + (self.variants if variants is None else variants)
        # emulated int8 (<variant>~<target>) runs as float math of every Q/DQ node: 2-3x the others'
        # time a video on the demo; the longest go first, so that no worker is left with one at the end
        variants = sorted(variants, key=lambda v: "~" not in v.name)
        per_variant = len(self.prompts) * len(self.config.seeds)
        # Several processes: each builds a variant's sessions for the videos it makes, so whole
        # variants per task unless the executor has room for more tasks than that makes. One
        # process (local) keeps its sessions: a task per video, a progress step per video.
        slots = self.executor.slots
        per_task = 1 if slots == 1 else max(1, min(per_variant, per_variant * len(variants) // (4 * slots)))
        stages = []
        for variant in variants:
            name = f"generate:{variant.name}"
            job = VariantVideos(self.model, variant, self.prompts, list(self.config.seeds), self.settings, self.work,
                                fps=self.config.fps, save_latents=self.config.save_latents, per_task=per_task)

            def plan(job=job, name=name):
                job.key = None if self.fresh else self.runner.keys[name]
                return job.tasks()

            files = [onnx_path(self.work, r, m) for m, r in variant.modules.items() if r != "torch"]
            stages.append(self._task_stage(name, self._generate_inputs(variant), plan, job.collect,
                                           [job.folder / "manifest.json"], files, GENERATE_SOURCES, finish=job.finish))
        self._batch(stages, label)
        for variant in variants:
            manifest = json.loads((video_dir(self.work, variant.name) / "manifest.json").read_text(encoding="utf-8"))
            self.records[variant.name] = [VideoRecord(**v) for v in manifest["videos"]]

    def _score_path(self, variant: str) -> Path:
        return Workspace.scores(self.work, variant)

    def score(self, variants: list[Variant] | None = None, label: str = "score") -> dict[str, pd.DataFrame]:
        """Score tables of the variants against ``torch`` (frames, videos, summary, latents)."""
        parts: dict[str, list[pd.DataFrame]] = {"frames": [], "videos": [], "summary": [], "latents": []}
        variants = self.variants if variants is None else variants
        stages = []
        for variant in variants:
            inputs = {"stage": "score", "reference": self.keys["generate:torch"],
                      "candidate": self.keys[f"generate:{variant.name}"], "metrics": _metrics_version(),
                      "prompts": self.prompt_set.record()}
            task = Task(f"score:{variant.name}", score_task, {"variant": variant.name, "prompts": self.prompt_set},
                        inputs=score_inputs(variant.name), outputs=score_outputs(variant.name))
            stages.append(self._task_stage(f"score:{variant.name}", inputs, [task], lambda r: None,
                                           [self._score_path(variant.name)], sources=SCORE_SOURCES))
        self._batch(stages, label)
        for variant in variants:
            for kind, path in table_paths(self._score_path(variant.name)).items():
                if kind != "metrics" and path.is_file():
                    parts[kind].append(pd.read_csv(path))
        tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items() if v}
        if "summary" in tables:
            tables["summary"] = tables["summary"].merge(self.cost_table(), on="variant", how="left")
        return tables

    def cost_table(self) -> pd.DataFrame:
        """Per variant what it cost to generate (``quant.stages.generate.variant_cost``), and
        ``speedup_vs_onnx``: the FP32 ONNX variant's median seconds per video over this one's."""
        rows = [{"variant": name, **variant_cost(video_dir(self.work, name))} for name in self.records
                if (video_dir(self.work, name) / "manifest.json").is_file()]
        table = pd.DataFrame(rows)
        if "onnx" in self.records and "video_seconds" in table:
            onnx = table.loc[table["variant"] == "onnx", "video_seconds"]
            if len(onnx) and onnx.notna().all():
                table["speedup_vs_onnx"] = float(onnx.iloc[0]) / table["video_seconds"]
        return table

    def reference_adherence(self) -> dict | None:
        """Whether the FP32 reference itself shows its prompts (shapes world only; None otherwise):
        the rates, the failed prompts and one row per video."""
        out = Workspace.scores(self.work, "torch").with_name("adherence.json")
        inputs = {"stage": "adherence", "reference": self.keys["generate:torch"], "prompts": self.prompt_set.record()}

        def judge() -> None:
            videos, summary = judge_folder(video_dir(self.work, "torch"), self.prompt_set)
            record = {"summary": {k: json_number(v) for k, v in summary.iloc[0].items() if k != "variant"}
                      if len(summary) else None,
                      "videos": [{k: json_number(v) for k, v in r.items()} for r in videos.to_dict("records")]}
            atomic_write_json(out, record)

        self._stage("adherence:torch", inputs, judge, [out], sources=SCORE_SOURCES)
        record = json.loads(out.read_text(encoding="utf-8"))
        self.adherence = record if record["summary"] else None
        return self.adherence

    def evaluate(self, variants: list[Variant], keep: dict[str, tuple[str, ...]] | None = None,
                 label: str = "evaluate") -> pd.DataFrame:
        """Quantize, generate and score ``variants`` (``keep``: recipe name -> nodes kept FP32, for
        ``<recipe>+keep-<tag>``); their summary rows. What the search and INC comparison call
        (``quant.audit.search.Evaluator``): the audit keeps its own bookkeeping."""
        for recipe, nodes in (keep or {}).items():
            self.keep_fp32[recipe] = tuple(nodes)
        self.quantize(variants, label=f"{label}: quantize")
        self.generate(variants, label=label)
        return self.score(variants, label=f"{label}: score")["summary"]

    def sensitivity(self, modules, recipe: str) -> dict[str, pd.DataFrame]:
        """Per-node sensitivity of ``modules`` to ``recipe`` (``quant.stages.sensitivity``), a stage each."""
        from quant.stages.sensitivity import SCHEMA_VERSION, node_sensitivity, read_sensitivity

        out = {}
        for module in modules:
            if f"quantize:{recipe}:{module}" not in self.keys:
                self.quantize([Variant(f"{recipe}@{module}", {module: recipe})], label="quantize")
            inputs = {"stage": "sensitivity", "schema": SCHEMA_VERSION, "recipe": recipe, "module": module,
                      "quantize": self.keys[f"quantize:{recipe}:{module}"],
                      "options": self.quantize_options(recipe).record()}
            self._stage(f"sensitivity:{recipe}:{module}", inputs, lambda m=module: node_sensitivity(
                self.model, self.work, m, recipe, self.quantize_options(recipe),
                show_progress=self.show), files=[onnx_path(self.work, recipe, module)], sources=SENSITIVITY_SOURCES)
            out[module] = read_sensitivity(self.work, module, recipe)
        return out

    def nonfinite(self, variant: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for video in self.records[variant]:
            for module, calls in video.nonfinite_modules.items():
                counts[module] = counts.get(module, 0) + calls
        frames = sum(r.nonfinite for r in self.records[variant])
        if frames and not counts:
            counts["decoded frames"] = frames  # a PyTorch module overflowed: no stand-in counted it
        return counts

    def link_files(self) -> None:
        """Hard-link the models and videos this run used into its folder (DESIGN.md: onnx/, videos/)."""
        recipes = {r for v in self.variants for r in v.modules.values()} - {"torch"}
        for recipe in sorted(recipes | {split_target(r)[0] for r in recipes}):
            src = onnx_dir(self.work, recipe)
            _link_tree(src, self.run_dir / "onnx" / src.name)
        for variant in ["torch"] + [v.name for v in self.variants]:
            _link_tree(video_dir(self.work, variant), video_dir(self.run_dir, variant))
        quantized = recipes - {"onnx"}
        reports = sorted({f"quantization/{r}.json" for r in quantized | {split_target(r)[0] for r in quantized}})
        for name in ["parity.json"] + reports:
            if (self.work / name).is_file():
                _link_file(self.work / name, self.run_dir / name)


def _metrics_version() -> dict:
    from metrics.scores import metric_parameters

    return metric_parameters()


# --- gates and results -------------------------------------------------------------------------

def _parity_gates(parity: dict) -> list[GateResult]:
    out = []
    for module, entry in parity.get("modules", {}).items():
        value = entry.get("rel_l2")
        out.append(GateResult("export", f"parity_rel_l2[{module}]", "<=", parity.get("threshold"), value,
                              bool(entry.get("passed")), "parity",
                              "" if entry.get("passed") else f"ONNX export of {module} differs from PyTorch "
                                                              f"(rel-L2 {value if value is not None else 'NaN/Inf'})"))
    return out


def _kind(audit: Audit, name: str) -> str:
    plain, target = split_target(name)
    if name == FLOOR:
        return "floor"
    if plain in audit.config.mixes or plain in audit.extra_gates:
        return "mix"
    return "attribution" if "@" in plain else "full"


def evaluate(audit: Audit, summary: pd.DataFrame, baseline: Baseline | None) -> tuple[list[dict], list[GateResult]]:
    """Per-variant entries for ``results.json`` and every gate checked (parity, finite, thresholds,
    regression); threshold gates tighter than the ``floor`` variant's own score are marked."""
    rows = {r["variant"]: r for r in summary.to_dict("records")}
    floor = rows.get(FLOOR)
    entries, checked = [], []
    for variant in audit.variants:
        row = rows.get(variant.name, {})
        nonfinite = audit.nonfinite(variant.name)
        own = audit.config.gates_for(variant.name) or audit.extra_gates.get(variant.name, ())
        gates = mark_noise_floor(check_gates(variant.name, row, own, nonfinite), floor)
        if baseline is not None and variant.name in baseline.metrics and audit.config.regression:
            gates += check_regression(variant.name, row, baseline.metrics[variant.name], audit.config.regression,
                                      baseline.run_id, baseline.note(audit.target.id))
        checked += gates
        emulates = split_target(variant.name)[1]
        entries.append({"name": variant.name, "kind": _kind(audit, variant.name), "modules": variant.modules,
                        **({"emulates": emulates} if emulates else {}),
                        **({"noise_ulps": variant.noise_ulps} if variant.noise_ulps else {}),
                        "videos": len(audit.records[variant.name]), "nonfinite": nonfinite,
                        "metrics": {k: json_number(v) for k, v in row.items() if k != "variant"},
                        "passed": all(g.passed for g in gates), "gates": [g.to_dict() for g in gates]})
    return entries, checked


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_scores(run_dir: Path, tables: dict[str, pd.DataFrame]) -> None:
    for kind, name in (("frames", "frames.csv"), ("videos", "videos.csv"), ("summary", "summary.csv"),
                       ("latents", "latents.csv")):
        if kind in tables:
            with atomic_path(run_dir / "scores" / name) as tmp:
                tables[kind].to_csv(tmp, index=False, float_format="%.10g")
    atomic_write_json(run_dir / "scores" / "metrics.json", _metrics_version())


def kernel_findings(work: Path, recipes) -> list[dict]:
    """Per (recipe, module): kernel SQNR and what it means (``quant_report.kernel_finding``)."""
    out = []
    for recipe in sorted(recipes):
        report = _read_json(report_path(work, recipe))
        for module, m in report.get("modules", {}).items():
            if "kernel" in m:
                out.append({"recipe": recipe, "module": module, "sqnr_min_db": json_number(m.get("sqnr_min_db")),
                            "float_math_sqnr_min_db": json_number(m.get("float_math_sqnr_min_db")),
                            "kernel_sqnr_db": json_number(m.get("kernel_sqnr_db")),
                            "kernel_identical": m.get("kernel_identical", False), **m["kernel"]})
    return out


def emulation_summary(work: Path, recipes) -> dict:
    """``quantization/<recipe>~<target>.json`` per emulated recipe: per module, SQNR and kernel SQNR there."""
    return {r: _read_json(report_path(work, r)) for r in sorted(recipes) if split_target(r)[1]}


def build_results(audit: Audit, entries: list[dict], checked: list[GateResult], parity: dict,
                  baseline: Baseline | None, started: str, argv: list[str]) -> dict:
    verdict = "pass" if all(g.passed for g in checked) else "fail"
    return {
        "schema_version": SCHEMA_VERSION, "run_id": audit.run_id, "tag": audit.config.tag,
        "started": started, "finished": utc_now(),
        "verdict": verdict,
        "model": audit.model.identity(), "modules": audit.modules,
        "settings": audit.settings.to_dict(),
        "prompts": [{"id": pid, "text": text, "tags": audit.prompt_set.tags[pid]}
                    for pid, text in audit.prompt_set.texts.items()],
        "seeds": list(audit.config.seeds),
        "reference_adherence": audit.adherence,
        "config": audit.config.to_dict(),
        "command": argv,
        "reproduce": shlex.join(["quant-audit", "run", "--config", str(audit.run_dir / "config.toml"), "--out", str(audit.out)]),
        "versions": versions(),
        "target": audit.target.to_dict(),
        "parity": {m: {k: e.get(k) for k in ("passed", "max_abs", "rel_l2", "samples", "threshold")}
                   for m, e in parity.get("modules", {}).items()},
        "baseline": None if baseline is None else {"run_id": baseline.run_id, "target": baseline.target},
        "kernel_findings": kernel_findings(audit.work, _quantized_recipes(audit)),
        "emulation": {r: {"emulates": e.get("emulates"), "description": e.get("emulates_description"),
                          "modules": {m: {k: json_number(v) if isinstance(v, float) else v for k, v in d.items()}
                                      for m, d in e.get("modules", {}).items()}}
                      for r, e in emulation_summary(audit.work, _quantized_recipes(audit)).items()},
        "executor": audit.config.executor,
        **({"workers": audit.executor_workers} if audit.executor_workers else {}),
        "stages": [{"name": t.name, "seconds": round(t.seconds, 3), "reused": t.reused, "where": t.where}
                   for t in audit.times],
        "failed_gates": [g.to_dict() for g in checked if not g.passed],
        "parity_gates": [g.to_dict() for g in checked if g.kind == "parity"],
        "search_gates": [g.to_dict() for g in checked if g.kind == "search"],
        "variants": entries,
    }


def _quantized_recipes(audit: Audit) -> set[str]:
    return {r for v in audit.variants for r in v.modules.values()} - {"torch", "onnx"}


def _extras_for_results(extras: dict) -> dict:
    out = {}
    if "sensitivity" in extras:
        out["sensitivity"] = {"recipe": extras["sensitivity"]["recipe"],
                              "modules": {m: [{k: json_number(v) for k, v in r.items()} for r in t.to_dict("records")]
                                          for m, t in extras["sensitivity"]["modules"].items() if t is not None}}
    if "search" in extras:
        out["search"] = extras["search"]
    return out


# --- driver ------------------------------------------------------------------------------------

@contextmanager
def locked_work(out: Path, fingerprint: str):
    """Hold ``<work>/.lock`` of this model in ``out`` (waiting, with a message, for another audit)."""
    work = work_dir(out, fingerprint)
    work.mkdir(parents=True, exist_ok=True)
    lock = FileLock(work / ".lock")
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        print(f"waiting for another audit of this model (lock {work / '.lock'})", file=sys.stderr)
        lock.acquire()
    try:
        yield work
    finally:
        lock.release()


def _open_run(config: AuditConfig, model: LoadedModel, out: Path, config_key: str, fresh: bool,
              show_progress: bool, target: Target) -> tuple[Audit, str]:
    """Resume the unfinished run with this config, or start a new one; returns it and its start time."""
    run_id = None if fresh else _resumable_run(out, config_key)
    resumed = run_id is not None
    audit = Audit(config, model, out, run_id or _new_run_id(), show_progress, fresh, target)
    started = _read_json(audit.run_dir / RUN_FILE).get("started") or utc_now()
    print(("resuming" if resumed else "starting") + f" run {audit.run_id} in {audit.run_dir}", file=sys.stderr)
    print(f"target: {target.describe()}", file=sys.stderr)
    atomic_write_text(audit.run_dir / "config.toml", config.to_toml())
    _write_status(audit, config_key, started, "running")
    return audit, started


def _write_status(audit: Audit, config_key: str, started: str, status: str, **extra) -> None:
    atomic_write_json(audit.run_dir / RUN_FILE, {"schema_version": SCHEMA_VERSION, "run_id": audit.run_id,
                                                 "status": status, "config_key": config_key, "started": started,
                                                 **extra})


def _analyses(audit: Audit) -> dict:
    """The optional ``[sensitivity]`` ranking and ``[search]`` of the config, for results.json.

    A found mix joins the run's variants (generated, scored and gated like the others); a
    search that cannot pass becomes a failing ``search`` gate, not a crash.
    """
    from quant.audit.search import SearchFailed, run_search, search_summary

    out: dict = {}
    config = audit.config
    if config.sensitivity:
        out["sensitivity"] = {"recipe": config.sensitivity_recipe,
                              "modules": audit.sensitivity(config.sensitivity, config.sensitivity_recipe)}
    if config.search and config.search.enabled:
        try:
            result = run_search(audit, config.search)
        except SearchFailed as exc:
            out["search_failed"] = str(exc)
            out["search"] = search_summary(audit.work)
            return out
        variant = Variant(config.search.name, result.chosen.modules)
        audit.extra_gates[variant.name] = result.gates
        audit.variants.append(variant)
        audit.generate([variant], label="generate searched mix")
        out["search"] = search_summary(audit.work)
        ranking = {m: t for m, t in (out.get("sensitivity", {}).get("modules") or {}).items()}
        ranking.update(audit.sensitivity(result.searched, config.search.recipe))
        out["sensitivity"] = {"recipe": config.search.recipe, "modules": ranking}
    return out


def _publish(audit: Audit, tables: dict[str, pd.DataFrame], baseline: str | None, started: str,
             argv: list[str], extras: dict | None = None) -> tuple[dict, list[GateResult]]:
    """Gates, then the run files: results.json, scores/, junit.xml, report.html, history row, dashboard."""
    from reports import history
    from reports.dashboard import render_dashboard
    from reports.html import render_report
    from reports.junit import write_junit

    parity = _read_json(audit.work / "parity.json")
    db = audit.workspace.history
    baseline_rows = None if baseline is None else Baseline(baseline, history.run_metrics(db, baseline),
                                                           history.run_target(db, baseline))
    entries, checked = evaluate(audit, tables["summary"], baseline_rows)
    checked = _parity_gates(parity) + checked
    extras = extras or {}
    if "search_failed" in extras:
        checked.append(GateResult("search", "search", "passes", None, None, False, "search", extras["search_failed"]))
    results = build_results(audit, entries, checked, parity, baseline_rows, started, argv)
    results.update(_extras_for_results(extras))
    audit.link_files()
    _write_scores(audit.run_dir, tables)
    atomic_write_json(audit.run_dir / "results.json", results)
    write_junit(audit.run_dir / "junit.xml", results)
    start = time.perf_counter()
    render_report(audit.run_dir)
    history.record_run(db, results)
    render_dashboard(audit.out, db)
    results["stages"].append({"name": "report", "seconds": round(time.perf_counter() - start, 3), "reused": False})
    atomic_write_json(audit.run_dir / "results.json", results)
    return results, checked


def check_device(config: AuditConfig) -> None:
    """Put this process on ``[runtime] device`` (``quant.support.target.set_device``); on
    ``"cuda"`` with an onnxruntime that has no GPU provider, say once that ONNX variants run on
    the CPU (the target records the providers, so the verdict says so too).

    Raises:
        UserError: ``"cuda"`` without a CUDA device visible to torch, naming the key.
    """
    set_device(config.device, where=f"{config.source}: runtime.device")
    if config.device == "cuda" and ort_providers() == ["CPUExecutionProvider"]:
        import onnxruntime as ort

        print(f"note: onnxruntime {ort.__version__} has no CUDA provider: ONNX variants run on the CPU, PyTorch on "
              f"the GPU (for both on the GPU: pip uninstall onnxruntime; pip install 'onnxruntime-gpu=={ort.__version__}')",
              file=sys.stderr)


def check_inputs(config: AuditConfig, model: LoadedModel, out: Path) -> None:
    """Every user input, checked before any work (exit 2 within seconds, not after the videos):
    settings against the model, prompt files, the variant set and every variant on this model,
    gate tables naming audited variants, [sensitivity]/[search] modules, the history store.

    Raises:
        UserError: naming the file, key or value.
    """
    from reports import history

    if config.executor == "ray":
        from quant.stages.executor import check_reachable

        check_reachable(config.ray_address)
    config.settings.check_for(model.pipe)
    check_modules_called(model.pipe, config.settings)
    read_prompts(config.eval_prompts)
    load_calibration_prompts(config.calibration_prompts, config.eval_prompts)
    modules = present_modules(model.pipe)
    names = config.variant_names(modules)
    if not [n for n in names if n != FLOOR]:
        raise UserError(f"{config.source}: variants: nothing to audit (variants.run is empty and attribution has "
                        "no quantize.recipes to attribute)")
    for name in names:
        config.variant(name, modules)
    searched = {config.search.name} if config.search and config.search.enabled else set()
    for name in config.gates:
        if name != "default" and name not in names and name not in searched:
            raise UserError(f"{config.source}: gates.{name}: variant '{name}' is not audited (add it to variants.run)")
    for where, wanted in (("sensitivity.modules", config.sensitivity),
                          ("search.modules", config.search.modules if config.search else ())):
        missing = [m for m in wanted if m not in modules]
        if missing:
            raise UserError(f"{config.source}: {where}: model '{model.name}' has no {', '.join(missing)} "
                            f"(its modules: {', '.join(modules)})")
    from quant.recipes.external import mapping

    for module, external in config.modules.items():
        if module not in modules:
            raise UserError(f"{config.source}: modules.{module}: model '{model.name}' has no {module} "
                            f"(its modules: {', '.join(modules)})")
        mapping(external, module)  # the file is there, and its names map to the module's
    if config.search and config.search.inc_compare and config.search.inc_compare not in modules:
        raise UserError(f"{config.source}: search.inc_compare: model '{model.name}' has no {config.search.inc_compare}")
    store = Workspace(out, config.history_url).history
    if history.exists(store):
        history.trend(store)  # openable (reachable), and of a schema this version reads


def run_audit(config: AuditConfig, out: Path, baseline: str | None = None, fresh: bool = False,
              show_progress: bool = True, argv: list[str] | None = None) -> AuditResult:
    """Run the whole audit (see the module doc); returns the verdict and ``results.json``'s content.

    Raises:
        UserError: bad configuration, prompts, model or baseline (before any heavy work).
    """
    from reports import history

    out = Path(out)
    set_threads(config.run_threads)
    if config.executor == "processes":  # the workers' libraries are imported while this process loads the model
        from quant.stages.executor import start_fork_server

        start_fork_server(TASK_SOURCES)
    check_device(config)
    target = current_target()
    model = load_model(config.model)
    check_inputs(config, model, out)
    config_key = stage_key({"config": config.to_dict(), "model": model.fingerprint, "target": target.id})
    base = None
    if baseline:
        base, why = history.resolve_baseline(Workspace(out, config.history_url).history, baseline, model.fingerprint,
                                             target.id)
        if why:
            print(why, file=sys.stderr)
    with locked_work(out, model.fingerprint):
        audit, started = _open_run(config, model, out, config_key, fresh, show_progress, target)
        try:
            audit.executor  # a Ray cluster is connected (or refused, exit 2) before any work
            audit.prepare()
            audit.quantize()
            audit.generate()
            extras = _analyses(audit)
            tables = audit.score()
        finally:
            audit.close()
        audit.reference_adherence()
        results, checked = _publish(audit, tables, base, started, argv or sys.argv, extras)
        _write_status(audit, config_key, started, "complete", finished=results["finished"], verdict=results["verdict"])
    return AuditResult(audit.run_id, audit.run_dir, results["verdict"], results, [g for g in checked if not g.passed])


def search_pipeline(config: AuditConfig, out: Path, objective: str | None = None, inc_compare: str | None = None,
                    show_progress: bool = True):
    """`quant-audit search`: export and calibrate (reusing finished stages), then ``quant.audit.search``.

    Raises:
        UserError: bad configuration or model. SearchFailed: no mix can pass the gate.
    """
    from dataclasses import replace

    from quant.config import SearchSettings
    from quant.audit.search import run_search

    settings = config.search or SearchSettings()
    if objective:
        settings = replace(settings, objective=objective)
    if inc_compare:
        settings = replace(settings, inc_compare=inc_compare)
    set_threads(config.run_threads)
    check_device(config)
    model = load_model(config.model)
    config.settings.check_for(model.pipe)
    with locked_work(Path(out), model.fingerprint):
        audit = Audit(config, model, Path(out), "search", show_progress)
        try:
            audit.prepare()
            return run_search(audit, settings)
        finally:
            audit.close()
