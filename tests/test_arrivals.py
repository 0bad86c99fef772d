"""The arrival benchmark's bookkeeping: latencies summarised by step count, rounds pooled, the docs' table."""
from __future__ import annotations

import pytest

from benchmarks.arrivals import pooled, summary, table


def run(mode: str, round_: int, latencies: list[tuple[int, float]], statuses: dict, differing=None) -> dict:
    result = dict(mode=mode, load=0.8, round=round_, rate_per_s=5.0, throughput_per_s=4.0 + round_,
                  statuses=statuses, latencies_s=latencies) | summary(latencies)
    return result if differing is None else result | {"pixels_differing": differing}


def test_the_summary_pools_latencies_by_step_count():
    result = summary([(4, 1.0), (20, 3.0), (4, 2.0)])
    assert result["mean_s"] == pytest.approx(2.0) and list(result["by_steps"]) == ["4", "20"]
    assert result["by_steps"]["4"]["p50_s"] == pytest.approx(1.5)


def test_rounds_pool_into_one_row_per_mode_with_each_rounds_p99():
    runs = [run("request", 0, [(4, 1.0), (20, 4.0)], {"200": 2}), run("step", 0, [(4, 0.5)], {"200": 1, "503": 1}, 0),
            run("request", 1, [(4, 2.0)], {"200": 1, "429": 1}), run("step", 1, [(20, 1.5)], {"200": 1}, 1)]
    rows = {r["mode"]: r for r in pooled(runs)}
    assert rows["request"]["statuses"] == {"200": 3, "429": 1} and rows["step"]["statuses"] == {"200": 2, "503": 1}
    assert rows["request"]["pixels_differing"] is None and rows["step"]["pixels_differing"] == 1
    assert rows["step"]["throughput_per_s"] == pytest.approx(4.5)
    assert rows["step"]["round_p99_s"] == [0.5, 1.5] and rows["request"]["mean_s"] == pytest.approx(7 / 3)
    text = table({"pooled": pooled(runs)})
    step_line = next(line for line in text.splitlines() if "| step |" in line)
    ratio = rows["step"]["p99_s"] / rows["request"]["p99_s"]
    assert f"({ratio:.2f}x)" in step_line and "2 x 200, 1 x 503" in step_line


def test_the_table_says_nan_for_a_step_count_with_no_answer():
    text = table({"pooled": pooled([run("step", 0, [(4, 0.5)], {"200": 1}, 0)])})
    assert "| 0.50 / nan s |" in text
