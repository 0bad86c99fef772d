"""``ip2p bench report``: a markdown table and a plot from pytest-benchmark's JSON."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ip2p")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    report = bench_sub.add_parser("report", help="markdown table and PNG plot from --benchmark-json results")
    report.add_argument("results", help="pytest-benchmark JSON (pytest benchmarks --benchmark-json=RESULTS.json)")
    report.add_argument("-o", "--output", default="benchmarks.md", help="markdown file to write")
    report.add_argument("--plot", default=None, help="PNG to write (default: beside the markdown)")
    savings = bench_sub.add_parser("savings", help="held-out success against UNet work for every saving and preset")
    savings.add_argument("out_dir", help="one JSON per setting (kept: a rerun does only what is missing), "
                         "savings.md and savings.png")
    savings.add_argument("--model", help="model folder or bundle (default: the shipped shapes model)")
    savings.add_argument("--backend", help="default: the model's own")
    savings.add_argument("--settings", nargs="+", help="names from benchmarks/savings.py (default: all)")


def run_bench(args: argparse.Namespace) -> None:
    if args.bench_command == "savings":
        run_savings(args)
        return
    from benchmarks.report import write_report

    out = Path(args.output)
    write_report(Path(args.results), out, Path(args.plot) if args.plot else out.with_suffix(".png"))
    log.info("wrote %s", out)


def run_savings(args: argparse.Namespace) -> None:
    from benchmarks.savings import all_settings, run_sweep, savings_plot, savings_table
    from engine.errors import InputError
    from engine.pipeline import EditPipeline

    unknown = sorted(set(args.settings or []) - set(all_settings()))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; see benchmarks/savings.py")
    pipe = EditPipeline.from_pretrained(args.model, backend=args.backend, progress=False)
    out = Path(args.out_dir)
    summaries = run_sweep(pipe, out, args.settings, progress=not args.quiet)
    if "preset exact" in summaries:
        (out / "savings.md").write_text(savings_table(summaries) + "\n", encoding="utf-8")
    savings_plot(summaries, out / "savings.png")
    log.info("wrote %s", out)


COMMANDS = {"bench": (add_bench_arguments, run_bench)}
