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


def run_bench(args: argparse.Namespace) -> None:
    from benchmarks.report import write_report

    out = Path(args.output)
    write_report(Path(args.results), out, Path(args.plot) if args.plot else out.with_suffix(".png"))
    log.info("wrote %s", out)


COMMANDS = {"bench": (add_bench_arguments, run_bench)}
