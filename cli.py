"""The ``compress`` command line: parse, call the ``compress`` package, map errors to exit codes.

    compress run RECIPE [--resume | --overwrite]   run a recipe's stages
    compress validate RECIPE                       check a recipe without loading weights
    compress inspect PATH [--json]                 what a checkpoint stores, bits per parameter; for a
                                                   model (built-in, GGUF, HF directory): its card
    compress eval PATH [--data SOURCE] [--json]    perplexity of any model or checkpoint
    compress plan RECIPE | --model CONFIG [--gpu-gib G] [--chart PNG]
                                                   memory per stage, or per precision and training method

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # third-party tqdm bars (GGUF conversion, datasets); ours are rich


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line and exit code 2, like every other error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed, {minimum}")
        return value
    return parse


def positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of GiB")
    return value


def png_path(text: str) -> Path:
    """A chart file to write: a .png name in an existing, writable directory."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .png (the chart is a PNG image)")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not path.is_file()):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot be written")
    return path


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=120)


def cmd_run(args) -> int:
    from compress import load_recipe, run_recipe
    from compress.execution.distributed import init_ranks, shutdown
    from compress.execution.memory import fix_mmap_threshold
    from compress.run.progress import ProgressBars
    from compress.stages.report import summary_table

    recipe = load_recipe(args.recipe)
    if recipe.spec.streaming:  # the process is the run's own: freed layers go back to the OS at once
        fix_mmap_threshold()
    ranks = init_ranks()  # under torchrun: this process's rank; rank 0 alone writes and prints
    if not ranks.main:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))  # rank 0 tells the story
    progress = ProgressBars(_console(stderr=True), enabled=not args.quiet and ranks.main)
    try:
        result = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, progress=progress, ranks=ranks)
    finally:
        shutdown()
    if not ranks.main:
        return 0
    console = _console()
    console.print(summary_table(result.reports, title=f"compress run {args.recipe}"))
    for report in result.reports:
        for note in report.notes:
            console.print(f"[dim]{report.name}: {note}[/dim]")
    for report in result.reports:
        if report.name == "export":
            console.print(f"checkpoint ({report.metrics['format']}): {report.metrics['path']}")
    console.print(f"report: {result.report_md}")
    return 0


def cmd_validate(args) -> int:
    from compress import load_recipe
    from compress.run.validate import check_recipe

    recipe = load_recipe(args.recipe)
    skeleton = check_recipe(recipe)
    stages = " -> ".join(entry.name for entry in recipe.stages)
    print(f"ok: {args.recipe}: model {recipe.spec.model} ({skeleton.source.kind}), stages {stages}, "
          f"output {recipe.output}")
    return 0


def cmd_inspect(args) -> int:
    from compress import inspect
    from compress.models.sources import resolve_model

    if resolve_model(args.path).kind != "checkpoint":
        return _inspect_model(args)
    info = inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.table import Table

    from compress.stages.report import human_bytes

    table = Table(title=f"{info['path']} ({info['format']})")
    for column in ("module", "format", "bits", "group", "config", "shape", "bytes"):
        table.add_column(column, justify="right" if column in ("bits", "group", "bytes") else "left")
    for row in info["modules"]:
        group = row.get("group_size", row.get("block", ""))
        table.add_row(row["name"], row["format"], str(row.get("bits", "")), str(group),
                      row.get("config", row.get("dtype", "")), "x".join(map(str, row["shape"])),
                      human_bytes(row["bytes"]))
    console = _console()
    console.print(table)
    console.print(f"bits/param (quantized layers): {info['bits_per_param']:.4f}   "
                  f"bits/param (everything stored): {info['bits_per_param_total']:.4f}   "
                  f"size: {human_bytes(info['bytes'])}   kernel: {info['kernel']} ({info['kernel_reason']})")
    engines = Table(title="engines (rules read in their sources; vllm: one H100/H200; vllm-cpu: vLLM's CPU build)")
    for column in ("engine", "loads", "kernel", "stops at", "why"):
        engines.add_column(column)
    for name, verdict in info["engines"].items():
        engines.add_row(name, "yes" if verdict["loads"] else "no", verdict["kernel"] or "",
                        verdict["stops_at"] or "", verdict["reason"] or "")
    console.print(engines)
    return 0


def _inspect_model(args) -> int:
    """A model that is not one of our checkpoints: its card (``compress.models.model_card``)."""
    from compress.models.model_card import card_lines, describe_model

    card = describe_model(args.path)
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        _console().print("\n".join(card_lines(card)), markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_eval(args) -> int:
    from compress.models.data import parse_source_string, token_windows
    from compress.execution.evaluate import kernels_used, perplexity
    from compress.models.sources import load_model, resolve_model

    source = resolve_model(args.path)
    start = time.perf_counter()
    model, tokenizer = load_model(source, args.dtype)
    text = parse_source_string(args.data)
    windows = token_windows(tokenizer, text, args.samples, args.seq_len)
    ppl = perplexity(model, windows, args.batch_size)
    result = {"path": args.path, "perplexity": ppl, "data": text.describe(), "samples": args.samples,
              "seq_len": args.seq_len, "seconds": time.perf_counter() - start, **kernels_used(model)}
    print(json.dumps(result, indent=2) if args.json else f"perplexity {ppl:.4f} on {text.describe()} "
          f"({args.samples} x {args.seq_len} tokens" + (f", kernel {result['kernel']})" if "kernel" in result else ")"))
    return 0


def cmd_plan(args) -> int:
    from compress.errors import CompressError
    from compress.planning.plan_report import model_plan, plan_chart, plan_tables, recipe_plan

    if (args.recipe is None) == (args.model is None):
        raise CompressError("plan: give a recipe or --model CONFIG (one of them)")
    if args.recipe is not None:
        from compress import load_recipe
        from compress.run.validate import check_order

        recipe = load_recipe(args.recipe)
        check_order(recipe)  # the recipe's own rules: a plan may be for another machine's files
        plan = recipe_plan(recipe, args.gpu_gib)
    else:
        from compress.planning.plan import architecture_for
        from compress.planning.plan_training import TrainingSetup

        setup = TrainingSetup(rank=args.rank, batch=args.batch, seq=args.train_seq or args.seq,
                              checkpointing=args.checkpointing, optimizer=args.optimizer)
        plan = model_plan(architecture_for(args.model), args.model, args.batch, args.seq, args.gpu_gib, setup)
    if args.chart:
        try:
            plan_chart(plan, args.chart)
        except OSError as err:
            raise CompressError(f"plan --chart {args.chart}: cannot write: {err.strerror or err}") from None
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    console = _console()
    for table in plan_tables(plan):
        console.print(table)
    if "fit" in plan:
        fit = plan["fit"]
        console.print(f"fits in {args.gpu_gib:g} GiB: inference {fit['inference'] or 'nothing'}, "
                      f"training {fit['training'] or 'nothing'}")
    if "peak_stage" in plan:
        console.print(f"peak: {plan['peak_gib']:.2f} GiB in stage {plan['peak_stage']}"
                      + (f" ({'fits' if plan['fits'] else 'does not fit'} in {args.gpu_gib:g} GiB)" if "fits" in plan else ""))
    if args.chart:
        console.print(f"chart: {args.chart}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from compress import __version__

    parser = OneLineParser(prog="compress", description="Compress Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe")
    run.add_argument("recipe")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue after the last completed stage")
    mode.add_argument("--overwrite", action="store_true", help="discard an earlier run's saved stages")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)
    validate = commands.add_parser("validate", help="check a recipe without loading weights")
    validate.add_argument("recipe")
    validate.set_defaults(func=cmd_validate)
    inspect = commands.add_parser("inspect", help="describe a checkpoint, or a model's card")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)
    evaluate = commands.add_parser("eval", help="perplexity of a model or checkpoint")
    evaluate.add_argument("path", help="checkpoint or model directory, .gguf file, or built-in name")
    evaluate.add_argument("--data", default="stdlib:eval", help="stdlib:train|eval, a file, or hub:NAME[:CONFIG[:SPLIT]]")
    evaluate.add_argument("--samples", type=at_least(1), default=32)
    evaluate.add_argument("--seq-len", type=at_least(2), default=512, help="tokens per window (at least 2)")
    evaluate.add_argument("--batch-size", type=at_least(1), default=4)
    evaluate.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)
    plan = commands.add_parser("plan", help="memory a model or a recipe needs (config only, nothing loaded)")
    plan.add_argument("recipe", nargs="?", help="a recipe: the memory of each stage as it will run")
    plan.add_argument("--model", help="preset (llama-2-7b, llama-3.1-70b, ...), built-in name, model directory "
                                      "or config.json: every precision and training method")
    plan.add_argument("--gpu-gib", type=positive_gib, default=None, help="GPU memory: what fits")
    plan.add_argument("--batch", type=at_least(1), default=1)
    plan.add_argument("--seq", type=at_least(1), default=4096, help="inference sequence length")
    plan.add_argument("--train-seq", type=at_least(2), default=None, help="training sequence length (default --seq)")
    plan.add_argument("--rank", type=at_least(1), default=16, help="LoRA rank for the training plans")
    plan.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the training plans")
    plan.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    plan.add_argument("--chart", type=png_path, help="write a stacked bar chart of the breakdown to this .png file")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)
    return parser


def configure_logging(verbose: bool) -> None:
    # transformers sets its own loggers' level when it first logs (from this variable), overriding ours
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if verbose else "error")
    from rich.logging import RichHandler

    handler = RichHandler(console=_console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("transformers", "datasets", "accelerate", "urllib3", "filelock", "httpx", "bitsandbytes", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from compress.errors import CompressError
    from compress.kernels import KernelUnavailableError, select_backend

    try:
        select_backend()  # a bad COMPRESS_KERNEL fails here, before any work
        return args.func(args)
    except (CompressError, KernelUnavailableError) as err:
        print("error: " + " ".join(str(err).split("\n")), file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
