"""Every stage of an edit, per backend and precision, beside diffusers on the same weights.

Quick set: ``pytest benchmarks --benchmark-only``; everything: add ``--full``. Save JSON with
``--benchmark-json=RESULTS.json`` and turn it into a table and plot with ``ip2p bench report``.
"""
import torch

from benchmarks import hardware
from benchmarks.conftest import BASELINE, DEVICE, NETWORK_STAGES, edit_psnr, peak_memory_bytes, relative_error


def test_stage(benchmark, case, systems):
    runner = systems.runner(case.model, case.backend)
    fn = runner.stage(case.stage, case.resolution)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds = 3 if case.model == "sd15" else 10
    out = benchmark.pedantic(systems.timed(fn), rounds=rounds, warmup_rounds=1, iterations=1)
    precision = case.backend.rsplit("-", 1)[1]
    info = benchmark.extra_info
    info.update(model=case.model, resolution=case.resolution, stage=case.stage, backend=case.backend,
                baseline=BASELINE, device=hardware.device_name(DEVICE), versions=hardware.versions(),
                peak_memory_bytes=peak_memory_bytes(DEVICE))
    if DEVICE == "cpu":
        info["cpu"] = hardware.cpu_capability()
    flops = systems.flops(case)
    # fp16 on a CPU has no fast matmul to measure (ONNX Runtime computes much of it in fp32): use fp32's peak
    peak = systems.peak(precision if precision == "bf16" or DEVICE == "cuda" else "fp32")
    info.update(flops=flops, peak_flops=peak)
    if case.stage in NETWORK_STAGES:
        info["accuracy_max_rel"] = relative_error(out, systems.reference(case))
    if case.stage == "edit":
        info["edit_steps"] = runner.edit_steps
        info["preset"] = getattr(runner, "preset", "exact")
        info["unet_evaluations"] = getattr(runner, "unet_evaluations", 3 * runner.edit_steps)
        info["unet_work"] = getattr(runner, "unet_work", float(info["unet_evaluations"]))  # MAC-weighted rows
        # same seed, same noise, same steps: only our exact backends are comparable with the reference
        if not case.backend.startswith("diffusers") and info["preset"] == "exact":
            info["psnr_db"] = edit_psnr(out, systems.reference(case))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and flops:
        info["percent_of_peak"] = 100.0 * flops / stats.stats.median / peak
