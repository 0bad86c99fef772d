"""Where a distilled student edits best: its success over a grid of (s_T, s_I) on validation sets of shapes edits
(seeds that neither training nor the held-out sets use), beside its teacher's exact edit on the same sets.

The scales it chooses are the student's defaults (``default_scales`` of ``ip2p distill``, ``scales`` in its
``distillation.json``); the held-out sets then measure them once (``ip2p bench savings --student``). A choice made
on the shapes model is not one for a photo model: run this on your own student and edits.

    ip2p bench scales STUDENT -o OUT [--text 2 3 4 5 6 7.5] [--image 1 1.25 1.5 1.75 2 2.5] [--steps 1]
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.savings import result_file
from engine.config import EditConfig
from engine.errors import InputError
from engine.files import write_json_atomic
from engine.presets import preset_config

VALIDATION_SEEDS = (2_000_001, 2_000_002, 2_000_003)  # never training data (small seeds), never held out (1000003-5)
TEACHER = "teacher, exact"


def success_over_sets(pipe, model: str, configs: dict[str, EditConfig], out_dir: Path, count: int,
                      progress: bool = True) -> dict[str, dict[str, float]]:
    """{name: {edit type: success %}} of each config over the validation sets, ``count`` edits each; one JSON
    per name in ``out_dir`` (a rerun reads it where ``model``, the count and the setting are the same)."""
    from training.evaluation import evaluate

    results = {}
    for name, config in tqdm(configs.items(), desc="scales", unit="setting", disable=not progress):
        path = result_file(out_dir, name)
        asked = {"model": model, "count": count, "seeds": list(VALIDATION_SEEDS), "steps": config.steps,
                 "sampler": config.sampler, "scales": [config.text_guidance, config.image_guidance]}
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("asked") != asked:  # another model, count or setting under this name: measured again
            reports = [evaluate(pipe, config, count, seed, progress=False) for seed in VALIDATION_SEEDS]
            saved = {"asked": asked, "success": {e: sum(r["edits"][e]["success"] for r in reports) / len(reports)
                                                 for e in reports[0]["edits"]}}
            write_json_atomic(path, saved)
        results[name] = saved["success"]
    return results


def choose(grid: dict[str, dict[str, float]], exact: dict[str, float]) -> str:
    """The setting whose worst edit type is closest to (or furthest above) the teacher's; ties: the higher mean."""
    def margins(name: str) -> tuple[float, float]:
        gaps = [grid[name][e] - exact[e] for e in exact]
        return round(min(gaps), 6), round(sum(gaps) / len(gaps), 6)  # rounded: equal gaps of averaged sets tie
    return max(grid, key=margins)


def scales_table(grid: dict[str, dict[str, float]], exact: dict[str, float], chosen: str) -> str:
    """Markdown: success per edit type and the worst type's gap to the teacher, the chosen row in bold."""
    edits = list(exact)
    lines = ["| setting | " + " | ".join(edits) + " | worst gap to exact |", "|---|" + "---:|" * (len(edits) + 1),
             f"| {TEACHER} | " + " | ".join(f"{exact[e]:.1f}%" for e in edits) + " | |"]
    for name, success in grid.items():
        cells = [f"{success[e]:.1f}%" for e in edits] + [f"{min(success[e] - exact[e] for e in edits):+.1f}"]
        label = f"**{name}**" if name == chosen else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_configs(texts: list[float], images: list[float], steps: int, sampler: str) -> dict[str, EditConfig]:
    """{"1 step, s_T 6, s_I 2.5": its EditConfig} for every pair of ``texts`` x ``images``."""
    return {f"{steps} step{'s' if steps > 1 else ''}, s_T {t:g}, s_I {i:g}":
            EditConfig(steps=steps, sampler=sampler, text_guidance=t, image_guidance=i)
            for t in texts for i in images}


def measure(student_path: str, out_dir: Path, texts: list[float], images: list[float], steps: int, count: int,
            teacher: str | None = None, progress: bool = True) -> dict:
    """The student's grid and its teacher's exact edit (``teacher``, default the one its ``distillation.json``
    names) on the validation sets; the chosen scales. Written to ``out_dir``/student_scales.json and .md."""
    from engine.pipeline import EditPipeline, locate_model
    from training.synthetic import EDITS

    if count < len(EDITS):
        raise InputError(f"--count {count}: at least {len(EDITS)} edits a set, one of each type")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a folder (the results go there)")
    student = EditPipeline.from_pretrained(student_path, progress=False)
    if student.model.student is None:
        raise InputError(f"{student_path}: not a distilled model (no distillation.json); see ip2p distill")
    for t in texts:
        for i in images:
            student.model.student.check_scales(t, i)
    card = Path(locate_model(student_path)) / "distillation.json"  # a shipped student's name: its folder
    if teacher is None and not card.is_file():
        raise InputError(f"{student_path} has no distillation.json naming its teacher (a bundle?): give --teacher")
    teacher_path = teacher or json.loads(card.read_text())["teacher"]
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = grid_configs(texts, images, steps, student.model.student.sampler)
    grid = success_over_sets(student, str(student_path), configs, out_dir, count, progress)
    exact = success_over_sets(EditPipeline.from_pretrained(teacher_path, progress=False), str(teacher_path),
                              {TEACHER: preset_config("exact")}, out_dir, count, progress)[TEACHER]
    chosen = choose(grid, exact)
    result = {"student": student_path, "teacher": teacher_path, "seeds": list(VALIDATION_SEEDS), "count": count,
              "exact": exact, "grid": grid, "chosen": chosen,
              "scales": [configs[chosen].text_guidance, configs[chosen].image_guidance]}
    write_json_atomic(out_dir / "student_scales.json", result)
    (out_dir / "student_scales.md").write_text(scales_table(grid, exact, chosen) + "\n", encoding="utf-8")
    return result
