"""pytest-benchmark JSON -> a markdown table (stage x backend: median, ratio to diffusers, % of peak)
and a PNG of per-stage latency per backend. ``ip2p bench report RESULTS.json``."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from engine.errors import InputError
from engine.files import atomic_path, write_text_atomic


def load_results(path: Path) -> tuple[list[dict], dict]:
    """(one row per benchmark, machine info) from a ``--benchmark-json`` file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such results file") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not a pytest-benchmark JSON file ({err})") from None
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "stage" not in info:
            continue
        rows.append({**info, "median_s": bench["stats"]["median"]})
    if not rows:
        raise InputError(f"{path}: no stage benchmarks in this file (run pytest benchmarks --benchmark-json=...)")
    return rows, data.get("machine_info", {})


BEST_CPU = "diffusers-cl-bf16"  # diffusers' best CPU setting: where it ran, every cell is a ratio to it too


def ratios(rows: list[dict], baseline: str | None = None) -> dict[tuple, float]:
    """Median over the median of ``baseline`` (default: each row's own baseline) for the same model, resolution
    and stage."""
    base = {(r["model"], r["resolution"], r["stage"]): r["median_s"] for r in rows
            if r["backend"] == (baseline or r["baseline"])}
    return {
        (r["model"], r["resolution"], r["stage"], r["backend"]): r["median_s"] / base[(r["model"], r["resolution"], r["stage"])]
        for r in rows
        if (r["model"], r["resolution"], r["stage"]) in base
    }


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(rows: list[dict], machine: dict) -> str:
    """One table per (model, resolution): rows are stages, columns backends."""
    rel, best = ratios(rows), ratios(rows, BEST_CPU)
    device = rows[0].get("device", machine.get("cpu", {}).get("brand_raw", "?"))
    lines = [f"Device: {device}. Cells: median, ratio to {rows[0]['baseline']} in the same run (and to {BEST_CPU}, "
             "diffusers' best CPU setting, where it ran: 'best'), % of the "
             "measured matmul peak for the backend's precision; err: max relative error of a network stage "
             "against the float32 torch backend; dB: PSNR of an edit against that backend's edit for the "
             "same seed.", ""]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["resolution"])].append(r)
    for (model, resolution), members in sorted(groups.items()):
        backends = sorted({r["backend"] for r in members}, key=lambda b: (not b.startswith("diffusers"), b))
        stages = [s for s in ("text_encode", "vae_encode", "unet_step", "guidance_sampler", "vae_decode", "edit")
                  if any(r["stage"] == s for r in members)]
        lines += [f"### {model} at {resolution}x{resolution}", "",
                  "| stage | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
        for stage in stages:
            cells = []
            for backend in backends:
                r = next((m for m in members if m["stage"] == stage and m["backend"] == backend), None)
                if r is None:
                    cells.append("")
                    continue
                key = (model, resolution, stage, backend)
                cell = f"{_time(r['median_s'])} ({rel.get(key, float('nan')):.2f}x"
                if key in best:
                    cell += f", {best[key]:.2f}x best"
                if r.get("percent_of_peak") is not None:
                    cell += f", {r['percent_of_peak']:.0f}%"
                cell += ")"
                if r.get("accuracy_max_rel") is not None:
                    cell += f" err {r['accuracy_max_rel']:.0e}"
                if r.get("psnr_db") is not None:
                    cell += f" {r['psnr_db']:.0f} dB"
                cells.append(cell)
            steps = next((r["edit_steps"] for r in members if r["stage"] == stage and "edit_steps" in r), None)
            label = f"{stage} ({steps} steps)" if steps else stage
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: per-stage median latency (log scale) per backend, one panel per model/resolution."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the plot needs matplotlib: pip install matplotlib") from None
    groups = sorted({(r["model"], r["resolution"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for ax, (model, resolution) in zip(axes[:, 0], groups):
        members = [r for r in rows if (r["model"], r["resolution"]) == (model, resolution)]
        stages = sorted({r["stage"] for r in members}, key=lambda s: ("text_encode", "vae_encode", "unet_step",
                                                                       "guidance_sampler", "vae_decode", "edit").index(s))
        backends = sorted({r["backend"] for r in members})
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            values = [next((r["median_s"] * 1e3 for r in members if r["stage"] == s and r["backend"] == backend), 0)
                      for s in stages]
            ax.bar([x + i * width for x in range(len(stages))], values, width, label=backend)
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(stages))], stages)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{model} {resolution}x{resolution}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(results: Path, out_md: Path, out_png: Path | None) -> None:
    rows, machine = load_results(results)
    text = "# Benchmark results\n\n" + markdown(rows, machine)
    if out_png is not None:
        plot(rows, out_png)
        text += f"\n![per-stage latency]({out_png.name})\n"
    write_text_atomic(out_md, text)
