"""The GPU side by side (issue 33): diffusers float16 eager, diffusers float16 compiled with channels-last (the
strongest setting a diffusers user can turn on), the engine eager, and the engine compiled with CUDA graphs, on the
same random-weight model: the UNet step (3 rows), the 20-step ``exact`` edit (and the engine's ``balanced`` and
``fast``), warm-up time, peak memory, each picture against its own system's float32 edit, and the UNet step's share
of the float16 matrix rate measured in the same run. JSON and a markdown report.

    python -m benchmarks.gpu_compare --model sd15 --json out/compare.json --report out/compare.md
    python -m benchmarks.gpu_compare --model tiny --device cpu --dtype float32 ...   # the CPU dry run

Timings are medians after warm-up; on CUDA each call is synchronised.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks import hardware
from benchmarks.runners import DiffusersRunner, EngineRunner
from training.evaluation import psnr

log = logging.getLogger(__name__)
SYSTEMS = ("diffusers-eager", "diffusers-compiled", "engine-eager", "engine-compiled")
PRESETS = ("exact", "balanced", "fast")
TARGETS = {"exact_ms": 300.0, "exact_vs_diffusers_compiled": 0.7, "fast_ms": 80.0, "unet_step_peak_share": 0.35}


def timed(call: Callable[[], Any], device: str, rounds: int) -> tuple[float, Any]:
    """(median seconds of ``rounds`` calls, already warm; the last call's result)."""
    out, times = None, []
    for _ in range(rounds):
        hardware.synchronize(device)
        start = time.perf_counter()
        out = call()
        hardware.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def engine_runners(model: Path, device: str, dtype: str, steps: int, compiled: bool, size: int,
                   presets: list[str]) -> dict[str, EngineRunner]:
    """One EngineRunner per preset over one pipeline, warmed up at ``size`` (compiled and captured then)."""
    from engine import EditPipeline

    options = {"compile": True} if compiled else None
    pipe = EditPipeline.from_pretrained(model, backend="torch", device=device, dtype=dtype, backend_options=options,
                                        progress=False)
    pipe.warmup([(size, size)])
    return {preset: EngineRunner(pipe, steps, preset) for preset in presets}


def diffusers_runner(model: Path, device: str, dtype: str, steps: int, compiled: bool) -> DiffusersRunner:
    """diffusers' pipeline; compiled: UNet and VAE channels-last, both through torch.compile with CUDA graphs
    (``mode="reduce-overhead"``, whole graphs), as diffusers' own speed-up guide advises."""
    runner = DiffusersRunner(model, device, getattr(torch, dtype), steps, channels_last=compiled)
    if compiled:
        pipe = runner.pipe
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)
    return runner


def measure_system(system: str, model: Path, args: argparse.Namespace, flops_per_step: float,
                   peak: float) -> dict:
    """One system's figures: warm-up seconds (loading, compiling, capturing), UNet step, edits, peak memory."""
    family, mode = system.split("-")
    start = time.perf_counter()
    if family == "engine":
        runners = engine_runners(model, args.device, args.dtype, args.steps, mode == "compiled", args.size,
                                 args.presets)
    else:
        runners = {"exact": diffusers_runner(model, args.device, args.dtype, args.steps, mode == "compiled")}
    calls = {"unet_step": runners["exact"].stage("unet_step", args.size)}
    calls |= {preset: runner.stage("edit", args.size) for preset, runner in runners.items()}
    for call in calls.values():  # compiles and captures every shape (diffusers compiles at its first call)
        call()
    figures: dict[str, Any] = {"system": system, "warmup_s": time.perf_counter() - start}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for name, call in calls.items():
        seconds, out = timed(call, args.device, args.rounds)
        figures[name] = {"ms": seconds * 1000}
        if name != "unet_step":
            figures[name]["pictures"] = out
    figures["unet_step"]["peak_share"] = flops_per_step / (figures["unet_step"]["ms"] / 1000) / peak
    figures["unet_rows"] = {preset: runner.unet_evaluations for preset, runner in runners.items()
                            if isinstance(runner, EngineRunner)}
    if args.device.startswith("cuda"):
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del runners, calls
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return figures


def reference_pictures(model: Path, args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    """Each family's float32 edits (same seed): what its reduced-precision pictures are compared with."""
    out = {"engine": {}, "diffusers": {}}
    engine = engine_runners(model, args.device, "float32", args.steps, False, args.size, args.presets)
    for preset, runner in engine.items():
        out["engine"][preset] = runner.stage("edit", args.size)()
    out["diffusers"]["exact"] = diffusers_runner(model, args.device, "float32", args.steps, False).stage(
        "edit", args.size)()
    del engine
    gc.collect()
    return out


def compare(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Every asked-for system, one after the other on the same device, with the run's matrix rate; ``save`` hears
    the figures so far after each system (a run cut short keeps what it measured)."""
    from engine.random_models import create_model

    model = Path(args.model)
    if not model.exists():  # a random-weight kind ("sd15", "tiny"), made once in the cache
        path = Path(args.cache) / args.model
        if not (path / "model_index.json").is_file():
            log.info("creating the random-weight %s model in %s", args.model, path)
            create_model(args.model, path, seed=0)
        model = path
    peak = hardware.measured_peak_flops(args.device, getattr(torch, args.dtype), size=args.matmul_size)
    probe = DiffusersRunner(model, args.device, getattr(torch, args.dtype), args.steps)
    flops_per_step = hardware.count_flops(probe.stage("unet_step", args.size))
    del probe
    references = reference_pictures(model, args)
    results: list[dict] = []
    data = {"device": hardware.device_name(args.device), "dtype": args.dtype, "size": args.size, "steps": args.steps,
            "rounds": args.rounds, "matmul_peak_tflops": peak / 1e12, "unet_step_gflop": flops_per_step / 1e9,
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda}, "systems": results}
    for system in args.systems:
        log.info("%s ...", system)
        figures = measure_system(system, model, args, flops_per_step, peak)
        family = system.split("-")[0]
        for preset in PRESETS:
            if preset in figures:
                figures[preset]["psnr_vs_float32"] = psnr(figures[preset].pop("pictures"), references[family][preset],
                                                                  peak=1.0)
        log.info("%s: %s", system, figures)
        results.append(figures)
        save(data | {"targets": check_targets(results)})
    return data | {"targets": check_targets(results)}


def check_targets(results: list[dict]) -> dict[str, Any]:
    """Issue 33's targets against the engine compiled (None where a system was not run)."""
    by = {r["system"]: r for r in results}
    engine, peer = by.get("engine-compiled"), by.get("diffusers-compiled")
    if engine is None:
        return {}
    exact, fast = engine["exact"]["ms"], engine.get("fast", {}).get("ms")
    ratio = exact / peer["exact"]["ms"] if peer else None
    return {"exact_ms": [exact, exact <= TARGETS["exact_ms"]],
            "exact_vs_diffusers_compiled": [ratio, None if ratio is None else ratio <= TARGETS[
                "exact_vs_diffusers_compiled"]],
            "fast_ms": [fast, None if fast is None else fast <= TARGETS["fast_ms"]],
            "unet_step_peak_share": [engine["unet_step"]["peak_share"],
                                     engine["unet_step"]["peak_share"] >= TARGETS["unet_step_peak_share"]]}


def report(data: dict) -> str:
    """The markdown table of a ``compare`` result."""
    lines = [f"# Side by side on {data['device']} ({data['dtype']}, {data['size']}x{data['size']}, "
             f"{data['steps']} steps, median of {data['rounds']})", "",
             f"Matrix rate measured in this run: {data['matmul_peak_tflops']:.3g} TFLOP/s; UNet step (3 rows): "
             f"{data['unet_step_gflop']:.0f} GFLOP.", "",
             "| system | warm-up | UNet step (share of the matrix rate) | exact | balanced | fast | peak memory |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["systems"]:
        cells = [f"{r['warmup_s']:.1f} s",
                 f"{r['unet_step']['ms']:.1f} ms ({100 * r['unet_step']['peak_share']:.0f}%)"]
        for preset in PRESETS:
            cell = r.get(preset)
            rows = r.get("unet_rows", {}).get(preset)
            cells.append("-" if cell is None else f"{cell['ms']:.0f} ms, {cell['psnr_vs_float32']:.1f} dB"
                         + (f", {rows} rows" if rows else ""))
        cells.append(f"{r['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r else "-")
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    lines += ["", "Pictures: PSNR against the same system family's float32 edit with the same seed.", ""]
    for name, (value, met) in data["targets"].items():
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"- {name}: {shown} (target {TARGETS[name]}): {'met' if met else 'NOT met' if met is not None else '-'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="a model folder, or a random-weight kind: sd15, tiny")
    parser.add_argument("--cache", default=str(Path.home() / ".cache/ip2p/bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS),
                        help="the engine's edits (exact is always run)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the square product timed for the rate")
    parser.add_argument("--json", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    args.presets = ["exact", *[p for p in args.presets if p != "exact"]]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    def save(data: dict) -> None:
        Path(args.json).write_text(json.dumps(data, indent=1, default=float))
        Path(args.report).write_text(report(data))

    sys.stdout.write(report(compare(args, save)))


if __name__ == "__main__":
    main()
