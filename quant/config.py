"""The audit configuration: one TOML file (default ``audit.toml``) that `quant-audit run` reads.

The file names the model, generation settings, prompt files, seeds, calibration, recipes,
variants, named mixes, gates and regression tolerances. Every key is checked once, here: an
unknown key or a bad value is a ``UserError`` naming the file and the dotted key
(``audit.toml: gates.fp16.psnr_avg: unknown metric ...``). Relative paths are relative to the
config file. ``to_toml`` writes the resolved configuration a run used (``config.toml``).

Example::

    config = load_config(Path("audit.toml")).override(model="wan2.2-ti2v-tiny", tag="rc1")
    config.variant_names(["text_encoder", "transformer", "vae_decoder"])
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from quant.errors import UserError
from quant.gates import Gate, METRIC_DIRECTIONS, parse_gate
from quant.pipeline.modules import MODULE_IO
from quant.pipeline.prompts import DEFAULT_CALIBRATION_PROMPTS, DEFAULT_EVAL_PROMPTS
from quant.recipes.records import INTEGER, KEEPERS, QUANTIZERS, RECIPES as RECORDS
from quant.pipeline.settings import GenerationSettings
from quant.support.target import DEVICES, INT8_PATHS, check_emulation_target
from quant.recipes.names import FLOOR, RECIPES, base_recipe, check_name, keep_recipe, split_target

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "audit.toml"
QUANT_RECIPES = QUANTIZERS
INT8_METHODS = tuple(dict.fromkeys(m for r in RECORDS.values() for m in r.methods))
ACTIVATION_TYPES = ("int8", "uint8")
EXECUTORS = ("local", "processes", "ray")  # [runtime] executor (quant.stages.executor)


OBJECTIVES = ("coverage", "latency")


@dataclass(frozen=True)
class SearchSettings:
    """The ``[search]`` table: a mixed-precision search driven by the video gate (``quant.audit.search``).

    Attributes:
        gates: the gate a mix must pass (default: the gates of variant ``recipe``).
        recipe: the INT8 recipe spread as widely as the gate allows (int8, int8-dynamic).
        fallback: what a module falls back to when keeping its nodes in FP32 is not enough.
        objective: ``coverage`` (most INT8 compute nodes) or ``latency`` (least, among passing mixes).
        name: the mix name written to the config snippet and shown in the report.
        enabled: also run the search inside ``quant-audit run``.
        modules: the modules the search may quantize (default all); the others run ``fallback``.
        inc_compare: a denoiser module on which to run neural-compressor's ``autotune`` with the
            same video metric, for comparison ("" to skip).
    """

    gates: tuple[Gate, ...] = ()
    recipe: str = "int8"
    fallback: str = "fp16"
    objective: str = "coverage"
    name: str = "searched"
    enabled: bool = False
    modules: tuple[str, ...] = ()
    inc_compare: str = ""


@dataclass(frozen=True)
class AuditConfig:
    """Everything one audit needs; see ``audit.toml`` at the repository root for each key's meaning.

    Attributes:
        gates: variant name (or ``default``) -> gates. ``default`` applies to every variant in
            ``variants`` that has no table of its own for that metric; attribution variants are
            gated only by their own tables (and, like every variant, by finiteness).
        regression: metric -> the largest drop against the baseline run that still passes.
    """

    model: str = "wan2.2-t2v-tiny"  # quant.pipeline.models.DEFAULT_MODEL; not imported: that module loads torch
    tag: str = ""
    settings: GenerationSettings = GenerationSettings()
    eval_prompts: Path = DEFAULT_EVAL_PROMPTS
    seeds: tuple[int, ...] = (0, 1)
    calibration_prompts: Path = DEFAULT_CALIBRATION_PROMPTS
    calibration_seeds: tuple[int, ...] = (0,)
    calibration_samples: int = 16
    simplify: bool = False
    recipes: tuple[str, ...] = QUANT_RECIPES
    int8_method: str = "minmax"
    int8_reduce_range: bool = False
    int8_activation_type: str = "int8"
    threads: int | None = None  # [runtime] threads: None = all usable cores (1 with executor = "processes")
    emulate: tuple[str, ...] = ()  # [runtime] emulate: int8 paths of other targets (quant.recipes.emulate)
    executor: str = "local"  # [runtime] executor: "local", "processes" or "ray" (quant.stages.executor)
    workers: int | None = None  # [runtime] workers, executor = "processes": None = usable cores // threads
    ray_address: str | None = None  # [runtime] ray_address: "auto", "ray://host:port", host:port; None = a local cluster
    device: str = "cpu"  # [runtime] device: "cpu" or "cuda"
    floor: bool = True
    variants: tuple[str, ...] = ("onnx", "fp16", "int8", "int8-dynamic", "inc-int8", "mixed")
    attribution: bool = True
    save_latents: bool = True
    fps: int = 8
    mixes: dict[str, dict[str, str]] = field(default_factory=lambda: {
        "mixed": {"text_encoder": "fp16", "transformer": "fp16", "transformer_2": "inc-int8", "vae_decoder": "fp16"}})
    gates: dict[str, tuple[Gate, ...]] = field(default_factory=dict)
    regression: dict[str, float] = field(default_factory=dict)
    keep_fp32: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "int8+keep-<tag>" -> nodes kept FP32
    search: "SearchSettings | None" = None
    sensitivity: tuple[str, ...] = ()  # modules whose per-node sensitivity the run ranks
    sensitivity_recipe: str = "int8"
    modules: dict = field(default_factory=dict)
    history_url: str | None = None  # [history] url (else $QUANT_AUDIT_HISTORY_URL, else <out>/history.sqlite)  # [modules]: module -> ExternalModule (its FP32 ONNX made elsewhere)
    source: str = "built-in defaults"

    @property
    def run_threads(self) -> int | None:
        """The threads each process runs: ``threads``, else 1 for executor = "processes" (tiny
        pipelines scale across processes, not across one process's threads), else None (all cores)."""
        if self.threads is None and self.executor == "processes":
            return 1
        return self.threads

    def override(self, **values) -> "AuditConfig":
        """A copy with the given fields replaced (``None`` values are ignored): command-line flags."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def variant_names(self, modules: list[str]) -> list[str]:
        """The variants this audit generates: the listed ones, ``floor``, ``<variant>~<target>`` for
        each listed variant with int8 modules and each ``[runtime] emulate`` target, then
        ``<recipe>@<module>`` attribution."""
        names = list(self.variants)
        if self.floor and FLOOR not in names:
            names.append(FLOOR)
        for target in self.emulate:
            for name in self.variants:
                if "~" not in name and name != FLOOR and self._runs_int8(name, modules) and f"{name}~{target}" not in names:
                    names.append(f"{name}~{target}")
        if self.attribution:
            names += [f"{r}@{m}" for r in self.recipes for m in modules if f"{r}@{m}" not in names]
        return names

    def variant(self, name: str, modules: list[str]):
        """The ``Variant`` called ``name`` on a pipeline with ``modules`` (``floor`` moves the noise)."""
        from quant.recipes.names import Variant

        return Variant(name, self.variant_modules(name, modules), noise_ulps=1 if name == FLOOR else 0)

    def _runs_int8(self, name: str, modules: list[str]) -> bool:
        return any(base_recipe(r) in INTEGER for r in self.variant_modules(name, modules).values())

    def variant_modules(self, name: str, modules: list[str]) -> dict[str, str]:
        """module -> recipe for variant ``name`` on a pipeline with ``modules``."""
        plain, target = split_target(name)
        if target is not None and plain in self.mixes:
            from quant.recipes.names import emulated

            return {m: emulated(r, target) for m, r in self.variant_modules(plain, modules).items()}
        if name in self.mixes:
            mix = self.mixes[name]
            missing = [m for m in modules if m not in mix]
            if missing:
                raise UserError(f"{self.source}: mixes.{name}: no recipe for module(s) {', '.join(missing)} of this model")
            return {m: mix[m] for m in modules}
        from quant.recipes.names import parse_variant

        return parse_variant(name, modules).modules

    def gates_for(self, variant: str) -> tuple[Gate, ...]:
        """``[gates.default]`` for the listed variants, then the variant's own table. An emulated
        ``<variant>~<target>`` is gated like ``<variant>`` (a verdict for the other target),
        unless it has a table of its own."""
        plain, target = split_target(variant)
        if target is not None and variant not in self.gates:
            return self.gates_for(plain)
        own = {g.metric: g for g in self.gates.get(variant, ())}
        if variant in self.variants:
            default = {g.metric: g for g in self.gates.get("default", ())}
            own = {**default, **own}
        return tuple(own.values())

    def to_dict(self) -> dict:
        """The TOML layout of this configuration, with absolute paths."""
        s = self.settings.to_dict()
        history = {}
        if self.history_url:  # without its password: config.toml and results.json are shared (PGPASSWORD holds it)
            from reports.history import describe

            history = {"history": {"url": describe(self.history_url)}}
        return {
            "schema_version": SCHEMA_VERSION, "model": self.model, "tag": self.tag,
            "generation": s,
            "prompts": {"eval": str(self.eval_prompts), "seeds": list(self.seeds)},
            "calibration": {"prompts": str(self.calibration_prompts), "seeds": list(self.calibration_seeds),
                            "samples_per_module": self.calibration_samples},
            "export": {"simplify": self.simplify},
            "quantize": {"recipes": list(self.recipes), "int8_method": self.int8_method,
                         "int8_reduce_range": self.int8_reduce_range, "int8_activation_type": self.int8_activation_type},
            "runtime": {**({"threads": self.threads} if self.threads is not None else {}), "emulate": list(self.emulate),
                        "executor": self.executor, **({"ray_address": self.ray_address} if self.ray_address else {}),
                        **({"workers": self.workers} if self.workers is not None else {}),
                        "device": self.device},
            "variants": {"run": list(self.variants), "attribution": self.attribution, "floor": self.floor,
                         "save_latents": self.save_latents, "fps": self.fps},
            "mixes": {k: {m: self._mix_entry(r) for m, r in v.items()} for k, v in self.mixes.items()},
            "gates": {v: {g.metric: g.text for g in gates} for v, gates in self.gates.items()},
            "regression": dict(self.regression),
            **({"sensitivity": {"modules": list(self.sensitivity), "recipe": self.sensitivity_recipe}}
               if self.sensitivity else {}),
            **({"modules": {m: e.to_toml() for m, e in self.modules.items()}} if self.modules else {}),
            **history,
            **({"search": {"enabled": self.search.enabled, "recipe": self.search.recipe,
                           "fallback": self.search.fallback, "objective": self.search.objective,
                           "name": self.search.name, "modules": list(self.search.modules),
                           "inc_compare": self.search.inc_compare,
                           "gates": {g.metric: g.text for g in self.search.gates}}}
               if self.search else {}),
        }

    def _mix_entry(self, recipe: str):
        if recipe in self.keep_fp32:
            return {"recipe": base_recipe(recipe), "keep_fp32": list(self.keep_fp32[recipe])}
        return recipe

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# --- parsing -----------------------------------------------------------------------------------

class _Reader:
    """Pops keys from one TOML table, with errors that name the file and the dotted key."""

    def __init__(self, source: str, table: dict, prefix: str = ""):
        self.source, self.table, self.prefix = source, dict(table), prefix

    def error(self, key: str, message: str) -> UserError:
        return UserError(f"{self.source}: {self.prefix}{key}: {message}")

    def sub(self, key: str) -> "_Reader":
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {value!r}")
        return _Reader(self.source, value, f"{self.prefix}{key}.")

    def take(self, key: str, kind, default):
        if key not in self.table:
            return default
        value = self.table.pop(key)
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def take_list(self, key: str, kind, default: tuple) -> tuple:
        value = self.take(key, list, None)
        if value is None:
            return default
        for item in value:
            if not isinstance(item, kind) or (isinstance(item, bool) and kind is not bool):
                raise self.error(key, f"expected a list of {kind.__name__}, got {value!r}")
        return tuple(value)

    def path(self, key: str, default: Path, base: Path) -> Path:
        value = self.take(key, str, None)
        return default if value is None else (base / value).resolve()

    def done(self) -> None:
        if self.table:
            key = sorted(self.table)[0]
            raise self.error(key, "unknown key")


def _check_seeds(reader: _Reader, key: str, seeds: tuple) -> tuple[int, ...]:
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 or s > 2**63 - 1 for s in seeds):
        raise reader.error(key, f"expected distinct integers in [0, 2**63-1], got {list(seeds)!r}")
    return seeds


def _parse_generation(reader: _Reader, base: GenerationSettings) -> GenerationSettings:
    values = {}
    for f in fields(GenerationSettings):
        kind = float if f.type in ("float", float) else str if f.type in ("str", str) else int
        if f.name in reader.table:
            values[f.name] = reader.take(f.name, kind, None)
    reader.done()
    try:
        return replace(base, **values)
    except UserError as exc:
        raise UserError(f"{reader.source}: generation: {exc}") from None


def _parse_recipes(reader: _Reader, key: str, recipes: tuple) -> tuple:
    for r in recipes:
        if r not in QUANT_RECIPES:
            raise reader.error(key, f"unknown quantization recipe '{r}' (recipes: {', '.join(QUANT_RECIPES)})")
    return recipes


def _parse_mix_entry(mix: _Reader, module: str, keep: dict[str, tuple[str, ...]]) -> str:
    """``"fp16"``, or ``{recipe = "int8", keep_fp32 = ["node", ...]}`` (nodes kept in FP32)."""
    if module not in MODULE_IO:
        raise mix.error(module, f"unknown module (modules: {', '.join(MODULE_IO)})")
    if isinstance(mix.table.get(module), dict):
        entry = mix.sub(module)
        recipe = entry.take("recipe", str, None)
        nodes = entry.take_list("keep_fp32", str, ())
        entry.done()
        if recipe not in KEEPERS:
            raise mix.error(module, f"recipe must be one of {', '.join(KEEPERS)} to keep nodes in FP32, got {recipe!r}")
        tagged = keep_recipe(recipe, nodes)
        if tagged != recipe:
            keep[tagged] = tuple(sorted(set(nodes)))
        return tagged
    recipe = mix.take(module, str, None)
    if recipe not in RECIPES:
        raise mix.error(module, f"unknown recipe '{recipe}' (recipes: {', '.join(RECIPES)})")
    return recipe


def _parse_mixes(reader: _Reader, keep: dict[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    mixes = {}
    for name in list(reader.table):
        try:
            check_name(name, "mix")
        except UserError as exc:
            raise reader.error(name, str(exc)) from None
        mix = reader.sub(name)
        if "@" in name or "~" in name or name in RECIPES or name == FLOOR:
            raise reader.error(name, "a mix name must not be a recipe or 'floor', or contain '@' or '~'")
        mixes[name] = {module: _parse_mix_entry(mix, module, keep) for module in list(mix.table)}
    return mixes


def _parse_gate_table(table: _Reader) -> tuple[Gate, ...]:
    """One table of ``metric = "<op> <number>"`` entries."""
    parsed = []
    for metric in list(table.table):
        try:
            parsed.append(parse_gate(metric, table.table.pop(metric)))
        except UserError as exc:
            raise table.error(metric, str(exc)) from None
    return tuple(parsed)


def _parse_gates(reader: _Reader) -> dict[str, tuple[Gate, ...]]:
    return {variant: _parse_gate_table(reader.sub(variant)) for variant in list(reader.table)}


def _parse_regression(reader: _Reader) -> dict[str, float]:
    out = {}
    for metric in list(reader.table):
        value = reader.take(metric, float, None)
        if metric not in METRIC_DIRECTIONS:
            raise reader.error(metric, f"unknown metric (metrics: {', '.join(METRIC_DIRECTIONS)})")
        if not math.isfinite(value) or value < 0:
            raise reader.error(metric, f"tolerance must be a finite number >= 0, got {value!r}")
        out[metric] = value
    return out


def _parse_modules(reader: _Reader, base_dir: Path) -> dict:
    """``[modules]``: ``name = "file.onnx"`` or ``[modules.name] path = ..., inputs = {...}, outputs = {...}``."""
    from quant.recipes.external import ExternalModule

    out = {}
    for module in list(reader.table):
        if module not in MODULE_IO:
            raise reader.error(module, f"unknown module '{module}' (modules: {', '.join(MODULE_IO)})")
        value = reader.table[module]
        if isinstance(value, str):
            reader.table.pop(module)
            out[module] = ExternalModule((base_dir / value).resolve())
            continue
        entry = reader.sub(module)
        path = entry.take("path", str, None)
        if not path:
            raise entry.error("path", "the ONNX file of the module is required")
        maps = {}
        for side in ("inputs", "outputs"):
            table = entry.take(side, dict, {})
            bad = [k for k, v in table.items() if not isinstance(v, str)]
            if bad:
                raise entry.error(f"{side}.{bad[0]}", f"expected the model's {side[:-1]} name as a string, got {table[bad[0]]!r}")
            maps[side] = tuple(table.items())
        entry.done()
        out[module] = ExternalModule((base_dir / path).resolve(), maps["inputs"], maps["outputs"])
    return out


def _parse_search(reader: _Reader) -> SearchSettings:
    d = SearchSettings()
    enabled = reader.take("enabled", bool, d.enabled)
    recipe = reader.take("recipe", str, d.recipe)
    spreadable = [n for n, r in RECORDS.items() if r.integer_kernels and r.keeps_nodes]
    if recipe not in spreadable:
        raise reader.error("recipe", f"the search spreads {' or '.join(spreadable)}, got {recipe!r}")
    fallback = reader.take("fallback", str, d.fallback)
    if fallback not in ("fp16", "onnx"):
        raise reader.error("fallback", f"a module falls back to fp16 or onnx (FP32), got {fallback!r}")
    objective = reader.take("objective", str, d.objective)
    if objective not in OBJECTIVES:
        raise reader.error("objective", f"expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    name = reader.take("name", str, d.name)
    if not name or "@" in name or "~" in name or name in RECIPES or name == FLOOR:
        raise reader.error("name", f"a mix name must not be empty, a recipe or 'floor', or contain '@' or '~', got {name!r}")
    try:
        check_name(name, "search")
    except UserError as exc:
        raise reader.error("name", str(exc)) from None
    modules = reader.take_list("modules", str, d.modules)
    for module in modules:
        if module not in MODULE_IO:
            raise reader.error("modules", f"unknown module '{module}' (modules: {', '.join(MODULE_IO)})")
    inc_compare = reader.take("inc_compare", str, d.inc_compare)
    if inc_compare not in ("", "transformer", "transformer_2"):
        raise reader.error("inc_compare", f"expected a denoiser module (transformer, transformer_2) or \"\", got {inc_compare!r}")
    gates = _parse_gate_table(reader.sub("gates"))
    reader.done()
    return SearchSettings(gates, recipe, fallback, objective, name, enabled, modules, inc_compare)


def parse_config(data: dict, source: str, base_dir: Path) -> AuditConfig:
    """Build an ``AuditConfig`` from parsed TOML ``data``; defaults fill what is absent."""
    d = AuditConfig()
    top = _Reader(source, data)
    version = top.take("schema_version", int, SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise top.error("schema_version", f"this quant-audit reads version {SCHEMA_VERSION}, got {version}")
    model = top.take("model", str, d.model)
    if not model:
        raise top.error("model", "must name a built-in model or a checkpoint folder")
    from quant.pipeline.models import BUILTIN_MODELS

    if model not in BUILTIN_MODELS and not Path(model).expanduser().is_absolute():
        model = str((base_dir / model).resolve())  # a folder is relative to the config file, like every path
    tag = top.take("tag", str, d.tag)
    settings = _parse_generation(top.sub("generation"), d.settings)
    prompts = top.sub("prompts")
    eval_prompts = prompts.path("eval", d.eval_prompts, base_dir)
    seeds = _check_seeds(prompts, "seeds", prompts.take_list("seeds", int, d.seeds))
    prompts.done()
    cal = top.sub("calibration")
    cal_prompts = cal.path("prompts", d.calibration_prompts, base_dir)
    cal_seeds = _check_seeds(cal, "seeds", cal.take_list("seeds", int, d.calibration_seeds))
    samples = cal.take("samples_per_module", int, d.calibration_samples)
    if samples < 2:
        raise cal.error("samples_per_module", f"must be an integer >= 2, got {samples}")
    cal.done()
    export = top.sub("export")
    simplify = export.take("simplify", bool, d.simplify)
    export.done()
    quant = top.sub("quantize")
    recipes = _parse_recipes(quant, "recipes", quant.take_list("recipes", str, d.recipes))
    method = quant.take("int8_method", str, d.int8_method)
    if method not in INT8_METHODS:
        raise quant.error("int8_method", f"unknown method '{method}' (methods: {', '.join(INT8_METHODS)})")
    for r in recipes:
        if RECORDS[r].methods and method not in RECORDS[r].methods:
            raise quant.error("int8_method", f"{r} calibrates with {' or '.join(RECORDS[r].methods)}, not {method}")
    reduce_range = quant.take("int8_reduce_range", bool, d.int8_reduce_range)
    activation_type = quant.take("int8_activation_type", str, d.int8_activation_type)
    if activation_type not in ACTIVATION_TYPES:
        raise quant.error("int8_activation_type", f"expected one of {', '.join(ACTIVATION_TYPES)}, got {activation_type!r}")
    quant.done()
    runtime = top.sub("runtime")
    threads = runtime.take("threads", int, d.threads)
    if threads is not None and threads < 1:
        raise runtime.error("threads", f"must be a positive integer, got {threads}")
    emulate = runtime.take_list("emulate", str, d.emulate)
    for target in emulate:
        if target not in INT8_PATHS:
            raise runtime.error("emulate", f"unknown target '{target}' (targets: {', '.join(INT8_PATHS)})")
    executor = runtime.take("executor", str, d.executor)
    if executor not in EXECUTORS:
        raise runtime.error("executor", f"expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    ray_address = runtime.take("ray_address", str, d.ray_address)
    if ray_address is not None and executor != "ray":
        raise runtime.error("ray_address", "is only read with executor = \"ray\"")
    workers = runtime.take("workers", int, d.workers)
    if workers is not None and executor != "processes":
        raise runtime.error("workers", "is only read with executor = \"processes\"")
    if workers is not None and workers < 1:
        raise runtime.error("workers", f"must be a positive integer, got {workers}")
    device = runtime.take("device", str, d.device)
    if device not in DEVICES:
        raise runtime.error("device", f"expected one of {', '.join(DEVICES)}, got {device!r}")
    runtime.done()
    var = top.sub("variants")
    variants = var.take_list("run", str, d.variants)
    attribution = var.take("attribution", bool, d.attribution)
    save_latents = var.take("save_latents", bool, d.save_latents)
    floor = var.take("floor", bool, d.floor)
    fps = var.take("fps", int, d.fps)
    if fps < 1:
        raise var.error("fps", f"must be a positive integer, got {fps}")
    var.done()
    keep: dict[str, tuple[str, ...]] = {}
    mixes = _parse_mixes(top.sub("mixes"), keep) if "mixes" in data else d.mixes
    top.table.pop("mixes", None)
    gates = _parse_gates(top.sub("gates"))
    regression = _parse_regression(top.sub("regression"))
    search = _parse_search(top.sub("search")) if "search" in data else None
    sens = top.sub("sensitivity")
    sens_modules = sens.take_list("modules", str, ())
    for module in sens_modules:
        if module not in MODULE_IO:
            raise sens.error("modules", f"unknown module '{module}' (modules: {', '.join(MODULE_IO)})")
    sens_recipe = sens.take("recipe", str, "int8")
    if sens_recipe not in KEEPERS:
        raise sens.error("recipe", f"expected one of {', '.join(KEEPERS)}, got {sens_recipe!r}")
    sens.done()
    modules = _parse_modules(top.sub("modules"), base_dir)
    hist = top.sub("history")
    history_url = hist.take("url", str, None)
    if history_url is not None and not history_url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
        raise hist.error("url", f"expected sqlite:///PATH or postgresql://..., got {history_url!r}")
    hist.done()
    top.done()
    config = AuditConfig(model=model, tag=tag, settings=settings, eval_prompts=eval_prompts, seeds=seeds,
                         calibration_prompts=cal_prompts, calibration_seeds=cal_seeds, calibration_samples=samples,
                         simplify=simplify, recipes=recipes, int8_method=method, int8_reduce_range=reduce_range,
                         int8_activation_type=activation_type, threads=threads, emulate=tuple(dict.fromkeys(emulate)),
                         executor=executor, ray_address=ray_address, workers=workers, device=device,
                         floor=floor, variants=variants,
                         attribution=attribution, save_latents=save_latents, fps=fps, mixes=mixes, gates=gates,
                         regression=regression, keep_fp32=keep, search=search, sensitivity=sens_modules,
                         sensitivity_recipe=sens_recipe, modules=modules, history_url=history_url, source=source)
    _check_variants(config)
    return config


def _check_variants(config: AuditConfig) -> None:
    """Every listed variant is a recipe, ``<recipe>@<module>`` or a mix, and its recipes are quantized."""
    if not config.variants and not config.attribution:
        raise UserError(f"{config.source}: variants.run: no variant to audit (list one, or set attribution = true)")
    for name in list(config.variants) + [g for g in config.gates if g != "default"]:
        where = "variants.run" if name in config.variants else f"gates.{name}"
        try:
            check_name(name)
        except UserError as exc:
            raise UserError(f"{config.source}: {where}: {exc}") from None
        plain, target = split_target(name)
        if target is not None:
            try:
                check_emulation_target(target, f"variant '{name}'")
            except UserError as exc:
                raise UserError(f"{config.source}: {where}: {exc}") from None
        if plain == FLOOR:
            if target is not None:
                raise UserError(f"{config.source}: {where}: '{name}': the floor runs no int8 kernels to emulate")
            continue
        if plain in config.mixes:
            used = {base_recipe(r) for r in config.mixes[plain].values()}
        else:
            recipe, _, module = plain.partition("@")
            if recipe not in RECIPES:
                raise UserError(f"{config.source}: {where}: unknown variant '{name}' (a recipe, <recipe>@<module> "
                                f"or a mix: {', '.join(config.mixes) or 'none defined'})")
            if module and module not in MODULE_IO:
                raise UserError(f"{config.source}: variant '{name}': unknown module '{module}'")
            used = {recipe}
        if target is not None and not used & set(INTEGER):
            raise UserError(f"{config.source}: {where}: '{name}' runs no int8 recipe ({', '.join(INTEGER)}) "
                            "whose kernels could be emulated")
        missing = sorted(used - set(config.recipes) - {"torch", "onnx"})
        if missing and name in config.variants:
            raise UserError(f"{config.source}: variants.run: '{name}' needs recipe(s) {', '.join(missing)}, "
                            f"which quantize.recipes does not list")


def load_config(path: Path | None) -> AuditConfig:
    """Read ``path``; without one, ``./audit.toml``, else the repository's ``audit.toml``, else defaults.

    Raises:
        UserError: the file is missing, is not TOML, or has an unknown key or a bad value.
    """
    if path is None:
        path = next((p for p in (Path("audit.toml"), DEFAULT_CONFIG) if p.is_file()), None)
        if path is None:
            return AuditConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data, str(path), path.resolve().parent)
