"""benchmarks/savings.py: the sweep of savings against held-out success, its table and plot."""
import json

from benchmarks.savings import all_settings, run_sweep, savings_plot, savings_table, student_settings
from engine.config import Student


def test_a_small_sweep_writes_work_and_success_per_setting(tiny_pipe, tmp_path):
    names = ["6 steps", "adaptive 0.99, 8 steps", "cache 3"]
    summaries = run_sweep(tiny_pipe, tmp_path, names, count=3, progress=False)
    assert summaries["6 steps"]["unet_evaluations_per_edit"] == 18
    assert summaries["adaptive 0.99, 8 steps"]["unet_evaluations_per_edit"] <= 24
    cached = summaries["cache 3"]  # 20 steps, 7 of them whole: the rows of exact, less work
    assert cached["unet_evaluations_per_edit"] == 60 and cached["unet_work_per_edit"] < 0.7 * 60
    assert set(summaries["6 steps"]["success"]) == {"recolour", "background", "remove"}
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["6_steps.json", "adaptive_0.99_8_steps.json", "cache_3.json"]
    saved = json.loads((tmp_path / "6_steps.json").read_text())
    assert saved["settings"]["steps"] == 6 and len(saved["per_set"]) == 3
    assert run_sweep(tiny_pipe, tmp_path, names, count=3, progress=False) == summaries  # kept, not rerun
    (tmp_path / "6_steps.json").write_text(json.dumps({**saved, "settings": {**saved["settings"], "steps": 5}}))
    again = run_sweep(tiny_pipe, tmp_path, ["6 steps"], count=3, progress=False)  # a name measured at another setting
    assert again["6 steps"]["settings"]["steps"] == 6 and again["6 steps"]["seconds"] != saved["seconds"]
    table = savings_table(summaries, baseline="6 steps")
    assert "| 6 steps | 18.0 | 18.0 (1.00x) |" in table and "(+0.0)" in table
    savings_plot(summaries, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert {"preset exact", "adaptive 0.99", "dpmpp_2m 6 steps"} <= set(all_settings())


def test_a_student_is_measured_at_its_own_default_scales_and_at_the_teachers():
    student = Student(embedding_dim=8, text_range=(2.0, 10.0), image_range=(1.0, 2.5), steps=(1, 1, 1),
                      scales=(4.0, 1.75))
    settings = student_settings(student)
    assert list(settings)[:2] == ["distilled, 1 step", "distilled, 1 step at s_T 7.5, s_I 1.5"] and len(settings) == 8
    own, teachers = settings["distilled, 4 steps"], settings["distilled, 4 steps at s_T 7.5, s_I 1.5"]
    assert (own.steps, own.sampler, own.text_guidance, own.image_guidance) == (4, "lcm", 4.0, 1.75)
    assert (teachers.steps, teachers.text_guidance, teachers.image_guidance) == (4, 7.5, 1.5)
    plain = student_settings(Student(embedding_dim=8, text_range=(2.0, 10.0), image_range=(1.0, 2.5)))
    assert list(plain) == ["distilled, 1 step", "distilled, 2 steps", "distilled, 4 steps", "distilled, 8 steps"]
