"""What the machine can do: measured matmul peak, FLOPs of a stage, device name, library versions."""
from __future__ import annotations

import platform
import time
from typing import Callable

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def cpu_capability() -> dict:
    """What the CPU does natively, recorded beside every CPU figure: torch's kernel level (AVX2, AVX512, ...)
    and whether bf16 and fp16 compute in hardware (else they are emulated, many times slower than fp32)."""
    from engine.cpu import native_dtype

    return {"torch_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_dtype("bfloat16"), "native_fp16": native_dtype("float16")}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def measured_peak_flops(device: str, dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul, best of ``repeats``: the practical ceiling a stage is compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch's FLOP counter (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    found = {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnxruntime": onnxruntime.__version__,
             "python": platform.python_version()}
    try:
        import openvino

        found["openvino"] = openvino.get_version().split("-")[0]
    except ImportError:
        pass
    return found
