"""Each runtime against the CPU's limit, in one run: one three-row UNet call of sd15 at 512x512 (the unit of work
of a guided step) and the whole 20-step 512x512 edit, every runtime in its own process with the same threads.

``python -m benchmarks.cpu_limit [--parts unet edit] [--json OUT.json]``: the random-weight sd15 model and its
fp32 ONNX bundle are built once in the benchmark cache (``IP2P_BENCH_CACHE``). Peers: diffusers in float32, in
bfloat16, and in bfloat16 with channels-last UNet and VAE (its best CPU setting where bf16 is native), and raw
OpenVINO on the bundle's own ``unet.onnx`` (compiled with nothing but the precision hint): the reference for
"at the limit". The engine also runs the bundle ``ip2p quantize`` makes of it (int8 UNet; opt-in,
approximate). Timings are the best of ``--repeats`` calls after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)
PROMPT = "make it snowy"
SIDE = 512
ROWS = 3
# (name, what it is): each is timed in a process of its own
UNET_RUNTIMES = {
    "diffusers-fp32": "diffusers' UNet, float32",
    "diffusers-bf16": "diffusers' UNet, bfloat16",
    "diffusers-bf16-cl": "diffusers' UNet, bfloat16, channels-last",
    "engine-torch-bf16": "engine, torch backend, bfloat16",
    "engine-onnxruntime": "engine, onnxruntime, the fp32 bundle (attention fused)",
    "engine-onnxruntime-unfused": "engine, onnxruntime, the fp32 bundle's graphs as exported",
    "engine-default": "engine, the default backend for the fp32 bundle",
    "engine-int8": "engine, the bundle from ip2p quantize (int8 UNet, OpenVINO)",
    "openvino-raw-f32": "raw OpenVINO on the bundle's unet.onnx, f32",
    "openvino-raw-bf16": "raw OpenVINO on the bundle's unet.onnx, bf16",
}
EDIT_RUNTIMES = {
    "diffusers-fp32": "diffusers, float32",
    "diffusers-best": "diffusers, its best CPU setting (bf16 where native, channels-last UNet and VAE)",
    "engine-default": "engine, the default backend for the fp32 bundle, exact",
    "engine-default-fast": "engine, the default backend for the fp32 bundle, preset fast",
    "engine-int8": "engine, the bundle from ip2p quantize (int8 UNet, OpenVINO), exact",
    "engine-int8-fast": "engine, the bundle from ip2p quantize (int8 UNet, OpenVINO), preset fast",
}


def unet_inputs(text_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    latent = SIDE // 8
    return {"sample": rng.standard_normal((ROWS, 8, latent, latent)).astype(np.float32),
            "timestep": np.full(ROWS, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((ROWS, 77, text_dim)).astype(np.float32)}


def best_of(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: lazy set-up, kernel choice, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def unet_call(name: str, model: Path, bundle: Path, int8: Path) -> Callable[[], object]:
    """A function making one three-row UNet call with runtime ``name``."""
    inputs = unet_inputs(768)
    if name.startswith("diffusers"):
        import torch
        from diffusers import UNet2DConditionModel

        dtype = torch.float32 if name == "diffusers-fp32" else torch.bfloat16
        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype).eval()
        if name.endswith("-cl"):
            unet = unet.to(memory_format=torch.channels_last)
        args = {k: torch.from_numpy(v).to(dtype) for k, v in inputs.items()}
        if name.endswith("-cl"):
            args["sample"] = args["sample"].contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode():
                return unet(args["sample"], args["timestep"], args["encoder_hidden_states"]).sample
        return call
    if name.startswith("openvino-raw"):
        import openvino as ov

        compiled = ov.Core().compile_model(str(bundle / "unet.onnx"), "CPU",
                                           {"INFERENCE_PRECISION_HINT": name.rpartition("-")[2]})
        request = compiled.create_infer_request()
        return lambda: request.infer(inputs)
    from engine import EditPipeline

    if name == "engine-torch-bf16":
        pipe = EditPipeline.from_pretrained(model, backend="torch", dtype="bfloat16", progress=False)
    else:
        chosen = int8 if name == "engine-int8" else bundle
        runtime = dict(backend="onnxruntime") if name.startswith("engine-onnxruntime") else {}
        if name == "engine-onnxruntime-unfused":
            runtime["backend_options"] = {"fused_attention": False}
        pipe = EditPipeline.from_pretrained(chosen, progress=False, **runtime)
    backend = pipe.backend
    args = {k: backend.asarray(v) for k, v in inputs.items()}
    return lambda: backend.to_numpy(backend.run("unet", args)["noise_pred"])


def edit_call(name: str, model: Path, bundle: Path, int8: Path) -> Callable[[], object]:
    """A function making one whole 512x512 edit with runtime ``name`` (20 steps unless the preset says)."""
    photo = (np.random.default_rng(1).random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    if name.startswith("diffusers"):
        import torch
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
        from PIL import Image

        from engine.cpu import native_dtype

        best = name == "diffusers-best"
        dtype = torch.bfloat16 if best and native_dtype("bfloat16") else torch.float32
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                                      requires_safety_checker=False)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if best:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        image = Image.fromarray(photo)

        def call():
            with torch.inference_mode():
                return pipe(PROMPT, image=image, num_inference_steps=20, output_type="np",
                            generator=torch.Generator().manual_seed(0)).images
        return call
    from engine import EditPipeline

    pipe = EditPipeline.from_pretrained(int8 if "int8" in name else bundle, progress=False)
    preset = "fast" if name.endswith("-fast") else "exact"
    return lambda: pipe.edit(photo, PROMPT, seed=0, resolution=SIDE, preset=preset)


def measure_one(part: str, name: str, model: Path, bundle: Path, int8: Path, repeats: int) -> dict:
    """Run in the child process: build the runtime, time it."""
    start = time.perf_counter()
    call = (unet_call if part == "unet" else edit_call)(name, model, bundle, int8)
    built = time.perf_counter() - start
    return dict(part=part, name=name, seconds=best_of(call, repeats), build_s=built)


def measure_all(parts: list[str], repeats: int, threads: int, only: list[str] | None = None) -> dict:
    from benchmarks.conftest import CACHE, Systems
    from benchmarks.hardware import cpu_capability, device_name, versions

    systems = Systems(CACHE, "cpu")
    model, bundle = systems.model_dir("sd15"), systems.bundle_dir("sd15", "fp32")
    int8 = systems.int8_bundle_dir("sd15")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    results: dict = dict(machine=device_name("cpu"), cpu=cpu_capability(), versions=versions(), threads=threads,
                         side=SIDE, rows=ROWS, repeats=repeats, runs=[])
    for part in parts:
        runtimes = UNET_RUNTIMES if part == "unet" else EDIT_RUNTIMES
        for name in (n for n in runtimes if not only or n in only):
            command = [sys.executable, "-m", "benchmarks.cpu_limit", "--one", part, name, "--repeats",
                       str(repeats if part == "unet" else 1), "--model", str(model), "--bundle", str(bundle),
                       "--int8", str(int8)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{part} {name} failed: {done.stderr[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["what"] = runtimes[name]
            results["runs"].append(run)
            log.info("%s %s: %.2f s", part, name, run["seconds"])
    return results


def table(results: dict) -> str:
    """Markdown: seconds and ratios to raw OpenVINO bf16 (UNet call) and to diffusers' best (edit)."""
    cpu = results["cpu"]
    lines = [f"{results['machine']}, torch capability {cpu['torch_capability']}, native bf16 {cpu['native_bf16']}, "
             f"{results['threads']} threads (torch {results['versions'].get('torch')}, onnxruntime "
             f"{results['versions'].get('onnxruntime')}, openvino {results['versions'].get('openvino')})."]
    for part, reference in (("unet", "openvino-raw-bf16"), ("edit", "diffusers-best")):
        runs = [r for r in results["runs"] if r["part"] == part]
        if not runs:
            continue
        ref = next((r["seconds"] for r in runs if r["name"] == reference), None)
        if ref is None and part == "unet":
            reference, ref = "openvino-raw-f32", next(r["seconds"] for r in runs if r["name"] == "openvino-raw-f32")
        title = (f"one {results['rows']}-row UNet call at {results['side']}x{results['side']}" if part == "unet"
                 else f"the whole {results['side']}x{results['side']} edit")
        lines += ["", f"| {title} | seconds | vs {reference} |", "|---|---:|---:|"]
        lines += [f"| {r['what']} | {r['seconds']:.2f} | {r['seconds'] / ref:.2f}x |" for r in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["unet", "edit"], default=["unet", "edit"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", help="results file to write")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these runtimes (names as in the table)")
    parser.add_argument("--one", nargs=2, metavar=("PART", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--int8", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one, args.model, args.bundle, args.int8, args.repeats)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = measure_all(args.parts, args.repeats, args.threads, args.only)
    if args.json:
        from engine.files import write_json_atomic

        write_json_atomic(args.json, results, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
