"""What scheduling alone can gain: a discrete-event model of the server's two batching policies, fed with the UNet
call costs and row plans measured on this machine (``python -m benchmarks.batching_model``).

The open-loop benchmark (``benchmarks.arrivals``) measures the real server, but one run's p99 ratio moved from
0.43x to 1.10x between rounds on this shared 2-core host (the p99 of 300 edits is noisy as well). This model has
no host noise and no HTTP: one processor runs the worker's loop as ``engine/serving/worker.py`` does (step
batching: the oldest queued edits join while their rows fit ``max_batch``; request batching: a batch of the
oldest edit's key, gathered for 10 ms, runs to its end), each call taking the measured time of its row count,
each edit its measured solo row plan (adaptive guidance drops rows mid-way). It answers what p99 ratio the
policies reach on this machine's cost curve, over many arrival draws, and on a curve where rows up to
``max_batch`` cost what one edit's do (a GPU's, roughly). A model, not a measurement.

``python -m benchmarks.batching_model --json docs/results/FILE.json [--draws 20] [--edits 300] [--rates R ...]
[--step-max-batch N ...]``
"""
from __future__ import annotations

import argparse
import io
import logging
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.arrivals import LOADS, request_fields
from benchmarks.hardware import cpu_capability, device_name, versions
from benchmarks.serving import example_png
from engine.files import write_json_atomic
from engine.pipeline import DEFAULT_BUNDLE, EditPipeline
from engine.presets import preset_config
from engine.serving.jobs import Settings

BATCH_WAIT = Settings().batch_wait_ms / 1000  # request batching's default gathering time, seconds


@dataclass(frozen=True)
class Costs:
    """Seconds of one UNet call at each measured row count (``rows`` ascending), and of an edit's start (text and
    image encoded) and finish (decoded)."""

    rows: list[int]
    seconds: list[float]
    begin: float
    finish: float

    def call(self, rows: int) -> float:
        """Seconds of a call of ``rows`` rows: interpolated between the measured counts, extended linearly."""
        if rows <= self.rows[-1]:
            return float(np.interp(rows, self.rows, self.seconds))
        slope = (self.seconds[-1] - self.seconds[-2]) / (self.rows[-1] - self.rows[-2])
        return self.seconds[-1] + slope * (rows - self.rows[-1])

    def flat(self, max_batch: int) -> "Costs":
        """The same, but every call of up to ``max_batch`` rows costs what one edit's 3 rows do."""
        seconds = [min(s, self.call(3)) if r <= max_batch else s for r, s in zip(self.rows, self.seconds)]
        return Costs(self.rows, seconds, self.begin, self.finish)


def measure(model: str, backend: str | None, edits: int) -> tuple[list[list[int]], Costs]:
    """Each mix edit's rows per step alone, and the call costs: 20-step edits of 1, 2 and 3 rows a step (their
    scales), and k edits of 3 rows stepped together."""
    pipe = EditPipeline.from_pretrained(model, backend=backend, progress=False)
    image = Image.open(io.BytesIO(example_png(64)))
    plans, begins, finishes = [], [], []
    for i in tqdm(range(edits), desc="row plans", mininterval=5):
        fields = request_fields(i)
        config = preset_config(fields["preset"], {"resolution": "auto"}, steps=int(fields["steps"]))
        rows: list[int] = []
        loop = pipe.denoising_loop(on_call=lambda r, _: rows.append(r))
        start = time.perf_counter()
        edit = pipe.begin(image, fields["instruction"], config, int(fields["seed"]))
        begins.append(time.perf_counter() - start)
        loop.add(edit)
        while loop:
            loop.step()
        start = time.perf_counter()
        pipe.finish(edit)
        finishes.append(time.perf_counter() - start)
        plans.append(rows)
    counts, seconds = [], []
    for scales, k in [((1.0, 1.0), 1), ((7.5, 1.0), 1)] + [((7.5, 1.5), k) for k in (1, 2, 3, 4, 6, 8)]:
        config = preset_config("exact", {"resolution": "auto"}, steps=20, text_guidance=scales[0],
                               image_guidance=scales[1])
        loop, times = pipe.denoising_loop(), []
        for seed in range(k):
            loop.add(pipe.begin(image, "make the circle blue", config, seed))
        counts.append(loop.rows())
        while loop:
            start = time.perf_counter()
            loop.step()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times[1:]))
    return plans, Costs(counts, seconds, statistics.median(begins), statistics.median(finishes))


def step_batching(arrivals: np.ndarray, plans: list[list[int]], costs: Costs, max_batch: int) -> np.ndarray:
    """Latencies under step batching: before every step the oldest queued edits join while the rows the running
    ones ask for, plus theirs, fit ``max_batch`` (the first always joins an empty loop)."""
    latencies, queue, running, now, sent = np.zeros(len(plans)), deque(), [], 0.0, 0
    while sent < len(plans) or queue or running:
        while sent < len(plans) and arrivals[sent] <= now:
            queue.append(sent)
            sent += 1
        if not queue and not running:
            now = arrivals[sent]
            continue
        room = max_batch - sum(plans[i][done] for i, done in running)
        while queue and (plans[queue[0]][0] <= room or not running):
            room -= plans[queue[0]][0]
            running.append([queue.popleft(), 0])
            now += costs.begin
        now += costs.call(sum(plans[i][done] for i, done in running))
        for edit in running:
            edit[1] += 1
            if edit[1] == len(plans[edit[0]]):
                now += costs.finish
                latencies[edit[0]] = now - arrivals[edit[0]]
        running = [edit for edit in running if edit[1] < len(plans[edit[0]])]
    return latencies


def request_batching(arrivals: np.ndarray, plans: list[list[int]], keys: list, costs: Costs,
                     max_batch: int) -> np.ndarray:
    """Latencies under request batching: the oldest edit and the queued ones of its key that fit ``max_batch``,
    gathered for up to ``BATCH_WAIT`` s unless full, run to their end."""
    latencies, queue, now, sent = np.zeros(len(plans)), [], 0.0, 0
    while sent < len(plans) or queue:
        while sent < len(plans) and arrivals[sent] <= now:
            queue.append(sent)
            sent += 1
        if not queue:
            now = arrivals[sent]
            continue
        until = now + BATCH_WAIT
        while True:
            batch, rows = [], 0
            for i in queue:
                if keys[i] == keys[queue[0]] and (not batch or rows + plans[i][0] <= max_batch):
                    batch.append(i)
                    rows += plans[i][0]
            if rows >= max_batch:
                break
            if sent == len(plans) or arrivals[sent] > until:
                now = until  # the first edit waited the whole gathering time
                break
            now = arrivals[sent]
            queue.append(sent)
            sent += 1
        for i in batch:
            queue.remove(i)
        now += costs.begin * len(batch)
        for step in range(len(plans[batch[0]])):  # one key, one step count
            now += costs.call(sum(plans[i][step] for i in batch))
        for i in batch:
            now += costs.finish
            latencies[i] = now - arrivals[i]
    return latencies


def compare(plans: list[list[int]], costs: Costs, max_batch: int, step_max_batch: int, loads, rates,
            draws: int) -> list[dict]:
    """p99 of both policies over ``draws`` arrival draws at each of ``loads`` (fractions of request batching's
    modelled capacity at ``max_batch``, every edit queued at once: the rate the server benchmark sends while it is
    the lower) and each of ``rates`` (edits a second, e.g. a server run's); step batching at ``step_max_batch``."""
    keys = [(request_fields(i)["steps"], request_fields(i)["preset"]) for i in range(len(plans))]
    at_once = np.zeros(len(plans))
    capacity = len(plans) / request_batching(at_once, plans, keys, costs, max_batch).max()
    step_capacity = len(plans) / step_batching(at_once, plans, costs, step_max_batch).max()
    rows = []
    for rate in [load * capacity for load in loads] + list(rates):
        ratios, p99 = [], {"request": [], "step": []}
        for draw in range(draws):
            rng = random.Random(draw)
            arrivals = np.cumsum([rng.expovariate(rate) for _ in plans])
            request = np.percentile(request_batching(arrivals, plans, keys, costs, max_batch), 99)
            step = np.percentile(step_batching(arrivals, plans, costs, step_max_batch), 99)
            p99["request"].append(request)
            p99["step"].append(step)
            ratios.append(step / request)
        rows.append(dict(load=rate / capacity, rate_per_s=rate, capacity_per_s=capacity,
                         step_max_batch=step_max_batch, step_capacity_per_s=step_capacity,
                         request_p99_s=statistics.fmean(p99["request"]), step_p99_s=statistics.fmean(p99["step"]),
                         ratio_mean=statistics.fmean(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                         ratio_median=statistics.median(ratios)))
    return rows


def table(results: dict) -> str:
    """docs/serving.md's table of the model's results."""
    lines = ["| call costs | step rows (capacity) | load (rate) | request p99 | step p99 | "
             "step / request: mean (median, range over draws) |", "|---|---|---|---:|---:|---|"]
    for name, rows in results["curves"].items():
        for r in rows:
            lines.append(f"| {name} | {r['step_max_batch']} ({r['step_capacity_per_s']:.2f}/s) | "
                         f"{r['load']:.0%} ({r['rate_per_s']:.2f}/s) | {r['request_p99_s']:.2f} s | "
                         f"{r['step_p99_s']:.2f} s | {r['ratio_mean']:.2f}x ({r['ratio_median']:.2f}, "
                         f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--backend")
    parser.add_argument("--edits", type=int, default=300,
                        help="edits per arrival draw (the mix of benchmarks.arrivals)")
    parser.add_argument("--draws", type=int, default=20, help="arrival draws per load")
    parser.add_argument("--max-batch", type=int, default=Settings().max_batch)
    parser.add_argument("--step-max-batch", type=int, nargs="+",
                        help="step batching's row limits to model (default: --max-batch), request batching's staying "
                             "at --max-batch")
    parser.add_argument("--loads", type=float, nargs="+", default=LOADS,
                        help="fractions of request batching's modelled capacity")
    parser.add_argument("--rates", type=float, nargs="*", default=[],
                        help="edits a second to model as well (a benchmarks.arrivals run's, to compare with it)")
    parser.add_argument("--json", required=True, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plans, costs = measure(args.model, args.backend, args.edits)
    limits = args.step_max_batch or [args.max_batch]
    curves = {"measured": (costs, limits),  # the flat curve is defined up to max_batch only
              "flat": (costs.flat(args.max_batch), [n for n in limits if n <= args.max_batch])}
    results = dict(machine=device_name("cpu"), cpu=cpu_capability(), versions=versions(), model=args.model,
                   max_batch=args.max_batch, draws=args.draws, edits=args.edits,
                   call_seconds=dict(zip(costs.rows, costs.seconds)), begin_s=costs.begin, finish_s=costs.finish,
                   row_plans=plans,
                   curves={name: [row for step_rows in rows for row in compare(plans, curve, args.max_batch, step_rows,
                                                                               args.loads, args.rates, args.draws)]
                           for name, (curve, rows) in curves.items()})
    write_json_atomic(args.json, results)
    print(table(results))


if __name__ == "__main__":
    main()
