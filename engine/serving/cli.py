"""``ip2p serve``: the edit service on this machine (uvicorn), or on Ray Serve with ``--ray``."""
from __future__ import annotations

import argparse
import logging
import os
import signal

from engine.errors import InputError
from engine.serving.interface import API_KEY_ENV

log = logging.getLogger("engine.serving")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_model_options, add_torch_options

    parser.add_argument("model", nargs="?", help="model folder, bundle or hub id (default: $IP2P_MODEL, else the "
                        "shipped shapes model: its ONNX bundle where torch is not installed)")
    add_model_options(parser)
    add_torch_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=12,
                        help="UNet rows per call, guidance branches counted (an edit at both scales takes 3; "
                        "default 12)")
    parser.add_argument("--batching", choices=("step", "request"), default="step",
                        help="step (default): queued edits join the running ones at every denoising step; request: a "
                        "batch of one size and settings runs to its end before the next starts")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="request batching: how long the first request of a batch waits for others (default 10)")
    parser.add_argument("--max-queue", type=int, default=64, help="queued edits before 429 (default 64)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request, queue included; 504 past it")
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit; 413 past it")
    parser.add_argument("--max-pixels", type=int, default=16_000_000, help="input and edit pixel limit")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--max-resolution", type=int, default=1024)
    parser.add_argument("--result-ttl", type=float, default=600.0, help="seconds a finished job's result is kept")
    parser.add_argument("--max-results", type=int, default=256, help="finished jobs kept at most")
    parser.add_argument("--max-held-mb", type=float, default=1024.0,
                        help="images held by queued and finished jobs, decoded inputs and kept answers; 429 past it "
                        "(the oldest finished results are let go first)")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client may take to send its request body; 408 past it")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="requests in progress at once (health checks exempt); 503 past it")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds queued work may finish on SIGTERM")
    parser.add_argument("--warmup", type=warmup_sizes, default=(), metavar="WxH[,WxH...]",
                        help="edit sizes to warm up before /readyz (every UNet row count at each: compilation and "
                        "graph capture happen then; default: the model's own size)")
    parser.add_argument("--api-key", help=f"require this key (or set ${API_KEY_ENV}); health endpoints stay open")
    parser.add_argument("--ray", action="store_true", help="run on Ray Serve (a local Ray cluster unless one is running)")
    parser.add_argument("--replicas", type=int, default=1, help="--ray: model replicas")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="--ray: CPUs per model replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="--ray: GPUs per model replica (a fraction allowed)")


def settings_from(args: argparse.Namespace):
    from engine.serving.jobs import Settings

    for name in ("max_batch", "max_queue", "max_steps", "max_resolution", "max_results", "max_pixels",
                 "max_connections"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("timeout", "max_body_mb", "max_held_mb", "read_timeout"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.batch_wait_ms < 0 or args.drain_timeout < 0:
        raise InputError("--batch-wait-ms and --drain-timeout must not be negative")
    return Settings(max_batch=args.max_batch, batching=args.batching, batch_wait_ms=args.batch_wait_ms,
                    max_queue=args.max_queue, timeout=args.timeout, max_body_bytes=int(args.max_body_mb * 2**20),
                    max_pixels=args.max_pixels,
                    max_steps=args.max_steps, max_resolution=args.max_resolution, result_ttl=args.result_ttl,
                    max_results=args.max_results, max_held_bytes=int(args.max_held_mb * 2**20),
                    read_timeout=args.read_timeout, max_connections=args.max_connections,
                    drain_timeout=args.drain_timeout, warmup=args.warmup,
                    api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)


def warmup_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"512x512,768x512" -> ((512, 512), (768, 512))."""
    sizes = []
    for part in text.split(","):
        width, sep, height = part.strip().lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise argparse.ArgumentTypeError(f"sizes are WIDTHxHEIGHT pixels such as 512x512, got {part!r}")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


def run_serve(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    from engine.cli import torch_options

    load = dict(model=args.model, backend=args.backend, device=args.device, dtype=args.dtype, variant=args.variant,
                backend_options=torch_options(args))
    if args.ray:
        from engine.extras import import_extra

        ray_app = import_extra("engine.serving.ray_app", "ip2p serve --ray")
        ray_app.serve_locally(load, settings, host=args.host, port=args.port, replicas=args.replicas,
                              num_cpus=args.num_cpus, num_gpus=args.num_gpus)
        return
    from engine.serving.service import http_server, local_service

    service = local_service(load, settings)
    log.info("serving on http://%s:%d (%s batching, %d UNet rows per call, queue %d)", args.host, args.port,
             settings.batching, settings.max_batch, settings.max_queue)
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down; a drained shutdown is a clean exit, not a kill
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    http_server(service, args.host, args.port).run()
    if service.failure is not None:  # its warm-up failed: the error is the command's
        raise service.failure
    log.info("stopped")


COMMANDS = {"serve": (add_serve_arguments, run_serve)}
