"""What each way of doing less work costs in edit quality: ``ip2p eval`` over the three held-out shapes sets
(3 x 300 edits) for every setting, success per edit type against UNet work per edit (rows evaluated,
weighted by the MACs each ran: a shallow step-cache row counts its share of the UNet), as a markdown table
and a Pareto plot (``ip2p bench savings OUT_DIR``; docs/savings.md holds the latest)."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from engine.caching import StepCache
from engine.config import PAPER_SCALES, EditConfig, Student
from engine.guidance import GuidanceOptions
from engine.files import write_json_atomic
from engine.presets import PRESETS, preset_config

log = logging.getLogger(__name__)

HELD_OUT_SEEDS = (1_000_003, 1_000_004, 1_000_005)


def _adaptive(threshold: float, **settings) -> EditConfig:
    return EditConfig(**settings, guidance=GuidanceOptions(adaptive_threshold=threshold))


SETTINGS: dict[str, EditConfig] = {  # every option on its own, then combinations; presets are added below
    "adaptive 0.995": _adaptive(0.995),
    "adaptive 0.99": _adaptive(0.99),
    "adaptive 0.98": _adaptive(0.98),
    "adaptive 0.9": _adaptive(0.9),
    "interval (1, inf)": EditConfig(guidance=GuidanceOptions(interval=(1.0, 1e9))),
    "10 steps": EditConfig(steps=10),
    "8 steps": EditConfig(steps=8),
    "6 steps": EditConfig(steps=6),
    "dpmpp_2m 10 steps": EditConfig(steps=10, sampler="dpmpp_2m"),
    "dpmpp_2m 8 steps": EditConfig(steps=8, sampler="dpmpp_2m"),
    "dpmpp_2m 6 steps": EditConfig(steps=6, sampler="dpmpp_2m"),
    "dpmpp_2m_sde 10 steps": EditConfig(steps=10, sampler="dpmpp_2m_sde"),
    "dpmpp_2m_sde 8 steps": EditConfig(steps=8, sampler="dpmpp_2m_sde"),
    "dpmpp_2m_sde 6 steps": EditConfig(steps=6, sampler="dpmpp_2m_sde"),
    "euler 10 steps": EditConfig(steps=10, sampler="euler"),
    "euler 8 steps": EditConfig(steps=8, sampler="euler"),
    "euler 6 steps": EditConfig(steps=6, sampler="euler"),
    "unipc 10 steps": EditConfig(steps=10, sampler="unipc"),
    "unipc 8 steps": EditConfig(steps=8, sampler="unipc"),
    "unipc 6 steps": EditConfig(steps=6, sampler="unipc"),
    "cache 2": EditConfig(step_cache=StepCache(2)),
    "cache 3": EditConfig(step_cache=StepCache(3)),
    "cache 5": EditConfig(step_cache=StepCache(5)),
    "cache 3, depth 2": EditConfig(step_cache=StepCache(3, depth=2)),
    "adaptive 0.99, 14 steps": _adaptive(0.99, steps=14),
    "adaptive 0.99, 12 steps": _adaptive(0.99, steps=12),
    "adaptive 0.99, 10 steps": _adaptive(0.99, steps=10),
    "adaptive 0.99, 9 steps": _adaptive(0.99, steps=9),
    "adaptive 0.99, 8 steps": _adaptive(0.99, steps=8),
    "adaptive 0.95, 10 steps": _adaptive(0.95, steps=10),
    "adaptive 0.9, 10 steps": _adaptive(0.9, steps=10),
    "adaptive 0.9, euler 8 steps": _adaptive(0.9, steps=8, sampler="euler"),
    "adaptive 0.9, euler 6 steps": _adaptive(0.9, steps=6, sampler="euler"),
    "adaptive 0.99, euler 8 steps": _adaptive(0.99, steps=8, sampler="euler"),
    "adaptive 0.9, euler 10 steps": _adaptive(0.9, steps=10, sampler="euler"),
    "adaptive 0.9, euler 7 steps": _adaptive(0.9, steps=7, sampler="euler"),
    "adaptive 0.9, euler 8 steps, cache 2": _adaptive(0.9, steps=8, sampler="euler", step_cache=StepCache(2)),
    "adaptive 0.9, dpmpp_2m_sde 8 steps": _adaptive(0.9, steps=8, sampler="dpmpp_2m_sde"),
    "adaptive 0.99, cache 3": _adaptive(0.99, step_cache=StepCache(3)),
    "adaptive 0.99, cache 5": _adaptive(0.99, step_cache=StepCache(5)),
    "adaptive 0.9, 10 steps, cache 2": _adaptive(0.9, steps=10, step_cache=StepCache(2)),
    "adaptive 0.9, 10 steps, cache 3": _adaptive(0.9, steps=10, step_cache=StepCache(3)),
}


STUDENT_STEPS = (1, 2, 4, 8)  # a distilled student's lcm steps, one UNet row each
AT_PAPER_SCALES = f" at s_T {PAPER_SCALES[0]:g}, s_I {PAPER_SCALES[1]:g}"  # a student's setting at the teacher's
IMAGE_GUIDANCE_SWEEP = (1.0, 1.5, 2.0, 2.5)


def all_settings() -> dict[str, EditConfig]:
    return {**{f"preset {name}": preset_config(name) for name in PRESETS}, **SETTINGS}


def student_settings(student: Student) -> dict[str, EditConfig]:
    """A distilled student (``ip2p distill``) at each of ``STUDENT_STEPS`` with its sampler, at its default scales
    and, where those differ from the teacher's, also at the teacher's (``... at s_T 7.5, s_I 1.5``)."""
    settings = {}
    for steps in STUDENT_STEPS:
        name = f"distilled, {steps} step{'s' if steps > 1 else ''}"
        settings[name] = preset_config("exact", student=student, steps=steps)
        if student.scales != PAPER_SCALES:
            text, image = PAPER_SCALES
            settings[f"{name}{AT_PAPER_SCALES}"] = preset_config("exact", student=student, steps=steps,
                                                                  text_guidance=text, image_guidance=image)
    return settings


def image_guidance_sweep(pipes: dict[str, tuple], out_dir: Path, count: int = 300, progress: bool = True) -> dict:
    """Each of ``pipes`` ({name: (pipeline, config)}) at every s_I of ``IMAGE_GUIDANCE_SWEEP`` on the first held-out
    set: success, colour right and the median untouched PSNR per edit type, so that a student's response to the
    scale can be set beside its teacher's. Kept in ``out_dir``/image_guidance.json (a rerun reads it)."""
    from training.evaluation import evaluate

    path = out_dir / "image_guidance.json"
    if path.is_file():
        return json.loads(path.read_text())
    sweep: dict = {}
    for name, (pipe, config) in pipes.items():
        for scale in tqdm(IMAGE_GUIDANCE_SWEEP, desc=f"image guidance: {name}", disable=not progress):
            report = evaluate(pipe, dataclasses.replace(config, image_guidance=scale), count, HELD_OUT_SEEDS[0],
                              progress=False)
            sweep.setdefault(name, {})[str(scale)] = {
                e: {k: r[k] for k in ("success", "colour_correct", "median_untouched_psnr_db")}
                for e, r in report["edits"].items()}
    write_json_atomic(path, sweep)
    return sweep


def sweep_table(sweep: dict) -> str:
    """Markdown: per model and s_I, success / median untouched PSNR per edit type."""
    edits = list(next(iter(next(iter(sweep.values())).values())))
    lines = ["| model | s_I | " + " | ".join(f"{e}: success, untouched PSNR" for e in edits) + " |",
             "|---|---:|" + "---:|" * len(edits)]
    for name, scales in sweep.items():
        for scale, by_edit in scales.items():
            cells = [f"{by_edit[e]['success']:.1f}%, {by_edit[e]['median_untouched_psnr_db']:.1f} dB" for e in edits]
            lines.append(f"| {name} | {scale} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_sweep(pipe, out_dir: Path, names: list[str] | None = None, count: int = 300,
              progress: bool = True, settings: dict[str, EditConfig] | None = None) -> dict[str, dict]:
    """Evaluate each setting (of ``settings``, default ``all_settings()``) on the three held-out sets of ``count``
    edits; one JSON per setting in ``out_dir`` (a rerun skips those already there). Returns {name: summary}."""
    from training.evaluation import evaluate

    settings = settings or all_settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name in tqdm(names or list(settings), desc="settings", unit="setting", disable=not progress):
        path = result_file(out_dir, name)
        kept = json.loads(path.read_text()) if path.is_file() else None
        if kept is not None and _same_setting(kept["settings"], settings[name]):
            summaries[name] = kept
            continue
        start = time.perf_counter()
        reports = [evaluate(pipe, settings[name], count, seed, progress=False) for seed in HELD_OUT_SEEDS]
        summary = {
            "name": name, "seconds": time.perf_counter() - start,
            "unet_evaluations_per_edit": sum(r["unet_evaluations_per_edit"] for r in reports) / len(reports),
            "unet_work_per_edit": sum(r["unet_work_per_edit"] for r in reports) / len(reports),
            "success": {e: sum(r["edits"][e]["success"] for r in reports) / len(reports) for e in reports[0]["edits"]},
            "per_set": [{e: r["edits"][e]["success"] for e in r["edits"]} for r in reports],
            "settings": {k: v for k, v in reports[0].items() if k not in ("cases", "edits", "seed", "count")},
        }
        write_json_atomic(path, summary)
        log.info("%s: %.1f UNet work per edit, success %s", name, summary["unet_work_per_edit"],
                 {e: round(v, 1) for e, v in summary["success"].items()})
        summaries[name] = summary
    return summaries


def result_file(out_dir: Path, name: str) -> Path:
    """Where a setting's kept result lives: "adaptive 0.99, 8 steps" -> OUT/adaptive_0.99_8_steps.json."""
    return out_dir / (name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".json")


def _same_setting(saved: dict, config: EditConfig) -> bool:
    """Whether a kept result measured ``config`` (a name may change its meaning: a student's default scales)."""
    return all(saved.get(key) == getattr(config, key)
               for key in ("steps", "sampler", "text_guidance", "image_guidance"))


def work_of(summary: dict) -> float:
    """MAC-weighted UNet work per edit; results from before step caching counted rows only, which equal it."""
    return summary.get("unet_work_per_edit", summary["unet_evaluations_per_edit"])


def savings_table(summaries: dict[str, dict], baseline: str = "preset exact") -> str:
    """Markdown: work and success per edit type, each with its difference from ``baseline``."""
    base = summaries[baseline]
    edits = list(base["success"])
    lines = ["| setting | UNet rows per edit | UNet work per edit (MAC-weighted) | " + " | ".join(edits) + " |",
             "|---|---:|---:|" + "---:|" * len(edits)]
    for name, s in sorted(summaries.items(), key=lambda kv: -work_of(kv[1])):
        rows, work = s["unet_evaluations_per_edit"], work_of(s)
        cells = [f"{s['success'][e]:.1f}% ({s['success'][e] - base['success'][e]:+.1f})" for e in edits]
        lines.append(f"| {name} | {rows:.1f} | {work:.1f} ({work / work_of(base):.2f}x) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def savings_plot(summaries: dict[str, dict], path: Path) -> None:
    """Success per edit type against UNet evaluations per edit, one marker per setting (a student at other scales
    than its own: hollow and unlabelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = list(next(iter(summaries.values()))["success"])
    fig, axes = plt.subplots(1, len(edits), figsize=(5 * len(edits), 4.2), sharey=True)
    floor = 70.0  # settings below it are drawn on the floor (their values are in the table)
    for ax, edit in zip(axes, edits):
        for name, s in summaries.items():
            preset, student = name.startswith("preset"), name.startswith("distilled")
            work, success = work_of(s), s["success"][edit]
            marker = "*" if preset else "D" if student else ("o" if success >= floor else "v")
            color = "C3" if preset else "C2" if student else "C0"
            other_scales = student and name.endswith(AT_PAPER_SCALES)
            ax.scatter(work, max(success, floor), marker=marker, s=160 if preset else 40 if student else 25,
                       color="none" if other_scales else color, edgecolors=color, zorder=3 if preset or student else 2)
            if preset or (student and not other_scales):
                label = name.removeprefix("preset ").replace("distilled, ", "")
                ax.annotate(label, (work, max(success, floor)), fontsize=8, xytext=(4, -10),
                            textcoords="offset points", color=color)
        ax.set_ylim(floor - 2, 101)
        ax.set_title(edit)
        ax.set_xlabel("UNet work per edit (whole-UNet rows, MAC-weighted)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out success (%, 900 edits)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
