"""The ``quant-audit`` command line.

Exit codes (DESIGN.md): 0 ran and every check passed; 1 ran and a check failed; 2 bad input or
usage (one line on stderr naming the file, field or value); 3 an unexpected internal error.

Example::

    quant-audit export --model wan2.2-t2v-tiny --out runs/r1
    quant-audit generate --model wan2.2-t2v-tiny --variant onnx --out runs/r1 --seeds 0,1
    quant-audit score --reference runs/r1/videos/torch --candidate runs/r1/videos/onnx --out runs/r1/scores/frames.csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant.errors import CheckFailed, UserError  # noqa: E402

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a one-line UserError (exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sub = self.prog.partition(" ")[2]
        raise UserError(f"{sub}: {message}" if sub else message)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from quant.pipeline.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name or checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, type=Path, help="run folder")


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    from quant.pipeline.settings import GenerationSettings as G

    g = p.add_argument_group("generation settings")
    g.add_argument("--height", type=int, default=G.height)
    g.add_argument("--width", type=int, default=G.width)
    g.add_argument("--frames", type=int, default=G.num_frames, dest="num_frames")
    g.add_argument("--steps", type=int, default=G.num_inference_steps, dest="num_inference_steps")
    g.add_argument("--guidance", type=float, default=G.guidance_scale, dest="guidance_scale")
    g.add_argument("--max-seq-len", type=int, default=G.max_sequence_length, dest="max_sequence_length")


def _model_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand that loads a model into a run folder and takes the generation settings."""
    p = sub.add_parser(name, help=help)
    _add_model_args(p)
    _add_settings_args(p)
    p.set_defaults(func=func)
    return p


def _settings(args):
    from quant.pipeline.settings import GenerationSettings

    return GenerationSettings(**{k: getattr(args, k) for k in GenerationSettings.field_names() if hasattr(args, k)})


def _prompts(args) -> list[str]:
    from quant.pipeline.prompts import DEFAULT_EVAL_PROMPTS, read_prompts

    return read_prompts(args.prompts or DEFAULT_EVAL_PROMPTS)


def cmd_export(args) -> int:
    from quant.recipes.export import ExportOptions
    from quant.stages.export import export_pipeline
    from quant.pipeline.models import load_model
    from reports.console import parity_table

    settings, prompts = _settings(args), _prompts(args)
    options = ExportOptions(opset=args.opset, force_external_data=args.external_data,
                            dynamic_batch=not args.static_batch, simplify=args.simplify)
    model = load_model(args.model)
    report = export_pipeline(model, settings, args.out, prompts, seed=args.seed, options=options, modules=args.module)
    parity_path = args.out / "parity.json"
    print(parity_table(json.loads(parity_path.read_text())))
    print(f"wrote {parity_path} and {args.out / 'onnx' / 'fp32'}")
    if report.failed:
        worst = {p.module: p.rel_l2 for p in report.parity if not p.passed}
        detail = ", ".join(f"{m} (rel-L2 {v:.3g})" for m, v in worst.items())
        raise CheckFailed(f"export parity failed for {detail}; threshold {report.parity[0].threshold:g}")
    return EXIT_OK


def _psnr_against_reference(root: Path, variant: str, records) -> str | None:
    from metrics.psnr import CAP_DB, psnr_frames
    from quant.stages.generate import video_dir
    from quant.pipeline.video_io import load_frames
    from reports.console import psnr_table

    reference_dir = video_dir(root, "torch")
    if variant == "torch" or not reference_dir.is_dir():
        return None
    rows = {}
    for record in records:
        ref_path = reference_dir / record.file
        if ref_path.is_file():
            rows[record.file] = psnr_frames(load_frames(ref_path), load_frames(video_dir(root, variant) / record.file)).tolist()
    return psnr_table(f"PSNR of '{variant}' against 'torch' per frame", rows, CAP_DB) if rows else None


def cmd_generate(args) -> int:
    from quant.stages.generate import generate_variant, video_dir
    from quant.pipeline.models import load_model
    from quant.pipeline.modules import present_modules
    from quant.pipeline.prompts import parse_seeds
    from quant.recipes.names import parse_variant

    settings, prompts, seeds = _settings(args), _prompts(args), parse_seeds(args.seeds)
    if args.fps < 1:
        raise UserError(f"--fps must be a positive integer, got {args.fps}")
    model = load_model(args.model)
    variant = parse_variant(args.variant, present_modules(model.pipe))
    records = generate_variant(model, variant, prompts, seeds, settings, args.out, fps=args.fps)
    table = _psnr_against_reference(args.out, variant.name, records)
    if table:
        print(table)
    bad = [r.file for r in records if r.nonfinite]
    print(f"wrote {len(records)} videos to {video_dir(args.out, variant.name)}")
    if bad:
        raise CheckFailed(f"variant '{variant.name}' produced NaN/Inf pixels in {', '.join(bad)}")
    return EXIT_OK


def cmd_score(args) -> int:
    from quant.stages.score import score_folders, write_tables
    from reports.console import score_table

    tables = score_folders(args.reference, args.candidate, variant=args.variant, luma=not args.no_luma)
    paths = write_tables(tables, args.out)
    print(score_table(tables.videos))
    capped = int(tables.frames["psnr_identical"].sum())
    if capped:
        print(f"{capped} identical frame(s): PSNR is infinite there, shown and averaged as 100 dB (psnr_identical=True)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


def cmd_calibrate(args) -> int:
    from quant.stages.calibrate import DEFAULT_CALIBRATION_PROMPTS, CalibrationSpec, calibrate, load_calibration_prompts
    from quant.pipeline.models import load_model
    from quant.pipeline.prompts import DEFAULT_EVAL_PROMPTS, parse_seeds

    settings = _settings(args)
    prompts = load_calibration_prompts(args.prompts or DEFAULT_CALIBRATION_PROMPTS, args.eval_prompts or DEFAULT_EVAL_PROMPTS)
    spec = CalibrationSpec(tuple(prompts), tuple(parse_seeds(args.seeds)), args.samples)
    model = load_model(args.model)
    cal = calibrate(model, spec, settings, args.out)
    print(("reused" if cal.reused else "captured") + f" calibration {cal.manifest['key']} in {cal.folder}")
    for module, entry in cal.manifest["modules"].items():
        samples = entry["samples"]
        steps = sorted({s["step"] for s in samples if s["step"] is not None})
        held = sum(s["holdout"] for s in samples)
        where = f", steps {steps}" if steps else ""
        print(f"  {module}: {len(samples)} of {entry['calls']} calls ({held} held back){where}")
    return EXIT_OK


def cmd_quantize(args) -> int:
    from quant.pipeline.models import load_model
    from quant.recipes.quantize import QuantizeOptions
    from quant.stages.quantize import quantize_pipeline, report_path
    from reports.console import quantization_table

    settings = _settings(args)
    options = QuantizeOptions(method=args.method, per_channel=not args.per_tensor,
                              op_types=tuple(args.op_type) if args.op_type else None,
                              nodes_to_exclude=tuple(args.exclude or ()), fp16_guard=not args.no_fp16_guard,
                              reduce_range=args.reduce_range, activation_type=args.activation_type)
    model = load_model(args.model)
    report = quantize_pipeline(model, settings, args.out, args.recipe, options, modules=args.module)
    print(quantization_table(report))
    print(f"wrote {args.out / 'onnx' / args.recipe} and {report_path(args.out, args.recipe)}")
    return EXIT_OK


def cmd_run(args) -> int:
    from quant.audit.run import run_audit
    from quant.config import load_config
    from reports.console import verdict_lines

    config = load_config(args.config).override(model=args.model, tag=args.tag)
    result = run_audit(config, args.out, baseline=args.baseline, fresh=args.fresh, argv=["quant-audit", *(args.argv or [])])
    print(verdict_lines(result.results))
    print(f"report: {result.run_dir / 'report.html'}")
    print(f"verdict: {result.verdict.upper()}")
    if result.failed:
        names = ", ".join(f"{g.variant}: {g.metric} {g.op} {g.threshold:g}" if g.threshold is not None
                          else f"{g.variant}: {g.metric}" for g in result.failed[:8])
        more = f" (+{len(result.failed) - 8} more)" if len(result.failed) > 8 else ""
        raise CheckFailed(f"{len(result.failed)} gate(s) failed: {names}{more}")
    return EXIT_OK


def cmd_sensitivity(args) -> int:
    from quant.support.files import atomic_write_text
    from quant.pipeline.models import load_model
    from quant.recipes.quantize import QuantizeOptions
    from quant.stages.sensitivity import node_sensitivity, sensitivity_paths
    from reports.console import sensitivity_table
    from reports.plots import sensitivity_bars

    model = load_model(args.model)
    table = node_sensitivity(model, args.out, args.module, args.recipe, QuantizeOptions(method=args.method))
    csv_path, json_path = sensitivity_paths(args.out, args.module, args.recipe)
    svg = csv_path.with_name(f"{args.module}.{args.recipe}.svg")
    atomic_write_text(svg, sensitivity_bars(table, f"{args.module} ({args.recipe})"))
    print(sensitivity_table(table, args.top))
    print(f"wrote {csv_path}, {json_path} and {svg}")
    return EXIT_OK


def cmd_search(args) -> int:
    from quant.audit.run import search_pipeline
    from quant.config import load_config
    from reports.console import inc_table, search_table

    config = load_config(args.config).override(model=args.model)
    result = search_pipeline(config, args.out, objective=args.objective, inc_compare=args.inc_compare)
    print(search_table(result))
    print(f"chosen: candidate {result.chosen.index} ({result.chosen.coverage:.1%} INT8 coverage); pin it in audit.toml:")
    print(result.snippet)
    if result.inc:
        print(inc_table(result.inc))
    print(f"wrote {result.folder}")
    return EXIT_OK


def cmd_report(args) -> int:
    from reports.html import render_report

    print(f"wrote {render_report(args.run)}")
    return EXIT_OK


def cmd_history(args) -> int:
    from reports import history
    from reports.console import history_tables
    from reports.dashboard import render_dashboard

    path = args.out / history.DB_NAME
    if not path.is_file():
        raise UserError(f"{path}: no history yet; `quant-audit run --out {args.out}` writes it")
    print(history_tables(history.runs(path), history.trend(path), args.metric))
    print(f"dashboard: {render_dashboard(args.out)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quant-audit", description="Audit what quantization does to a text-to-video pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _model_command(sub, "export", "PyTorch modules -> FP32 ONNX, with a parity check against PyTorch", cmd_export)
    p.add_argument("--prompts", type=Path, help="prompts whose generation supplies parity inputs (default eval.txt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--external-data", action="store_true", help="always save weights as external data")
    p.add_argument("--static-batch", action="store_true", help="do not try a dynamic batch axis")
    p.add_argument("--simplify", action="store_true", help="simplify with onnxslim, kept only if parity holds")
    p.add_argument("--module", action="append", help="export only this module (repeatable; default all)")

    p = _model_command(sub, "generate", "fixed-seed videos for one variant", cmd_generate)
    p.add_argument("--variant", default="torch", help="torch, onnx, <recipe> or <recipe>@<module>")
    p.add_argument("--prompts", type=Path, help="prompt file, one per line (default calibration_data/prompts/eval.txt)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the .webp preview")

    p = _model_command(sub, "calibrate", "capture calibration inputs for every module", cmd_calibrate)
    p.add_argument("--prompts", type=Path, help="calibration prompts (default calibration_data/prompts/calibration.txt)")
    p.add_argument("--eval-prompts", type=Path, help="evaluation prompts they must not overlap (default eval.txt)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds per prompt (default 0)")
    p.add_argument("--samples", type=int, default=16, help="samples kept per module, spread over its calls (default 16)")

    p = _model_command(sub, "quantize", "FP32 ONNX -> FP16 / INT8 ONNX", cmd_quantize)
    p.add_argument("--recipe", required=True, help="fp16, int8, int8-dynamic or inc-int8")
    p.add_argument("--method", default="minmax", help="INT8 calibration: minmax, entropy or percentile")
    p.add_argument("--module", action="append", help="quantize only this module (repeatable; default all)")
    p.add_argument("--op-type", action="append", help="op type to quantize (repeatable; default MatMul, Conv, Gemm)")
    p.add_argument("--exclude", action="append", help="node name to keep in FP32 (repeatable)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--no-fp16-guard", action="store_true", help="convert every node to FP16, even where it overflows")
    p.add_argument("--reduce-range", action="store_true",
                   help="int8/int8-dynamic: 7-bit weights (no u8s8 pair saturation on CPUs without VNNI)")
    p.add_argument("--activation-type", default="int8", choices=["int8", "uint8"], help="int8: activation type (default int8)")

    from quant.gates import METRIC_DIRECTIONS

    p = sub.add_parser("run", help="the whole audit: export, calibrate, quantize, generate, score, gates, report, history")
    p.add_argument("--config", type=Path, help="TOML config (default ./audit.toml, else the repository's audit.toml)")
    p.add_argument("--model", help="override the config's model: built-in name or checkpoint folder")
    p.add_argument("--out", type=Path, default=Path("runs"), help="where runs, work files and history go (default runs/)")
    p.add_argument("--tag", help="release tag recorded with the run (e.g. v1.2-rc1)")
    p.add_argument("--baseline", help="'latest' or a run id: fail when a metric drops beyond [regression] tolerances")
    p.add_argument("--fresh", action="store_true", help="recompute every stage instead of reusing finished work")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sensitivity", help="rank a module's quantized nodes by what each costs (keep-one-in-FP32)")
    _add_model_args(p)
    p.add_argument("--module", required=True, help="text_encoder, transformer, transformer_2 or vae_decoder")
    p.add_argument("--recipe", default="int8", help="int8, int8-dynamic or fp16 (default int8)")
    p.add_argument("--method", default="minmax", help="INT8 calibration: minmax, entropy or percentile")
    p.add_argument("--top", type=int, default=20, help="rows to print (the CSV has every node)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("search", help="find the mix with the most INT8 that passes the [search] gates")
    p.add_argument("--config", type=Path, help="TOML config with a [search] table (default ./audit.toml)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output folder shared with `run` (default runs/)")
    p.add_argument("--objective", choices=["coverage", "latency"], help="override [search] objective")
    p.add_argument("--inc-compare", choices=["transformer", "transformer_2"],
                   help="also run neural-compressor's autotune on this module with the same video metric")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="(re)render the HTML report of a run")
    p.add_argument("run", type=Path, help="run folder (holds results.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("history", help="list past runs and trends from the history store")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder holding history.sqlite (default runs/)")
    p.add_argument("--metric", default="psnr_mean", choices=list(METRIC_DIRECTIONS), help="metric of the trend table")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("score", help="PSNR/SSIM of candidate videos against reference videos")
    p.add_argument("--reference", required=True, type=Path, help="folder of reference videos (.npz or .mp4)")
    p.add_argument("--candidate", required=True, type=Path, help="folder of videos scored against the same names")
    p.add_argument("--out", required=True, type=Path, help="per-frame CSV; per-video, summary and latent tables go beside it")
    p.add_argument("--variant", help="name for the candidate in the tables (default: its folder name)")
    p.add_argument("--no-luma", action="store_true", help="skip the BT.601 luma SSIM column")
    p.set_defaults(func=cmd_score)
    return parser


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    # diffusers imports torchao when it is installed (neural-compressor needs it), and torch then
    # logs pytree deprecation warnings on every command; INC logs INFO lines through its own logger.
    for name in ("torch", "torchao", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            module.set_verbosity_error()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        _quiet_libraries()
        return args.func(args)
    except UserError as exc:
        print(f"quant-audit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckFailed as exc:
        print(f"quant-audit: FAILED: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        print("quant-audit: interrupted; finished files are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error of the audit. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception:  # noqa: BLE001 - the last line of defence: a bug, reported with its traceback
        traceback.print_exc()
        print("quant-audit: internal error (exit 3); please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
