"""Step-level against request-level batching under Poisson arrivals, in one run (``python -m benchmarks.arrivals``).

Each mode gets a fresh ``ip2p serve`` process on loopback serving the same model. Its capacity is its throughput
with 16 clients keeping it busy; the open-loop runs then send edits at Poisson times at 50, 80 and 95% of the
lower of the two capacities (so that both servers are below saturation), each edit drawn from a mix of step
counts (4, 8, 20) and presets (exact, balanced, fast), and record each edit's latency (sent to answered). The long
job: a 4-step edit sent while a 400-step job runs, against the same edit on the idle server. Every answer of the
step-level runs is checked against the library's solo edit with its seed.

``python -m benchmarks.arrivals --json docs/results/FILE.json [--model BUNDLE] [--requests 200]``
"""
from __future__ import annotations

import argparse
import asyncio
import io
import logging
import random
import statistics
import time

import httpx
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.hardware import cpu_capability, device_name, versions
from benchmarks.serving import INSTRUCTIONS, example_png, percentile, serve_process
from engine.files import write_json_atomic
from engine.pipeline import DEFAULT_BUNDLE, EditPipeline
from engine.serving.jobs import Settings

log = logging.getLogger(__name__)
STEPS, PRESETS = (4, 8, 20), ("exact", "balanced", "fast")
LOADS = (0.5, 0.8, 0.95)
MODES = ("request", "step")
LONG_STEPS, SHORT_STEPS = 400, 4


def request_fields(i: int) -> dict[str, str]:
    """Edit ``i`` of the mix: its steps, preset, instruction and seed (the same edit in every run)."""
    rng = random.Random(i)
    return {"instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "seed": str(i), "steps": str(rng.choice(STEPS)),
            "preset": rng.choice(PRESETS)}


async def post(client: httpx.AsyncClient, url: str, png: bytes, fields: dict[str, str]) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = await client.post(f"{url}/v1/edits", data=fields, files={"image": ("in.png", png, "image/png")})
    return time.perf_counter() - start, response


async def closed_loop(url: str, png: bytes, requests: int, clients: int = 16) -> float:
    """Edits per second with ``clients`` clients sending back to back: the server kept busy."""
    queue = list(range(requests))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client():
            while queue:
                _, response = await post(client, url, png, request_fields(queue.pop()))
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return requests / (time.perf_counter() - start)


async def open_loop(url: str, png: bytes, rate: float, requests: int, seed: int) -> dict:
    """``requests`` edits sent at Poisson times of ``rate`` per second, whatever the answers: latencies (with
    each edit's steps), throughput (answers over the time from the first send to the last answer), statuses,
    the answers."""
    rng = random.Random(seed)
    arrivals = np.cumsum([rng.expovariate(rate) for _ in range(requests)])
    latencies, statuses, answers = [], {}, {}
    bar = tqdm(total=requests, desc=f"{rate:.2f} edits/s", leave=False, mininterval=5)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=requests)) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            latency, response = await post(client, url, png, request_fields(i))
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                latencies.append((int(request_fields(i)["steps"]), latency))
                answers[i] = response.content
            bar.update()

        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    bar.close()
    return dict(rate_per_s=rate, requests=requests, statuses=statuses, throughput_per_s=len(answers) / wall,
                latencies_s=latencies, answers=answers) | summary(latencies)


def summary(latencies: list[tuple[int, float]]) -> dict:
    """p50, p99 and mean of (steps, latency) pairs, and p50 and p99 by step count."""
    values = [latency for _, latency in latencies]
    by_steps: dict[str, list[float]] = {}
    for steps, latency in sorted(latencies):
        by_steps.setdefault(str(steps), []).append(latency)
    return dict(p50_s=percentile(values, 50), p99_s=percentile(values, 99),
                mean_s=statistics.fmean(values) if values else float("nan"),
                by_steps={steps: dict(p50_s=percentile(v, 50), p99_s=percentile(v, 99))
                          for steps, v in by_steps.items()})


async def behind_long_job(url: str, png: bytes) -> dict:
    """A 4-step edit on the idle server (median of 5), then the same edit sent while a 400-step job runs."""
    fields = {"instruction": INSTRUCTIONS[0], "seed": "7", "steps": str(SHORT_STEPS)}
    async with httpx.AsyncClient(timeout=600) as client:
        solo = statistics.median([(await post(client, url, png, fields))[0] for _ in range(5)])
        created = await client.post(f"{url}/v1/jobs", files={"image": ("in.png", png, "image/png")},
                                    data={"instruction": INSTRUCTIONS[1], "seed": "8", "steps": str(LONG_STEPS)})
        job = f"{url}/v1/jobs/{created.json()['id']}"
        while (view := (await client.get(job)).json())["steps_done"] < 10:
            if view["state"] != "running" and view["state"] != "queued":
                raise RuntimeError(f"the {LONG_STEPS}-step job ended early: {view}")
            await asyncio.sleep(0.01)
        behind, response = await post(client, url, png, fields)
        response.raise_for_status()
        while (view := (await client.get(job)).json())["state"] == "running":
            await asyncio.sleep(0.05)
    return dict(solo_s=solo, behind_s=behind, ratio=behind / solo, long_job_state=view["state"])


def differing(pipe: EditPipeline, png: bytes, answers: dict[int, bytes]) -> int:
    """Answers whose pixels differ from the library's solo edit with the same settings and seed (0 expected)."""
    image, wrong = Image.open(io.BytesIO(png)), 0
    for i, data in answers.items():
        fields = request_fields(i)
        expected = pipe.edit(image, fields["instruction"], seed=int(fields["seed"]), steps=int(fields["steps"]),
                             preset=fields["preset"]).images[0]
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        wrong += not np.array_equal(got, np.asarray(expected))
    return wrong


def run(model: str, backend: str | None, requests: int, max_batch: int, loads=LOADS,
        request_max_batch: int | None = None, rounds: int = 1) -> dict:
    """Both modes at ``max_batch`` rows a call, or request batching at ``request_max_batch`` where given (each
    policy at its own best setting); the open-loop runs ``rounds`` times, the modes taking turns in alternating
    order (a fresh server each), so that a slower spell of the machine is as likely to fall on either; each round
    its own arrival times, the same for both modes. The long job runs in the first round."""
    load_args = {"model": model, "backend": backend}
    png = example_png(64)
    rows = {"step": max_batch, "request": request_max_batch or max_batch}
    settings = {mode: Settings(max_batch=rows[mode], batching=mode, max_queue=10_000, max_steps=LONG_STEPS,
                               timeout=3600, max_connections=20_000) for mode in MODES}
    capacity = {}
    for mode in MODES:
        with serve_process(load_args, settings[mode]) as url:
            capacity[mode] = asyncio.run(closed_loop(url, png, max(24, requests // 4)))
        log.info("%s batching: capacity %.2f edits/s", mode, capacity[mode])
    base = min(capacity.values())
    pipe = EditPipeline.from_pretrained(model, backend=backend, progress=False)
    runs, long_job = [], {}
    for round_ in range(rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            with serve_process(load_args, settings[mode]) as url:
                for load in loads:
                    result = asyncio.run(open_loop(url, png, load * base, requests, int(load * 100) + 1000 * round_))
                    answers = result.pop("answers")
                    if mode == "step":
                        result["pixels_differing"] = differing(pipe, png, answers)
                    runs.append(dict(mode=mode, load=load, round=round_) | result)
                    log.info("%s batching at %.0f%%, round %d: p50 %.2f s, p99 %.2f s", mode, load * 100, round_,
                             result["p50_s"], result["p99_s"])
                if round_ == 0:
                    long_job[mode] = asyncio.run(behind_long_job(url, png))
                    log.info("%s batching, behind a %d-step job: %s", mode, LONG_STEPS, long_job[mode])
    return dict(machine=device_name("cpu"), cpu=cpu_capability(), versions=versions(), model=model,
                backend=backend or "its own", max_batch=rows, capacity_per_s=capacity, rounds=rounds,
                mix=dict(steps=STEPS, presets=PRESETS, size=64), runs=runs, pooled=pooled(runs), long_job=long_job)


def pooled(runs: list[dict]) -> list[dict]:
    """Each mode and load over all its rounds: the latencies' summary, the mean throughput, each round's p99, and
    (step batching) the answers differing from the library's solo edits."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["load"]), []).append(r)
    return [dict(mode=mode, load=load, rate_per_s=group[0]["rate_per_s"],
                 throughput_per_s=statistics.fmean(r["throughput_per_s"] for r in group),
                 round_p99_s=[r["p99_s"] for r in group],
                 pixels_differing=sum(r["pixels_differing"] for r in group) if mode == "step" else None,
                 statuses={code: sum(r["statuses"].get(code, 0) for r in group)
                           for code in sorted({code for r in group for code in r["statuses"]})})
            | summary([tuple(pair) for r in group for pair in r["latencies_s"]])
            for (mode, load), group in groups.items()]


def table(results: dict) -> str:
    """docs/serving.md's table of one run: each mode and load over its rounds, p99 against request batching's."""
    lines = ["| load | batching | throughput | p50 | p99 (x request's) | p99 of 4- / 20-step edits | rounds' p99 | "
             "answers |", "|---|---|---:|---:|---:|---:|---|---|"]
    request = {r["load"]: r["p99_s"] for r in results["pooled"] if r["mode"] == "request"}
    for r in results["pooled"]:
        ratio = f" ({r['p99_s'] / request[r['load']]:.2f}x)" if r["mode"] != "request" and r["load"] in request else ""
        by_steps = {steps: r["by_steps"].get(steps, {}).get("p99_s", float("nan")) for steps in ("4", "20")}
        answers = ", ".join(f"{n} x {code}" for code, n in r["statuses"].items())
        lines.append(f"| {r['load']:.0%} ({r['rate_per_s']:.2f}/s) | {r['mode']} | {r['throughput_per_s']:.2f}/s | "
                     f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s{ratio} | {by_steps['4']:.2f} / {by_steps['20']:.2f} s "
                     f"| {', '.join(f'{p:.2f}' for p in r['round_p99_s'])} | {answers} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--backend")
    parser.add_argument("--requests", type=int, default=200, help="edits per open-loop run")
    parser.add_argument("--max-batch", type=int, default=Settings().max_batch,
                        help="UNet rows per call, both servers")
    parser.add_argument("--request-max-batch", type=int, help="the request-batching server's rows per call, where "
                        "it should differ from --max-batch")
    parser.add_argument("--loads", type=float, nargs="+", default=LOADS, help="fractions of the capacity")
    parser.add_argument("--rounds", type=int, default=1, help="open-loop runs of each mode, taking turns")
    parser.add_argument("--json", required=True, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("engine.serving").setLevel(logging.WARNING)  # not one line per request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results = run(args.model, args.backend, args.requests, args.max_batch, tuple(args.loads),
                  args.request_max_batch, args.rounds)
    write_json_atomic(args.json, results, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
