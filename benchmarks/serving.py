"""Load, soak and overhead runs of the edit service on loopback (``ip2p bench serve``): real server, real HTTP.

A load run starts ``ip2p serve`` in its own process, drives it with concurrent asyncio clients from this one, and
checks every answer's pixels against the library edit with its seed. The uncontended runs do the same with one
client (stage timings from the answers' Server-Timing headers); the soak run starts the service in this process
(uvicorn in a thread), to read its resident memory.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.hostile import Attacker, attack_summary, server_errors
from engine.pipeline import EditPipeline
from engine.serving.encoders import encode_image
from engine.serving.jobs import Settings
from engine.serving.service import background_server, local_service

log = logging.getLogger(__name__)
INSTRUCTIONS = ("make the circle blue", "turn the square red", "remove the triangle", "make the background yellow")


@dataclass
class Load:
    clients: int = 32
    requests: int = 300
    steps: int = 20
    sizes: tuple[int, ...] = (64,)  # input sides, cycled over requests
    hostile: int = 0  # hostile clients (benchmarks/hostile.py) beside the edit clients, until those are done


def example_png(size: int, fmt: str = "png") -> bytes:
    """The README's example scene at ``size`` pixels a side, as PNG (or ``fmt``) bytes."""
    from importlib import resources

    path = resources.files("engine").joinpath("..", "examples", "shapes.png")
    image = Image.open(str(path)).convert("RGB") if path.is_file() else Image.new("RGB", (64, 64), (90, 160, 220))
    return encode_image(image.resize((size, size), Image.Resampling.LANCZOS), fmt)


@contextmanager
def serve_process(load_args: dict, settings: Settings, ray_replicas: int | None = None):
    """``ip2p serve`` in its own process on a free loopback port, as users run it (so the load's clients do not
    share its interpreter); with ``ray_replicas``, ``ip2p serve --ray`` on a local Ray with that many replicas
    sharing this machine's CPUs. Yields the base URL once ready, stops it with SIGTERM (SIGINT for Ray, which
    then shuts Serve and Ray down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "ip2p.cli", "-q", "serve", load_args["model"], "--port", str(port),
               "--max-batch", str(settings.max_batch), "--batching", settings.batching,
               "--batch-wait-ms", str(settings.batch_wait_ms), "--max-steps", str(settings.max_steps),
               "--timeout", f"{settings.timeout:g}",
               "--max-queue", str(settings.max_queue), "--max-resolution", str(settings.max_resolution),
               "--max-held-mb", f"{settings.max_held_bytes / 2**20:g}", "--read-timeout", f"{settings.read_timeout:g}",
               "--max-connections", str(settings.max_connections)]
    for flag in ("backend", "dtype"):
        if load_args.get(flag):
            command += [f"--{flag}", load_args[flag]]
    if ray_replicas:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        command += ["--ray", "--replicas", str(ray_replicas), "--num-cpus", f"{cpus / ray_replicas:g}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ip2p serve exited: {process.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT if ray_replicas else signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def drive(url: str, load: Load, pngs: dict[int, bytes], progress: bool = True) -> dict:
    """``load.requests`` edits from ``load.clients`` concurrent clients, seed = request index, and
    ``load.hostile`` hostile clients beside them until they are done. Returns statuses, latencies, the answers
    (PNG bytes by seed), the hostile requests' answers by kind, and the server's resident memory before and
    after (its own metric)."""

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(load.requests):
        queue.put_nowait(i)
    latencies, statuses, answers = [], {}, {}
    bar = tqdm(total=load.requests, desc="requests", disable=not progress, leave=False)
    limits = httpx.Limits(max_connections=load.clients, max_keepalive_connections=load.clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one_client():
            while not queue.empty():
                i = queue.get_nowait()
                size = load.sizes[i % len(load.sizes)]
                fields = {"instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "seed": str(i), "steps": str(load.steps)}
                while True:
                    start = time.perf_counter()
                    response = await client.post(f"{url}/v1/edits", data=fields,
                                                 files={"image": ("in.png", pngs[size], "image/png")})
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code != 429:
                        break
                    await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                latencies.append(time.perf_counter() - start)
                if response.status_code == 200:
                    answers[i] = response.content
                bar.update()

        attackers = [Attacker(url, Image.open(io.BytesIO(pngs[load.sizes[0]])).convert("RGB"), seed=i)
                     for i in range(load.hostile)]
        stop = asyncio.Event()
        rss_before = await server_rss_mb(client, url)
        start = time.perf_counter()
        attacks = [asyncio.ensure_future(attacker.run(client, stop)) for attacker in attackers]
        await asyncio.gather(*(one_client() for _ in range(load.clients)))
        wall = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*attacks)
        rss_after = await server_rss_mb(client, url)
    bar.close()
    return dict(wall_s=wall, statuses=statuses, latencies=latencies, answers=answers,
                hostile=attack_summary(attackers), server_rss_mb=[rss_before, rss_after])


async def server_rss_mb(client: httpx.AsyncClient, url: str) -> float:
    """The server process's resident memory from its /metrics (``process_resident_memory_bytes``)."""
    text = (await client.get(f"{url}/metrics")).text
    line = next((line for line in text.splitlines() if line.startswith("process_resident_memory_bytes")), None)
    return float(line.split()[1]) / 2**20 if line else float("nan")


def check_pixels(pipe: EditPipeline, load: Load, pngs: dict[int, bytes], answers: dict[int, bytes]) -> tuple[int, int]:
    """How many answers differ from the library's edit with their seed (0 expected), and by how many levels at
    most."""
    wrong, largest = 0, 0
    for i, png in answers.items():
        size = load.sizes[i % len(load.sizes)]
        expected = pipe.edit(Image.open(io.BytesIO(pngs[size])), INSTRUCTIONS[i % len(INSTRUCTIONS)], seed=i,
                             steps=load.steps).images[0]
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
        difference = int(np.abs(got - np.asarray(expected, dtype=np.int16)).max())
        wrong, largest = wrong + (difference > 0), max(largest, difference)
    return wrong, largest


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def load_run(load_args: dict, settings: Settings, load: Load, verify: bool = True,
             ray_replicas: int | None = None) -> dict:
    """One load run against a fresh ``ip2p serve`` process with ``settings`` (``ray_replicas``: on Ray Serve);
    latency percentiles, throughput, and (``verify``) how many answers differ from the library's edit with their
    seed."""
    pngs = {size: example_png(size) for size in load.sizes}
    with serve_process(load_args, settings, ray_replicas) as url:
        result = asyncio.run(drive(url, load, pngs))
    latencies = result.pop("latencies")
    answers = result.pop("answers")
    summary = dict(max_batch=settings.max_batch, ray_replicas=ray_replicas, clients=load.clients,
                   hostile_clients=load.hostile, hostile=result["hostile"], server_rss_mb=result["server_rss_mb"],
                   requests=load.requests, steps=load.steps, sizes=list(load.sizes), wall_s=result["wall_s"],
                   statuses=result["statuses"], throughput_per_s=len(answers) / result["wall_s"],
                   p50_s=percentile(latencies, 50), p99_s=percentile(latencies, 99), mean_s=statistics.fmean(latencies))
    if verify:
        pipe = EditPipeline.from_pretrained(**load_args, progress=False)
        summary["pixels_differing"], summary["largest_difference"] = check_pixels(pipe, load, pngs, answers)
    return summary


PIPELINE_STAGES = ("preprocess", "text_encode", "image_encode", "denoise", "decode", "postprocess")


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: name;dur=ms, ...`` as seconds by name."""
    stages = {}
    for item in header.split(","):
        name, _, duration = item.strip().partition(";dur=")
        stages[name] = float(duration) / 1000
    return stages


def multipart_body(fields: dict[str, str], upload: bytes, filename: str) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and the file field ``image``, and its content type."""
    boundary = "ip2p-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + upload + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def uncontended(load_args: dict, size: int, steps: int, repeats: int = 20, fmt: str = "png", block: int = 10,
                own_process: bool = True) -> dict:
    """One client, one edit at a time at ``size``: library calls and HTTP requests in alternating blocks of
    ``block`` (the first of each block not counted: the other side's threads may still be busy), so both see
    the same machine. Reports both latencies and the server's overhead per request: the client's latency less
    the pipeline's own stages (which add up to its wall time), i.e. HTTP, upload parsing, image decode, queue,
    image encode and transfer. The upload and the answer are both in ``fmt``. The client is the leanest there
    is (the standard library's http.client, one kept-alive connection per block, the body built once), so
    that what is measured is the server, not a client library's own per-request work; and the server runs in
    its own process as users run it (``own_process=False``: in this one, sharing the client's interpreter)."""
    import http.client

    png = example_png(size, fmt)
    pipe = EditPipeline.from_pretrained(**load_args, progress=False)
    image = Image.open(io.BytesIO(png))
    settings = Settings(max_batch=1, batch_wait_ms=0, max_resolution=max(1024, size))
    fields = {"instruction": INSTRUCTIONS[0], "seed": "0", "steps": str(steps), "resolution": str(size),
              "output_format": fmt}
    body, content_type = multipart_body(fields, png, f"in.{fmt}")
    library, served, overhead, stages = [], [], [], {"read": [], "queue": [], "write": []}
    server = (serve_process(load_args, settings) if own_process
              else background_server(local_service(load_args, settings)))
    with server as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        while len(library) < repeats:
            for i in range(block + 1):
                start = time.perf_counter()
                pipe.edit(image, INSTRUCTIONS[0], seed=0, steps=steps, resolution=size)
                if i:
                    library.append(time.perf_counter() - start)
            client = http.client.HTTPConnection(host, int(port), timeout=600)  # idle ones are closed by the server
            for i in range(block + 1):
                start = time.perf_counter()
                client.request("POST", "/v1/edits", body=body, headers={"Content-Type": content_type})
                response = client.getresponse()
                answer = response.read()
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"the service answered {response.status}: {answer[:200]!r}")
                if not i:
                    continue
                served.append(elapsed)
                timing = server_timing(response.getheader("server-timing"))
                overhead.append(elapsed - sum(timing.get(stage, 0.0) for stage in PIPELINE_STAGES))
                for stage, values in stages.items():
                    values.append(timing[stage])
            client.close()
    return dict(size=size, steps=steps, repeats=len(library), format=fmt, library_p50_s=percentile(library, 50),
                library_p99_s=percentile(library, 99), http_p50_s=percentile(served, 50),
                http_p99_s=percentile(served, 99),
                p50_ratio=percentile(served, 50) / percentile(library, 50),
                p99_ratio=percentile(served, 99) / percentile(library, 99),
                overhead_p50_ms=percentile(overhead, 50) * 1000, overhead_p99_ms=percentile(overhead, 99) * 1000,
                **{f"{stage}_p50_ms": percentile(values, 50) * 1000 for stage, values in stages.items()})


def soak(load_args: dict, settings: Settings, edits: int, sizes: tuple[int, ...], hostile: int = 0) -> dict:
    """Resident memory after warm-up against after ``edits`` more edits of mixed sizes (with ``hostile``
    hostile clients beside them)."""
    pngs = {size: example_png(size) for size in sizes}
    service = local_service(load_args, settings)
    with background_server(service) as url:
        asyncio.run(drive(url, Load(clients=8, requests=50, sizes=sizes), pngs, progress=False))
        before = rss_mb()
        result = asyncio.run(drive(url, Load(clients=8, requests=edits, sizes=sizes, hostile=hostile), pngs))
        after = rss_mb()
    return dict(edits=edits, sizes=list(sizes), rss_after_warmup_mb=before, rss_after_mb=after,
                growth_pct=100 * (after - before) / before, statuses=result["statuses"], hostile_clients=hostile,
                hostile=result["hostile"], max_held_mb=settings.max_held_bytes / 2**20)


def attacks_text(summary: dict[str, dict[str, int]]) -> str:
    """``bomb 12 x 400; big_job 3 x 202, 9 x 429; ...``"""
    return "; ".join(f"{kind} " + ", ".join(f"{n} x {status}" for status, n in counts.items())
                     for kind, counts in summary.items() if counts)


def differing(run: dict) -> str:
    """A load run's answers that differ from the library's edit, with the largest difference where any does."""
    if "pixels_differing" not in run:
        return "not checked"
    count, largest = run["pixels_differing"], run.get("largest_difference")
    return f"{count} (at most {largest} level{'s' * (largest > 1)})" if count and largest is not None else str(count)


def serving_table(results: dict) -> str:
    """The markdown of one ``ip2p bench serve`` run (docs/serving.md)."""
    cpu = results["cpu"]
    model = results.get("model") or {}
    lines = [f"{results['machine']}, torch capability {cpu['torch_capability']}, native bf16 {cpu['native_bf16']}; "
             f"model {Path(model.get('model') or 'shapes-onnx').name}, backend {model.get('backend') or 'its own'}, "
             f"dtype {model.get('dtype') or 'its own'} (torch {results['versions'].get('torch')}, onnxruntime "
             f"{results['versions'].get('onnxruntime')}).", "",
             "| load run | requests | answers | throughput | p50 | p99 | answers differing from the library's |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for run in results["load"]:
        answers = ", ".join(f"{n} x {code}" for code, n in sorted(run["statuses"].items()))
        server = f"Ray Serve, {run['ray_replicas']} replicas, " if run.get("ray_replicas") else ""
        lines.append(f"| {server}max batch {run['max_batch']}, {run['clients']} clients, {run['steps']} steps, "
                     f"{'/'.join(map(str, run['sizes']))} px | {run['requests']} | {answers} | "
                     f"{run['throughput_per_s']:.2f} edits/s | {run['p50_s']:.2f} s | {run['p99_s']:.2f} s | "
                     f"{differing(run)} |")
    hostile = [run for run in results["load"] if run.get("hostile_clients")]
    if hostile:
        lines += ["", "| load run, with hostile clients | hostile requests: answers by kind | 5xx or no answer | "
                  "server memory before / after |", "|---|---|---:|---:|"]
        for run in hostile:
            lines.append(f"| max batch {run['max_batch']}, {run['hostile_clients']} hostile beside {run['clients']} | "
                         f"{attacks_text(run['hostile'])} | {server_errors(run['hostile'])} | "
                         f"{run['server_rss_mb'][0]:.0f} / {run['server_rss_mb'][1]:.0f} MB |")
    if len(results["load"]) > 1:
        first = results["load"][0]
        gains = ", ".join(f"max batch {run['max_batch']} {run['throughput_per_s'] / first['throughput_per_s']:.2f}x"
                          for run in results["load"][1:])
        lines += ["", f"Throughput against max batch {first['max_batch']}: {gains}."]
    if "uncontended" not in results:
        return "\n".join(lines)
    lines += ["", "| one client, one edit at a time | edits | library p50 / p99 | HTTP p50 / p99 | HTTP / library p99 | "
              "server overhead p50 / p99 | read / queue / write p50 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for run in [results["uncontended"], *results.get("overhead", [])]:
        lines.append(f"| {run['size']} px, {run['steps']} steps, {run['format']} in and out | {run['repeats']} | "
                     f"{run['library_p50_s'] * 1000:.0f} / {run['library_p99_s'] * 1000:.0f} ms | "
                     f"{run['http_p50_s'] * 1000:.0f} / {run['http_p99_s'] * 1000:.0f} ms | {run['p99_ratio']:.3f} | "
                     f"{run['overhead_p50_ms']:.1f} / {run['overhead_p99_ms']:.1f} ms | "
                     f"{run['read_p50_ms']:.1f} / {run['queue_p50_ms']:.1f} / {run['write_p50_ms']:.1f} ms |")
    if "soak" in results:
        soak_run = results["soak"]
        answers = ", ".join(f"{n} x {code}" for code, n in sorted(soak_run["statuses"].items()))
        lines += ["", f"Soak: {soak_run['edits']} edits of {'/'.join(map(str, soak_run['sizes']))} px ({answers}): "
                      f"resident memory {soak_run['rss_after_warmup_mb']:.0f} MB after warm-up, "
                      f"{soak_run['rss_after_mb']:.0f} MB after ({soak_run['growth_pct']:+.2f}%)."]
        if soak_run.get("hostile_clients"):
            lines[-1] += (f" With {soak_run['hostile_clients']} hostile clients beside it (--max-held-mb "
                          f"{soak_run['max_held_mb']:g}): {attacks_text(soak_run['hostile'])}; "
                          f"{server_errors(soak_run['hostile'])} answered 5xx or not at all.")
    return "\n".join(lines)
