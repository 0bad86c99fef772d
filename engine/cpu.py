"""What this CPU does natively, read once from the flags the kernel reports: whether bfloat16 and float16
arithmetic run in hardware or are emulated (10-200x slower than float32, measured in docs/benchmarks.md)."""
from __future__ import annotations

import functools
import os
import platform

# x86: AVX-512 BF16 (Zen 4, Cooper Lake and later) or AMX; Arm: the bf16 extension (Armv8.6)
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"), "float16": ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo ``flags`` or ``Features``); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_dtype(dtype: str, flags: frozenset[str] | None = None) -> bool:
    """Whether ``dtype`` ("float32", "bfloat16", "float16") computes natively on this CPU. On a Mac (Apple
    silicon, no /proc) bf16 and fp16 count as native; elsewhere unknown flags count as emulated."""
    if dtype == "float32":
        return True
    flags = cpu_flags() if flags is None else flags
    if not flags and platform.system() == "Darwin" and platform.machine() == "arm64":
        return True
    return any(flag in flags for flag in NATIVE_FLAGS.get(dtype, ()))


def cpu_precision(dtype: str, flags: frozenset[str] | None = None) -> tuple[str, str | None]:
    """(the dtype to run in on this CPU, why it differs from ``dtype`` or None): a reduced precision the CPU
    only emulates is slower than float32 by 4-200x, so it becomes float32."""
    if native_dtype(dtype, flags):
        return dtype, None
    wanted = {"bfloat16": "AVX-512 BF16 or AMX", "float16": "AVX-512 FP16 or AMX-FP16"}.get(dtype, "")
    return "float32", (f"{dtype} is emulated on this CPU (no {wanted}), several times slower than float32 "
                       f"(up to 200x measured); running in float32 instead")


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share a core's FPUs; ORT runs best on one
    thread per core)."""
    try:
        cores = set()
        physical = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((physical, core))
        count = len(cores)
    except OSError:
        count = 0
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(count or available, available))


def default_threads() -> int:
    """Intra-op threads of the bundle runtimes (onnxruntime, OpenVINO) when none are asked for: $OMP_NUM_THREADS
    where set (torch reads it too, and Ray sets it to each replica's CPUs: two replicas on 2 cores each spinning 2
    threads edited at half the throughput), else one per physical core."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else physical_cores()
