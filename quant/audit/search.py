"""Mixed-precision search driven by the video gate: the most INT8 that still passes.

1. **Attribution**: ``<recipe>@<module>`` videos say how much each module's quantization costs.
2. **Sensitivity**: per module, its quantized nodes ranked by keep-one-in-FP32 gain
   (``quant.stages.sensitivity``).
3. **Moves**, in that order: for the costliest module first, keep its most sensitive nodes in
   FP32 one by one (only nodes whose gain is positive), then fall back to ``fallback`` for the
   whole module; then the next module. Applying the first ``i`` moves to the all-``recipe``
   pipeline gives candidate ``i``; candidate ``N`` is ``fallback`` everywhere.
4. **Bisection** on ``i``: candidate 0 passing ends the search; candidate ``N`` failing means no
   mix can pass (``SearchFailed``, exit 1). Otherwise the smallest passing ``i`` is found in
   about log2(N) verified candidates instead of N for a greedy walk; quality is close to
   monotonic in ``i`` (each move keeps more in higher precision), and every candidate the
   search reports was verified by regenerating and scoring the videos, never by a proxy.
   With ``objective = "latency"`` the chosen mix is the passing verified candidate with the
   least estimated ONNX Runtime time per video.

Coverage is the share of the pipeline's compute nodes (MatMul, Conv, Gemm) that run in INT8;
latency is the median ORT CPU time of each module call times its calls per video.

Example::

    result = run_search(audit, SearchSettings(gates=(parse_gate("psnr_mean", ">= 35"),)))
    print(result.snippet)      # [mixes.searched] ... to pin in audit.toml
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
import tomli_w

from quant.config import AuditConfig, SearchSettings
from quant.errors import CheckFailed, UserError
from quant.gates import Gate, check_gates
from quant.support.files import atomic_path, atomic_write_json, atomic_write_text, json_number
from quant.stages.ledger import stage_key
from quant.pipeline.models import LoadedModel
from quant.pipeline.ort_modules import open_session
from quant.pipeline.settings import GenerationSettings
from quant.recipes.census import latency_ms, precision_census, precision_counts
from quant.recipes.names import Variant, base_recipe, keep_recipe, onnx_path
from quant.stages.calibrate import CalibrationSet
from quant.stages.workspace import Workspace

SCHEMA_VERSION = 1


class SearchFailed(CheckFailed):
    """Even the all-fallback pipeline fails the gate: no mix of these recipes can pass."""


@dataclass
class Candidate:
    """One verified assignment: module -> recipe (``int8+keep-<tag>`` keeps nodes FP32)."""

    index: int
    modules: dict[str, str]
    keep: dict[str, list[str]]
    metrics: dict
    passed: bool
    failed: list[str]
    coverage: float
    int8_nodes: int
    latency_ms: float
    label: str = ""


@dataclass
class SearchResult:
    settings: SearchSettings
    chosen: Candidate
    candidates: list[Candidate]
    moves: list[tuple[str, str, str]]
    attribution: dict[str, float]
    references: dict[str, Candidate] = field(default_factory=dict)
    snippet: str = ""
    folder: Path | None = None
    gates: tuple[Gate, ...] = ()
    searched: list[str] = field(default_factory=list)
    inc: dict | None = None


def _gates(audit, settings: SearchSettings) -> tuple[Gate, ...]:
    gates = settings.gates or audit.config.gates_for(settings.recipe)
    if not gates:
        raise UserError(f"{audit.config.source}: search: no gates to search against (add [search.gates], "
                        f"or [gates.{settings.recipe}])")
    return gates


class Evaluator(Protocol):
    """What the search and the INC comparison use of an audit (``quant.audit.run.Audit``): facts
    to read and one way to have variants verified. Neither writes into the audit: they return
    their findings (``SearchResult``) and the audit decides what joins the run."""

    config: AuditConfig
    model: LoadedModel
    settings: GenerationSettings
    modules: list[str]
    prompts: list[str]
    work: Path
    calibration: CalibrationSet

    def evaluate(self, variants: list[Variant], keep: dict[str, tuple[str, ...]] | None = None,
                 label: str = "evaluate") -> pd.DataFrame:
        """Quantize (``keep``: recipe name -> nodes kept FP32), generate and score; the summary rows."""

    def nonfinite(self, variant: str) -> dict[str, int]:
        """Module -> calls whose output held NaN/Inf, for a variant ``evaluate`` generated."""

    def sensitivity(self, modules: list[str], recipe: str) -> dict[str, pd.DataFrame]:
        """Per-layer rankings of ``modules`` for ``recipe`` (a cached stage)."""


class Search:
    """The state of one search over ``audit``'s pipeline (see the module doc)."""

    def __init__(self, audit: Evaluator, settings: SearchSettings):
        self.audit, self.settings = audit, settings
        self.gates = _gates(audit, settings)
        self.metric = self.gates[0].metric
        self.modules = audit.modules
        missing = [m for m in settings.modules if m not in self.modules]
        if missing:
            raise UserError(f"{audit.config.source}: search.modules: this model has no {', '.join(missing)}")
        self.searched = [m for m in self.modules if m in settings.modules] if settings.modules else list(self.modules)
        self._latency: dict[tuple[str, str], float] = {}
        self._counts: dict[tuple[str, str], dict] = {}
        self.total_nodes = sum(self._census("onnx", m)["total"] for m in self.modules)
        self.evaluated: dict[int, Candidate] = {}
        self.inc: dict | None = None

    def _census(self, recipe: str, module: str) -> dict:
        """Compute nodes by precision of one model file (files are keyed by content: cached)."""
        if (recipe, module) not in self._counts:
            counts = precision_counts(precision_census(onnx_path(self.audit.work, recipe, module)))
            self._counts[(recipe, module)] = {**counts, "total": sum(counts.values())}
        return self._counts[(recipe, module)]

    def _calls_per_video(self, module: str) -> float:
        cal = self.audit.calibration.manifest
        generations = len(cal["spec"]["prompts"]) * len(cal["spec"]["seeds"])
        return cal["modules"][module]["calls"] / generations

    def _module_latency(self, recipe: str, module: str) -> float:
        if (recipe, module) not in self._latency:
            sample = self.audit.calibration.reader(module).get_next()
            session = open_session(onnx_path(self.audit.work, recipe, module))
            self._latency[(recipe, module)] = latency_ms(session, sample) * self._calls_per_video(module)
        return self._latency[(recipe, module)]

    def variant(self, modules: dict[str, str], label: str) -> Variant:
        """Named ``label``; else a uniform assignment is named by its recipe (those videos exist),
        and a mix by a hash of its assignment."""
        if not label:
            recipes = set(modules.values())
            label = recipes.pop() if len(recipes) == 1 else f"search-{stage_key(modules)[:10]}"
        return Variant(label, modules)

    def verify(self, index: int, modules: dict[str, str], keep: dict[str, tuple[str, ...]], label: str = "") -> Candidate:
        """Quantize, generate, score and gate one assignment."""
        variant = self.variant(modules, label)
        kept = {modules[module]: tuple(nodes) for module, nodes in keep.items() if nodes}
        row = self.audit.evaluate([variant], kept, label=f"search: candidate {index}").iloc[0].to_dict()
        nonfinite = self.audit.nonfinite(variant.name)
        gates = check_gates(variant.name, row, self.gates, nonfinite)
        int8 = sum(self._census(r, m)["int8"] for m, r in modules.items())
        candidate = Candidate(index, modules, {m: list(n) for m, n in keep.items() if n},
                              {k: json_number(v) for k, v in row.items() if k != "variant"},
                              all(g.passed for g in gates), [f"{g.metric} {g.op} {g.threshold:g}" for g in gates if not g.passed],
                              int8 / self.total_nodes if self.total_nodes else 0.0, int8,
                              sum(self._module_latency(r, m) for m, r in modules.items()), variant.name)
        if index >= 0:
            self.evaluated[index] = candidate
        return candidate

    def attribution(self) -> dict[str, float]:
        """module -> the gate's first metric of ``<recipe>@<module>`` (lower: that module costs more)."""
        recipe = self.settings.recipe
        variants = [Variant(f"{recipe}@{m}", {k: (recipe if k == m else "torch") for k in self.modules})
                    for m in self.searched]
        summary = self.audit.evaluate(variants, label="search: attribution").set_index("variant")
        return {m: float(summary.loc[f"{recipe}@{m}", self.metric]) for m in self.searched}

    def references(self) -> dict[str, Candidate]:
        """All-``recipe`` and all-``fp16``, verified like the candidates, for the curve and the note."""
        return {name: self.verify(-1, {m: name for m in self.modules}, {}, label=name)
                for name in dict.fromkeys((self.settings.recipe, "fp16"))}

    def moves(self, attribution: dict[str, float], ranking: dict[str, pd.DataFrame]) -> list[tuple[str, str, str]]:
        higher_is_better = self.gates[0].op in (">=", ">")
        # the module whose quantization costs the gate's metric most comes first
        order = sorted(self.searched, key=lambda m: attribution[m] if higher_is_better else -attribution[m])
        moves = []
        for module in order:
            table = ranking[module]
            helpful = table[table["gain_db"] > 0]["members"].tolist() if table is not None else []
            moves += [("keep", module, members) for members in helpful]  # a layer: ";"-joined nodes
            moves.append(("fallback", module, self.settings.fallback))
        return moves

    def assignment(self, moves: list[tuple[str, str, str]]) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
        keep: dict[str, list[str]] = {m: [] for m in self.modules}
        fallback: set[str] = set(self.modules) - set(self.searched)
        for kind, module, what in moves:
            if kind == "keep":
                keep[module] += what.split(";")
            else:
                fallback.add(module)
        modules = {m: (self.settings.fallback if m in fallback else keep_recipe(self.settings.recipe, keep[m]))
                   for m in self.modules}
        return modules, {m: tuple(sorted(keep[m])) for m in self.modules if m not in fallback and keep[m]}


def _bisect(search: Search, moves: list) -> Candidate:
    def at(i: int) -> Candidate:
        if i not in search.evaluated:
            search.verify(i, *search.assignment(moves[:i]))
        return search.evaluated[i]

    if at(0).passed:
        return at(0)
    last = at(len(moves))
    if not last.passed:
        raise SearchFailed(f"no mix can pass {', '.join(last.failed)}: even {search.settings.fallback} everywhere "
                           f"scores {search.metric} = {last.metrics.get(search.metric)}")
    lo, hi = 0, len(moves)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).passed:
            hi = mid
        else:
            lo = mid
    return at(hi)


def compare_with_inc(search: Search, chosen: Candidate, module: str) -> dict:
    """Our chosen recipe for ``module`` and INC's ``autotune`` on it, each scored with only that
    module quantized (``quant.audit.inc_compare``)."""
    from quant.audit.inc_compare import inc_autotune

    if module not in search.modules:
        raise UserError(f"search: inc_compare: this model has no '{module}'")
    recipe = chosen.modules[module]
    variant = Variant(f"{search.settings.name}@{module}", {m: (recipe if m == module else "torch") for m in search.modules})
    row = search.audit.evaluate([variant], label="search: inc comparison").iloc[0]
    census = search._census(recipe, module) if recipe not in ("torch",) else {"int8": 0, "total": 0}
    ours = {"recipe": base_recipe(recipe), "keep_fp32": chosen.keep.get(module, []), "value": json_number(row[search.metric]),
            "int8_nodes": census["int8"], "compute_nodes": census["total"]}
    return {"module": module, "ours": ours, "inc": inc_autotune(search.audit, module, search.gates)}


def snippet(result_name: str, chosen: Candidate) -> str:
    """The ``[mixes.<name>]`` table that pins the chosen mix in ``audit.toml``."""
    entries = {}
    for module, recipe in chosen.modules.items():
        nodes = chosen.keep.get(module)
        entries[module] = {"recipe": base_recipe(recipe), "keep_fp32": nodes} if nodes else recipe
    return tomli_w.dumps({"mixes": {result_name: entries}})


def run_search(audit: Evaluator, settings: SearchSettings) -> SearchResult:
    """Search (see the module doc) on ``audit``'s work folder; writes ``<work>/search/``.

    Raises:
        SearchFailed: even the all-``fallback`` pipeline fails the gate.
    """
    search = Search(audit, settings)
    start = time.perf_counter()
    attribution = search.attribution()
    ranking = audit.sensitivity(search.searched, settings.recipe)
    moves = search.moves(attribution, ranking)
    try:
        chosen = _bisect(search, moves)
    except SearchFailed:  # keep what was verified, for the report and the user
        _write(search, moves, attribution, search.references(), time.perf_counter() - start)
        raise
    references = search.references()
    if settings.objective == "latency":
        chosen = min((c for c in search.evaluated.values() if c.passed), key=lambda c: c.latency_ms)
    if settings.inc_compare:
        search.inc = compare_with_inc(search, chosen, settings.inc_compare)
    result = SearchResult(settings, chosen, sorted(search.evaluated.values(), key=lambda c: c.index), moves,
                          attribution, references, snippet(settings.name, chosen), Workspace.search(audit.work),
                          search.gates, search.searched, search.inc)
    _write(search, moves, attribution, references, time.perf_counter() - start, result)
    return result


def _write(search: Search, moves, attribution, references, seconds: float, result: SearchResult | None = None) -> None:
    folder = Workspace.search(search.audit.work)
    candidates = sorted(search.evaluated.values(), key=lambda c: c.index)
    table = pd.DataFrame([{"index": c.index, "variant": c.label, "passed": c.passed, "coverage": c.coverage,
                           "int8_nodes": c.int8_nodes, "latency_ms": c.latency_ms, **c.metrics,
                           "modules": ";".join(f"{m}={r}" for m, r in c.modules.items())} for c in candidates])
    with atomic_path(folder / "candidates.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    atomic_write_json(folder / "search.json", {
        "schema_version": SCHEMA_VERSION, "settings": {**asdict(search.settings),
                                                       "gates": [f"{g.metric} {g.op} {g.threshold:g}" for g in search.gates]},
        "method": "bisection over sensitivity-ordered moves, every candidate verified on the videos",
        "total_compute_nodes": search.total_nodes, "attribution": attribution,
        "moves": [list(m) for m in moves], "seconds": round(seconds, 1),
        "references": {k: asdict(v) for k, v in references.items()},
        "candidates": [asdict(c) for c in candidates],
        "chosen": asdict(result.chosen) if result else None, "finished": result is not None,
        "snippet": result.snippet if result else None,
        "inc_compare": search.inc,
    })
    if result:
        atomic_write_text(folder / f"{search.settings.name}.toml", result.snippet)


def search_summary(work: Path) -> dict:
    """``<work>/search/search.json`` (what ``results.json`` and the report show), or {}."""
    import json

    try:
        return json.loads((Workspace.search(work) / "search.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
