"""The batching model's two policies on hand-made row plans and costs: the times they give can be added up here."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.batching_model import BATCH_WAIT, Costs, compare, request_batching, step_batching, table

COSTS = Costs(rows=[1, 3, 12], seconds=[0.010, 0.020, 0.050], begin=0.001, finish=0.002)


def test_call_costs_interpolate_extend_and_flatten():
    assert COSTS.call(2) == pytest.approx(0.015) and COSTS.call(6) == pytest.approx(0.030)
    assert COSTS.call(15) == pytest.approx(0.060)  # the last slope, 10 ms for 3 rows
    flat = COSTS.flat(12)
    assert flat.call(12) == pytest.approx(0.020) and flat.call(1) == pytest.approx(0.010)


def test_a_lone_edit_takes_its_start_its_calls_and_its_finish():
    plans = [[3, 3, 1, 1]]
    expected = 0.001 + 2 * 0.020 + 2 * 0.010 + 0.002
    assert step_batching(np.array([0.5]), plans, COSTS, 12)[0] == pytest.approx(expected)
    keys = ["a"]  # request batching gathers for BATCH_WAIT first: nothing else comes
    assert request_batching(np.array([0.5]), plans, keys, COSTS, 12)[0] == pytest.approx(BATCH_WAIT + expected)


def test_a_short_edit_joins_a_long_one_under_step_batching_and_waits_under_request_batching():
    plans, keys = [[3] * 20, [3] * 4], ["long", "short"]
    arrivals = np.array([0.0, 0.1])
    step = step_batching(arrivals, plans, COSTS, 12)
    request = request_batching(arrivals, plans, keys, COSTS, 12)
    long_alone = BATCH_WAIT + 0.001 + 20 * 0.020 + 0.002
    assert request[0] == pytest.approx(long_alone)
    assert request[1] == pytest.approx(long_alone - 0.1 + BATCH_WAIT + 0.001 + 4 * 0.020 + 0.002)
    # step batching: the long edit's 5th step ends at 0.101 s; the short one joins then (encoded in 1 ms), the
    # next four calls hold 6 rows (30 ms each), then the long edit's last 11 steps run alone
    joined = 0.001 + 5 * 0.020 + 0.001
    short_done = joined + 4 * 0.030 + 0.002
    assert step[1] == pytest.approx(short_done - 0.1)
    assert step[0] == pytest.approx(short_done + 11 * 0.020 + 0.002)


def test_rows_beyond_max_batch_wait_for_room():
    plans = [[3] * 2, [3] * 2]
    both = step_batching(np.zeros(2), plans, COSTS, 3)  # one edit's rows at a time
    assert both[0] == pytest.approx(0.001 + 2 * 0.020 + 0.002)
    assert both[1] == pytest.approx(both[0] + 0.001 + 2 * 0.020 + 0.002)


def test_loads_are_of_request_batchings_capacity_whatever_step_batchings_rows():
    plans = [[3] * 4] * 6
    one_at_a_time = 6 / (6 * (0.001 + 4 * 0.020 + 0.002))  # 3 rows: the six edits run one after another
    rows = compare(plans, COSTS, 12, 3, loads=[0.5], rates=[2.0], draws=2)
    assert [r["step_max_batch"] for r in rows] == [3, 3]
    assert rows[0]["step_capacity_per_s"] == pytest.approx(one_at_a_time)
    assert rows[0]["rate_per_s"] == pytest.approx(0.5 * rows[0]["capacity_per_s"])
    assert rows[1]["rate_per_s"] == 2.0 and rows[1]["load"] == pytest.approx(2.0 / rows[0]["capacity_per_s"])
    assert f"| 3 ({one_at_a_time:.2f}/s) | 50% (" in table({"curves": {"measured": rows}})
