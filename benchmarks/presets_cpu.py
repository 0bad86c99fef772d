"""The whole 512x512 sd15 edit per preset against diffusers' float32 20-step edit, in one process:
``python -m benchmarks.presets_cpu [--model DIR] [--dtype bfloat16] [--no-onnxruntime] [-o OUT.json]``.

One timed run of each after a 1-step warm-up (an sd15 edit takes minutes on a small CPU); the pytest
suite (``pytest benchmarks``) repeats its cases, this script answers one question quickly. The presets run
on the torch backend in ``--dtype``, and on onnxruntime's CPU provider and OpenVINO (where installed) with the
fp32 bundle. The random-weight sd15 model and its bundle are built once in the benchmark cache when no model is
given.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.hardware import cpu_capability, device_name
from engine.extras import available

log = logging.getLogger(__name__)
PROMPT = "make it snowy"
# Timed besides the presets: step caching (DeepCache's share of the UNet, measured in time), and `fast` as it was
# until 2026-12-03 (10 Euler-ancestral steps), to compare with today's 8 Euler steps.
COMBINATIONS = {"exact + cache 3": dict(cache_interval=3),
                "fast, 10 euler_ancestral steps": dict(preset="fast", steps=10, sampler="euler_ancestral")}


def time_diffusers(model: Path, photo: np.ndarray) -> float:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(photo)
    with torch.inference_mode():
        pipe(PROMPT, image=image, num_inference_steps=1, output_type="np")  # warm-up
        start = time.perf_counter()
        pipe(PROMPT, image=image, num_inference_steps=20, output_type="np")
    return time.perf_counter() - start


def time_presets(model: Path, photo: np.ndarray, dtype: str | None, combinations: dict[str, dict],
                 backend: str | None = None) -> dict[str, dict]:
    """Seconds, UNet rows and work of each preset's edit (and of ``combinations``) on ``model``: a model folder
    (torch, in ``dtype``) or a bundle (``backend``, in ``dtype`` or its default precision)."""
    from engine import EditPipeline
    from engine.presets import PRESETS

    pipe = EditPipeline.from_pretrained(model, backend=backend, dtype=dtype, progress=False)
    pipe.edit(photo, PROMPT, steps=1, seed=0, resolution=512)  # warm-up
    out = {}
    for name, settings in {**{p: dict(preset=p) for p in PRESETS}, **combinations}.items():
        start = time.perf_counter()
        result = pipe.edit(photo, PROMPT, seed=0, resolution=512, **settings)
        out[name] = {"seconds": time.perf_counter() - start, "unet_evaluations": result.unet_evaluations[0],
                     "unet_work": result.unet_work[0], "timings": result.timings}
        log.info("%s: %.1f s, %d UNet rows, %.1f in whole-UNet MACs", name, out[name]["seconds"],
                 result.unet_evaluations[0], result.unet_work[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the random-weight sd15 model in the benchmark cache (and its fp32 "
                        "bundle; a model given is timed on the torch backend only)")
    parser.add_argument("--dtype", default="bfloat16", help="the engine's dtype (float32 where bf16 is emulated)")
    parser.add_argument("--no-onnxruntime", action="store_true", help="time the torch backend only")
    parser.add_argument("-o", "--output", default="presets_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.conftest import CACHE, Systems

    systems = Systems(CACHE, "cpu")
    model = Path(args.model) if args.model else systems.model_dir("sd15")
    photo = (np.random.default_rng(1).random((512, 512, 3)) * 255).astype(np.uint8)
    results = {"device": device_name("cpu"), "cpu": cpu_capability(), "torch": torch.__version__,
               "diffusers-fp32-20": time_diffusers(model, photo)}
    log.info("diffusers fp32, 20 steps: %.1f s", results["diffusers-fp32-20"])
    results[f"engine-{args.dtype}"] = time_presets(model, photo, args.dtype, COMBINATIONS)
    if not (args.no_onnxruntime or args.model):  # the cached model's fp32 bundle (no split UNet: presets only)
        import onnxruntime

        bundle = systems.bundle_dir("sd15", "fp32")
        results["onnxruntime"] = onnxruntime.__version__
        results["engine-onnxruntime-fp32"] = time_presets(bundle, photo, None, {}, backend="onnxruntime")
        if available("openvino"):  # the default for a bundle on a CPU: bf16 where native
            results["engine-openvino"] = time_presets(bundle, photo, None, {}, backend="openvino")
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
