"""``ip2p bench report``: a markdown table and a plot from pytest-benchmark's JSON."""
from __future__ import annotations

import argparse
import dataclasses
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
    savings.add_argument("--student", help="also a model of `ip2p distill` (of --model) at 1, 2, 4 and 8 steps, and "
                         "both over image guidance 1.0-2.5 (image_guidance.json, sweep.md)")
    scales = bench_sub.add_parser("scales", help="a distilled student's success over a grid of guidance scales on "
                                  "validation sets, beside its teacher: the default scales to give it")
    scales.add_argument("student", help="a model folder of ip2p distill (its distillation.json names the teacher)")
    scales.add_argument("--teacher", help="default: the one the student's distillation.json names")
    scales.add_argument("-o", "--output", required=True, help="folder: one JSON per setting (kept: a rerun does only "
                        "what is missing), student_scales.json and .md")
    scales.add_argument("--text", type=float, nargs="+", default=[2, 3, 4, 5, 6, 7.5],
                        help="s_T values (default: the shipped student's grid, as --image)")
    scales.add_argument("--image", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75, 2.0, 2.5], help="s_I values")
    scales.add_argument("--steps", type=int, default=1, help="the student's steps (default 1)")
    scales.add_argument("--count", type=int, default=300, help="edits per validation set (three sets)")
    pairs = bench_sub.add_parser("pairs", help="time per generate-pairs candidate at SD 1.5 / CLIP ViT-L/14 shapes")
    pairs.add_argument("--resolution", type=int, default=512)
    pairs.add_argument("--samples", type=int, default=4, help="candidates per prompt")
    pairs.add_argument("--json", required=True, help="results file to write")
    serve = bench_sub.add_parser("serve", help="load, soak and overhead of the edit service on loopback")
    serve.add_argument("--model", help="default: the shipped shapes bundle")
    serve.add_argument("--backend", help="default: the model's own")
    serve.add_argument("--dtype", help="default: the model's own (torch: float32)")
    serve.add_argument("--parts", nargs="+", choices=["uncontended", "load", "soak", "overhead"],
                       default=["uncontended", "load", "soak", "overhead"], help="what to run (default: all)")
    serve.add_argument("--clients", type=int, default=32)
    serve.add_argument("--requests", type=int, default=300)
    serve.add_argument("--max-batch", type=int, nargs="+", default=[1, 8],
                       help="UNet rows per call (an edit at both scales takes 3); one load run per value")
    serve.add_argument("--soak", type=int, default=0, metavar="N", help="also N edits of mixed sizes, memory measured")
    serve.add_argument("--hostile", type=int, default=0, metavar="N",
                       help="N hostile clients beside each load run and the soak (benchmarks/hostile.py): image "
                       "bombs, crafted files, odd JSON, unknown paths, slow uploads, big jobs never fetched")
    serve.add_argument("--ray", type=int, metavar="REPLICAS", help="load runs on `ip2p serve --ray` with this many "
                       "replicas, sharing this machine's CPUs (needs the ray extra)")
    serve.add_argument("--overhead-size", type=int, default=512, help="side of the uncontended edits")
    serve.add_argument("--json", required=True, help="results file to write")


def run_bench(args: argparse.Namespace) -> None:
    if args.bench_command == "savings":
        run_savings(args)
        return
    if args.bench_command == "serve":
        run_serving(args)
        return
    if args.bench_command == "scales":
        run_student_scales(args)
        return
    if args.bench_command == "pairs":
        run_pairs_timing(args)
        return
    from benchmarks.report import write_report

    out = Path(args.output)
    write_report(Path(args.results), out, Path(args.plot) if args.plot else out.with_suffix(".png"))
    log.info("wrote %s", out)


def run_savings(args: argparse.Namespace) -> None:
    from benchmarks.savings import (all_settings, image_guidance_sweep, run_sweep, savings_plot, savings_table,
                                    student_settings, sweep_table)
    from engine.errors import InputError
    from engine.pipeline import EditPipeline

    unknown = sorted(set(args.settings or []) - set(all_settings()))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; see benchmarks/savings.py")
    pipe = EditPipeline.from_pretrained(args.model, backend=args.backend, progress=False)
    out = Path(args.out_dir)
    summaries = run_sweep(pipe, out, args.settings, progress=not args.quiet)
    if args.student:
        student = EditPipeline.from_pretrained(args.student, backend=args.backend, progress=False)
        if student.model.student is None:
            raise InputError(f"{args.student}: not a distilled model (no distillation.json); see ip2p distill")
        settings = student_settings(student.model.student)
        summaries |= run_sweep(student, out, progress=not args.quiet, settings=settings)
        teacher = all_settings()["preset exact"]  # the sweep varies s_I at the teacher's s_T
        sweep = image_guidance_sweep({"teacher, exact": (pipe, teacher), "distilled, 4 steps": (
            student, dataclasses.replace(settings["distilled, 4 steps"], text_guidance=teacher.text_guidance))},
                                     out, progress=not args.quiet)
        (out / "sweep.md").write_text(sweep_table(sweep) + "\n", encoding="utf-8")
    if "preset exact" in summaries:
        (out / "savings.md").write_text(savings_table(summaries) + "\n", encoding="utf-8")
    savings_plot(summaries, out / "savings.png")
    log.info("wrote %s", out)


def run_student_scales(args: argparse.Namespace) -> None:
    from benchmarks.student_scales import measure, scales_table

    result = measure(args.student, Path(args.output), args.text, args.image, args.steps, args.count,
                     teacher=args.teacher, progress=not args.quiet)
    log.info("%s\nchosen: %s: set \"scales\": %s in %s's distillation.json (default_scales of ip2p distill)",
             scales_table(result["grid"], result["exact"], result["chosen"]), result["chosen"], result["scales"],
             args.student)


def run_serving(args: argparse.Namespace) -> None:
    import json

    from benchmarks.hardware import cpu_capability, device_name, versions
    from engine.files import write_json_atomic
    from benchmarks.serving import Load, load_run, serving_table, soak, uncontended
    from engine.pipeline import DEFAULT_BUNDLE
    from engine.serving.jobs import Settings

    load_args = dict(model=args.model or str(DEFAULT_BUNDLE), backend=args.backend, dtype=args.dtype)
    results: dict = dict(machine=device_name("cpu"), cpu=cpu_capability(), versions=versions(), model=load_args,
                         load=[])
    logging.getLogger("engine.serving").setLevel(logging.WARNING)  # not one line per request
    # with hostile clients: a short read deadline (their slow uploads) and a small image budget (their big jobs)
    hostile_limits = dict(read_timeout=2.0, max_held_bytes=256 * 2**20) if args.hostile else {}
    if "uncontended" in args.parts:
        results["uncontended"] = uncontended(load_args, size=64, steps=20, repeats=100)
        log.info("uncontended: %s", results["uncontended"])
    if "load" in args.parts:
        for max_batch in args.max_batch:
            settings = Settings(max_batch=max_batch, batch_wait_ms=10, max_queue=4 * args.clients, **hostile_limits)
            load = Load(clients=args.clients, requests=args.requests, hostile=args.hostile)
            results["load"].append(load_run(load_args, settings, load, ray_replicas=args.ray))
            log.info("max batch %d: %s", max_batch, results["load"][-1])
    if "soak" in args.parts and args.soak:
        results["soak"] = soak(load_args, Settings(max_batch=8, max_queue=64, **hostile_limits), args.soak,
                               sizes=(64, 96, 128), hostile=args.hostile)
        log.info("soak: %s", results["soak"])
    if "overhead" in args.parts:
        # last: the large edits leave onnxruntime's CPU arena grown, which would inflate the soak's baseline.
        # One step: the overhead does not depend on the steps, and shorter edits buy more samples of it.
        results["overhead"] = [uncontended(load_args, size=args.overhead_size, steps=1, repeats=30, fmt=fmt, block=10)
                               for fmt in ("png", "jpeg")]
        log.info("overhead at %d px: %s", args.overhead_size, results["overhead"])
    write_json_atomic(args.json, results, indent=1)
    log.info("wrote %s\n\n%s", args.json, serving_table(json.loads(json.dumps(results))))


def run_pairs_timing(args: argparse.Namespace) -> None:
    from benchmarks.hardware import cpu_capability, device_name, versions
    from benchmarks.pairs import time_pairs
    from engine.files import write_json_atomic

    result = dict(machine=device_name("cpu"), cpu=cpu_capability(), versions=versions(),
                  **time_pairs(args.resolution, samples=args.samples))
    write_json_atomic(Path(args.json), result)
    log.info("%s", result)
    log.info("wrote %s", args.json)


COMMANDS = {"bench": (add_bench_arguments, run_bench)}
